"""Failure paths of the engine, each reproduced through the public API.

Most run against a real ``gunicorn -k gthread`` (where the bug lived); the rest drive
streams in-process or on real socket pairs. Each of them failed before its fix.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask, session

from flask_datastar import (
    SSE,
    DatastarResponse,
    FlaskDatastar,
    SSERegistry,
    Stream,
    StreamClosed,
    datastar_response,
    open_streams,
    sse_response,
    sse_stream,
)
from flask_datastar.transport import Chunk, SocketWatcher
from tests.helpers import (
    ConnectionClosed,
    GunicornServer,
    RawHTTPStream,
    get_json,
    post,
    wait_for,
)

APP = "tests.live_apps.streams:app"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process *pid* so far, from ``/proc``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    # utime and stime are fields 14 and 15 of the line; 12 and 13 after the name.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- 1. no select.select: file descriptors past 1023 ------------------------------------


@pytest.mark.live
@pytest.mark.parametrize("loop", ["0", "1"], ids=["one-shot-end", "owner-drain"])
def test_a_backlog_on_a_socket_numbered_past_1023_is_flushed(loop: str) -> None:
    """A one-shot stream that ends with a backlog, and a handler whose own events pile
    past the bound, wait for the socket to drain; ``select.select`` raised ValueError for
    any fd >= 1024 there, and the tail was lost."""
    env = {
        "TEST_HOG_FDS": "1100",
        "TEST_SNDBUF": "4096",
        "FLASK_DATASTAR_MAX_BACKLOG": "16384",
    }
    size, count = 300_000, 3
    with GunicornServer(APP, threads=4, env=env) as server:
        path = f"/big?size={size}&count={count}&loop={loop}"
        with RawHTTPStream(server.port, path, rcvbuf=4096) as stream:
            time.sleep(0.5)  # the handler is done (or waiting): its tail is in the backlog
            events = list(stream.events(timeout=20))  # to the terminating chunk
        assert events[0].signals["fd"] >= 1024
        assert [e.signals["i"] for e in events[1:]] == list(range(count))
        assert all(len(e.signals["pad"]) == size for e in events[1:])
        assert "Traceback" not in server.log_text()


# -- 2. empty and incomplete events never reach the wire ---------------------------------


@pytest.mark.live
@pytest.mark.parametrize("via", ["stream", "registry"])
@pytest.mark.parametrize("text", ["", "event: x\ndata: y\n"], ids=["empty", "no-blank-line"])
def test_text_that_is_not_a_whole_event_is_refused_and_the_stream_goes_on(
    via: str, text: str
) -> None:
    with GunicornServer(APP, threads=8, env={"FLASK_DATASTAR_HEARTBEAT": "30"}) as server:
        with RawHTTPStream(server.port, "/sse") as stream:
            events = stream.events(timeout=10)
            first = next(events).signals
            assert first["path"] == "direct"
            wait_for(lambda: get_json(server, "/stats")["registered"] == 1)
            status, _, body = post(f"{server.url}/raw?via={via}", body=text.encode())
            assert status == 400
            assert b"empty event" in body or b"blank line" in body
            status, _, _ = post(f"{server.url}/click")
            assert status == 204
            # The strict decoder: had "0\r\n\r\n" gone out, the response would have ended
            # there and the click's chunk would be garbage after it.
            assert next(events).signals["count"] == first["count"] + 1


def test_sending_an_empty_or_incomplete_event_raises() -> None:
    gen = Stream({})
    for bad in ("", b"", "event: x\ndata: y\n", "data: y"):
        with pytest.raises(ValueError, match="empty event|blank line"):
            gen.send(bad)
    with pytest.raises(ValueError, match="empty"):
        Chunk(b"")
    registry = SSERegistry("checks")
    try:
        with pytest.raises(ValueError, match="empty event"):
            registry.broadcast("")
        with pytest.raises(ValueError, match="blank line"):
            registry.send_to("k", "event: x\n")
    finally:
        registry.close()
    gen.send(": comment\r\n\r\n")  # CRLF line ends are events too
    gen.send(SSE.patch_signals({"a": 1}).encode())


# -- 4. StreamClosed from another stream ends the handler's own stream -------------------


def test_a_handler_killed_by_a_peer_that_left_ends_its_own_stream(app: Flask) -> None:
    ended: list[str] = []
    peers: list[Stream] = []

    @app.get("/peer")
    @sse_stream(on_connect=peers.append)
    def peer(gen: Stream) -> Iterator[Any]:
        yield gen.sleep()

    @app.get("/relay")
    @sse_stream(on_disconnect=lambda gen: ended.append(gen.close_reason))
    def relay(gen: Stream) -> Iterator[Any]:
        while True:
            peers[0].patch_signals({"hello": True})  # raises once the peer has left
            yield gen.sleep(0.01)

    client = app.test_client()
    peer_response = client.get("/peer", buffered=False)
    next(iter(peer_response.response))
    peer_response.close()
    assert peers[0].closed
    relay_response = client.get("/relay", buffered=False)
    chunks = iter(relay_response.response)
    # Before, the relay's stream lived on, sending heartbeats (0.2 s) forever.
    with pytest.raises(StreamClosed) as caught:
        for _ in range(50):
            next(chunks)
    relay_response.close()
    assert caught.value.stream is peers[0]
    assert ended == ["the handler raised StreamClosed"]
    assert open_streams() == []


# -- 5 (the wire's part). text from a request can never make a send fail -----------------


def test_a_lone_surrogate_cannot_make_a_send_fail() -> None:
    event = SSE.patch_signals(json.loads('{"text": "a\\ud800b"}'))
    assert Chunk(event).data.endswith('"a\ufffdb"}\n\n'.encode())
    gen = Stream({})
    gen.send(event)  # raised UnicodeEncodeError before


# -- 7. no busy loop after a stream with a backlog has ended -----------------------------


@pytest.mark.live
def test_the_watcher_does_not_spin_after_a_stream_with_a_backlog_ends() -> None:
    env = {"TEST_SNDBUF": "4096", "FLASK_DATASTAR_HEARTBEAT": "30"}
    with GunicornServer(APP, threads=8, env=env) as server:
        [pid] = server.worker_pids()
        with RawHTTPStream(server.port, "/blocking?seconds=5", rcvbuf=4096) as stream:
            assert stream.status == 200
            wait_for(lambda: get_json(server, "/stats")["registered"] == 1)
            for _ in range(5):
                assert post(f"{server.url}/click?pad=6000")[0] == 204  # fills a backlog
            assert post(f"{server.url}/block")[0] == 204  # the owner is busy for 5 s
            time.sleep(0.3)
            assert post(f"{server.url}/close-all")[0] == 204  # a normal end, backlog kept
            # The client reads again: its socket turns writable while nobody flushes.
            stream.sock.settimeout(0.2)
            try:
                while stream.sock.recv(65536):
                    pass
            except OSError:
                pass
            before = cpu_seconds(pid)
            time.sleep(2.0)
            used = cpu_seconds(pid) - before
        # A level-triggered EPOLLOUT left set used a whole core (2 s) here.
        assert used < 0.5, f"the idle worker used {used:.2f} s of CPU in 2 s"


# -- 8. a stale epoll event cannot end the stream that took the socket's number ---------


class Owner:
    def __init__(self) -> None:
        self.gone = threading.Event()

    def _peer_gone(self, reason: str) -> None:
        self.gone.set()

    def _socket_writable(self) -> bool:
        return False


def test_a_stale_hang_up_event_does_not_end_the_socket_that_reused_the_number() -> None:
    """epoll reports numbers: a HUP read for a socket that then closed, whose number the
    next connection got, reaches the new socket's entry. It must be checked on the
    socket itself (white-box: the race window is microseconds wide in a live server)."""
    import select
    import socket

    watcher = SocketWatcher.get()
    server, client = socket.socketpair()
    owner = Owner()
    try:
        watcher.add(server, owner)
        fd = server.fileno()
        for mask in (select.EPOLLHUP, select.EPOLLERR, select.EPOLLIN | select.EPOLLRDHUP):
            watcher._handle(fd, mask, watcher._watched[fd])  # the stale event
            assert not owner.gone.is_set(), mask
        client.close()  # and a real one is still seen
        assert owner.gone.wait(5)
    finally:
        watcher.remove(server)
        server.close()
        client.close()


# -- 9. the stream cap cannot be overshot by concurrent opens ----------------------------


@pytest.mark.live
def test_concurrent_opens_cannot_overshoot_the_stream_cap() -> None:
    env = {
        "FLASK_DATASTAR_MAX_STREAMS": "3",
        "FLASK_DATASTAR_CLIENT_SHARE": "1",
        "TEST_AFTER_REQUEST_DELAY": "0.5",
    }
    with GunicornServer(APP, threads=20, env=env) as server:
        streams: list[RawHTTPStream] = []
        lock = threading.Lock()

        def open_one() -> None:
            stream = RawHTTPStream(server.port, "/sse")
            with lock:
                streams.append(stream)

        threads = [threading.Thread(target=open_one) for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        try:
            assert [s.status for s in streams] == [200] * 10
            # A refused stream is told when to retry, then cut (the client retries it).
            admitted = 0
            for stream in streams:
                try:
                    next(stream.events(timeout=10))
                    admitted += 1
                except ConnectionClosed:
                    assert stream.parser.retry is not None
            assert admitted == 3
            assert get_json(server, "/stats")["open"] == 3
        finally:
            for s in streams:
                s.close()


# -- 10. errors in on_connect get a response; wrong yields do not loop -------------------


@pytest.mark.live
@pytest.mark.parametrize(("kind", "status"), [("raise", 500), ("abort", 403)])
def test_an_error_in_on_connect_is_an_http_error_not_an_empty_reply(kind: str, status: int) -> None:
    with GunicornServer(APP, threads=4) as server:
        with RawHTTPStream(server.port, f"/bad-connect?kind={kind}") as stream:
            assert stream.status == status  # the connection was cut before the status line
            body = stream.read_body(timeout=10)
        if kind == "abort":
            assert b"You may not listen here." in body
        stats = get_json(server, "/stats")
        # The stream it opened is gone: out of the registry, its slot free, hooks run.
        assert stats["open"] == 0 and stats["registered"] == 0
        assert stats["disconnects"] == ["the response was never sent"]


@pytest.mark.live
def test_a_handler_that_yields_a_wrong_type_ends_cleanly_once() -> None:
    with GunicornServer(APP, threads=4) as server:
        with RawHTTPStream(server.port, "/bad-yield") as stream:
            events = list(stream.events(timeout=10))  # ends with the terminating chunk
            assert [e.signals for e in events] == [{"before": True}]
            stream.request("GET", "/stats")  # the connection is still good
            stats = json.loads(stream.read_body(timeout=10))
        assert stats["open"] == 0
        assert "yielded int" in stats["disconnects"][0]
        assert "A stream handler yielded int" in server.log_text()


def test_on_connect_runs_in_the_view_so_its_session_writes_are_saved(app: Flask) -> None:
    app.secret_key = "test"

    @app.get("/s")
    @sse_stream(on_connect=lambda gen: session.update(seen=True))
    def handler(gen: Stream) -> None:
        gen.patch_signals({"ok": True})

    response = app.test_client().get("/s")
    assert "session=" in response.headers.get("Set-Cookie", "")


def test_a_response_dropped_before_it_runs_still_ends_its_stream(app: Flask) -> None:
    registry = SSERegistry("dropped")
    ended: list[str] = []

    @app.get("/s")
    @sse_stream(on_connect=registry.register, on_disconnect=lambda g: ended.append(g.close_reason))
    def handler(gen: Stream) -> Iterator[Any]:
        yield gen.sleep()

    @app.after_request
    def fail(response: Any) -> Any:
        raise LookupError("after_request failed")

    app.config["PROPAGATE_EXCEPTIONS"] = False
    # pytest's log capture would keep the traceback, and so the dropped response, alive.
    app.logger.propagate = False
    try:
        assert app.test_client().get("/s").status_code == 500
        gc.collect()
        assert ended == ["the response was never sent"]
        assert len(registry) == 0 and open_streams() == []
    finally:
        app.logger.propagate = True
        registry.close()


# -- 15. imports and serves where there is no epoll ----------------------------------------


def test_the_package_imports_and_serves_without_epoll() -> None:
    """As on macOS or Windows: no epoll, no MSG_NOSIGNAL. The portable path serves."""
    script = r"""
import select, socket, sys
for name in [n for n in dir(select) if n.startswith("EPOLL")] + ["epoll"]:
    delattr(select, name)
for name in ("MSG_NOSIGNAL",):
    if hasattr(socket, name):
        delattr(socket, name)
import threading
from werkzeug.serving import make_server
from flask import Flask
from flask_datastar import FlaskDatastar, SSE
import flask_datastar.transport as transport
assert not transport.DIRECT_WRITES_SUPPORTED
app = Flask(__name__)
datastar = FlaskDatastar(app)
clients = datastar.registry(app, "c")
@app.get("/sse")
@datastar.sse(on_connect=clients.register)
def sse(gen):
    gen.patch_signals({"path": gen.path})
    yield gen.sleep()
server = make_server("127.0.0.1", 0, app, threaded=True)
threading.Thread(target=server.serve_forever, daemon=True).start()
import http.client
conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
conn.request("GET", "/sse")
rv = conn.getresponse()
head = [rv.readline().decode().strip() for _ in range(4)]
print(rv.status, *head)
clients.broadcast(SSE.patch_signals({"n": 1}))
for _ in range(3):
    line = rv.readline().decode().strip()
    if line.startswith("data:"):
        print(line)
        break
server.shutdown()
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("200")
    assert 'data: signals {"path":"queue"}' in lines[0]
    assert lines[1] == 'data: signals {"n":1}'


# -- 16. async views are refused where they are declared ---------------------------------


async def async_view() -> str:
    return SSE.patch_signals({"a": 1})


async def async_generator_view() -> Any:
    yield SSE.patch_signals({"a": 1})


async def async_handler(gen: Stream) -> None:
    gen.patch_signals({"a": 1})


@pytest.mark.parametrize("view", [async_view, async_generator_view], ids=["coro", "asyncgen"])
def test_async_views_are_refused_at_decoration_time(view: Any) -> None:
    with pytest.raises(TypeError, match="async def.*plain generator function"):
        datastar_response(view)
    with pytest.raises(TypeError, match="async def"):
        sse_stream(view)
    with pytest.raises(TypeError, match="async def"):
        FlaskDatastar().sse(on_connect=None)(view)


def test_async_handlers_and_content_are_refused_in_the_view(app: Flask) -> None:
    with app.test_request_context():
        with pytest.raises(TypeError, match="async def"):
            sse_response(async_handler)
        agen = async_generator_view()
        with pytest.raises(TypeError, match="async generator"):
            DatastarResponse(agen)
    assert open_streams() == []


# -- found by the torture test -------------------------------------------------------


def test_a_stream_closed_while_its_on_connect_sends_ends_quietly(app: Flask) -> None:
    """Another thread may close a stream between its registration and the first send
    of ``on_connect``: the view still answers (before, StreamClosed left it: a 500)."""
    ended: list[str] = []

    def connect(gen: Stream) -> None:
        gen.close()  # what a close command racing the registration does
        gen.patch_signals({"first": True})

    @app.get("/s")
    @sse_stream(on_connect=connect, on_disconnect=lambda gen: ended.append(gen.close_reason))
    def handler(gen: Stream) -> Iterator[Any]:
        yield gen.sleep()

    response = app.test_client().get("/s")
    assert response.status_code == 200
    assert response.get_data() == b":\n\n"  # the headers' comment, then a clean end
    response.close()
    assert ended == ["closed by the server"]
    assert open_streams() == []


@pytest.mark.live
def test_a_clean_end_gives_the_kept_alive_connection_its_default_user_timeout() -> None:
    """A stream bounds unacknowledged data with TCP_USER_TIMEOUT. Left on a connection
    that goes on with keep-alive, an idle client then ended in an ETIMEDOUT that
    gunicorn logged as an error with a traceback."""
    env = {"FLASK_DATASTAR_SEND_TIMEOUT": "7"}
    with GunicornServer(APP, threads=4, env=env) as server:
        with RawHTTPStream(server.port, "/oneshot") as stream:
            assert len(list(stream.events(timeout=10))) == 4  # a clean end
            stream.request("GET", "/user-timeout")
            assert json.loads(stream.read_body(timeout=10)) == {"ms": 0}


# -- the stream cap by worker class (issue 12, item 8) -----------------------------------


@pytest.mark.parametrize(
    ("worker_class", "threads", "connections", "limit"),
    [
        ("ThreadWorker", 100, 1000, 90),
        ("ThreadWorker", 4, 1000, 2),
        ("GeventWorker", 1, 1000, 900),  # was 1: the cap came from --threads alone
        ("EventletWorker", 1, 50, 45),
        ("SyncWorker", 1, 1000, 0),
    ],
)
def test_the_stream_cap_follows_the_worker_class(
    worker_class: str, threads: int, connections: int, limit: int
) -> None:
    from flask_datastar.gunicorn import stream_limit

    assert stream_limit(worker_class, threads, connections) == limit


@pytest.mark.live
def test_the_sync_worker_refuses_streams_with_a_message_that_says_what_to_run() -> None:
    """A stream would hold a sync worker, which serves one request at a time, for good."""
    with GunicornServer(
        APP, threads=1, config="gunicorn.conf.py", extra_args=["-k", "sync"]
    ) as server:
        with RawHTTPStream(server.port, "/sse") as stream:
            assert stream.status == 503
            assert b"-k gthread" in stream.read_body(timeout=10)
        assert get_json(server, "/stats")["open"] == 0  # the worker still answers
        assert "gunicorn's sync worker serves one request at a time" in server.log_text()


# -- found by the torture test: ends on a connection the kernel has given up on -----------


def wait_for_request_end(server: GunicornServer, timeout: float = 30.0) -> str:
    """Wait until gunicorn (at debug level) has logged how a failed response ended; return
    the log."""

    def ended() -> str:
        log = server.log_text()
        return log if "Socket error" in log or "Ignoring" in log else ""

    text: str = wait_for(ended, timeout)
    assert text, "gunicorn never finished the response"
    return text


@pytest.mark.live
def test_a_connection_the_kernel_timed_out_ends_without_a_server_error() -> None:
    """A client whose window stays shut is given up by the kernel after ``send_timeout``
    (TCP_USER_TIMEOUT), with ETIMEDOUT pending on the socket. The stream then ends
    abruptly, but shutting down a connection that is already dead fails, and gunicorn's
    terminating chunk met the ETIMEDOUT, which it logged as an error with a traceback
    (the torture test's rare 'TimeoutError ... in write_chunk', from slow clients)."""
    env = {
        "FLASK_DATASTAR_SEND_TIMEOUT": "1",
        "FLASK_DATASTAR_HEARTBEAT": "30",
    }
    with GunicornServer(APP, threads=4, env=env, extra_args=["--log-level", "debug"]) as server:
        with RawHTTPStream(server.port, "/sse", rcvbuf=4096) as stream:
            assert stream.status == 200
            wait_for(lambda: get_json(server, "/stats")["registered"] == 1)
            # More than the client's window, less than the server's send buffer: no
            # backlog (whose flush would meet the error first), and the window shuts.
            for _ in range(2):
                assert post(f"{server.url}/click?pad=6000")[0] == 204
            # The client reads nothing from now on.
            reasons = wait_for(lambda: get_json(server, "/stats")["disconnects"], timeout=30)
            assert reasons, "the stream never ended"
            # The stream had given its thread back: it ended the connection itself,
            # and gunicorn (which logged the request when it let go) has nothing to say.
            log = server.log_text()
    assert "Traceback" not in log and "Socket error" not in log, log[-3000:]


@pytest.mark.live
def test_a_clean_end_on_the_queue_path_checks_the_connection_first() -> None:
    """On the queue path gunicorn writes every chunk, and the terminating one, with a
    blocking send. A clean end on a connection the kernel has given up on (a client
    whose window stayed shut for ``send_timeout``) made that send report ETIMEDOUT,
    which gunicorn logged as an error; on a live client that stopped reading it could
    wait for ever. The end is abrupt there, and quiet."""
    env = {
        "FLASK_DATASTAR_DIRECT_WRITES": "false",
        "FLASK_DATASTAR_SEND_TIMEOUT": "1",
        "FLASK_DATASTAR_HEARTBEAT": "30",
    }
    with GunicornServer(APP, threads=4, env=env, extra_args=["--log-level", "debug"]) as server:
        with RawHTTPStream(server.port, "/sse", rcvbuf=4096) as stream:
            assert stream.status == 200
            wait_for(lambda: get_json(server, "/stats")["registered"] == 1)
            for _ in range(2):  # more than the window, less than the send buffer
                assert post(f"{server.url}/click?pad=6000")[0] == 204
            # The client reads nothing; the kernel gives its connection up (TCP_CLOSE).
            closed = wait_for(lambda: get_json(server, "/stats")["tcp_states"] == [7], 30)
            assert closed, get_json(server, "/stats")
            assert post(f"{server.url}/close-all")[0] == 204  # a clean end
            log = wait_for_request_end(server)
            assert get_json(server, "/stats")["disconnects"] == ["closed by the server"]
    assert "Traceback" not in log and "Socket error" not in log, log[-3000:]
