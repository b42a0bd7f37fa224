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

import itertools
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from . import metrics

if TYPE_CHECKING:
    from redis.client import PubSub

__all__ = ["Bus", "BusError", "LocalBus", "RedisBus", "RedisClients", "redis_clients"]

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


# -- Redis: the clients ---------------------------------------------------------------

#: URL schemes of the primary of a Sentinel-managed group, and of a Redis Cluster.
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
_PLAIN_SCHEMES = ("redis", "rediss", "unix")


def _redacted(url: str) -> str:
    """Return *url* without its password, for logs and error messages."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hosts = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.partition(':')[0]}:***@{hosts}"


def _keepalive_options() -> dict[int, int]:
    """TCP keepalive that notices a vanished Redis host within about 20 seconds."""
    options = {}
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        constant = getattr(socket, name, None)
        if constant is not None:
            options[constant] = value
    return options


def _import_redis() -> Any:
    try:
        import redis
    except ImportError:
        raise RuntimeError(
            "'RedisBus' needs redis-py: install it with 'pip install \"flask_datastar[redis]\"'."
        ) from None
    return redis


def _split_hosts(url: str, default_port: int) -> tuple[str, list[tuple[str, int]], str]:
    """Split a URL with several hosts (``scheme://[user:pw@]h1:p1,h2:p2/path?query``).

    :return: the user info (``""`` without one), the hosts and ports, and what follows
        them (path and query).
    """
    scheme, _, rest = url.partition("://")
    netloc, slash, tail = rest.partition("/")
    netloc, question, query = netloc.partition("?")
    tail = slash + tail if slash else question + query
    userinfo, _, hostlist = netloc.rpartition("@")
    hosts = []
    for item in hostlist.split(","):
        item = item.strip()
        if item.startswith("["):  # [IPv6]:port
            host, _, port = item[1:].partition("]")
            port = port.lstrip(":")
        else:
            host, _, port = item.partition(":")
        if not host:
            raise ValueError(
                f"The Redis URL {_redacted(url)!r} names no host: write"
                f" {scheme}://host1:port1,host2:port2/..."
            )
        try:
            hosts.append((host, int(port) if port else default_port))
        except ValueError:
            raise ValueError(f"The port {port!r} in {_redacted(url)!r} is not a number.") from None
    return userinfo, hosts, tail


def _connection_options(url: str, userinfo: str, path: str, query: str) -> dict[str, Any]:
    """The connection options of a multi-host URL, parsed as redis-py parses one host.

    (Credentials, ``?socket_timeout=...`` and the other query options of redis-py URLs.)
    """
    redis = _import_redis()
    tls = url.startswith("rediss+")
    single = f"{'rediss' if tls else 'redis'}://{userinfo + '@' if userinfo else ''}h{path}"
    options: dict[str, Any] = redis.connection.parse_url(single + (f"?{query}" if query else ""))
    for key in ("host", "port", "connection_class"):
        options.pop(key, None)
    if tls:
        options["ssl"] = True
    return options


#: What a listener copies of the application's client: where Redis is and how to log in.
_IDENTITY_OPTIONS = frozenset(
    {"host", "port", "path", "db", "username", "password", "credential_provider", "ssl"}
)


def _identity(options: dict[str, Any]) -> dict[str, Any]:
    """The address, credentials and TLS settings among a client's connection options."""
    return {
        key: value
        for key, value in options.items()
        if key in _IDENTITY_OPTIONS or key.startswith("ssl_")
    }


class RedisClients:
    """The redis-py clients of one bus, made by ``redis_clients()``.

    :attr:`client` publishes (and the application may use it for its own
    data); each listener gets a client of its own from :meth:`listener_client`,
    which never retries a command behind the bus's back (a silent reconnect
    would resubscribe and hide the messages lost meanwhile).
    """

    def __init__(
        self,
        client: Any,
        where: str,
        *,
        owned: bool,
        listener_client: Callable[[str], Any],
        sharded: bool = False,
        route: Callable[[str], str] | None = None,
        refresh: Callable[[], set[str]] | None = None,
    ) -> None:
        #: The client that publishes: a ``redis.Redis`` or a ``redis.cluster.RedisCluster``.
        self.client = client
        #: Where Redis is, for logs (no password).
        self.where = where
        #: Whether the bus made :attr:`client` (and closes it) or the application did.
        self.owned = owned
        #: Redis Cluster: ``SPUBLISH`` / ``SSUBSCRIBE``, one listener per shard primary.
        self.sharded = sharded
        self._listener_client = listener_client
        self._route = route
        self._refresh = refresh

    def listener_client(self, key: str) -> Any:
        """A new client for the listener of *key* (``""``, or a cluster node's ``host:port``)."""
        return self._listener_client(key)

    def route(self, channel: str) -> str:
        """The listener that subscribes to *channel*: ``""``, or the primary holding its slot."""
        return "" if self._route is None else self._route(channel)

    def refresh(self) -> set[str] | None:
        """Read the cluster's slots again; return its primaries (``None`` without a cluster)."""
        return None if self._refresh is None else self._refresh()


def redis_clients(
    source: Any,
    *,
    connect_timeout: float = 2.0,
    health_check_interval: float = 5.0,
    redis_options: dict[str, Any] | None = None,
) -> RedisClients:
    """Make the Redis clients of a bus: the one place where flask_datastar makes them.

    *source* is one of:

    - a URL: ``redis://``, ``rediss://`` (TLS) or ``unix://`` for one server (see
      redis-py's ``Redis.from_url``); ``redis+sentinel://[[user]:password@]host:port[,
      host:port...]/service_name[/db][?options]`` for the primary that Redis Sentinel
      names; ``redis+cluster://[[user]:password@]host:port[,host:port...][?options]``
      for a Redis Cluster (sharded pub/sub). ``rediss+sentinel`` and ``rediss+cluster``
      use TLS. Options are redis-py's URL options (``socket_timeout``, ...);
      ``sentinel_username`` and ``sentinel_password`` authenticate to the sentinels;
    - the application's own ``redis.Redis`` (also one made by
      ``Sentinel.master_for``), ``redis.ConnectionPool`` or
      ``redis.cluster.RedisCluster``: it publishes, and the listeners connect with its
      settings (address, credentials, TLS) plus the bus's timeouts and health checks;
    - a function without arguments that returns one of those.

    :param source: see above.
    :param connect_timeout: seconds to connect and to wait for an answer, for the
        clients made here (an application's client keeps its own settings).
    :param health_check_interval: redis-py's health check interval of those clients.
    :param redis_options: more keyword arguments for the clients made from a URL.
    :raises TypeError: *source* is none of the above.
    :raises ValueError: a URL or a client that cannot carry the bus.
    """
    redis = _import_redis()
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # (Through the untyped module object: parts of redis-py 5 are unannotated.)
    RedisCluster = redis.cluster.RedisCluster
    Sentinel = redis.sentinel.Sentinel
    SentinelConnectionPool = redis.sentinel.SentinelConnectionPool

    if callable(source) and not isinstance(
        source, (str, redis.Redis, redis.ConnectionPool, RedisCluster)
    ):
        source = source()
    redis_options = dict(redis_options or {})
    common: dict[str, Any] = {
        "socket_connect_timeout": connect_timeout,
        "socket_timeout": connect_timeout,
        "socket_keepalive": True,
        "socket_keepalive_options": _keepalive_options(),
        "health_check_interval": health_check_interval,
    }

    def listening(connection_class: type, options: dict[str, Any]) -> dict[str, Any]:
        """Options for a listener's connections: *options*' address and credentials, and
        no retry, bytes, and the bus's timeouts."""
        merged = {
            **_identity(options),
            **common,
            # No retry: a reconnect hidden inside redis-py would resubscribe silently.
            "retry": Retry(NoBackoff(), 0),
            "client_name": "flask_datastar:listener",
            "decode_responses": False,  # the bus reads bytes whatever the app's client does
        }
        if not issubclass(connection_class, redis.connection.Connection):
            # A unix socket has no TCP keepalive.
            merged.pop("socket_keepalive")
            merged.pop("socket_keepalive_options")
        return merged

    if isinstance(source, str):
        url = source
        scheme = url.partition("://")[0].lower()
        where = _redacted(url)
        if scheme in _PLAIN_SCHEMES:
            options = {**common, **redis_options}
            # One immediate retry covers a pooled connection that Redis closed while
            # idle; redis-py's default (several retries with backoff) would hold it up.
            publisher = redis.Redis.from_url(
                url, retry=Retry(NoBackoff(), 1), **{"client_name": "flask_datastar", **options}
            )

            def plain_listener(key: str) -> Any:
                # No retry at all on the subscription: a reconnect hidden inside redis-py
                # would resubscribe silently, and the messages lost meanwhile would go
                # unnoticed.
                return redis.Redis.from_url(
                    url,
                    retry=Retry(NoBackoff(), 0),
                    **{
                        "client_name": "flask_datastar:listener",
                        **options,
                        "decode_responses": False,
                    },
                )

            return RedisClients(publisher, where, owned=True, listener_client=plain_listener)
        if scheme in SENTINEL_SCHEMES:
            userinfo, hosts, tail = _split_hosts(url, 26379)
            path, _, query = tail.partition("?")
            service, _, db = path.strip("/").partition("/")
            if not service or "/" in db:
                raise ValueError(
                    f"The Sentinel URL {where!r} must name the service:"
                    " redis+sentinel://host:26379[,host:26379...]/service_name[/db]."
                )
            _check_sentinel()
            options = _connection_options(url, userinfo, f"/{db or 0}", query)
            sentinel_auth = {
                key: options.pop(f"sentinel_{key}")
                for key in ("username", "password")
                if f"sentinel_{key}" in options
            }
            sentinel = Sentinel(
                hosts,
                sentinel_kwargs={
                    "socket_connect_timeout": connect_timeout,
                    "socket_timeout": connect_timeout,
                    **({"ssl": True} if options.get("ssl") else {}),
                    **sentinel_auth,
                },
                **{**common, **options, **redis_options},
            )
            publisher = sentinel.master_for(
                service, retry=Retry(NoBackoff(), 1), client_name="flask_datastar"
            )

            def sentinel_listener(key: str) -> Any:
                return sentinel.master_for(
                    service,
                    retry=Retry(NoBackoff(), 0),
                    client_name="flask_datastar:listener",
                    decode_responses=False,
                )

            return RedisClients(publisher, where, owned=True, listener_client=sentinel_listener)
        if scheme in CLUSTER_SCHEMES:
            ClusterNode = redis.cluster.ClusterNode
            hosts, options = _parse_cluster_url(url)
            cluster = RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in hosts],
                **{"client_name": "flask_datastar", **common, **options, **redis_options},
            )
            return _cluster_clients(cluster, where, listening, owned=True)
        raise ValueError(
            f"The Redis URL {where!r} has the scheme {scheme!r}; use redis://, rediss://,"
            " unix://, redis+sentinel:// or redis+cluster://."
        )

    if redis_options:
        raise TypeError(
            f"Options {sorted(redis_options)} apply to the clients a bus makes from a URL;"
            " set them on your own client instead."
        )
    if isinstance(source, RedisCluster):
        return _cluster_clients(source, repr(source), listening, owned=False)
    if isinstance(source, redis.ConnectionPool):
        source = redis.Redis(connection_pool=source)
    if isinstance(source, Sentinel):
        raise TypeError(
            "Give the bus the primary's client, 'sentinel.master_for(\"service_name\")',"
            " not the Sentinel object."
        )
    if not isinstance(source, redis.Redis):
        module = type(source).__module__
        hint = (
            " An asyncio client cannot serve the bus's threads: give a redis.Redis."
            if module.startswith("redis.asyncio")
            else ""
        )
        raise TypeError(
            "The bus needs a Redis URL, a redis.Redis, a redis.ConnectionPool, a"
            " redis.cluster.RedisCluster, or a function returning one of them, not"
            f" {type(source).__name__}.{hint}"
        )
    if getattr(source, "connection", None) is not None:
        raise ValueError(
            "The bus publishes from many threads: give it a client without"
            " 'single_connection_client=True'."
        )
    pool = source.connection_pool
    where = repr(pool)
    if isinstance(pool, SentinelConnectionPool):
        if not pool.is_master:
            raise ValueError(
                "The bus publishes: give it the primary's client,"
                f" 'sentinel.master_for({pool.service_name!r})', not 'slave_for'."
            )
        _check_sentinel()  # after the mistakes any redis-py version can name
        listener_client = _sentinel_listener(pool, listening)
    else:

        def own_listener(key: str) -> Any:
            listener_pool = redis.ConnectionPool(
                connection_class=pool.connection_class,
                **listening(pool.connection_class, pool.connection_kwargs),
            )
            return redis.Redis(connection_pool=listener_pool)

        listener_client = own_listener
    _warn_without_timeout(pool.connection_kwargs, where)
    return RedisClients(source, where, owned=False, listener_client=listener_client)


def _parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """The startup nodes and the connection options of a ``redis+cluster://`` URL."""
    userinfo, hosts, tail = _split_hosts(url, 6379)
    path, _, query = tail.partition("?")
    if path.strip("/") not in ("", "0"):
        raise ValueError(
            f"A Redis Cluster has database 0 only; remove {path!r} from {_redacted(url)!r}."
        )
    options = _connection_options(url, userinfo, "", query)
    options.pop("db", None)
    return hosts, options


def sentinel_supported() -> bool:
    """Whether this redis-py can subscribe through Sentinel (5.0.0 cannot: 5.0.1 fixed it)."""
    import inspect

    from redis.sentinel import SentinelManagedConnection

    return "push_request" in inspect.signature(SentinelManagedConnection.read_response).parameters


def _check_sentinel() -> None:
    if not sentinel_supported():
        raise RuntimeError(
            "Redis Sentinel needs redis-py 5.0.1 or newer (in 5.0.0 a Sentinel connection"
            " cannot subscribe): 'pip install -U \"redis>=5.0.1\"'."
        )


def _warn_without_timeout(options: dict[str, Any], where: str) -> None:
    if options.get("socket_timeout") is None:
        log.warning(
            "flask_datastar: the Redis client %s has no socket_timeout: while Redis is"
            " unreachable, a broadcast may wait for it indefinitely. Give the client"
            " socket_timeout=2 (seconds) or so.",
            where,
        )


def _sentinel_listener(
    pool: Any, listening: Callable[[type, dict[str, Any]], dict[str, Any]]
) -> Callable[[str], Any]:
    """Listener clients that ask the sentinels for the primary at every (re)connection."""

    def make(key: str) -> Any:
        return pool.sentinel_manager.master_for(
            pool.service_name,
            connection_class=pool.connection_class,
            **listening(pool.connection_class, pool.connection_kwargs),
        )

    return make


def _cluster_clients(
    cluster: Any,
    where: str,
    listening: Callable[[type, dict[str, Any]], dict[str, Any]],
    *,
    owned: bool,
) -> RedisClients:
    """The clients of a bus over a Redis Cluster: one listener per primary, with SSUBSCRIBE."""
    import redis

    if not hasattr(redis.client.PubSub, "ssubscribe"):
        raise RuntimeError(
            "Sharded pub/sub on a Redis Cluster needs redis-py >= 5.0:"
            " 'pip install -U \"redis>=5.0\"'."
        )
    manager = cluster.nodes_manager
    if owned is False:
        _warn_without_timeout(manager.connection_kwargs, where)

    def node_listener(key: str) -> Any:
        options = dict(manager.connection_kwargs)
        connection_class = options.pop("connection_class", redis.connection.Connection)
        if options.pop("ssl", False) and connection_class is redis.connection.Connection:
            connection_class = redis.connection.SSLConnection
        host, _, port = key.rpartition(":")
        options.update(host=host, port=int(port))
        pool = redis.ConnectionPool(
            connection_class=connection_class, **listening(connection_class, options)
        )
        return redis.Redis(connection_pool=pool)

    def route(channel: str) -> str:
        name: str = cluster.get_node_from_key(channel).name
        return name

    def refresh() -> set[str]:
        manager.initialize()
        return {node.name for node in cluster.get_primaries()}

    return RedisClients(
        cluster,
        where,
        owned=owned,
        listener_client=node_listener,
        sharded=True,
        route=route,
        refresh=refresh,
    )


# -- Redis: the bus -------------------------------------------------------------------

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


class _Listener:
    """One subscribed connection and its thread: the whole bus, or one shard of a cluster.

    Its fields are guarded by the bus's lock, except the outage bookkeeping, which only
    its own thread touches.
    """

    def __init__(self, key: str, client: Any, where: str, backoff: tuple[float, float]) -> None:
        self.key = key
        self.client = client
        self.where = where
        self.thread: threading.Thread | None = None
        #: This connection's number; unique among the bus's listeners.
        self.epoch = 0
        self.connected = False
        #: Channels Redis has confirmed on the current connection, by epoch.
        self.confirmed: dict[str, int] = {}
        #: Channels that got their first subscriber again after losing their last: the
        #: listener sends SUBSCRIBE again even if its UNSUBSCRIBE is still under way.
        self.renew: set[str] = set()
        #: Set when this listener's shard is gone from the cluster and it has no channel.
        self.retired = False
        self.deaf_since: float | None = None
        self.attempts = 0
        self.delay = backoff[0]
        # Publishing here wakes the listener when the set of channels changes.
        self.control = f"flask_datastar:bus:{uuid.uuid4().hex}"


class RedisBus:
    """A bus over Redis pub/sub (redis-py): every worker on every host gets every message.

    ::

        bus = RedisBus("redis://localhost:6379/0")
        bus = RedisBus("redis+sentinel://s1:26379,s2:26379/mymaster/0")
        bus = RedisBus("redis+cluster://node1:6379,node2:6379")
        bus = RedisBus(client=app_redis)        # the application's own client or pool
        clients = SSERegistry("clients", bus=bus)

    A publish is one ``PUBLISH`` (``SPUBLISH`` on a Redis Cluster), in the
    caller's thread, whatever the number of tabs. Receiving takes one thread
    and one Redis connection per process (on a cluster: per shard primary that
    holds a subscribed channel), started by the first :meth:`subscribe` in that
    process (a registry subscribes at its first ``register``): a process that
    only publishes (a CLI command, a cron job, a task queue worker) starts
    neither. A process forked from the one that created the bus (gunicorn
    workers, with or without ``--preload``) starts its own listener.

    The subscription is watched: TCP keepalive, redis-py's health checks and a
    ``PING`` after *health_check_interval* seconds of silence, which must be
    answered within as long again. When the connection is lost, the listener
    logs an error, reconnects with a capped exponential backoff (logging each
    failed attempt) and, once Redis confirms the subscription again, calls
    every subscriber's ``on_gap``: what was published meanwhile is gone. With
    Sentinel, each reconnection asks the sentinels for the current primary;
    on a cluster, each one reads the slots again first.

    :param url: a Redis URL: ``redis://:password@host:6379/0``, ``rediss://``
        for TLS, ``redis+sentinel://...`` or ``redis+cluster://...``; see
        ``redis_clients()`` for their syntax.
    :param client: instead of *url*, the application's ``redis.Redis`` (one
        from ``Sentinel.master_for`` too), ``redis.ConnectionPool``,
        ``redis.cluster.RedisCluster``, or a function returning one of them,
        called at the bus's first use. It publishes as configured (give it a
        ``socket_timeout``); the listeners connect with its address,
        credentials and TLS settings, and the bus's own timeouts.
    :param health_check_interval: seconds of silence on the subscription
        after which Redis is pinged.
    :param connect_timeout: seconds to wait for a connection to Redis, and
        for Redis to answer a command; a publish waits this long at most
        while Redis is unreachable (a refused connection fails at once).
        With *client*, it applies to the listeners only.
    :param subscribe_timeout: seconds the first :meth:`subscribe` of a
        channel waits for Redis to confirm it; after that it returns, and the
        subscriber gets ``on_gap()`` once the subscription is active.
    :param backoff: the first and the longest pause between reconnection
        attempts, in seconds; the pause doubles after each failed attempt.
    :param redis_options: with *url*, more keyword arguments for the redis-py
        clients (both the publishing and the subscribing ones). The
        connections are named ``flask_datastar`` (publishing) and
        ``flask_datastar:listener`` in ``CLIENT LIST`` unless ``client_name``
        is given.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        client: Any = None,
        health_check_interval: float = 5.0,
        connect_timeout: float = 2.0,
        subscribe_timeout: float = 2.0,
        backoff: tuple[float, float] = (0.1, 5.0),
        **redis_options: Any,
    ) -> None:
        redis = _import_redis()
        if isinstance(client, str) and url is None:
            url, client = client, None  # DATASTAR_REDIS set from the environment
        if (url is None) == (client is None):
            raise TypeError("Give 'RedisBus' either a Redis URL or 'client=', not both.")
        if health_check_interval <= 0:
            raise ValueError("'health_check_interval' must be a positive number of seconds.")
        if not 0 < backoff[0] <= backoff[1]:
            raise ValueError("'backoff' must be (first, longest) with 0 < first <= longest.")
        self.health_check_interval = health_check_interval
        self.subscribe_timeout = subscribe_timeout
        self.backoff = backoff
        # RedisClusterException too: what redis-py raises when no node of a cluster
        # answers (it is neither a RedisError nor an OSError).
        self._redis_errors: tuple[type[BaseException], ...] = (
            redis.RedisError,
            OSError,
            redis.exceptions.RedisClusterException,
        )
        self._source: Any = url if url is not None else client
        self._options: dict[str, Any] = {
            "connect_timeout": connect_timeout,
            "health_check_interval": health_check_interval,
            "redis_options": redis_options,
        }
        self._clients: RedisClients | None = None
        self._clients_lock = threading.Lock()
        if url is not None:
            self.url = url
            # At once, so that a wrong URL fails at start-up. (A cluster client reads the
            # slots when it is made: at the first use, so that an app starts while the
            # cluster is down; its URL is only checked here.)
            if url.partition("://")[0].lower() in CLUSTER_SCHEMES:
                _parse_cluster_url(url)
            else:
                self._redis()
        else:
            self.url = f"<{type(client).__name__}>"
            if not callable(client) or isinstance(client, redis.Redis):
                self._redis()
        self._closed = False
        self._reset_process()

    def __repr__(self) -> str:
        return f"<RedisBus {self._where}>"

    @property
    def _where(self) -> str:
        clients = self._clients
        return clients.where if clients is not None else _redacted(self.url)

    def _redis(self) -> RedisClients:
        """The clients, made at the first call (see ``redis_clients()``)."""
        clients = self._clients
        if clients is None:
            with self._clients_lock:
                clients = self._clients
                if clients is None:
                    clients = self._clients = redis_clients(self._source, **self._options)
        return clients

    @property
    def client(self) -> Any:
        """The redis-py client that publishes; the application may use it for its own data.

        A ``redis.Redis``, or a ``redis.cluster.RedisCluster`` on a cluster.

        :raises BusError: on a cluster, no node could be reached to learn its slots
            (the client is made at the first use).
        """
        try:
            return self._redis().client
        except self._redis_errors as e:
            raise BusError(f"Could not reach Redis at {self._where}: {e}") from e

    @property
    def sharded(self) -> bool:
        """Whether the bus runs on a Redis Cluster, with ``SPUBLISH`` and ``SSUBSCRIBE``."""
        return self._redis().sharded

    @property
    def connected(self) -> bool:
        """Whether this process's listeners currently hold live subscriptions."""
        with self._lock:
            listeners = [entry for entry in self._listeners.values() if not entry.retired]
            return bool(listeners) and all(entry.connected for entry in listeners)

    def _reset_process(self) -> None:
        """Start this process's state afresh: a forked child inherits no threads."""
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._subscriptions: dict[str, list[_Subscription]] = {}
        #: The listener (its key) that subscribes each channel.
        self._routes: dict[str, str] = {}
        self._listeners: dict[str, _Listener] = {}
        self._epochs = itertools.count(1)
        self._stop = threading.Event()

    def _check_process(self) -> None:
        if self._pid != os.getpid():
            with _FORK_LOCK:
                if self._pid != os.getpid():
                    self._reset_process()

    # -- the Bus protocol -----------------------------------------------------------

    def publish(self, channel: str, payload: bytes) -> None:
        """Publish *payload* on *channel* with one ``PUBLISH`` (``SPUBLISH`` on a cluster).

        :raises BusError: Redis could not be reached or refused the command.
        """
        self._check_process()
        try:
            clients = self._redis()
            if clients.sharded:
                clients.client.spublish(channel, payload)
            else:
                clients.client.publish(channel, payload)
        except self._redis_errors as e:
            raise BusError(f"Could not publish to Redis at {self._where}: {e}") from e

    def subscribe(self, channel: str, on_message: OnMessage, on_gap: OnGap) -> None:
        """Call ``on_message(payload)`` for each message on *channel*, in the listener thread.

        Starts this process's listener if needed and waits (up to
        *subscribe_timeout*) until Redis confirms the subscription, so that
        whatever the caller sends next cannot be older than a message it
        misses. ``on_gap()`` is called, in the listener thread, after every
        interruption, and after a confirmation that came too late to wait for.

        :raises BusError: on a cluster, no node could be reached to learn its slots.
        """
        self._check_process()
        try:
            clients = self._redis()
            key = clients.route(channel)
        except self._redis_errors as e:
            raise BusError(f"Could not reach Redis at {self._where}: {e}") from e
        subscription = _Subscription(on_message, on_gap)
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self!r} is closed; create a new bus.")
            subscribers = self._subscriptions.setdefault(channel, [])
            key = self._routes.setdefault(channel, key)
            listener = self._listener_locked(key)
            if not subscribers:
                listener.renew.add(channel)
            subscribers.append(subscription)
            if listener.confirmed.get(channel) == listener.epoch and listener.connected:
                subscription.epoch = listener.epoch
                subscription.ready.set()
            wake = len(subscribers) == 1 and listener.thread is not None
            if listener.thread is None:
                self._start_locked(listener)
            thread = listener.thread
        if wake:
            self._wake(listener)
        if threading.current_thread() is not thread:
            # (From the listener's own thread, in a callback, waiting would only stall it.)
            subscription.ready.wait(self.subscribe_timeout)
        with self._lock:
            subscription.waiting = False
            late = not subscription.ready.is_set()
        if late:
            log.warning(
                "flask_datastar: Redis at %s has not confirmed the subscription to %r within"
                " %s s; its streams will be resynced once it does.",
                listener.where,
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
                listener = self._listeners.get(self._routes.pop(channel, ""))
                if listener is not None:
                    # A subscriber that comes next must wait for a new confirmation: the
                    # listener may be unsubscribing this channel from Redis right now.
                    listener.confirmed.pop(channel, None)
        # The listener is not woken: it drops the channel at its next poll, within a
        # second, and no PUBLISH per unsubscribe (from many threads at once, when many
        # registries go idle together) grows the connection pool.

    def close(self) -> None:
        """Stop this process's listeners and close the connections the bus made."""
        with self._lock:
            self._closed = True
            listeners = list(self._listeners.values()) if self._pid == os.getpid() else []
            self._stop.set()
        for listener in listeners:
            if listener.thread is not None:
                self._wake(listener)
        for listener in listeners:
            if listener.thread is not None:
                listener.thread.join(self.health_check_interval + 5)
            _close_client(listener.client)
        clients = self._clients
        if clients is not None and clients.owned:
            _close_client(clients.client)

    # -- the listeners --------------------------------------------------------------

    def _listener_locked(self, key: str) -> _Listener:
        """The listener of *key*, made if needed (not started); called with the lock held."""
        listener = self._listeners.get(key)
        if listener is None or listener.retired:
            clients = self._redis()
            where = f"{clients.where} (shard {key})" if clients.sharded else clients.where
            listener = _Listener(key, clients.listener_client(key), where, self.backoff)
            self._listeners[key] = listener
        return listener

    def _start_locked(self, listener: _Listener) -> None:
        listener.thread = threading.Thread(
            target=self._listen,
            args=(listener,),
            name="flask_datastar-redis-listener",
            daemon=True,
        )
        listener.thread.start()

    def _wake(self, listener: _Listener) -> None:
        try:
            # A plain PUBLISH even on a cluster: the cluster carries it to every node.
            self._redis().client.publish(listener.control, b"")
        except self._redis_errors:
            pass  # The listener is reconnecting; it reads the channel list when it is back.

    def _listen(self, listener: _Listener) -> None:
        """A listener thread: hold the subscription, and get it back whenever it is lost."""
        clients = self._redis()
        lost = False
        while not self._stop.is_set():
            if lost and clients.sharded and not self._rebalance(listener):
                break  # its shard is gone and it has no channel left
            pubsub = None
            try:
                # (redis-py leaves these two methods unannotated.)
                make_pubsub: Callable[[], PubSub] = listener.client.pubsub
                pubsub = make_pubsub()
                with self._lock:
                    listener.epoch = next(self._epochs)
                    listener.confirmed.clear()
                # The control channel first: its confirmation proves the connection works.
                pubsub.subscribe(listener.control)
                self._serve(listener, pubsub, clients.sharded)
            except Exception as e:
                if not self._stop.is_set():
                    self._lost(listener, e)
                    lost = True
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:
                        pass
            if not self._stop.is_set():
                # Jitter keeps the workers of a fleet from reconnecting in lockstep.
                self._stop.wait(listener.delay * (0.5 + random.random() / 2))
                listener.delay = min(listener.delay * 2, self.backoff[1])
        with self._lock:
            listener.connected = False
            listener.confirmed.clear()

    def _rebalance(self, listener: _Listener) -> bool:
        """Read the cluster's slots again and move channels to the primaries now holding them.

        :return: whether *listener* should go on (its node is a primary, or it keeps
            channels that no other node could take).
        """
        clients = self._redis()
        try:
            primaries = clients.refresh() or set()
            with self._lock:
                routes = {channel: clients.route(channel) for channel in self._routes}
        except Exception as e:
            log.error(
                "flask_datastar: could not read the slots of the Redis Cluster at %s (%s).",
                clients.where,
                e,
            )
            return True
        wake = []
        with self._lock:
            for channel, key in routes.items():
                if channel not in self._routes or self._routes[channel] == key:
                    continue
                old = self._listeners.get(self._routes[channel])
                if old is not None:
                    old.confirmed.pop(channel, None)
                self._routes[channel] = key
                target = self._listener_locked(key)
                target.renew.add(channel)
                if target.thread is None:
                    self._start_locked(target)
                else:
                    wake.append(target)
            keeps = listener.key in self._routes.values()
            if not keeps and listener.key not in primaries:
                listener.retired = True
                if self._listeners.get(listener.key) is listener:
                    del self._listeners[listener.key]
        for target in wake:
            self._wake(target)
        if listener.retired:
            log.warning(
                "flask_datastar: %s is no longer a primary of the Redis Cluster; its"
                " channels moved to the others.",
                listener.where,
            )
            _close_client(listener.client)
        return not listener.retired

    def _serve(self, listener: _Listener, pubsub: PubSub, sharded: bool) -> None:
        """Read messages until the listener stops; raise when the connection is lost."""
        interval = self.health_check_interval
        poll = min(1.0, interval / 2)
        subscribed: set[str] = set()
        #: Channels unsubscribed here whose confirmation has not come yet.
        leaving: set[str] = set()
        last_heard = time.monotonic()
        ping_sent: float | None = None
        subscribe: Callable[..., None] = pubsub.ssubscribe if sharded else pubsub.subscribe
        unsubscribe: Callable[..., None] = pubsub.sunsubscribe if sharded else pubsub.unsubscribe
        while not self._stop.is_set():
            with self._lock:
                wanted = {
                    channel
                    for channel, key in self._routes.items()
                    if key == listener.key and channel in self._subscriptions
                }
                renew = listener.renew & wanted
                listener.renew -= renew
            added, dropped = (wanted - subscribed) | renew, subscribed - wanted
            if added:
                subscribe(*sorted(added))
                subscribed |= added
            if dropped:
                unsubscribe(*sorted(dropped))
                subscribed -= dropped
                leaving |= dropped
                with self._lock:
                    for channel in dropped:
                        if self._routes.get(channel) == listener.key:
                            listener.confirmed.pop(channel, None)
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
            if message["type"] == "sunsubscribe":
                channel = _text(message["channel"])
                if channel in leaving:
                    leaving.discard(channel)
                elif channel in subscribed:
                    # The cluster moved the channel's slot to another shard.
                    raise ConnectionError(f"the cluster moved {channel!r} to another shard")
                continue
            self._handle(listener, message)

    def _handle(self, listener: _Listener, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind in ("ssubscribe", "smessage"):
            kind = kind[1:]
        if kind not in ("subscribe", "message"):
            return
        channel = _text(message["channel"])
        if channel == listener.control:
            if kind == "subscribe":
                self._back(listener)
            return
        if kind == "subscribe":
            self._confirm(listener, channel)
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

    def _lost(self, listener: _Listener, error: Exception) -> None:
        with self._lock:
            listener.connected = False
            listener.confirmed.clear()
        listener.attempts += 1
        reason = str(error) or type(error).__name__
        if listener.deaf_since is None:
            listener.deaf_since = time.monotonic()
            log.error(
                "flask_datastar: lost the Redis subscription at %s (%s); this process misses"
                " broadcasts from the others until it is back. Reconnecting.",
                listener.where,
                reason,
            )
        else:
            log.error(
                "flask_datastar: still no Redis subscription at %s after %.1f s (attempt %d:"
                " %s); next attempt in about %.1f s.",
                listener.where,
                time.monotonic() - listener.deaf_since,
                listener.attempts,
                reason,
                listener.delay,
            )

    def _back(self, listener: _Listener) -> None:
        """The connection works again (or for the first time)."""
        with self._lock:
            listener.connected = True
        if listener.deaf_since is not None:
            metrics.bus_reconnected()  # metrics
            log.warning(
                "flask_datastar: the Redis subscription at %s is back after %.1f s; resyncing"
                " every stream of this process.",
                listener.where,
                time.monotonic() - listener.deaf_since,
            )
        listener.deaf_since = None
        listener.attempts = 0
        listener.delay = self.backoff[0]

    def _confirm(self, listener: _Listener, channel: str) -> None:
        """Redis confirmed *channel*: release the waiting subscribers, tell the others."""
        gaps = []
        with self._lock:
            if self._routes.get(channel) != listener.key:
                return  # moved to another shard meanwhile; that listener confirms it
            epoch = listener.epoch
            listener.confirmed[channel] = epoch
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


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _close_client(client: Any) -> None:
    """Close a client the bus made, and its connection pool (redis-py keeps a given one)."""
    try:
        client.close()
        pool = getattr(client, "connection_pool", None)
        if pool is not None:
            pool.disconnect()
    except Exception:
        log.debug("flask_datastar: error closing a Redis client", exc_info=True)
