"""The Flask extension: configuration, per-app state and template helpers."""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast, overload

from flask import Flask, current_app, has_app_context

from . import actions, client, compression, guards, scheduler
from .registry import LINGER, SSERegistry
from .replay import ReplayLog
from .response import (
    Authorize,
    Compress,
    DatastarResponse,
    StreamDecorator,
    StreamView,
    sse_stream,
)
from .signals import DEFAULT_MAX_SIGNALS_BYTES
from .stream import Hook, Stream, StreamConfig

if TYPE_CHECKING:
    from .bus import Bus

__all__ = ["DatastarConfig", "FlaskDatastar", "Periodic", "RegistryHandle"]

P = ParamSpec("P")
T = TypeVar("T")

#: The registry in which every stream that has an identity is filed, so that
#: :meth:`FlaskDatastar.revoke` reaches it in every process.
IDENTITY_REGISTRY = "flask_datastar.identities"

#: Who opens a stream: called in the view, returns a user id or ``None``.
IdentityLoader = Callable[[], Any]
#: Whether an identity may open a stream (topic ``None``) or join a topic.
Authorizer = Callable[[Any, "str | None"], object]


def _no_resync(gen: Stream) -> None:
    """The identity registry sends nothing: the application's registries resync."""


#: Every configuration key with its default.
DEFAULTS: dict[str, Any] = {
    "DATASTAR_HEARTBEAT": 15.0,
    "DATASTAR_MAX_BACKLOG": 64 * 1024,
    "DATASTAR_DIRECT_WRITES": True,
    "DATASTAR_SEND_TIMEOUT": 30.0,
    "DATASTAR_MAX_SIGNALS_BYTES": DEFAULT_MAX_SIGNALS_BYTES,
    "DATASTAR_MAX_STREAMS": None,
    "DATASTAR_CLIENT_SHARE": 0.5,
    "DATASTAR_RELEASE_THREADS": True,
    "DATASTAR_SCHEDULER_THREADS": 2,
    "DATASTAR_SLOW_STEP": 0.5,
    "DATASTAR_MAX_LIFETIME": None,
    "DATASTAR_RETRY": None,
    "DATASTAR_JS_URL": None,
    "DATASTAR_JS_INTEGRITY": None,
    "DATASTAR_REDIS_URL": None,
    "DATASTAR_REDIS": None,
    "DATASTAR_CSRF": True,
    "DATASTAR_CSRF_EXEMPT": (),
    "DATASTAR_TRUSTED_ORIGINS": (),
    "DATASTAR_SELF_CHECK": True,
    "DATASTAR_SELF_CHECK_IGNORE": (),
    # Compression (flask_datastar.compression): True is zstd, gzip, br, where installed.
    "DATASTAR_COMPRESSION": True,
    "DATASTAR_COMPRESSION_WINDOW": compression.DEFAULT_WINDOW,
}


@dataclass(frozen=True)
class DatastarConfig:
    """The ``DATASTAR_*`` settings of one app, read once by :meth:`FlaskDatastar.init_app`.

    ``js_url`` and ``js_integrity`` are the values at that moment, checked there;
    :func:`~flask_datastar.datastar_script` and :func:`~flask_datastar.datastar_url`
    read those two keys from ``app.config`` again on every call.
    """

    heartbeat: float
    max_backlog: int
    direct_writes: bool
    send_timeout: float
    max_signals_bytes: int
    max_streams: int | None
    js_url: str | None
    js_integrity: str | None
    redis_url: str | None
    #: ``DATASTAR_REDIS``: the application's own redis-py client or pool, or a function
    #: returning one.
    redis: Any = None
    #: ``"all"``, ``"signals"`` or ``"off"``: see :mod:`flask_datastar.guards`.
    csrf: guards.CSRFMode = "all"
    #: Endpoint and blueprint names the CSRF check skips.
    csrf_exempt: frozenset[str] = frozenset()
    #: Other origins (``scheme://host[:port]``) whose pages may send commands.
    trusted_origins: frozenset[str] = frozenset()
    #: The share of a process's streams one client (identity, else address) may hold.
    client_share: float = 0.5
    #: Streams on the direct path give their server thread back once they first pause.
    release_threads: bool = True
    #: The scheduler's pool threads, and the seconds after which a step is slow.
    scheduler_threads: int = 2
    slow_step: float = 0.5
    #: Seconds after which a stream is ended so that its client reconnects (jittered).
    max_lifetime: float | None = None
    #: The range (milliseconds) of the reconnection delay each stream tells its client.
    retry: tuple[int, int] | None = None
    #: Whether the deployment self-check runs (see :mod:`flask_datastar.selfcheck`).
    self_check: bool = True
    #: Names of self-check traps not to warn about.
    self_check_ignore: frozenset[str] = frozenset()
    #: The encodings streams may be compressed with, most preferred first (empty: off).
    compression: tuple[str, ...] = ()
    #: The base-2 logarithm of each stream compressor's window.
    compression_window_bits: int = 12

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
            js_integrity=_integrity(config["DATASTAR_JS_INTEGRITY"]),
            redis_url=config["DATASTAR_REDIS_URL"] or None,
            redis=config["DATASTAR_REDIS"],
            csrf=guards.parse_csrf_mode(config["DATASTAR_CSRF"]),
            csrf_exempt=guards.parse_names(config["DATASTAR_CSRF_EXEMPT"]),
            trusted_origins=guards.parse_origins(config["DATASTAR_TRUSTED_ORIGINS"]),
            client_share=_share(number("DATASTAR_CLIENT_SHARE", float, 0)),
            release_threads=_boolean(
                config["DATASTAR_RELEASE_THREADS"], "DATASTAR_RELEASE_THREADS"
            ),
            scheduler_threads=number("DATASTAR_SCHEDULER_THREADS", int, 1),
            slow_step=number("DATASTAR_SLOW_STEP", float, 0.001),
            max_lifetime=None
            if config["DATASTAR_MAX_LIFETIME"] is None
            else number("DATASTAR_MAX_LIFETIME", float, 1),
            retry=_retry_range(config["DATASTAR_RETRY"]),
            self_check=_boolean(config["DATASTAR_SELF_CHECK"], "DATASTAR_SELF_CHECK"),
            self_check_ignore=_check_names(config["DATASTAR_SELF_CHECK_IGNORE"]),
            compression=compression.parse_compression(config["DATASTAR_COMPRESSION"]),
            compression_window_bits=compression.parse_window(config["DATASTAR_COMPRESSION_WINDOW"]),
        )


def _retry_range(value: Any) -> tuple[int, int] | None:
    """Read ``DATASTAR_RETRY``: ``None``, milliseconds, or ``[low, high]`` (or ``"low,high"``)."""
    if value is None or value == "":
        return None
    parts = value.split(",") if isinstance(value, str) else value
    if isinstance(parts, (int, float)):
        parts = [parts, parts]
    try:
        low, high = (int(part) for part in parts)
    except (TypeError, ValueError):
        raise ValueError(
            f"DATASTAR_RETRY must be milliseconds or a [low, high] range of them, such as"
            f" [1000, 5000], not {value!r}."
        ) from None
    if not 0 < low <= high:
        raise ValueError(f"DATASTAR_RETRY needs 0 < low <= high milliseconds, not {value!r}.")
    return low, high


def _share(value: float) -> float:
    if not 0 < value <= 1:
        raise ValueError(
            f"DATASTAR_CLIENT_SHARE must be above 0 and at most 1 (1 turns the fair share"
            f" off), not {value!r}."
        )
    return value


def _integrity(value: Any) -> str | None:
    # Checked here so that a wrong hash fails at start-up, not in the first page.
    if not value:
        return None
    return client.validate_integrity(str(value))


def _check_names(value: Any) -> frozenset[str]:
    from .selfcheck import CHECKS

    names = frozenset([value] if isinstance(value, str) else value or ())
    unknown = sorted(str(name) for name in names - set(CHECKS))
    if unknown:
        raise ValueError(
            f"DATASTAR_SELF_CHECK_IGNORE names unknown checks {unknown}; the checks are"
            f" {', '.join(CHECKS)}."
        )
    return names


def _boolean(value: Any, key: str) -> bool:
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off", ""}:
            return False
        raise ValueError(f"{key} must be true or false, not {value!r}.")
    return bool(value)


def _unproxied(app: Flask) -> Flask:
    """Return the app itself when *app* is the :data:`flask.current_app` proxy.

    What outlives the call (a registry's ``on_resync``, run by the bus's own
    thread; a handle's table of apps) must hold the app, not a proxy that
    points at nothing outside the context.
    """
    get = getattr(app, "_get_current_object", None)
    return app if get is None else cast(Flask, get())


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

    # Set by the decorators below; class-level defaults, one per instance once set.
    _identity_function: IdentityLoader | None = None
    _authorizer: Authorizer | None = None

    def __init__(self, app: Flask | None = None, **options: Any) -> None:
        unknown = [name for name in options if f"DATASTAR_{name.upper()}" not in DEFAULTS]
        if unknown:
            known = ", ".join(key[len("DATASTAR_") :].lower() for key in DEFAULTS)
            raise TypeError(f"Unknown FlaskDatastar option(s) {unknown}; known: {known}.")
        self.options = options
        # Weak: a handle made on the fly and dropped is not bound to later apps.
        self._handles: weakref.WeakSet[RegistryHandle] = weakref.WeakSet()
        self._handles_lock = threading.Lock()
        self._periodic: list[Periodic] = []
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Register the extension on *app* and read its ``DATASTAR_*`` configuration.

        The registries of the handles declared so far
        (:meth:`registry_handle`) are created for *app* here.

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
                release_threads=config.release_threads,
                max_lifetime=config.max_lifetime,
                retry=config.retry,
            ),
        )
        scheduler.configure(
            threads=config.scheduler_threads,
            max_threads=max(32, config.scheduler_threads),
            slow_step=config.slow_step,
        )
        if config.redis_url or config.redis is not None:
            from .bus import RedisBus

            if config.redis_url and config.redis is not None:
                raise ValueError(
                    "Set DATASTAR_REDIS_URL or DATASTAR_REDIS (a redis-py client), not both."
                )
            # One bus per app: its listener thread starts in a worker only when a
            # registry of the app gets its first stream there.
            state.bus = RedisBus(config.redis_url, client=config.redis)
        app.extensions["datastar"] = state
        if config.csrf == "all":
            # With "signals", read_signals() alone checks.
            app.before_request(guards.check_csrf)
        app.before_request(self._start_periodic)
        app.cli.add_command(client.cli)
        app.jinja_env.globals.update(
            datastar_url=client.datastar_url,
            datastar_script=client.datastar_script,
            sse_get=actions.sse_get,
            sse_post=actions.sse_post,
            sse_put=actions.sse_put,
            sse_patch=actions.sse_patch,
            sse_delete=actions.sse_delete,
            peek=actions.peek,
            set_all=actions.set_all,
            toggle_all=actions.toggle_all,
            # datastar-py's data-* builder; datastar-py is imported when first used.
            data=actions.attribute_generator,
        )
        # Now, with each handle's options, before a view could make one without them.
        with self._handles_lock:
            handles = list(self._handles)
        for handle in handles:
            handle.for_app(app)

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

    # -- who listens -------------------------------------------------------------------

    def identity_loader(self, fn: IdentityLoader) -> IdentityLoader:
        """Declare how to tell who opens a stream: ``@datastar.identity_loader``.

        *fn* is called with no argument once per stream, in the view that
        opens it (the request, the session and Flask-Login's ``current_user``
        are those of that request), and returns a user id, or ``None`` for an
        anonymous client::

            @datastar.identity_loader
            def identity():
                return current_user.get_id() if current_user.is_authenticated else None

        The result is the stream's :attr:`~flask_datastar.Stream.identity` for
        its whole life (it is never read again from a later request);
        :meth:`SSERegistry.send_to_identity
        <flask_datastar.SSERegistry.send_to_identity>` reaches the streams of
        one identity and :meth:`revoke` ends them, in every process. Return
        something hashable, and a string or a number with a bus.

        :param fn: the loader.
        :return: *fn*, unchanged.
        """
        self._identity_function = fn
        return fn

    def authorizer(self, fn: Authorizer) -> Authorizer:
        """Declare who may listen: ``@datastar.authorizer``, for every stream and topic of the app.

        *fn* is called as ``fn(identity, None)`` in the view of every stream,
        before ``on_connect`` and before any byte is sent, and as
        ``fn(identity, topic)`` whenever a stream joins a topic of one of the
        extension's registries (``register(gen, topics=...)``,
        ``join(gen, topic)``). A false answer refuses: a 401 when the identity
        is ``None``, a 403 otherwise, with no event. *fn* may also
        ``abort()`` with a status of its own. ``flask.request`` is the
        stream's request in both cases.

        :param fn: the check.
        :return: *fn*, unchanged.
        """
        self._authorizer = fn
        return fn

    def _load_identity(self) -> Any:
        loader = self._identity_function
        if loader is None:
            return None
        identity = loader()
        try:
            hash(identity)
        except TypeError:
            raise TypeError(
                f"The identity loader returned {type(identity).__name__}, which is not"
                " hashable: return a user id (a string or a number), or None."
            ) from None
        return identity

    def _authorize_topic(self, identity: Any, topic: str) -> object:
        # Read at each call: the authorizer may be declared after the registry exists.
        authorizer = self._authorizer
        return True if authorizer is None else authorizer(identity, topic)

    def _identity_registry(self, app: Flask) -> SSERegistry:
        return self.registry(app, IDENTITY_REGISTRY, on_resync=_no_resync)

    def revoke(
        self,
        app: Flask,
        identity: Any,
        *,
        event: str | bytes | None = None,
        reconnect: bool = True,
    ) -> None:
        """End every stream of *identity* of *app*, in every process, whatever its registries.

        For a logout or a lost account: change the state first (clear the
        session, withdraw the permission), then call this. See
        :meth:`SSERegistry.revoke <flask_datastar.SSERegistry.revoke>` for
        *event* and *reconnect*; to end the streams of a topic, call
        ``registry.revoke(topic=...)`` on the registry they joined it in.

        :param app: an app this extension was registered on, or
            :data:`flask.current_app`.
        :param identity: the identity, as the identity loader returned it.
        :param event: an event to send to those streams before they end.
        :param reconnect: end them abruptly (the tabs reconnect and are
            checked again; a refusal stops them) or cleanly.
        :raises flask_datastar.BusError: the bus did not take the message.
        """
        if identity is None:
            raise ValueError("'revoke' needs an identity; anonymous streams have none.")
        self._identity_registry(app).revoke(identity=identity, event=event, reconnect=reconnect)

    def registry(
        self,
        app: Flask,
        name: str = "default",
        *,
        on_resync: Callable[[Stream], object] | None = None,
        linger: float = LINGER,
        replay: ReplayLog | None = None,
    ) -> SSERegistry:
        """Return *app*'s registry called *name*, created on first use and joined to its bus.

        With ``DATASTAR_REDIS_URL`` (or ``DATASTAR_REDIS``) set, the registry reaches the streams of
        every process serving the app; a process that only publishes (a CLI
        command, a task worker) just calls ``registry.broadcast(...)``.

        Names may be made on the fly (one registry per chat room, per user):
        as long as the application holds a registry, or it has streams, work
        queued or a bus subscription, this returns that same object for its
        name; one that nothing uses any more is forgotten and collected, so
        its thread and its Redis subscription do not outlive it (see
        *linger*), and the next call makes a new one. Safe to call from any
        thread.

        :param app: an app this extension was registered on, or
            :data:`flask.current_app`.
        :param name: the registry's topic.
        :param on_resync: see :class:`~flask_datastar.SSERegistry`; it runs in
            an app context of *app* (the bus calls it from its own thread).
            Only the call that creates the registry sets it: pass it on every
            call for a name whose registry may have been collected meanwhile.
        :param linger: see :class:`~flask_datastar.SSERegistry`; only the call
            that creates the registry sets it.
        :param replay: a :class:`~flask_datastar.ReplayLog`: the
            registry numbers its events and keeps them, so a tab that reconnects
            with ``Last-Event-ID`` gets what it missed (see :doc:`resume`). Only
            the call that creates the registry sets it.
        """
        app = _unproxied(app)
        state = self._state(app)
        with state.registries_lock:
            registry = state.registries.get(name)
            if registry is None:
                resync = None
                if on_resync is not None:
                    hook = on_resync
                    # Weak: a handle holds its registries for as long as their apps
                    # live, and a registry holding its app would keep both forever.
                    app_ref = weakref.ref(app)

                    def resync(gen: Stream) -> object:
                        bound = app_ref()
                        if bound is None:
                            return None  # the app is gone, and with it its streams
                        with bound.app_context():
                            return hook(gen)

                registry = SSERegistry(
                    name,
                    bus=state.bus,
                    on_resync=resync,
                    linger=linger,
                    authorize=self._authorize_topic,
                    replay=replay,
                )
                state.registries[name] = registry
        return registry

    def registry_handle(
        self,
        name: str = "default",
        *,
        on_resync: Callable[[Stream], object] | None = None,
        linger: float = LINGER,
    ) -> RegistryHandle:
        """Declare the registry called *name* without an app, for app factories and blueprints.

        Call it at import time, next to the extension, and import the handle
        wherever the registry is used::

            datastar = FlaskDatastar()
            clients = datastar.registry_handle("clients")

        The handle stands for each app's registry of that name: it is created
        in :meth:`init_app` for every app (or on first use, for a handle
        declared after :meth:`init_app` ran), and each call on the handle
        goes to the registry of :data:`flask.current_app`. See
        :class:`RegistryHandle`.

        :param name: the registry's topic.
        :param on_resync: see :meth:`registry`; it runs in an app context of
            the app whose registry lost bus messages.
        :param linger: see :class:`~flask_datastar.SSERegistry`.
        """
        handle = RegistryHandle(self, name, on_resync=on_resync, linger=linger)
        with self._handles_lock:
            self._handles.add(handle)
        return handle

    def bus(self, app: Flask) -> Bus | None:
        """Return the bus *app*'s registries publish through, or ``None`` without one.

        With ``DATASTAR_REDIS_URL`` or ``DATASTAR_REDIS`` it is a
        :class:`~flask_datastar.bus.RedisBus`;
        call its ``close()`` when the app is discarded (in tests).

        :param app: an app this extension was registered on.
        """
        return self._state(app).bus

    @overload
    def sse(self, view: StreamView[P], /) -> Callable[P, DatastarResponse]: ...
    @overload
    def sse(
        self,
        *,
        on_connect: Hook | None = None,
        on_disconnect: Hook | None = None,
        authorize: Authorize | None = None,
        own_thread: bool = False,
        compress: Compress = None,
    ) -> StreamDecorator: ...
    def sse(
        self,
        view: StreamView[Any] | None = None,
        *,
        on_connect: Hook | None = None,
        on_disconnect: Hook | None = None,
        authorize: Authorize | None = None,
        own_thread: bool = False,
        compress: Compress = None,
    ) -> Any:
        """Decorate a view as a stream handler: ``@datastar.sse(on_connect=...)``.

        The same as :func:`~flask_datastar.sse_stream`. *authorize*, called as
        ``authorize(identity)`` after the app's :meth:`authorizer`, decides
        whether this client may open this stream: a false answer is a 401 (no
        identity) or a 403, with no event, and ``on_connect`` does not run.
        *own_thread* runs the handler on the server's thread for the stream's
        whole life instead of the scheduler's pool, for a handler that blocks
        between two yields (see :mod:`flask_datastar.scheduler`).
        *compress* is this route's compression (``False``: never compressed;
        see :func:`~flask_datastar.sse_response`).
        """
        decorate = sse_stream(
            on_connect=on_connect,
            on_disconnect=on_disconnect,
            authorize=authorize,
            own_thread=own_thread,
            compress=compress,
        )
        return decorate(view) if view is not None else decorate

    def every(self, seconds: float) -> Callable[[Callable[[], object]], Periodic]:
        """Run the decorated function every *seconds*, once per process, with an app context.

        For work that is the same for every tab: render once, broadcast to a
        registry, instead of one render per tab in each tab's handler::

            @datastar.every(1.0)
            def tick():
                clock.broadcast(SSE.patch_elements(render_clock()), coalesce="clock")

        It runs on the stream scheduler's pool (see
        :mod:`flask_datastar.scheduler`), at a fixed rate; a run that would
        start while the previous one still runs is skipped. It starts in each
        process (each gunicorn worker, after the fork) with that process's
        first request to an app this extension is registered on, and runs
        there with that app's context.

        :param seconds: the period.
        :return: a decorator; the function it returns is a
            :class:`~flask_datastar.Periodic`,
            still callable as before.
        """
        if not seconds > 0:
            raise ValueError(f"'every' needs a period above 0 seconds, not {seconds!r}.")

        def decorate(fn: Callable[[], object]) -> Periodic:
            periodic = Periodic(seconds, fn)
            self._periodic.append(periodic)
            return periodic

        return decorate

    def _start_periodic(self) -> None:
        """``before_request``: start this process's periodic jobs for the current app."""
        if self._periodic:
            app = _unproxied(current_app)
            for periodic in self._periodic:
                periodic.start(app)

    @staticmethod
    def csrf_exempt(view: T) -> T:
        """Exempt a view function, or every view of a blueprint, from the CSRF check.

        The same as :func:`flask_datastar.guards.csrf_exempt`::

            @app.post("/webhooks/stripe")
            @datastar.csrf_exempt
            def stripe_webhook(): ...

        :param view: a view function or a :class:`flask.Blueprint`.
        """
        return guards.csrf_exempt(view)


class RegistryHandle:
    """A registry declared at import time, standing for the registry of that name of each app.

    Made by :meth:`FlaskDatastar.registry_handle`. With an app factory there
    is no app at import time, so views and blueprints cannot share a
    registry object; they share the handle instead::

        # myapp/extensions.py
        datastar = FlaskDatastar()
        clients = datastar.registry_handle("clients")

        # myapp/poll.py
        from .extensions import clients, datastar

        @bp.get("/sse")
        @datastar.sse(on_connect=clients.register)
        def sse(gen): ...

        @bp.post("/vote")
        def vote():
            ...
            clients.broadcast(SSE.patch_elements(html))

    Every method of :class:`~flask_datastar.SSERegistry` is here, and each
    call goes to the registry of :data:`flask.current_app`, the one that
    ``datastar.registry(current_app, name)`` returns: so it needs an
    application context, which views, stream hooks, CLI commands and
    ``on_resync`` have. Where there is none (a thread of your own), use
    :meth:`for_app` or push one with ``with app.app_context():``. Several
    apps (two ``create_app()`` calls in one process, as tests make) each get
    their own registry behind the same handle.

    The handle keeps each app's registry alive while both exist, so the
    registry keeps its streams and its bus subscription between calls. The
    registry is created with the handle's *on_resync* and *linger*; binding
    the handle to an app that already made its registry of that name with
    other options raises :class:`RuntimeError`, so that an ``on_resync``
    is never silently lost.

    :param extension: the extension that declared it.
    :param name: the registry's topic.
    :param on_resync: see :meth:`FlaskDatastar.registry`.
    :param linger: see :class:`~flask_datastar.SSERegistry`.
    """

    def __init__(
        self,
        extension: FlaskDatastar,
        name: str = "default",
        *,
        on_resync: Callable[[Stream], object] | None = None,
        linger: float = LINGER,
    ) -> None:
        if not linger >= 0:
            raise ValueError(f"'linger' must be a number of seconds, 0 or more, not {linger!r}.")
        self.extension = extension
        self.name = name
        self.on_resync = on_resync
        self.linger = linger
        # Strong values: the handle is what keeps each app's registry (which the
        # extension holds weakly) alive. Weak keys: a discarded app takes its
        # registry with it.
        self._bound: weakref.WeakKeyDictionary[Flask, SSERegistry] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<RegistryHandle {self.name!r}>"

    # -- finding the registry ---------------------------------------------------------

    def for_app(self, app: Flask) -> SSERegistry:
        """Return *app*'s registry of this name, creating it on first use; no context needed.

        Use it where there is no application context, such as a thread of your
        own that broadcasts: ``clients.for_app(app).broadcast(event)``.

        :param app: an app the extension was registered on.
        :raises RuntimeError: the extension is not registered on *app*, or
            *app* already made this registry with other options.
        """
        app = _unproxied(app)
        registry = self._bound.get(app)
        if registry is not None:
            return registry
        registry = self.extension.registry(
            app, self.name, on_resync=self.on_resync, linger=self.linger
        )
        if registry.linger != self.linger or (
            self.on_resync is not None and registry.on_resync is None
        ):
            raise RuntimeError(
                f"The app {app.name!r} already has a registry {self.name!r}, made with other"
                " options (on_resync, linger) than its handle's, which would be lost. Reach"
                " that registry through its handle only (the handle's methods, or"
                f" 'handle.for_app(app)' rather than 'datastar.registry(app, {self.name!r})'),"
                " and declare one handle per name."
            )
        with self._lock:
            return self._bound.setdefault(app, registry)

    def get(self) -> SSERegistry:
        """Return the registry of the current app (:data:`flask.current_app`).

        :raises RuntimeError: there is no application context.
        """
        if not has_app_context():
            raise RuntimeError(
                f"The registry handle {self.name!r} needs an application context to find"
                " the app's registry: use it in a view, a stream hook or a CLI command,"
                f" inside 'with app.app_context():', or call '.for_app(app)' on it to get"
                " the app's registry where there is no context (a thread of your own)."
            )
        return self.for_app(current_app)

    # -- the registry's methods, on the current app's registry ---------------------------

    def register(self, gen: Stream, key: Any = None, *, topics: Iterable[str] = ()) -> Stream:
        """Register *gen* in the current app's registry: :meth:`SSERegistry.register`.

        Works as a hook: ``@datastar.sse(on_connect=clients.register)``.

        :param gen: the stream.
        :param key: the key that :meth:`send_to` reaches.
        :param topics: topics it joins, checked by the app's authorizer.
        """
        return self.get().register(gen, key, topics=topics)

    def join(self, gen: Stream, *topics: str) -> Stream:
        """Add *gen* to *topics*: :meth:`SSERegistry.join`.

        :param gen: the stream.
        :param topics: topic names, checked by the app's authorizer.
        """
        return self.get().join(gen, *topics)

    def leave(self, gen: Stream, *topics: str) -> None:
        """Take *gen* out of *topics*: :meth:`SSERegistry.leave`.

        :param gen: the stream.
        :param topics: topic names.
        """
        self.get().leave(gen, *topics)

    def unregister(self, gen: Stream) -> bool:
        """Remove *gen* from this handle's registry of whichever app it is in.

        Unlike the other methods, it needs no application context. A stream
        that ends leaves its registries by itself.

        :param gen: the stream.
        :return: whether it was registered.
        """
        with self._lock:
            registries = list(self._bound.values())
        return any([registry.unregister(gen) for registry in registries])

    def broadcast(self, event: str | bytes, *, coalesce: Hashable | None = None) -> None:
        """Send *event* to every stream of the current app's registry.

        See :meth:`SSERegistry.broadcast`.

        :param event: a complete event.
        :param coalesce: a label for events where the newest supersedes the older.
        """
        self.get().broadcast(event, coalesce=coalesce)

    def send_to(self, key: Any, event: str | bytes, *, coalesce: Hashable | None = None) -> None:
        """Send *event* to the streams under *key*: :meth:`SSERegistry.send_to`.

        :param key: the key given to :meth:`register`.
        :param event: a complete event.
        :param coalesce: as for :meth:`broadcast`.
        """
        self.get().send_to(key, event, coalesce=coalesce)

    def send_to_identity(
        self, identity: Any, event: str | bytes, *, coalesce: Hashable | None = None
    ) -> None:
        """Send *event* to the streams of *identity*: :meth:`SSERegistry.send_to_identity`.

        :param identity: a user id, as the identity loader returns it.
        :param event: a complete event.
        :param coalesce: as for :meth:`broadcast`.
        """
        self.get().send_to_identity(identity, event, coalesce=coalesce)

    def publish(self, topic: str, event: str | bytes, *, coalesce: Hashable | None = None) -> None:
        """Send *event* to the streams that joined *topic*: :meth:`SSERegistry.publish`.

        :param topic: the topic.
        :param event: a complete event.
        :param coalesce: as for :meth:`broadcast`.
        """
        self.get().publish(topic, event, coalesce=coalesce)

    def revoke(
        self,
        *,
        identity: Any = None,
        topic: str | None = None,
        key: Any = None,
        event: str | bytes | None = None,
        reconnect: bool = True,
    ) -> None:
        """End the streams of an identity, a topic or a key everywhere: :meth:`SSERegistry.revoke`.

        :param identity: end every stream of this identity.
        :param topic: end every stream that joined this topic.
        :param key: end every stream registered under this key.
        :param event: an event to send to them first.
        :param reconnect: end abruptly (the tabs reconnect and are checked again).
        """
        self.get().revoke(identity=identity, topic=topic, key=key, event=event, reconnect=reconnect)

    def notify_subscribers(self, fn: Callable[[Stream], object]) -> list[Stream]:
        """Call ``fn(gen)`` for every stream of this process in the current app's registry.

        See :meth:`SSERegistry.notify_subscribers`.

        :param fn: the function to call.
        :return: the streams that failed.
        """
        return self.get().notify_subscribers(fn)

    def notify_subscriber(self, key: Any, fn: Callable[[Stream], object]) -> int:
        """Call ``fn(gen)`` for the streams under *key*: :meth:`SSERegistry.notify_subscriber`.

        :param key: the key given to :meth:`register`.
        :param fn: the function to call.
        :return: the number of streams reached without error.
        """
        return self.get().notify_subscriber(key, fn)

    def snapshot(self, key: Any = None) -> list[Stream]:
        """Return the registered streams: :meth:`SSERegistry.snapshot`.

        :param key: only the streams registered with this key.
        """
        return self.get().snapshot(key)

    def keys(self) -> list[Any]:
        """Return the keys that have a stream: :meth:`SSERegistry.keys`."""
        return self.get().keys()

    def flush(self, timeout: float | None = 5.0) -> bool:
        """Wait until everything queued is written: :meth:`SSERegistry.flush`.

        :param timeout: seconds to wait at most.
        """
        return self.get().flush(timeout)

    def close(self, timeout: float | None = 5.0) -> bool:
        """Stop the current app's broadcaster and leave its bus: :meth:`SSERegistry.close`.

        :param timeout: seconds to wait for the broadcaster to finish.
        """
        return self.get().close(timeout)

    @property
    def count(self) -> int:
        """The number of streams in the current app's registry."""
        return self.get().count

    @property
    def bus(self) -> Bus | None:
        """The bus of the current app's registry, if any."""
        return self.get().bus

    def __len__(self) -> int:
        return len(self.get())

    def __contains__(self, gen: object) -> bool:
        return gen in self.get()


class Periodic:
    """A function run every *seconds* in each process, made by :meth:`FlaskDatastar.every`.

    Calling it calls the function. :meth:`job` returns the
    :class:`~flask_datastar.scheduler.PeriodicJob` running it for an app in
    this process, to stop it or to read ``runs``.
    """

    def __init__(self, seconds: float, fn: Callable[[], object]) -> None:
        self.seconds = seconds
        self.fn = fn
        self.__wrapped__ = fn
        self.__name__ = getattr(fn, "__name__", "periodic")
        self.__doc__ = fn.__doc__
        # (process, app) -> job: a job started before a fork does not run in the child.
        self._jobs: dict[tuple[int, int], scheduler.PeriodicJob] = {}
        self._lock = threading.Lock()

    def __call__(self) -> object:
        return self.fn()

    def start(self, app: Flask) -> scheduler.PeriodicJob:
        """Start it for *app* in this process, if it is not running yet; return its job."""
        key = (os.getpid(), id(app))
        job = self._jobs.get(key)
        if job is not None:
            return job
        with self._lock:
            job = self._jobs.get(key)
            if job is None:
                fn = self.fn

                def run() -> None:
                    with app.app_context():
                        fn()

                name = f"every {self.seconds:g} s: {getattr(fn, '__qualname__', fn)!s}"
                job = scheduler.scheduler().every(self.seconds, run, name=name)
                self._jobs[key] = job
        return job

    def job(self, app: Flask | None = None) -> scheduler.PeriodicJob | None:
        """Return the job running it for *app* (the current app) in this process, if any."""
        target = _unproxied(app or current_app)
        return self._jobs.get((os.getpid(), id(target)))
