"""Metrics: the plain snapshot, the Prometheus export, and their sum across gunicorn workers.

The counters are per process and count from its start, so every in-process test
compares a snapshot taken before with one taken after.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from flask_datastar import SSE, FlaskDatastar, RedisBus, SSERegistry, metrics
from flask_datastar.testing import ServerSentEvent, SSEParser, open_stream
from tests.helpers import GunicornServer, RawHTTPStream, RedisServer, free_port, post, wait_for

ROUTE = "/room/<name>/sse"


def route(snapshot: dict[str, Any], name: str = ROUTE) -> dict[str, Any]:
    empty = {
        "open": 0,
        "opened": 0,
        "events": 0,
        "bytes": 0,
        "heartbeats": 0,
        "dropped": 0,
        "slow_steps": 0,
        "slow_step_seconds": 0.0,
        "refused": {},
    }
    numbers: dict[str, Any] = snapshot["routes"].get(name, empty)
    return numbers


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse a Prometheus text exposition into {(sample name, labels): value}."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


@pytest.fixture
def app() -> Flask:
    """A fresh app in testing mode: two streams at most, a small backlog."""
    app = Flask(__name__)
    app.config.update(
        TESTING=True,
        DATASTAR_HEARTBEAT=0.2,
        DATASTAR_MAX_STREAMS=2,
        DATASTAR_CLIENT_SHARE=1,
        DATASTAR_MAX_BACKLOG=1024,
    )
    FlaskDatastar(app)
    return app


@pytest.fixture
def rooms(app: Flask) -> SSERegistry:
    """A stream route with a URL argument, its registry, a broadcast and a scrape."""
    datastar = app.extensions["datastar"].extension
    clients = datastar.registry(app, "metrics-rooms")

    def connect(gen: Any) -> None:
        clients.register(gen)
        gen.patch_signals({"hello": 1})

    @app.get(ROUTE)
    @datastar.sse(on_connect=connect, authorize=lambda identity: True)
    def sse(gen: Any, name: str) -> Any:
        yield gen.sleep(None)

    @app.get("/closed/sse")
    @datastar.sse(authorize=lambda identity: False)
    def closed(gen: Any) -> None:
        return None

    @app.get("/slow/sse")
    @datastar.sse
    def slow(gen: Any) -> Any:
        time.sleep(metrics.SLOW_STEP + 0.05)  # a step that holds its thread
        gen.patch_signals({"slow": True})
        yield gen.sleep(None)

    app.add_url_rule("/metrics", view_func=metrics.metrics_view())
    return clients


def test_open_streams_events_and_bytes_are_counted_by_route(
    app: Flask, client: FlaskClient, rooms: SSERegistry
) -> None:
    before = metrics.snapshot()
    first = open_stream(client, "/room/a/sse")
    second = open_stream(client, "/room/b/sse")
    try:
        first.next_event(), second.next_event()
        during = metrics.snapshot()
        assert route(during)["open"] - route(before)["open"] == 2
        assert route(during)["opened"] - route(before)["opened"] == 2
        assert "/room/a/sse" not in during["routes"]  # the rule, never the raw path
        event = SSE.patch_signals({"n": 1})
        rooms.broadcast(event)
        first.next_event(), second.next_event()
        after = metrics.snapshot()
        # Two first states and two copies of the broadcast.
        assert route(after)["events"] - route(before)["events"] == 4
        sent = len(SSE.patch_signals({"hello": 1}).encode()) + len(event.encode())
        assert route(after)["bytes"] - route(before)["bytes"] == 2 * sent
        assert after["streams_open"] - before["streams_open"] == 2
    finally:
        first.close()
        second.close()
    closed = wait_for(lambda: route(metrics.snapshot())["open"] == route(before)["open"])
    assert closed, "the closed streams still count as open"
    # Closing folds each stream's counters into its route: nothing is lost or doubled.
    assert route(metrics.snapshot())["events"] - route(before)["events"] == 4


def test_refused_streams_are_counted_by_reason(
    app: Flask, client: FlaskClient, rooms: SSERegistry
) -> None:
    before = metrics.snapshot()
    held = [open_stream(client, "/room/a/sse"), open_stream(client, "/room/b/sse")]
    try:
        assert client.get("/room/c/sse").status_code == 503  # DATASTAR_MAX_STREAMS
        assert client.get("/closed/sse").status_code == 401
    finally:
        for stream in held:
            stream.close()
    after = metrics.snapshot()
    assert route(after)["refused"].get("limit", 0) - route(before)["refused"].get("limit", 0) == 1
    refused_auth = route(after, "/closed/sse")["refused"].get("auth", 0)
    assert refused_auth - route(before, "/closed/sse")["refused"].get("auth", 0) == 1


def test_slow_steps_are_counted(app: Flask, client: FlaskClient, rooms: SSERegistry) -> None:
    before = route(metrics.snapshot(), "/slow/sse")
    with open_stream(client, "/slow/sse") as stream:
        assert stream.next_event().signals == {"slow": True}
    after = route(metrics.snapshot(), "/slow/sse")
    assert after["slow_steps"] - before["slow_steps"] == 1
    assert after["slow_step_seconds"] - before["slow_step_seconds"] >= metrics.SLOW_STEP
    # The scheduler's own hook takes a route label as well as a stream.
    metrics.slow_step("/slow/sse", 0.5)
    assert route(metrics.snapshot(), "/slow/sse")["slow_steps"] - before["slow_steps"] == 2


def test_an_event_a_slow_client_cannot_take_is_counted_as_dropped(
    app: Flask, client: FlaskClient, rooms: SSERegistry
) -> None:
    before = route(metrics.snapshot())
    # Not read at all (buffered=False and never iterated): its backlog fills.
    response = client.get("/room/a/sse", buffered=False)
    try:
        gen = rooms.snapshot()[-1]
        # The first event waits; the second would take the wait past the backlog.
        for _ in range(2):
            rooms.broadcast(SSE.patch_elements("<p id='big'>" + "x" * 800 + "</p>"))
        assert rooms.flush()
        assert gen.closed
    finally:
        response.close()
    assert route(metrics.snapshot())["dropped"] - before["dropped"] == 1


def test_coalesced_broadcasts_are_counted(
    app: Flask, client: FlaskClient, rooms: SSERegistry
) -> None:
    with open_stream(client, "/room/a/sse") as stream:
        stream.next_event()
        sent = delivered = coalesced = 0
        before = metrics.snapshot()["coalesced"]
        deadline = time.monotonic() + 10
        # Coalescing happens only when broadcasts come faster than they are written.
        while coalesced == 0 and time.monotonic() < deadline:
            for n in range(200):
                rooms.broadcast(SSE.patch_signals({"n": n}), coalesce="n")
                sent += 1
            assert rooms.flush()
            coalesced = metrics.snapshot()["coalesced"] - before
            delivered = len(stream.received)
            while True:
                try:
                    stream.next_event(timeout=0.2)
                except TimeoutError:
                    break
            delivered = len(stream.received) - 1  # less the first state
        assert coalesced > 0
        assert delivered + coalesced == sent


def test_bus_messages_lag_and_publish_errors(redis_server: RedisServer) -> None:
    bus = RedisBus(redis_server.url)
    registry = SSERegistry("metrics-bus", bus=bus)
    app = Flask(__name__)
    app.config["TESTING"] = True
    datastar = FlaskDatastar(app)

    @app.get("/bus/sse")
    @datastar.sse(on_connect=registry.register)
    def sse(gen: Any) -> Any:
        yield gen.sleep(None)

    client = app.test_client()
    before = metrics.snapshot()["bus"]
    try:
        with open_stream(client, "/bus/sse") as stream:
            for n in range(5):
                registry.broadcast(SSE.patch_signals({"n": n}))
            stream.events(5)
            bus_now = metrics.snapshot()["bus"]
            assert bus_now["messages"] - before["messages"] == 5
            lag = bus_now["lag_seconds"]
            assert lag["count"] - before["lag_seconds"]["count"] == 5
            assert 0 <= lag["max"] < 5  # loopback: well under a second; never negative
            assert lag["buckets"]["+Inf"] == lag["count"]
            # Redis goes away and comes back: the listener reconnects, once.
            redis_server.restart()
            back = wait_for(lambda: metrics.snapshot()["bus"]["reconnects"] > before["reconnects"])
            assert back, "the bus reconnect was not counted"
    finally:
        registry.close()
        bus.close()
    nowhere = RedisBus(f"redis://127.0.0.1:{free_port()}/0", connect_timeout=0.5)
    try:
        failures = metrics.snapshot()["bus"]["publish_errors"]
        SSERegistry("metrics-nowhere", bus=nowhere).broadcast(SSE.patch_signals({"n": 0}))
        assert metrics.snapshot()["bus"]["publish_errors"] - failures == 1
    finally:
        nowhere.close()


def test_prometheus_export_matches_the_snapshot(
    app: Flask, client: FlaskClient, rooms: SSERegistry
) -> None:
    with open_stream(client, "/room/a/sse") as stream:
        stream.next_event()
        response = client.get("/metrics")
        assert response.status_code == 200
        assert response.mimetype == "text/plain"
        samples = scrape(response.get_data(as_text=True))
        numbers = route(metrics.snapshot())
        labels = (("route", ROUTE),)
        assert samples[("flask_datastar_streams_open", labels)] == numbers["open"] >= 1
        assert samples[("flask_datastar_events_sent_total", labels)] == numbers["events"]
        assert samples[("flask_datastar_bytes_sent_total", labels)] == numbers["bytes"]


def test_without_prometheus_client_counting_works_and_export_says_what_to_install() -> None:
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "from flask_datastar import metrics\n"
        "metrics.slow_step('/x', 1.0)\n"
        "assert metrics.snapshot()['routes']['/x']['slow_steps'] == 1\n"
        "try:\n"
        "    metrics.metrics_view()\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert 'pip install "flask_datastar[prometheus]"' in result.stdout


GUNICORN_CONF = """\
from flask_datastar.gunicorn import child_exit, post_worker_init, worker_exit
"""


class Tab:
    """A live stream that counts the bytes of event text it reads."""

    def __init__(self, port: int, path: str) -> None:
        self.http = RawHTTPStream(port, path)
        self.parser = SSEParser()
        self.bytes = 0
        self.pending: list[ServerSentEvent] = []

    def next_event(self) -> ServerSentEvent:
        while not self.pending:
            data = self.http.read_chunk(timeout=5)
            assert data is not None, "the stream ended"
            self.bytes += len(data)
            self.pending.extend(self.parser.feed(data))
        return self.pending.pop(0)


def test_live_metrics_add_up_across_gunicorn_workers(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    multiprocess_dir = tmp_path / "prometheus"
    multiprocess_dir.mkdir()
    config = tmp_path / "gunicorn.conf.py"
    config.write_text(GUNICORN_CONF)
    env = {
        "FLASK_DATASTAR_REDIS_URL": redis_server.url,
        "FLASK_DATASTAR_HEARTBEAT": "0",  # only events on the wire: their bytes add up
        "PROMETHEUS_MULTIPROC_DIR": str(multiprocess_dir),
    }
    server = GunicornServer(
        "tests.live_apps.metrics_app:app", workers=2, threads=12, env=env, config=str(config)
    )
    tabs: list[Tab] = []
    labels = (("route", ROUTE),)

    def scraped() -> dict[Any, float]:
        status, _, body = post(f"{server.url}/metrics", method="GET")
        assert status == 200
        return scrape(body.decode())

    def scraped_when(name: str, value: float) -> dict[Any, float] | None:
        samples = scraped()
        return samples if samples.get((name, labels)) == value else None

    with server:
        try:
            by_pid: dict[int, list[Tab]] = {}
            # gunicorn hands connections to whichever worker accepts first: open streams
            # until both workers hold some.
            while len(tabs) < 16 and (len(by_pid) < 2 or len(tabs) < 4):
                tab = Tab(server.port, f"/room/r{len(tabs)}/sse")
                tabs.append(tab)
                by_pid.setdefault(tab.next_event().signals["pid"], []).append(tab)
            assert len(by_pid) == 2, "every stream went to one worker"
            for n in range(3):
                assert post(f"{server.url}/say?text=m{n}")[0] == 200
            for tab in tabs:
                assert [tab.next_event().signals["said"] for _ in range(3)] == ["m0", "m1", "m2"]
            sent = len(tabs) * 4  # a first state and three broadcasts each
            samples = wait_for(lambda: scraped_when("flask_datastar_events_sent_total", sent))
            assert samples, f"the events never added up to {sent}: {scraped()}"
            assert samples[("flask_datastar_streams_open", labels)] == len(tabs)
            assert samples[("flask_datastar_streams_opened_total", labels)] == len(tabs)
            wire = sum(tab.bytes for tab in tabs)
            assert samples[("flask_datastar_bytes_sent_total", labels)] == wire
            # Both workers listen on the bus: each got the three messages, and timed them.
            assert samples[("flask_datastar_bus_messages_total", ())] == 6
            assert samples[("flask_datastar_bus_lag_seconds_count", ())] == 6

            # A worker killed outright writes nothing more: the master's child_exit hook
            # takes its streams out of the gauge, and its counters stay.
            victim, lost = next(iter(by_pid.items()))
            os.kill(victim, signal.SIGKILL)
            left = len(tabs) - len(lost)
            samples = wait_for(lambda: scraped_when("flask_datastar_streams_open", left))
            assert samples, f"the killed worker's streams still count as open: {scraped()}"
            assert samples[("flask_datastar_events_sent_total", labels)] == sent
        finally:
            for tab in tabs:
                tab.http.close()


def test_a_compressed_stream_counts_its_events_heartbeats_and_bytes_before_compression(
    app: Flask, client: FlaskClient
) -> None:
    # As documented: bytes are counted before compression, and a heartbeat is told from
    # an event by its own text, not by the first byte of its compressed form.
    datastar = app.extensions["datastar"].extension
    events = [SSE.patch_signals({"n": n}) for n in range(3)]

    @app.get("/zipped/sse")
    @datastar.sse
    def zipped(gen: Any) -> Any:
        yield from events
        yield gen.sleep(0.7)  # heartbeats (every 0.2 s) go through the compressor too

    before = metrics.snapshot()
    response = client.get(
        "/zipped/sse",
        headers={"Accept-Encoding": "gzip", "Datastar-Request": "true"},
        buffered=False,
    )
    assert response.headers["Content-Encoding"] == "gzip"
    body = b"".join(response.response)  # type: ignore[arg-type]
    response.close()
    text = zlib.decompress(body, 16 + zlib.MAX_WBITS).decode()
    # The opening comment carries the headers out; it is the response's, not counted.
    assert text.startswith(":\n\n")
    text = text[3:]
    heartbeats = sum(1 for block in text.split("\n\n") if block.startswith(":"))
    assert heartbeats >= 1
    done = wait_for(
        lambda: (
            route(metrics.snapshot(), "/zipped/sse")["open"] == route(before, "/zipped/sse")["open"]
        )
    )
    assert done, "the stream still counts as open"
    after = metrics.snapshot()
    numbers, old = route(after, "/zipped/sse"), route(before, "/zipped/sse")
    assert numbers["events"] - old["events"] == len(events) + text.count("retry:")
    assert numbers["heartbeats"] - old["heartbeats"] == heartbeats
    assert numbers["bytes"] - old["bytes"] == len(text.encode())


def test_compressed_bytes_are_counted_exactly_while_open_and_once_after(
    app: Flask, client: FlaskClient
) -> None:
    # The "encoded" numbers (the compressed ratio) come from each stream's compressor:
    # every byte it took and made, the opening comment and the end of the body
    # included, counted while the stream is open and, once it closed, exactly once.
    app.config["DATASTAR_HEARTBEAT"] = 30  # no heartbeat between two readings
    datastar = app.extensions["datastar"].extension
    go_on = threading.Event()

    @app.get("/counted/sse")
    @datastar.sse
    def counted(gen: Any) -> Any:
        yield SSE.patch_signals({"n": 1})
        while not go_on.is_set():
            yield gen.sleep(0.02)
        yield SSE.patch_signals({"n": 2})

    def encoded() -> dict[str, int]:
        return metrics.snapshot()["encoded"].get("gzip", {"raw": 0, "wire": 0})  # type: ignore[no-any-return]

    before = encoded()
    response = client.get(
        "/counted/sse",
        headers={"Accept-Encoding": "gzip", "Datastar-Request": "true"},
        buffered=False,
    )
    assert response.headers["Content-Encoding"] == "gzip"
    decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
    chunks = iter(response.response)  # type: ignore[call-overload]
    wire, text = b"", b""
    while b'"n":1' not in text:
        chunk = next(chunks)
        wire += chunk
        text += decoder.decompress(chunk)
    live = encoded()
    assert (live["raw"] - before["raw"], live["wire"] - before["wire"]) == (len(text), len(wire))
    go_on.set()
    for chunk in chunks:
        wire += chunk
        text += decoder.decompress(chunk)
    response.close()
    assert decoder.eof, "a clean end ends the gzip body"
    assert wait_for(lambda: route(metrics.snapshot(), "/counted/sse")["open"] == 0)
    after = encoded()
    assert (after["raw"] - before["raw"], after["wire"] - before["wire"]) == (len(text), len(wire))


def test_no_counter_goes_back_while_streams_close() -> None:
    # Snapshots taken while compressed streams open and close, as a scrape does at any
    # moment: a closing stream counts either as open (its own counters and its
    # compressor's) or in its route's totals, never in neither. The engine forgets an
    # ended stream before metrics fold it into the totals; a snapshot that read the
    # engine's open streams in between lost its events and its compressed bytes.
    app = Flask(__name__)
    app.config.update(TESTING=True, DATASTAR_HEARTBEAT=30, DATASTAR_MAX_STREAMS=100)
    datastar = FlaskDatastar(app)

    @app.get("/brief/sse")
    @datastar.sse
    def brief(gen: Any) -> None:
        gen.patch_signals({"n": 1})

    def numbers() -> tuple[int, int, int, int]:
        snapshot = metrics.snapshot()
        gzip = snapshot["encoded"].get("gzip", {"raw": 0, "wire": 0})
        counted = route(snapshot, "/brief/sse")
        return gzip["raw"], gzip["wire"], counted["events"], counted["bytes"]

    went_back: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    stop = threading.Event()

    def scrape_forever() -> None:
        highest: tuple[int, ...] = numbers()
        while not stop.is_set():
            now = numbers()
            if any(new < old for new, old in zip(now, highest, strict=True)):
                went_back.append((highest, now))
            highest = tuple(map(max, now, highest))

    bodies: list[bytes] = []

    def open_and_close(count: int) -> None:
        own = app.test_client()
        headers = {"Accept-Encoding": "gzip", "Datastar-Request": "true"}
        for _ in range(count):
            response = own.get("/brief/sse", headers=headers)
            bodies.append(zlib.decompress(response.data, 16 + zlib.MAX_WBITS))

    interval = sys.getswitchinterval()
    # Threads switch often, as under a loaded server: the gap between the two steps
    # of a stream's end, a few bytecodes wide, is then met in a fraction of a second.
    sys.setswitchinterval(1e-5)
    scraper = threading.Thread(target=scrape_forever)
    openers = [threading.Thread(target=open_and_close, args=(100,)) for _ in range(3)]
    try:
        scraper.start()
        for thread in openers:
            thread.start()
        for thread in openers:
            thread.join()
    finally:
        stop.set()
        scraper.join()
        sys.setswitchinterval(interval)
    assert went_back == []
    assert len(bodies) == 300 and all(b'"n":1' in body for body in bodies)
    assert route(metrics.snapshot(), "/brief/sse")["open"] == 0
