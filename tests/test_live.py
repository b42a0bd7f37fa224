"""Live tests against a real ``gunicorn -k gthread`` on an ephemeral loopback port.

They read the wire with a strict chunk decoder, so every framing mistake of the
direct socket path shows up as a :class:`ProtocolError`.
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from flask_datastar.testing import ServerSentEvent, SSEParser
from tests.helpers import (
    ConnectionClosed,
    GunicornServer,
    RawHTTPStream,
    get_json,
    make_self_signed_cert,
    post,
    wait_for,
)

pytestmark = pytest.mark.live

APP = "tests.live_apps.streams:app"


def first_event(stream: RawHTTPStream) -> ServerSentEvent:
    assert stream.status == 200, stream.headers
    return next(stream.events(timeout=10))


def signals_until(
    stream: RawHTTPStream, done: Callable[[dict[str, Any]], bool]
) -> list[dict[str, Any]]:
    seen = []
    for event in stream.events(timeout=10):
        seen.append(event.signals)
        if done(event.signals):
            return seen
    raise AssertionError(f"the stream ended after {seen}")


def click(server: GunicornServer, pad: int = 0) -> None:
    status, _, _ = post(f"{server.url}/click?pad={pad}")
    assert status == 204


@pytest.fixture(scope="module")
def server() -> Iterator[GunicornServer]:
    env = {"FLASK_DATASTAR_HEARTBEAT": "1"}
    with GunicornServer(APP, threads=20, env=env) as srv:
        yield srv


def test_three_streams_and_a_post_all_see_the_new_count(server: GunicornServer) -> None:
    streams = [RawHTTPStream(server.port, "/sse") for _ in range(3)]
    try:
        firsts = [first_event(s).signals for s in streams]
        assert {f["path"] for f in firsts} == {"direct"}
        start = firsts[0]["count"]
        click(server)
        for s in streams:
            assert signals_until(s, lambda sig: "count" in sig)[-1]["count"] == start + 1
    finally:
        for s in streams:
            s.close()


def test_every_chunk_is_one_whole_event(server: GunicornServer) -> None:
    with RawHTTPStream(server.port, "/sse?tick=0.05") as stream:
        assert stream.chunked
        assert stream.headers["Content-Type"] == "text/event-stream"
        assert stream.headers["X-Accel-Buffering"] == "no"
        assert "Connection" not in stream.headers or stream.headers["Connection"] != "close"
        chunks = []
        for _ in range(12):
            chunk = stream.read_chunk(timeout=10)
            assert chunk is not None
            chunks.append(chunk)
            if len(chunks) == 6:
                click(server)
    assert chunks[0] == b":\n\n"  # the headers left with a comment, before any event
    for chunk in chunks[1:]:
        parser = SSEParser()
        events = parser.feed(chunk)
        assert chunk.endswith(b"\n\n")
        assert len(events) + parser.comments == 1, chunk


def test_normal_end_terminates_and_keeps_the_connection(server: GunicornServer) -> None:
    with RawHTTPStream(server.port, "/oneshot") as stream:
        for round_ in range(3):
            if round_:
                stream.request("GET", "/oneshot")
            events = list(stream.events(timeout=10))  # ends at the terminating chunk
            assert events[0].signals == {"path": "direct"}
            assert [e.elements for e in events[1:]] == [f'<p id="n{i}">{i}</p>' for i in range(3)]
        # The same socket carried three responses: keep-alive survived the direct writes.
        stream.request("GET", "/stats")
        assert json.loads(stream.read_body(timeout=10))["pid"] > 0


def test_disconnect_runs_the_hook_and_frees_the_thread() -> None:
    # Two threads only: a stream whose thread were not given back would starve the rest.
    env = {"FLASK_DATASTAR_HEARTBEAT": "1", "FLASK_DATASTAR_DIRECT_WRITES": "false"}
    with GunicornServer(APP, threads=2, env=env) as server:
        for _ in range(3):
            with RawHTTPStream(server.port, "/sse") as stream:
                assert first_event(stream).signals["path"] == "queue"
            # The portable path notices at a failed heartbeat write (about two intervals).
            stats = wait_for(lambda: (s := get_json(server, "/stats"))["open"] == 0 and s)
            assert stats and stats["registered"] == 0
        assert len(stats["disconnects"]) == 3
        a, b = RawHTTPStream(server.port, "/sse"), RawHTTPStream(server.port, "/sse")
        try:
            assert first_event(a).signals["path"] == first_event(b).signals["path"] == "queue"
        finally:
            a.close()
            b.close()
        threads = stats["threads"]
    # Nothing but gunicorn's main thread and pool (2), and the scheduler's timer and pool
    # (3): no thread per stream.
    assert threads <= 3 + 3, stats["thread_names"]


def test_fin_ends_a_direct_stream_without_waiting_for_a_heartbeat() -> None:
    env = {"FLASK_DATASTAR_HEARTBEAT": "30"}
    with GunicornServer(APP, threads=4, env=env) as server:
        stream = RawHTTPStream(server.port, "/sse")
        assert first_event(stream).signals["path"] == "direct"
        assert get_json(server, "/stats")["open"] == 1
        stream.shutdown_write()  # FIN, as a closing tab sends
        # Well before the 30 s heartbeat could have found out.
        stats = wait_for(lambda: (s := get_json(server, "/stats"))["open"] == 0 and s, timeout=10)
        stream.close()
        assert stats, "the stream was still open 10 s after the client's FIN"
        assert stats["disconnects"] == ["the client closed the connection"]
        assert stats["registered"] == 0


def test_a_stalled_client_is_ended_and_the_others_get_everything() -> None:
    env = {
        "FLASK_DATASTAR_HEARTBEAT": "30",
        "FLASK_DATASTAR_MAX_BACKLOG": "16384",
        "TEST_SNDBUF": "4096",
    }
    clicks = 60
    with GunicornServer(APP, threads=12, env=env) as server:
        readers = [RawHTTPStream(server.port, "/sse") for _ in range(5)]
        # It ticks under the app's state lock: its sends must never hold that lock
        # waiting for a client that does not read, or every click would hang.
        stalled = RawHTTPStream(server.port, "/sse?tick=0.01", rcvbuf=4096)
        try:
            starts = [first_event(r).signals["count"] for r in readers]
            for _ in range(clicks):
                click(server, pad=2000)
            for reader, start in zip(readers, starts, strict=True):
                last = start + clicks
                counts = [
                    s["count"]
                    for s in signals_until(reader, lambda sig, last=last: sig.get("count") == last)
                ]
                assert counts == list(range(start + 1, start + clicks + 1))
            stats = wait_for(lambda: (s := get_json(server, "/stats"))["registered"] == 5 and s)
            assert stats, "the stalled client was never ended"
            assert len(stats["disconnects"]) == 1
            assert "not reading" in stats["disconnects"][0]
            # Its connection was cut mid-stream: it can never look like a complete response.
            with pytest.raises(ConnectionClosed):
                for _ in stalled.events(timeout=10):
                    pass
        finally:
            for r in [*readers, stalled]:
                r.close()


def test_a_slow_reader_gets_every_event_through_the_backlog() -> None:
    # Small buffers on both sides: most events go out in parts, the rest waits in the
    # stream's backlog until the socket is writable again (the watcher flushes it).
    env = {"FLASK_DATASTAR_MAX_BACKLOG": str(1024 * 1024), "TEST_SNDBUF": "4096"}
    clicks = 40
    with GunicornServer(APP, threads=4, env=env) as server:
        with RawHTTPStream(server.port, "/sse", rcvbuf=4096) as slow:
            start = first_event(slow).signals["count"]
            for _ in range(clicks):
                click(server, pad=8000)
            counts = []
            for event in slow.events(timeout=10):
                counts.append(event.signals["count"])
                time.sleep(0.01)
                if counts[-1] == start + clicks:
                    break
            assert counts == list(range(start + 1, start + clicks + 1))
            assert get_json(server, "/stats")["disconnects"] == []


def test_http_1_0_falls_back_to_the_queue_path(server: GunicornServer) -> None:
    with RawHTTPStream(server.port, "/sse", http_version="HTTP/1.0") as stream:
        assert stream.status == 200 and not stream.chunked
        first = next(stream.events(timeout=10)).signals
        assert first["path"] == "queue"
        click(server)
        assert signals_until(stream, lambda sig: "count" in sig)[-1]["count"] == first["count"] + 1
    with RawHTTPStream(server.port, "/oneshot", http_version="HTTP/1.0") as stream:
        events = SSEParser().feed(stream.read_until_close(timeout=10))
        assert len(events) == 4


def test_tls_falls_back_to_the_queue_path(tmp_path: Path) -> None:
    certfile, keyfile = make_self_signed_cert(tmp_path)
    with GunicornServer(APP, threads=4, certfile=certfile, keyfile=keyfile) as server:
        with RawHTTPStream(server.port, "/sse", tls=True) as stream:
            first = first_event(stream).signals
            assert first["path"] == "queue"
            click(server)
            assert signals_until(stream, lambda sig: "count" in sig)[-1]["count"] == 1


def test_a_middleware_adding_content_encoding_forces_the_fallback() -> None:
    with GunicornServer(APP, threads=4, env={"TEST_GZIP": "1"}) as server:
        with RawHTTPStream(server.port, "/sse") as stream:
            assert stream.headers["Content-Encoding"] == "gzip"
            inflate = zlib.decompressobj(wbits=31)
            parser = SSEParser()
            events: list[ServerSentEvent] = []
            clicked = False
            while not any("count" in e.signals and e.signals["count"] == 1 for e in events[1:]):
                chunk = stream.read_chunk(timeout=10)
                assert chunk is not None
                events.extend(parser.feed(inflate.decompress(chunk)))
                if events and not clicked:
                    clicked = True
                    click(server)
            assert events[0].signals["path"] == "queue"


def test_a_vanished_peer_is_bounded_by_the_tcp_user_timeout() -> None:
    # A peer that acknowledges nothing would otherwise hold its thread ~15 minutes.
    env = {"FLASK_DATASTAR_SEND_TIMEOUT": "7"}
    with GunicornServer(APP, threads=4, env=env) as server:
        with RawHTTPStream(server.port, "/sse?show_timeout=1") as stream:
            events = stream.events(timeout=10)
            assert next(events).signals["path"] == "direct"
            assert next(events).signals == {"tcp_user_timeout": 7000}
