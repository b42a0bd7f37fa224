"""Carrying broadcasts between processes.

A registry without a bus reaches the streams of its own process only. With a
bus, :meth:`~flask_datastar.SSERegistry.broadcast` publishes the rendered
event once, and the bus hands it to the registry of the same name in every
subscribed process (the publisher's own included, exactly once), which
writes it to its local streams.

Two buses ship here: :class:`LocalBus` (one process; useful in tests) and
:class:`RedisBus` (Redis pub/sub through redis-py, for several workers and
several hosts).
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from . import metrics

if TYPE_CHECKING:
    import redis
    from redis.client import PubSub

__all__ = ["Bus", "BusError", "LocalBus", "RedisBus"]

log = logging.getLogger(__name__)

OnMessage = Callable[[bytes], None]
OnGap = Callable[[], None]


class BusError(ConnectionError):
    """A message could not be handed to the bus (its server is down or unreachable).

    :meth:`~flask_datastar.SSERegistry.broadcast` catches it: the event still
    reaches the streams of the publishing process, and the other processes
    resync once they hear from the bus again.
    """


class Bus(Protocol):
    """What a registry needs of a message bus."""

    def publish(self, channel: str, payload: bytes) -> None:
        """Send *payload* to every subscriber of *channel*, in every process.

        :raises BusError: the bus could not take the message.
        """

    def subscribe(self, channel: str, on_message: OnMessage, on_gap: OnGap) -> None:
        """Call ``on_message(payload)`` for each message on *channel*, and ``on_gap()``
        after any interruption during which messages may have been lost."""

    def unsubscribe(self, channel: str, on_message: OnMessage) -> None:
        """Stop calling *on_message*."""


class LocalBus:
    """A bus within one process: messages are delivered in the publisher's thread.

    It behaves as a real bus does (every payload is encoded and decoded), which
    makes it useful to test an application's bus plumbing without a server.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: dict[str, list[OnMessage]] = {}

    def publish(self, channel: str, payload: bytes) -> None:
        with self._lock:
            callbacks = list(self._subscribers.get(channel, ()))
        for callback in callbacks:
            callback(payload)

    def subscribe(self, channel: str, on_message: OnMessage, on_gap: OnGap) -> None:
        with self._lock:
            self._subscribers.setdefault(channel, []).append(on_message)

    def unsubscribe(self, channel: str, on_message: OnMessage) -> None:
        with self._lock:
            callbacks = self._subscribers.get(channel, [])
            if on_message in callbacks:
                callbacks.remove(on_message)


# -- Redis --------------------------------------------------------------------------

# Taken when a bus notices it runs in a forked child and resets its per-process state.
_FORK_LOCK = threading.Lock()


class _Subscription:
    __slots__ = ("on_message", "on_gap", "waiting", "ready", "epoch")

    def __init__(self, on_message: OnMessage, on_gap: OnGap) -> None:
        self.on_message = on_message
        self.on_gap = on_gap
        #: ``subscribe()`` has not returned yet: nothing was missed so far.
        self.waiting = True
        self.ready = threading.Event()
        #: The connection on which Redis last confirmed this subscription.
        self.epoch = 0


def _redacted(url: str) -> str:
    """Return *url* without its password, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + host))


def _keepalive_options() -> dict[int, int]:
    """TCP keepalive that notices a vanished Redis host within about 20 seconds."""
    options = {}
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        constant = getattr(socket, name, None)
        if constant is not None:
            options[constant] = value
    return options


class RedisBus:
    """A bus over Redis pub/sub (redis-py): every worker on every host gets every message.

    ::

        bus = RedisBus("redis://localhost:6379/0")
        clients = SSERegistry("clients", bus=bus)

    A publish is one ``PUBLISH``, in the caller's thread, whatever the number
    of tabs. Receiving takes one thread and one Redis connection per process,
    started by the first :meth:`subscribe` in that process (a registry
    subscribes at its first ``register``): a process that only publishes (a
    CLI command, a cron job, a task queue worker) starts neither. A process
    forked from the one that created the bus (gunicorn workers, with or
    without ``--preload``) starts its own listener.

    The subscription is watched: TCP keepalive, redis-py's health checks and a
    ``PING`` after *health_check_interval* seconds of silence, which must be
    answered within as long again. When the connection is lost, the listener
    logs an error, reconnects with a capped exponential backoff (logging each
    failed attempt) and, once Redis confirms the subscription again, calls
    every subscriber's ``on_gap``: what was published meanwhile is gone.

    :param url: a redis-py URL, such as ``redis://:password@host:6379/0`` or
        ``rediss://...`` for TLS.
    :param health_check_interval: seconds of silence on the subscription
        after which Redis is pinged.
    :param connect_timeout: seconds to wait for a connection to Redis, and
        for Redis to answer a command; a publish waits this long at most
        while Redis is unreachable (a refused connection fails at once).
    :param subscribe_timeout: seconds the first :meth:`subscribe` of a
        channel waits for Redis to confirm it; after that it returns, and the
        subscriber gets ``on_gap()`` once the subscription is active.
    :param backoff: the first and the longest pause between reconnection
        attempts, in seconds; the pause doubles after each failed attempt.
    :param redis_options: more keyword arguments for ``redis.Redis.from_url``
        (both the publishing and the subscribing client). The connections are
        named ``flask_datastar`` (publishing) and ``flask_datastar:listener``
        in ``CLIENT LIST`` unless ``client_name`` is given.
    """

    def __init__(
        self,
        url: str,
        *,
        health_check_interval: float = 5.0,
        connect_timeout: float = 2.0,
        subscribe_timeout: float = 2.0,
        backoff: tuple[float, float] = (0.1, 5.0),
        **redis_options: Any,
    ) -> None:
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError:
            raise RuntimeError(
                "'RedisBus' needs redis-py: install it with"
                " 'pip install \"flask_datastar[redis]\"'."
            ) from None
        if health_check_interval <= 0:
            raise ValueError("'health_check_interval' must be a positive number of seconds.")
        if not 0 < backoff[0] <= backoff[1]:
            raise ValueError("'backoff' must be (first, longest) with 0 < first <= longest.")
        self.url = url
        self.health_check_interval = health_check_interval
        self.subscribe_timeout = subscribe_timeout
        self.backoff = backoff
        self._redis_errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        common: dict[str, Any] = {
            "socket_connect_timeout": connect_timeout,
            "socket_timeout": connect_timeout,
            "socket_keepalive": True,
            "socket_keepalive_options": _keepalive_options(),
            "health_check_interval": health_check_interval,
            **redis_options,
        }
        # One immediate retry covers a pooled connection that Redis closed while idle;
        # redis-py's default (several retries with backoff) would hold the command up.
        self._client: redis.Redis = redis.Redis.from_url(
            url, retry=Retry(NoBackoff(), 1), **{"client_name": "flask_datastar", **common}
        )
        # No retry at all on the subscription: a reconnect hidden inside redis-py would
        # resubscribe silently, and the messages lost meanwhile would go unnoticed.
        self._sub_client: redis.Redis = redis.Redis.from_url(
            url,
            retry=Retry(NoBackoff(), 0),
            **{"client_name": "flask_datastar:listener", **common},
        )
        self._closed = False
        self._reset_process()

    def __repr__(self) -> str:
        return f"<RedisBus {_redacted(self.url)}>"

    @property
    def client(self) -> redis.Redis:
        """The redis-py client that publishes; the application may use it for its own data."""
        return self._client

    @property
    def connected(self) -> bool:
        """Whether this process's listener currently holds a live subscription."""
        return self._connected

    def _reset_process(self) -> None:
        """Start this process's state afresh: a forked child inherits no threads."""
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._subscriptions: dict[str, list[_Subscription]] = {}
        #: Channels Redis has confirmed on the current connection, by epoch.
        self._confirmed: dict[str, int] = {}
        #: Channels that got their first subscriber again after losing their last: the
        #: listener sends SUBSCRIBE again even if its UNSUBSCRIBE is still under way.
        self._renew: set[str] = set()
        self._epoch = 0
        self._connected = False
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        # The listener's own bookkeeping of an outage.
        self._deaf_since: float | None = None
        self._attempts = 0
        self._delay = self.backoff[0]
        # Publishing here wakes the listener when the set of channels changes.
        self._control = f"flask_datastar:bus:{uuid.uuid4().hex}"

    def _check_process(self) -> None:
        if self._pid != os.getpid():
            with _FORK_LOCK:
                if self._pid != os.getpid():
                    self._reset_process()

    # -- the Bus protocol -----------------------------------------------------------

    def publish(self, channel: str, payload: bytes) -> None:
        """Publish *payload* on *channel* with one ``PUBLISH``.

        :raises BusError: Redis could not be reached or refused the command.
        """
        self._check_process()
        try:
            self._client.publish(channel, payload)
        except self._redis_errors as e:
            raise BusError(f"Could not publish to Redis at {_redacted(self.url)}: {e}") from e

    def subscribe(self, channel: str, on_message: OnMessage, on_gap: OnGap) -> None:
        """Call ``on_message(payload)`` for each message on *channel*, in the listener thread.

        Starts this process's listener if needed and waits (up to
        *subscribe_timeout*) until Redis confirms the subscription, so that
        whatever the caller sends next cannot be older than a message it
        misses. ``on_gap()`` is called, in the listener thread, after every
        interruption, and after a confirmation that came too late to wait for.
        """
        self._check_process()
        subscription = _Subscription(on_message, on_gap)
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self!r} is closed; create a new bus.")
            subscribers = self._subscriptions.setdefault(channel, [])
            if not subscribers:
                self._renew.add(channel)
            subscribers.append(subscription)
            if self._confirmed.get(channel) == self._epoch and self._connected:
                subscription.epoch = self._epoch
                subscription.ready.set()
            wake = len(subscribers) == 1 and self._thread is not None
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._listen, name="flask_datastar-redis-listener", daemon=True
                )
                self._thread.start()
        if wake:
            self._wake()
        if threading.current_thread() is not self._thread:
            # (From the listener's own thread, in a callback, waiting would only stall it.)
            subscription.ready.wait(self.subscribe_timeout)
        with self._lock:
            subscription.waiting = False
            late = not subscription.ready.is_set()
        if late:
            log.warning(
                "flask_datastar: Redis at %s has not confirmed the subscription to %r within"
                " %s s; its streams will be resynced once it does.",
                _redacted(self.url),
                channel,
                self.subscribe_timeout,
            )

    def unsubscribe(self, channel: str, on_message: OnMessage) -> None:
        """Stop calling *on_message* for *channel*."""
        self._check_process()
        with self._lock:
            subscribers = self._subscriptions.get(channel, [])
            subscribers[:] = [s for s in subscribers if s.on_message != on_message]
            emptied = not subscribers and channel in self._subscriptions
            if emptied:
                del self._subscriptions[channel]
                # A subscriber that comes next must wait for a new confirmation: the
                # listener may be unsubscribing this channel from Redis right now.
                self._confirmed.pop(channel, None)
        # The listener is not woken: it drops the channel at its next poll, within a
        # second, and no PUBLISH per unsubscribe (from many threads at once, when many
        # registries go idle together) grows the connection pool.

    def close(self) -> None:
        """Stop this process's listener and close the connections to Redis."""
        with self._lock:
            self._closed = True
            thread = self._thread if self._pid == os.getpid() else None
            self._stop.set()
        if thread is not None:
            self._wake()
            thread.join(self.health_check_interval + 5)
        self._client.close()
        self._sub_client.close()

    # -- the listener ---------------------------------------------------------------

    def _wake(self) -> None:
        try:
            self._client.publish(self._control, b"")
        except self._redis_errors:
            pass  # The listener is reconnecting; it reads the channel list when it is back.

    def _listen(self) -> None:
        """The listener thread: hold the subscription, and get it back whenever it is lost."""
        while not self._stop.is_set():
            pubsub = None
            try:
                # (redis-py leaves these two methods unannotated.)
                make_pubsub: Callable[[], PubSub] = self._sub_client.pubsub
                pubsub = make_pubsub()
                with self._lock:
                    self._epoch += 1
                    self._confirmed.clear()
                # The control channel first: its confirmation proves the connection works.
                pubsub.subscribe(self._control)
                self._serve(pubsub)
            except Exception as e:
                if not self._stop.is_set():
                    self._lost(e)
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:
                        pass
            if not self._stop.is_set():
                # Jitter keeps the workers of a fleet from reconnecting in lockstep.
                self._stop.wait(self._delay * (0.5 + random.random() / 2))
                self._delay = min(self._delay * 2, self.backoff[1])
        with self._lock:
            self._connected = False
            self._confirmed.clear()

    def _serve(self, pubsub: PubSub) -> None:
        """Read messages until the listener stops; raise when the connection is lost."""
        interval = self.health_check_interval
        poll = min(1.0, interval / 2)
        subscribed: set[str] = set()
        last_heard = time.monotonic()
        ping_sent: float | None = None
        while not self._stop.is_set():
            with self._lock:
                wanted = set(self._subscriptions)
                renew = self._renew & wanted
                self._renew.clear()
            added, dropped = (wanted - subscribed) | renew, subscribed - wanted
            if added:
                pubsub.subscribe(*sorted(added))
                subscribed |= added
            if dropped:
                unsubscribe: Callable[..., None] = pubsub.unsubscribe
                unsubscribe(*sorted(dropped))
                subscribed -= dropped
                with self._lock:
                    for channel in dropped:
                        self._confirmed.pop(channel, None)
            message = pubsub.get_message(timeout=poll)
            now = time.monotonic()
            if message is None:
                # redis-py only sends its health-check PING; a connection that went
                # silent without a FIN (a vanished host) is caught by checking the answer.
                if ping_sent is not None:
                    if now - ping_sent > interval:
                        raise ConnectionError(f"Redis did not answer a PING within {interval} s")
                elif now - last_heard >= interval:
                    pubsub.ping()
                    ping_sent = now
                continue
            last_heard, ping_sent = now, None
            self._handle(message)

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind not in ("subscribe", "message"):
            return
        channel = message["channel"]
        if isinstance(channel, bytes):
            channel = channel.decode("utf-8", "replace")
        if channel == self._control:
            if kind == "subscribe":
                self._back()
            return
        if kind == "subscribe":
            self._confirm(channel)
            return
        data = message["data"]
        payload = data if isinstance(data, bytes) else str(data).encode("utf-8")
        with self._lock:
            subscribers = list(self._subscriptions.get(channel, ()))
        for subscription in subscribers:
            try:
                subscription.on_message(payload)
            except Exception:
                log.exception("flask_datastar: error handling a message on %r", channel)

    def _lost(self, error: Exception) -> None:
        with self._lock:
            self._connected = False
            self._confirmed.clear()
        self._attempts += 1
        reason = str(error) or type(error).__name__
        if self._deaf_since is None:
            self._deaf_since = time.monotonic()
            log.error(
                "flask_datastar: lost the Redis subscription at %s (%s); this process misses"
                " broadcasts from the others until it is back. Reconnecting.",
                _redacted(self.url),
                reason,
            )
        else:
            log.error(
                "flask_datastar: still no Redis subscription at %s after %.1f s (attempt %d:"
                " %s); next attempt in about %.1f s.",
                _redacted(self.url),
                time.monotonic() - self._deaf_since,
                self._attempts,
                reason,
                self._delay,
            )

    def _back(self) -> None:
        """The connection works again (or for the first time)."""
        with self._lock:
            self._connected = True
        if self._deaf_since is not None:
            metrics.bus_reconnected()  # metrics
            log.warning(
                "flask_datastar: the Redis subscription at %s is back after %.1f s; resyncing"
                " every stream of this process.",
                _redacted(self.url),
                time.monotonic() - self._deaf_since,
            )
        self._deaf_since = None
        self._attempts = 0
        self._delay = self.backoff[0]

    def _confirm(self, channel: str) -> None:
        """Redis confirmed *channel*: release the waiting subscribers, tell the others."""
        gaps = []
        with self._lock:
            epoch = self._epoch
            self._confirmed[channel] = epoch
            for subscription in self._subscriptions.get(channel, ()):
                if subscription.epoch == epoch:
                    continue
                first = subscription.epoch == 0
                subscription.epoch = epoch
                if first and subscription.waiting:
                    subscription.ready.set()
                else:
                    gaps.append(subscription)
        for subscription in gaps:
            try:
                subscription.on_gap()
            except Exception:
                log.exception("flask_datastar: error resyncing after a gap on %r", channel)
