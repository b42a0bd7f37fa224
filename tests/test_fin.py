"""A client's FIN ends its direct stream, whatever waits in the server's receive queue.

Under a real gunicorn (gthread): the socket watcher learns of a FIN from ``EPOLLIN``,
then ``recv(MSG_PEEK)`` returning ``b""``. A client that sent bytes after its request
(a pipelined request: HTTP/1.1 allows it, and a proxy may do it) leaves them unread in
the receive queue, where they hide the FIN from that ``recv``; the watcher then stopped
watching the socket for reading, so a FIN that came after them was never seen, and the
stream lived on (heartbeats going to a client that had left) until a write failed, which
never happens while the client still reads. These are the torture test's "the server
kept a stream open after the client's FIN" in a form that fails every time.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask, jsonify

from flask_datastar import FlaskDatastar, Stream, open_streams
from flask_datastar.transport import SocketTransport, SocketWatcher
from tests.helpers import GunicornServer, RawHTTPStream

pytestmark = pytest.mark.live

APP = "tests.live_apps.streams:app"

# A live app for the backstop test (gunicorn imports it from this module): a stream that
# only sends heartbeats, and a fault: the socket watcher forgets every stream's socket,
# as if epoll had not reported what happened to it.
app = Flask(__name__)
app.config.from_prefixed_env()
datastar = FlaskDatastar(app)
reasons: list[str] = []


@app.get("/quiet")
@datastar.sse(on_disconnect=lambda gen: reasons.append(gen.close_reason))
def quiet(gen: Stream) -> Any:
    gen.patch_signals({"path": gen.path})
    yield gen.sleep()


@app.get("/unwatch")
def unwatch() -> Any:
    for gen in open_streams():
        transport = gen._transport
        if isinstance(transport, SocketTransport):
            SocketWatcher.get().remove(transport.sock)
    return jsonify(unwatched=len(open_streams()))


@app.get("/state")
def state() -> Any:
    return jsonify(open=len(open_streams()), reasons=reasons)


PIPELINED = b"GET /stats HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def get_json(server: GunicornServer, path: str) -> Any:
    with urllib.request.urlopen(server.url + path, timeout=10) as response:
        return json.loads(response.read())


def wait_for(condition: Callable[[], Any], timeout: float) -> Any:
    """Poll *condition* until it returns something true, or ``None`` at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.05)
    return None


def first_signals(stream: RawHTTPStream) -> dict[str, Any]:
    for event in stream.events(timeout=10):
        if event.event == "datastar-patch-signals":
            return dict(event.signals)
    raise AssertionError("The stream ended before its first event.")


def read_until_end(stream: RawHTTPStream, timeout: float) -> str | None:
    """Read on after a FIN, as a closing tab's socket does; return how the body ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if stream.read_chunk(timeout=min(0.5, deadline - time.monotonic())) is None:
                return "clean"
        except TimeoutError:
            continue
        except (ConnectionError, OSError):
            return "abrupt"
    return None


@pytest.mark.parametrize("rcvbuf", [None, 2048], ids=["reader", "slow-reader"])
def test_a_fin_after_pipelined_bytes_ends_the_stream(rcvbuf: int | None) -> None:
    # Heartbeats every 0.2 s: the stream writes all along, so a write failing cannot be
    # what ends it (a half-closed client still takes every byte).
    env = {"FLASK_DATASTAR_HEARTBEAT": "0.2", "TEST_SNDBUF": "4096" if rcvbuf else "0"}
    with GunicornServer(APP, threads=4, env=env) as server:
        stream = RawHTTPStream(server.port, "/sse?tick=0.05", rcvbuf=rcvbuf)
        try:
            assert first_signals(stream)["path"] == "direct"
            stream.sock.sendall(PIPELINED)  # the next request, sent ahead of time
            # The watcher sees those bytes before the FIN (as it would a proxy's).
            time.sleep(0.5)
            assert get_json(server, "/stats")["open"] == 1
            stream.shutdown_write()  # FIN, as a closing tab sends
            ended = read_until_end(stream, timeout=10)
            stats = wait_for(lambda: (s := get_json(server, "/stats"))["open"] == 0 and s, 5)
        finally:
            stream.close()
        assert ended is not None, "the server kept the stream open 10 s after the client's FIN"
        assert stats, "the stream was still open after its connection ended"
        assert stats["disconnects"] == ["the client closed the connection"]
        assert stats["registered"] == 0


def test_bytes_without_a_fin_do_not_end_the_stream() -> None:
    """Pipelined bytes alone are no sign of leaving: the stream goes on."""
    env = {"FLASK_DATASTAR_HEARTBEAT": "0.2"}
    with GunicornServer(APP, threads=4, env=env) as server:
        stream = RawHTTPStream(server.port, "/sse?tick=0.05")
        try:
            assert first_signals(stream)["path"] == "direct"
            stream.sock.sendall(PIPELINED)
            ticks = 0
            for event in stream.events(timeout=5):
                ticks += "tick" in event.signals
                if ticks == 20:  # a second of ticks after the bytes came
                    break
            stats = get_json(server, "/stats")
        finally:
            stream.close()
        assert stats["open"] == 1
        assert stats["disconnects"] == []


def test_a_fin_the_watcher_missed_ends_the_stream_within_a_heartbeat() -> None:
    """The backstop: whatever makes the socket watcher miss a FIN, the stream's own
    scheduler step asks the socket once per heartbeat interval."""
    env = {"FLASK_DATASTAR_HEARTBEAT": "0.5"}
    with GunicornServer("tests.test_fin:app", threads=4, env=env) as server:
        stream = RawHTTPStream(server.port, "/quiet")
        try:
            assert first_signals(stream)["path"] == "direct"
            assert get_json(server, "/unwatch")["unwatched"] == 1
            stream.shutdown_write()  # FIN, which no watcher reports now
            ended = read_until_end(stream, timeout=10)
            state = wait_for(lambda: (s := get_json(server, "/state"))["open"] == 0 and s, 5)
        finally:
            stream.close()
        assert ended is not None, "the server kept the stream open 10 s after the client's FIN"
        assert state, "the stream was still open after its connection ended"
        assert state["reasons"] == ["the client closed the connection"]
