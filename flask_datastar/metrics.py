"""Counters and gauges of this process's streams, with ``prometheus_client`` export.

The engine calls the hooks of this module at a few marked places (a stream
opens, an event is written, a registry coalesces, a bus message arrives);
they add to plain integers under one lock, so counting costs well under a
microsecond per event and needs no third-party package. Read them with
:func:`snapshot`::

    from flask_datastar import metrics
    metrics.snapshot()["streams_open"]

When ``prometheus_client`` is installed (``pip install
"flask_datastar[prometheus]"``) the same numbers are exported as
``flask_datastar_*`` metrics in its default registry, so an existing
``/metrics`` endpoint shows them; :func:`metrics_view` serves one. Under
gunicorn with ``PROMETHEUS_MULTIPROC_DIR`` set, each worker writes its
numbers to that directory about once a second (and the worker that answers
the scrape writes its own first), and the scrape adds them up across
workers; :func:`flask_datastar.gunicorn.child_exit` drops the gauges of a
worker that exited.

Streams are labelled by their Flask route (``request.url_rule.rule``, such
as ``/room/<name>/sse``), never by the raw path, so the number of series
stays bounded; registries and buses are not labelled at all (an
application may make one registry per room or per user).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Response

    from .compression import Encoder
    from .stream import Stream
    from .transport import Chunk

__all__ = [
    "BUS_LAG_BUCKETS",
    "REFUSAL_REASONS",
    "SLOW_STEP",
    "bus_publish_failed",
    "bus_received",
    "bus_reconnected",
    "bus_stamp",
    "event_dropped",
    "event_sent",
    "events_coalesced",
    "flush",
    "mark_process_dead",
    "metrics_view",
    "prometheus_registry",
    "route_of",
    "slow_step",
    "snapshot",
    "step_done",
    "stream_closed",
    "stream_compressed",
    "stream_opened",
    "stream_refused",
]

#: Why a stream can be refused: over the process's stream limit, over one
#: client's share of it, the process is stopping, or the identity/authorizer said no.
REFUSAL_REASONS = ("limit", "threads", "client_share", "draining", "auth")

#: Upper bounds (seconds) of the bus lag histogram's buckets.
BUS_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

#: Seconds between two writes of a worker's numbers to ``PROMETHEUS_MULTIPROC_DIR``.
SYNC_INTERVAL = 1.0

#: A handler step that runs this many seconds or longer counts as slow
#: (:func:`step_done`); it holds a thread that other work may be waiting for.
SLOW_STEP = 0.1

#: The route label of a stream opened outside a request (no ``url_rule``).
NO_ROUTE = "(none)"

# Where a stream's route and its "counted as open" mark live: in its WSGI environ,
# which every stream has, so that the Stream class needs no slot for metrics.
_ROUTE_KEY = "flask_datastar.metrics.route"
_COUNTS_KEY = "flask_datastar.metrics.counts"
_ENCODER_KEY = "flask_datastar.metrics.encoder"
# The time a bus message was published (seconds since the epoch), in the message.
_SENT_AT = "at"  # not "s": the replay log puts the entry id there


class _Route:
    """The numbers of one route (plain integers: the hot path only adds)."""

    __slots__ = (
        "open",
        "opened",
        "events",
        "bytes",
        "heartbeats",
        "dropped",
        "slow_steps",
        "slow_seconds",
        "refused",
    )

    def __init__(self) -> None:
        self.open = 0
        self.opened = 0
        self.events = 0
        self.bytes = 0
        self.heartbeats = 0
        self.dropped = 0
        self.slow_steps = 0
        self.slow_seconds = 0.0
        self.refused: dict[str, int] = {}

    def as_dict(self) -> dict[str, Any]:
        return {
            "open": self.open,
            "opened": self.opened,
            "events": self.events,
            "bytes": self.bytes,
            "heartbeats": self.heartbeats,
            "dropped": self.dropped,
            "slow_steps": self.slow_steps,
            "slow_step_seconds": self.slow_seconds,
            "refused": dict(self.refused),
        }


_lock = threading.Lock()
_routes: dict[str, _Route] = {}
_coalesced = [0]
# Bus: messages received, lag sum and max, lag bucket counts, reconnects, failed publishes.
_bus = {"messages": 0, "lag_sum": 0.0, "lag_max": 0.0, "reconnects": 0, "publish_errors": 0}
_bus_buckets = [0] * (len(BUS_LAG_BUCKETS) + 1)
# Compression: bytes before and after, by encoding.
_encoded: dict[str, list[int]] = {}
# The streams counted as open and not yet as closed, whose own counters (and
# compressor's) a snapshot adds to the totals. Kept here, under _lock, rather than
# read from the engine's open streams: a stream leaves those before stream_closed()
# folds its counters into the totals, and a snapshot in between counted it nowhere
# (its events and compressed bytes went back, then forward again).
_counted: set[Stream] = set()


def _route(name: str) -> _Route:
    """The numbers of route *name*, made on first use (call it under ``_lock``)."""
    numbers = _routes.get(name)
    if numbers is None:
        numbers = _routes[name] = _Route()
    return numbers


def _add_encoded(totals: dict[str, list[int]], encoder: Encoder) -> None:
    """Add *encoder*'s byte counts to *totals*, by encoding (call it under ``_lock``)."""
    pair = totals.get(encoder.name)
    if pair is None:
        pair = totals[encoder.name] = [0, 0]
    pair[0] += encoder.raw_bytes
    pair[1] += encoder.wire_bytes


def _current_route() -> str:
    """The url rule of the current request, or :data:`NO_ROUTE`."""
    from flask import has_request_context, request

    if has_request_context():
        rule = request.url_rule
        if rule is not None:
            return rule.rule
    return NO_ROUTE


def route_of(stream: Stream) -> str:
    """Return the route label of *stream*: the url rule of the view that opened it.

    :param stream: a stream that :func:`stream_opened` counted.
    """
    route: str = stream.environ.get(_ROUTE_KEY, NO_ROUTE)
    return route


# -- the hooks the engine calls -------------------------------------------------------


def stream_opened(stream: Stream) -> None:
    """Count *stream* as open under the route of the current request (call it in the view)."""
    route = _current_route()
    environ = stream.environ
    if not isinstance(environ, dict):
        return  # (always a dict: the WSGI environ, or {} outside a request)
    environ[_ROUTE_KEY] = route
    # The stream's own counters: written under its lock, so sending takes no global one.
    environ[_COUNTS_KEY] = [0, 0, 0]
    with _lock:
        numbers = _route(route)
        numbers.open += 1
        numbers.opened += 1
        _counted.add(stream)
    _exporter.started()


def stream_closed(stream: Stream) -> None:
    """Count *stream* as closed; a second call for the same stream changes nothing."""
    environ = stream.environ
    if not isinstance(environ, dict):
        return
    with _lock:
        # Taken out under the lock that snapshots read under: counted once, either here
        # in its route's totals or, while it is open, from the stream itself.
        counts = environ.pop(_COUNTS_KEY, None)
        if counts is None:
            return
        _counted.discard(stream)
        encoder = environ.pop(_ENCODER_KEY, None)
        if encoder is not None:
            _add_encoded(_encoded, encoder)
        numbers = _route(environ.get(_ROUTE_KEY, NO_ROUTE))
        numbers.open -= 1
        numbers.events += counts[0]
        numbers.bytes += counts[1]
        numbers.heartbeats += counts[2]


def stream_refused(reason: str, route: str | None = None) -> None:
    """Count a stream that was not opened, for *reason* (one of :data:`REFUSAL_REASONS`).

    :param reason: why it was refused.
    :param route: its route; by default the url rule of the current request.
    """
    name = _current_route() if route is None else route
    with _lock:
        refused = _route(name).refused
        refused[reason] = refused.get(reason, 0) + 1


def event_sent(stream: Stream, chunk: Chunk) -> None:
    """Count *chunk* handed to *stream*'s transport: an event, or a heartbeat comment.

    Call it under the stream's lock (as ``Stream._write_locked`` is): it adds
    to the stream's own counters, without a lock of its own.
    """
    counts = stream.environ.get(_COUNTS_KEY)
    if counts is not None:
        data = chunk.data
        counts[1] += len(data)
        if data[0] == 58:  # b":", a comment: the heartbeat
            counts[2] += 1
        else:
            counts[0] += 1


def event_dropped(stream: Stream) -> None:
    """Count an event that *stream* could not take (its client read too slowly; it ends)."""
    route = stream.environ.get(_ROUTE_KEY, NO_ROUTE)
    with _lock:
        _route(route).dropped += 1


def events_coalesced(count: int = 1) -> None:
    """Count events a registry dropped because a newer one with their label superseded them."""
    with _lock:
        _coalesced[0] += count


def slow_step(stream_or_route: Stream | str, seconds: float) -> None:
    """Count a handler step that held its thread for *seconds* (the scheduler calls it).

    :param stream_or_route: the stream whose handler ran, or its route label.
    :param seconds: how long the step took.
    """
    route = stream_or_route if isinstance(stream_or_route, str) else route_of(stream_or_route)
    with _lock:
        numbers = _route(route)
        numbers.slow_steps += 1
        numbers.slow_seconds += seconds


def step_done(stream: Stream, started: float) -> None:
    """Count the handler step of *stream* that began at *started* if it was slow.

    :param stream: the stream whose handler ran.
    :param started: ``time.monotonic()`` when the step began.
    """
    seconds = time.monotonic() - started
    if seconds >= SLOW_STEP:
        slow_step(stream, seconds)


def stream_compressed(stream: Stream, encoder: Encoder) -> None:
    """Count what *encoder* compresses for *stream*, from now until the stream closes.

    The encoder keeps its own byte counts (under the stream's lock, as it
    compresses), so a compressed write takes no lock of this module: snapshots
    read the counts of the open streams' encoders, and :func:`stream_closed`
    adds them to the totals of their encoding.

    :param stream: a stream that :func:`stream_opened` counted.
    :param encoder: its compressor.
    """
    environ = stream.environ
    if isinstance(environ, dict) and _COUNTS_KEY in environ:
        environ[_ENCODER_KEY] = encoder


def bus_stamp(message: dict[str, Any]) -> None:
    """Write the publishing time into a bus *message*, for :func:`bus_received` to measure lag."""
    message[_SENT_AT] = round(time.time(), 6)


def bus_received(message: Mapping[str, Any]) -> None:
    """Count a bus message as it reaches this process, and how long it took since its publish.

    The lag compares the wall clocks of two processes: across hosts it is as
    exact as their clock synchronisation (NTP: a millisecond or so). A
    negative difference (clock skew) counts as zero.
    """
    sent_at = message.get(_SENT_AT)
    lag = None
    if isinstance(sent_at, (int, float)):
        lag = max(0.0, time.time() - float(sent_at))
    with _lock:
        _bus["messages"] += 1
        if lag is not None:
            _bus["lag_sum"] += lag
            _bus["lag_max"] = max(_bus["lag_max"], lag)
            index = 0
            while index < len(BUS_LAG_BUCKETS) and lag > BUS_LAG_BUCKETS[index]:
                index += 1
            _bus_buckets[index] += 1
    if lag is not None and _exporter.state == "ready":
        # One observation per message and process (not per stream): cheap enough to
        # write at once, and a histogram cannot be synced as deltas.
        _exporter.metrics["bus_lag"].observe(lag)


def bus_reconnected() -> None:
    """Count a bus subscription that was lost and is back."""
    with _lock:
        _bus["reconnects"] += 1


def bus_publish_failed() -> None:
    """Count a publish that the bus did not take."""
    with _lock:
        _bus["publish_errors"] += 1


# -- reading them -------------------------------------------------------------------


def _gather() -> tuple[
    dict[str, dict[str, Any]], int, dict[str, Any], list[int], dict[str, list[int]]
]:
    """Copy every number: the routes' totals plus the counters of the open streams."""
    with _lock:
        routes = {name: numbers.as_dict() for name, numbers in _routes.items()}
        encoded = {name: list(totals) for name, totals in _encoded.items()}
        for stream in _counted:
            counts = stream.environ.get(_COUNTS_KEY)
            if counts is not None:
                numbers = routes.get(stream.environ.get(_ROUTE_KEY, NO_ROUTE))
                if numbers is not None:
                    numbers["events"] += counts[0]
                    numbers["bytes"] += counts[1]
                    numbers["heartbeats"] += counts[2]
                encoder = stream.environ.get(_ENCODER_KEY)
                if encoder is not None:
                    _add_encoded(encoded, encoder)
        return routes, _coalesced[0], dict(_bus), list(_bus_buckets), encoded


def snapshot() -> dict[str, Any]:
    """Return this process's numbers as plain data (JSON-serialisable).

    ::

        {
            "pid": 4242,
            "streams_open": 3, "events_sent": 120, "bytes_sent": 40960,
            "routes": {"/sse": {"open": 3, "opened": 5, "events": 120, "bytes": 40960,
                                "heartbeats": 4, "dropped": 0, "slow_steps": 0,
                                "slow_step_seconds": 0.0, "refused": {"limit": 1}}},
            "coalesced": 7,
            "bus": {"messages": 30, "lag_seconds": {"count": 30, "sum": 0.012,
                    "max": 0.002, "buckets": {"0.001": 25, ..., "+Inf": 30}},
                    "reconnects": 0, "publish_errors": 0},
            "encoded": {"gzip": {"raw": 40960, "wire": 2048}},
        }

    The counters count from the start of the process; ``open`` is a gauge.
    With several workers each has its own numbers: add them up, or let
    Prometheus do it (see the module's docs).
    """
    routes, coalesced, bus, buckets, totals = _gather()
    encoded = {name: {"raw": raw, "wire": wire} for name, (raw, wire) in totals.items()}
    cumulative: dict[str, int] = {}
    total = 0
    for bound, count in zip((*map(str, BUS_LAG_BUCKETS), "+Inf"), buckets, strict=True):
        total += count
        cumulative[bound] = total
    return {
        "pid": os.getpid(),
        "streams_open": sum(numbers["open"] for numbers in routes.values()),
        "events_sent": sum(numbers["events"] for numbers in routes.values()),
        "bytes_sent": sum(numbers["bytes"] for numbers in routes.values()),
        "routes": routes,
        "coalesced": coalesced,
        "bus": {
            "messages": bus["messages"],
            "lag_seconds": {
                "count": total,
                "sum": bus["lag_sum"],
                "max": bus["lag_max"],
                "buckets": cumulative,
            },
            "reconnects": bus["reconnects"],
            "publish_errors": bus["publish_errors"],
        },
        "encoded": encoded,
    }


# -- Prometheus ---------------------------------------------------------------------


def _multiprocess_dir() -> str | None:
    # The variable prometheus_client reads (its old lower-case spelling too).
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")


class _Exporter:
    """Copies the plain numbers into ``prometheus_client`` metrics, as deltas.

    Single process: at every scrape of the default registry (a collector
    registered first syncs before the metrics are read), no thread. Under
    ``PROMETHEUS_MULTIPROC_DIR``: a daemon thread per process every
    :data:`SYNC_INTERVAL` seconds, since the scrape reads the other
    workers' files, not their memory.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.state: str = "unknown"  # "unknown", "absent" or "ready"
        self.metrics: dict[str, Any] = {}
        self.exported: dict[tuple[str, ...], float] = {}
        self.thread_pid = 0

    def ready(self) -> bool:
        """Create the metrics once, if ``prometheus_client`` can be imported."""
        if self.state == "unknown":
            with self.lock:
                if self.state == "unknown":
                    self.state = "ready" if self._create() else "absent"
        return self.state == "ready"

    def _create(self) -> bool:
        try:
            import prometheus_client as prom
        except ImportError:
            return False
        registry = prom.REGISTRY
        registry.register(_SyncCollector())  # first: it syncs before the others are read
        route = ("route",)
        self.metrics = {
            "open": prom.Gauge(
                "flask_datastar_streams_open",
                "Streams open now.",
                route,
                multiprocess_mode="livesum",
            ),
            "opened": prom.Counter("flask_datastar_streams_opened", "Streams opened.", route),
            "refused": prom.Counter(
                "flask_datastar_streams_refused",
                "Streams refused, by reason (limit, client_share, draining, auth).",
                ("route", "reason"),
            ),
            "events": prom.Counter(
                "flask_datastar_events_sent", "Events handed to streams.", route
            ),
            "bytes": prom.Counter(
                "flask_datastar_bytes_sent",
                "Bytes of events and heartbeats handed to streams, before compression.",
                route,
            ),
            "heartbeats": prom.Counter(
                "flask_datastar_heartbeats_sent", "Heartbeat comments sent.", route
            ),
            "dropped": prom.Counter(
                "flask_datastar_events_dropped",
                "Events a slow client could not take (its stream was ended).",
                route,
            ),
            "slow_steps": prom.Counter(
                "flask_datastar_slow_steps", "Handler steps that held a thread too long.", route
            ),
            "slow_seconds": prom.Counter(
                "flask_datastar_slow_step_seconds", "Time spent in slow handler steps.", route
            ),
            "coalesced": prom.Counter(
                "flask_datastar_events_coalesced",
                "Broadcast events superseded by a newer one before they were written.",
            ),
            "bus_lag": prom.Histogram(
                "flask_datastar_bus_lag_seconds",
                "Time from a bus publish to its arrival in this process's listener.",
                buckets=BUS_LAG_BUCKETS,
            ),
            "bus_messages": prom.Counter("flask_datastar_bus_messages", "Bus messages received."),
            "bus_reconnects": prom.Counter(
                "flask_datastar_bus_reconnects", "Bus subscriptions lost and recovered."
            ),
            "bus_publish_errors": prom.Counter(
                "flask_datastar_bus_publish_errors", "Publishes the bus did not take."
            ),
            "encoded_raw": prom.Counter(
                "flask_datastar_encoded_raw_bytes", "Bytes given to a compressor.", ("encoding",)
            ),
            "encoded_wire": prom.Counter(
                "flask_datastar_encoded_wire_bytes", "Bytes a compressor made.", ("encoding",)
            ),
        }
        return True

    def started(self) -> None:
        """A stream opened: export from now on; under multiprocess mode, sync in this process."""
        if not self.ready() or self.thread_pid == os.getpid() or _multiprocess_dir() is None:
            return
        with self.lock:
            pid = os.getpid()
            if self.thread_pid == pid:
                return
            if self.thread_pid:
                # A forked worker: what its parent exported is not this process's.
                self.exported.clear()
            self.thread_pid = pid
        threading.Thread(
            target=self._sync_forever, name="flask_datastar-metrics", daemon=True
        ).start()

    def _sync_forever(self) -> None:
        pid = os.getpid()
        while self.thread_pid == pid:
            time.sleep(SYNC_INTERVAL)
            self.sync()

    def _add(self, key: tuple[str, ...], metric: Any, value: float) -> None:
        delta = value - self.exported.get(key, 0)
        if delta > 0:
            child = metric.labels(*key[1:]) if len(key) > 1 else metric
            child.inc(delta)
            self.exported[key] = value

    def sync(self) -> None:
        """Write what changed since the last sync into the prometheus metrics."""
        # Not ready() here: the registry calls the sync collector while _create holds
        # the lock, to learn its names.
        if self.state != "ready":
            return
        routes, coalesced, bus, _, encoded = _gather()
        m = self.metrics
        with self.lock:
            for name, numbers in routes.items():
                m["open"].labels(name).set(numbers["open"])
                for field, metric in (
                    ("opened", "opened"),
                    ("events", "events"),
                    ("bytes", "bytes"),
                    ("heartbeats", "heartbeats"),
                    ("dropped", "dropped"),
                    ("slow_steps", "slow_steps"),
                    ("slow_step_seconds", "slow_seconds"),
                ):
                    self._add((metric, name), m[metric], numbers[field])
                for reason, count in numbers["refused"].items():
                    self._add(("refused", name, reason), m["refused"], count)
            self._add(("coalesced",), m["coalesced"], coalesced)
            self._add(("bus_messages",), m["bus_messages"], bus["messages"])
            self._add(("bus_reconnects",), m["bus_reconnects"], bus["reconnects"])
            self._add(("bus_publish_errors",), m["bus_publish_errors"], bus["publish_errors"])
            for encoding, (raw, wire) in encoded.items():
                self._add(("encoded_raw", encoding), m["encoded_raw"], raw)
                self._add(("encoded_wire", encoding), m["encoded_wire"], wire)


class _SyncCollector:
    """Registered first in the default registry: brings the numbers up to date at a scrape."""

    def collect(self) -> list[Any]:
        _exporter.sync()
        return []


_exporter = _Exporter()


def flush() -> None:
    """Write this process's numbers to ``prometheus_client`` now (a worker about to exit)."""
    if _exporter.ready():
        _exporter.sync()


def prometheus_registry() -> Any:
    """Return the ``prometheus_client`` registry to scrape, after syncing this process.

    Under ``PROMETHEUS_MULTIPROC_DIR`` a fresh registry that adds up every
    worker's files (``MultiProcessCollector``); otherwise the default
    registry, with the application's own metrics beside these.

    :raises RuntimeError: ``prometheus_client`` is not installed.
    """
    if not _exporter.ready():
        raise RuntimeError(
            "Exporting metrics needs prometheus_client: install it with"
            " 'pip install \"flask_datastar[prometheus]\"', or read"
            " 'flask_datastar.metrics.snapshot()' instead."
        )
    from prometheus_client import REGISTRY, CollectorRegistry

    if _multiprocess_dir() is None:
        return REGISTRY
    from prometheus_client import multiprocess

    _exporter.sync()
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


def metrics_view() -> Callable[[], Response]:
    """Return a Flask view that answers a Prometheus scrape::

        app.add_url_rule("/metrics", view_func=metrics.metrics_view())

    It serves what :func:`prometheus_registry` collects, in the text format
    (or OpenMetrics when the scraper asks for it). Protect or hide the route
    as any internal endpoint (a separate port, the proxy's access rules);
    with CSRF on, a scrape is a GET and needs nothing.

    :raises RuntimeError: ``prometheus_client`` is not installed.
    """
    prometheus_registry()  # fails now, at start-up, if prometheus_client is missing

    def metrics() -> Response:
        from flask import Response, request
        from prometheus_client.exposition import choose_encoder

        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return Response(encoder(prometheus_registry()), content_type=content_type)

    return metrics


def mark_process_dead(pid: int) -> None:
    """Drop the gauges of exited process *pid* from ``PROMETHEUS_MULTIPROC_DIR``.

    Its counters stay (they count what happened); its open streams no longer
    count as open. Does nothing without the directory or ``prometheus_client``.

    :param pid: the process id of the worker that exited.
    """
    directory = _multiprocess_dir()
    if directory is None:
        return
    try:
        from prometheus_client import multiprocess
    except ImportError:
        return
    multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
