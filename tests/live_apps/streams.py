"""A test app for the live tests: streams that report their process and path, a counter
that broadcasts, one-shot streams, and a stats endpoint. Settings come from the
environment (``FLASK_DATASTAR_*``, plus the ``TEST_*`` variables below)."""

from __future__ import annotations

import os
import resource
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from flask import Flask, Response, abort, jsonify, request

from flask_datastar import SSE, FlaskDatastar, Stream, open_streams, sse_response

app = Flask(__name__)
app.config.from_prefixed_env()
datastar = FlaskDatastar(app)
clients = datastar.registry(app, "live")

state = {"count": 0}
state_lock = threading.Lock()
disconnects: list[str] = []
# A small send buffer makes a client that does not read fill it quickly.
SNDBUF = int(os.environ.get("TEST_SNDBUF", "0"))
# Holding this many files open pushes every client socket's number past 1023, where
# select.select() no longer works, as in a worker that holds a thousand tabs.
HOG_FDS = int(os.environ.get("TEST_HOG_FDS", "0"))
if HOG_FDS:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    hogged = [os.open(os.devnull, os.O_RDONLY) for _ in range(HOG_FDS)]
# Work after the view (as a session save or an after_request hook does) widens the
# window between building a stream's response and the server starting to send it.
AFTER_REQUEST_DELAY = float(os.environ.get("TEST_AFTER_REQUEST_DELAY", "0"))
if AFTER_REQUEST_DELAY:

    @app.after_request
    def slow_after_request(response: Response) -> Response:
        time.sleep(AFTER_REQUEST_DELAY)
        return response


blocker = threading.Event()


def connect(gen: Stream) -> None:
    sock = gen.environ.get("gunicorn.socket")
    if SNDBUF and isinstance(sock, socket.socket):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
    clients.register(gen, key=request.args.get("key"))


@app.get("/sse")
@datastar.sse(on_connect=connect, on_disconnect=lambda gen: disconnects.append(gen.close_reason))
def sse(gen: Stream) -> Iterator[Any]:
    with state_lock:
        gen.patch_signals({"pid": os.getpid(), "path": gen.path, "count": state["count"]})
    sock = gen.environ.get("gunicorn.socket")
    if request.args.get("show_timeout") and isinstance(sock, socket.socket):
        timeout = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
        gen.patch_signals({"tcp_user_timeout": timeout})
    tick = float(request.args.get("tick", "0"))
    n = 0
    while True:
        yield gen.sleep(tick or None)
        n += 1
        # As example_app does: the state lock is held while the stream sends.
        with state_lock:
            gen.patch_signals({"tick": n, "count": state["count"]})


@app.get("/big")
def big() -> Any:
    """Large events for a slow reader: the backlog is flushed at the end (one-shot) or
    drained between steps (``loop=1``)."""
    size, count = int(request.args["size"]), int(request.args.get("count", "1"))
    loop = request.args.get("loop") == "1"

    def handler(gen: Stream) -> Iterator[Any] | None:
        sock = gen.environ.get("gunicorn.socket")
        if SNDBUF and isinstance(sock, socket.socket):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
        gen.patch_signals({"fd": sock.fileno() if isinstance(sock, socket.socket) else -1})
        if not loop:
            for i in range(count):
                gen.patch_signals({"i": i, "pad": "x" * size})
            return None
        return steps(gen)

    def steps(gen: Stream) -> Iterator[Any]:
        for i in range(count):
            gen.patch_signals({"i": i, "pad": "x" * size})
            yield gen.sleep(0)

    return sse_response(handler)


@app.get("/blocking")
@datastar.sse(on_connect=connect)
def blocking(gen: Stream) -> Iterator[Any]:
    """Ticks until ``POST /block``, then spends seconds inside one step (as a slow
    query would), without yielding."""
    gen.patch_signals({"blocking": False})
    while True:
        yield gen.sleep(0.05)
        if blocker.is_set():
            blocker.clear()
            time.sleep(float(request.args.get("seconds", "4")))


@app.post("/block")
def block() -> tuple[str, int]:
    blocker.set()
    return "", 204


@app.post("/close-all")
def close_all() -> tuple[str, int]:
    for gen in open_streams():
        gen.close(reconnect=request.args.get("reconnect") == "1")
    return "", 204


def failing_connect(gen: Stream) -> None:
    clients.register(gen)
    if request.args.get("kind") == "abort":
        abort(403, "You may not listen here.")
    raise RuntimeError("on_connect failed")


@app.get("/bad-connect")
@datastar.sse(
    on_connect=failing_connect, on_disconnect=lambda gen: disconnects.append(gen.close_reason)
)
def bad_connect(gen: Stream) -> Iterator[Any]:
    yield gen.sleep()


@app.get("/bad-yield")
@datastar.sse(on_disconnect=lambda gen: disconnects.append(gen.close_reason))
def bad_yield(gen: Stream) -> Iterator[Any]:
    gen.patch_signals({"before": True})
    yield 42


@app.post("/raw")
def raw() -> Any:
    """Send text that is not a whole event: to every stream, or through the registry."""
    text = request.get_data(as_text=True)
    try:
        if request.args.get("via") == "registry":
            clients.broadcast(text)
        else:
            for gen in clients.snapshot():
                gen.send(text)
    except ValueError as e:
        return str(e), 400
    return "", 204


@app.get("/user-timeout")
def user_timeout() -> Any:
    """The TCP user timeout of this request's connection (a plain request, no stream)."""
    sock = request.environ.get("gunicorn.socket")
    assert isinstance(sock, socket.socket)
    return jsonify(ms=sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT))


@app.post("/click")
def click() -> tuple[str, int]:
    pad = "x" * int(request.args.get("pad", "0"))
    with state_lock:
        state["count"] += 1
        event = SSE.patch_signals({"count": state["count"], "pad": pad})
        clients.broadcast(event)
    return "", 204


@app.get("/oneshot")
def oneshot() -> Any:
    def handler(gen: Stream) -> None:
        gen.patch_signals({"path": gen.path})
        for i in range(3):
            gen.patch_elements(f'<p id="n{i}">{i}</p>')

    return sse_response(handler)


def tcp_state(gen: Stream) -> int | None:
    """The kernel's TCP state of the stream's connection (1 established, 7 closed)."""
    sock = gen.environ.get("gunicorn.socket")
    if not isinstance(sock, socket.socket) or sock.fileno() == -1:
        return None
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


@app.get("/stats")
def stats() -> Any:
    return jsonify(
        pid=os.getpid(),
        registered=len(clients),
        open=len(open_streams()),
        tcp_states=[tcp_state(gen) for gen in open_streams()],
        disconnects=disconnects,
        threads=threading.active_count(),
        thread_names=sorted(t.name for t in threading.enumerate()),
    )


class GzipPerEvent:
    """A compressing middleware that flushes after every body item, as a stream needs.

    It adds ``Content-Encoding`` by wrapping ``start_response``, which is what must turn
    the direct socket path off.
    """

    def __init__(self, wsgi_app: Callable[..., Iterable[bytes]]) -> None:
        self.wsgi_app = wsgi_app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
            headers.append(("Content-Encoding", "gzip"))
            return start_response(status, headers, exc_info)

        body = self.wsgi_app(environ, start)
        compressor = zlib.compressobj(wbits=31)

        def compressed() -> Iterator[bytes]:
            try:
                for item in body:
                    yield compressor.compress(item) + compressor.flush(zlib.Z_SYNC_FLUSH)
                yield compressor.flush()
            finally:
                close = getattr(body, "close", None)
                if close is not None:
                    close()

        return compressed()


if os.environ.get("TEST_GZIP") == "1":
    app.wsgi_app = GzipPerEvent(app.wsgi_app)  # type: ignore[method-assign]
