"""The Flask extension: configuration, per-app state and template helpers."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ParamSpec, overload

from flask import Flask

from . import actions
from .registry import LINGER, SSERegistry
from .response import DatastarResponse, StreamDecorator, StreamView, sse_stream
from .signals import DEFAULT_MAX_SIGNALS_BYTES
from .stream import Hook, Stream, StreamConfig

if TYPE_CHECKING:
    from .bus import Bus

__all__ = ["DatastarConfig", "FlaskDatastar"]

P = ParamSpec("P")


#: Every configuration key with its default.
DEFAULTS: dict[str, Any] = {
    "DATASTAR_HEARTBEAT": 15.0,
    "DATASTAR_MAX_BACKLOG": 64 * 1024,
    "DATASTAR_DIRECT_WRITES": True,
    "DATASTAR_SEND_TIMEOUT": 30.0,
    "DATASTAR_MAX_SIGNALS_BYTES": DEFAULT_MAX_SIGNALS_BYTES,
    "DATASTAR_MAX_STREAMS": None,
    "DATASTAR_JS_URL": None,
    "DATASTAR_REDIS_URL": None,
}


@dataclass(frozen=True)
class DatastarConfig:
    """The ``DATASTAR_*`` settings of one app, read once by :meth:`FlaskDatastar.init_app`."""

    heartbeat: float
    max_backlog: int
    direct_writes: bool
    send_timeout: float
    max_signals_bytes: int
    max_streams: int | None
    js_url: str | None
    redis_url: str | None

    @classmethod
    def from_mapping(cls, config: Any) -> DatastarConfig:
        def number(key: str, kind: type, minimum: float) -> Any:
            value = config[key]
            try:
                value = kind(value)
            except (TypeError, ValueError):
                raise ValueError(f"{key} must be a number, not {config[key]!r}.") from None
            if value < minimum:
                raise ValueError(f"{key} must be at least {minimum}, not {value!r}.")
            return value

        max_streams = config["DATASTAR_MAX_STREAMS"]
        return cls(
            heartbeat=number("DATASTAR_HEARTBEAT", float, 0),
            max_backlog=number("DATASTAR_MAX_BACKLOG", int, 1024),
            direct_writes=_boolean(config["DATASTAR_DIRECT_WRITES"], "DATASTAR_DIRECT_WRITES"),
            send_timeout=number("DATASTAR_SEND_TIMEOUT", float, 0.1),
            max_signals_bytes=number("DATASTAR_MAX_SIGNALS_BYTES", int, 1),
            max_streams=None if max_streams is None else number("DATASTAR_MAX_STREAMS", int, 1),
            js_url=config["DATASTAR_JS_URL"] or None,
            redis_url=config["DATASTAR_REDIS_URL"] or None,
        )


def _boolean(value: Any, key: str) -> bool:
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off", ""}:
            return False
        raise ValueError(f"{key} must be true or false, not {value!r}.")
    return bool(value)


@dataclass
class _State:
    extension: FlaskDatastar
    config: DatastarConfig
    stream_config: StreamConfig
    bus: Bus | None = None
    #: Weak: a registry that nothing uses any more (no reference from the application,
    #: no stream, no broadcaster thread, no bus subscription) is collected.
    registries: weakref.WeakValueDictionary[str, SSERegistry] = field(
        default_factory=weakref.WeakValueDictionary
    )
    registries_lock: threading.Lock = field(default_factory=threading.Lock)


class FlaskDatastar:
    """Datastar for a Flask app: streams, signals, registries and template helpers.

    ::

        datastar = FlaskDatastar(app)      # or FlaskDatastar() + init_app(app)

    The options are defaults for the app's ``DATASTAR_*`` configuration keys
    (``heartbeat=5`` for ``DATASTAR_HEARTBEAT``); a key set in the config wins.
    The config is read once, in :meth:`init_app`. One instance can serve
    several apps; each keeps its state in ``app.extensions["datastar"]``.

    :param app: the app to set up now.
    :param options: defaults for the ``DATASTAR_*`` keys, in lower case
        without the prefix.
    """

    def __init__(self, app: Flask | None = None, **options: Any) -> None:
        unknown = [name for name in options if f"DATASTAR_{name.upper()}" not in DEFAULTS]
        if unknown:
            known = ", ".join(key[len("DATASTAR_") :].lower() for key in DEFAULTS)
            raise TypeError(f"Unknown FlaskDatastar option(s) {unknown}; known: {known}.")
        self.options = options
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Register the extension on *app* and read its ``DATASTAR_*`` configuration.

        :param app: the Flask app.
        :raises RuntimeError: an instance was already registered on this app.
        """
        if "datastar" in app.extensions:
            raise RuntimeError(
                "A 'FlaskDatastar' instance has already been registered on this Flask app."
                " Import and use that instance instead."
            )
        for key, default in DEFAULTS.items():
            app.config.setdefault(key, self.options.get(key[len("DATASTAR_") :].lower(), default))
        config = DatastarConfig.from_mapping(app.config)
        state = _State(
            extension=self,
            config=config,
            stream_config=StreamConfig(
                heartbeat=config.heartbeat,
                max_backlog=config.max_backlog,
                direct_writes=config.direct_writes,
                send_timeout=config.send_timeout,
            ),
        )
        if config.redis_url:
            from .bus import RedisBus

            # One bus per app: its listener thread starts in a worker only when a
            # registry of the app gets its first stream there.
            state.bus = RedisBus(config.redis_url)
        app.extensions["datastar"] = state
        app.jinja_env.globals.update(
            datastar_url=actions.datastar_url,
            sse_get=actions.sse_get,
            sse_post=actions.sse_post,
            sse_put=actions.sse_put,
            sse_patch=actions.sse_patch,
            sse_delete=actions.sse_delete,
            # datastar-py's data-* builder; datastar-py is imported when first used.
            data=actions.attribute_generator,
        )

    @staticmethod
    def _state(app: Flask) -> _State:
        try:
            state: _State = app.extensions["datastar"]
        except KeyError:
            raise RuntimeError(
                "The 'FlaskDatastar' extension is not registered on this Flask app."
                " Did you forget to call 'init_app'?"
            ) from None
        return state

    def config(self, app: Flask) -> DatastarConfig:
        """Return the settings *app* runs with.

        :param app: an app this extension was registered on.
        """
        return self._state(app).config

    def registry(
        self,
        app: Flask,
        name: str = "default",
        *,
        on_resync: Callable[[Stream], object] | None = None,
        linger: float = LINGER,
    ) -> SSERegistry:
        """Return *app*'s registry called *name*, created on first use and joined to its bus.

        With ``DATASTAR_REDIS_URL`` set, the registry reaches the streams of
        every process serving the app; a process that only publishes (a CLI
        command, a task worker) just calls ``registry.broadcast(...)``.

        Names may be made on the fly (one registry per chat room, per user):
        as long as the application holds a registry, or it has streams, work
        queued or a bus subscription, this returns that same object for its
        name; one that nothing uses any more is forgotten and collected, so
        its thread and its Redis subscription do not outlive it (see
        *linger*), and the next call makes a new one. Safe to call from any
        thread.

        :param app: an app this extension was registered on.
        :param name: the registry's topic.
        :param on_resync: see :class:`~flask_datastar.SSERegistry`; it runs in
            an app context of *app* (the bus calls it from its own thread).
            Only the call that creates the registry sets it: pass it on every
            call for a name whose registry may have been collected meanwhile.
        :param linger: see :class:`~flask_datastar.SSERegistry`; only the call
            that creates the registry sets it.
        """
        state = self._state(app)
        with state.registries_lock:
            registry = state.registries.get(name)
            if registry is None:
                resync = None
                if on_resync is not None:
                    hook = on_resync

                    def resync(gen: Stream) -> object:
                        with app.app_context():
                            return hook(gen)

                registry = SSERegistry(name, bus=state.bus, on_resync=resync, linger=linger)
                state.registries[name] = registry
        return registry

    def bus(self, app: Flask) -> Bus | None:
        """Return the bus *app*'s registries publish through, or ``None`` without one.

        With ``DATASTAR_REDIS_URL`` it is a :class:`~flask_datastar.bus.RedisBus`;
        call its ``close()`` when the app is discarded (in tests).

        :param app: an app this extension was registered on.
        """
        return self._state(app).bus

    @overload
    def sse(self, view: StreamView[P], /) -> Callable[P, DatastarResponse]: ...
    @overload
    def sse(
        self, *, on_connect: Hook | None = None, on_disconnect: Hook | None = None
    ) -> StreamDecorator: ...
    def sse(
        self,
        view: StreamView[Any] | None = None,
        *,
        on_connect: Hook | None = None,
        on_disconnect: Hook | None = None,
    ) -> Any:
        """Decorate a view as a stream handler: ``@datastar.sse(on_connect=...)``.

        The same as :func:`~flask_datastar.sse_stream`.
        """
        decorate = sse_stream(on_connect=on_connect, on_disconnect=on_disconnect)
        return decorate(view) if view is not None else decorate
