"""The app of tests/test_engine_attack.py: streams pushed at the engine's edges.

Settings come from ``FLASK_DATASTAR_*`` variables (``app.config.from_prefixed_env()``).

- ``GET /idle``: a stream that sleeps until it ends (registered in ``idle``).
- ``GET /burst?n=N&size=S``: *N* events of *S* bytes before the first pause (after a
  first pause with ``pause=1``).
- ``GET /doomed?x=V``: a stream closed in its first step; its ``finally`` records ``x``.
- ``GET /steady``: a patch ``{"n": N}`` every 0.05 s.
- ``GET /nap?seconds=S``: one patch, then sleeps *S* seconds, over and over.
- ``GET /decimal``: a patch ``{"n": N}`` every ``Decimal("0.05")`` s.
- ``GET /wait-in-hook``: ends at once; its ``on_disconnect`` calls ``wait_closed``.
- ``POST /close-and-wait``: close every ``idle`` stream and wait for each to end.
- ``POST /poke?size=S&n=N``: send *N* events of *S* bytes to every ``idle`` stream,
  from this request's thread.
- ``wrapped``: the app behind a middleware that hides gunicorn's response object.
- ``GET /kept-socket``: reads TCP_INFO, after its first pause, on the socket it saw first.
- ``GET /stats``: open streams, how far ``/burst`` got, the ends seen and why.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

from flask import Flask, jsonify, request

from flask_datastar import SSE, FlaskDatastar, Stream, StreamClosed, open_streams

app = Flask(__name__)
app.config.from_prefixed_env()
datastar = FlaskDatastar(app)

idle: list[Stream] = []
progress: dict[str, int] = {"burst": 0}
ended: list[str] = []
finals: list[str] = []


def remember_end(gen: Stream) -> None:
    ended.append(gen.close_reason)
    if gen in idle:
        idle.remove(gen)


@app.get("/idle")
@datastar.sse(on_connect=idle.append, on_disconnect=remember_end)
def idle_stream(gen: Stream) -> Iterator[Any]:
    gen.patch_signals({"idle": True})
    yield gen.sleep()


@app.get("/burst")
@datastar.sse(on_disconnect=remember_end)
def burst(gen: Stream) -> Iterator[Any]:
    n = int(request.args.get("n", "100"))
    size = int(request.args.get("size", "65536"))
    if request.args.get("pause"):
        yield gen.sleep(0)  # from here on, on the scheduler
    for i in range(n):
        progress["burst"] = i + 1
        yield SSE.patch_elements(f"<div id='b'>{'x' * size}</div>")
    yield gen.sleep()


@app.get("/doomed")
@datastar.sse
def doomed(gen: Stream) -> Iterator[Any]:
    try:
        gen.patch_signals({"doomed": True})
        gen.close()  # ended before its first pause (a client gone, a close from elsewhere)
        yield None
        yield gen.sleep()
    finally:
        finals.append(request.args.get("x", "no request"))


@app.get("/steady")
@datastar.sse
def steady(gen: Stream) -> Iterator[Any]:
    n = 0
    while True:
        n += 1
        gen.patch_signals({"n": n})
        yield gen.sleep(0.05)


@app.get("/nap")
@datastar.sse
def nap(gen: Stream) -> Iterator[Any]:
    gen.patch_signals({"nap": True})
    while True:
        # Whatever the query says, as an app that reads its refresh period from it.
        yield gen.sleep(float(request.args.get("seconds", "1")))


@app.get("/decimal")
@datastar.sse
def decimal_period(gen: Stream) -> Iterator[Any]:
    yield gen.sleep(0.01)  # from here on, on the scheduler
    n = 0
    while True:
        n += 1
        gen.patch_signals({"n": n})
        # A period read from a NUMERIC column: time.sleep() takes a Decimal too.
        yield gen.sleep(Decimal("0.05"))


def wait_in_hook(gen: Stream) -> None:
    try:
        gen.wait_closed(5)
        finals.append("waited")
    except RuntimeError:
        finals.append("wait refused")


@app.get("/wait-in-hook")
@datastar.sse(on_disconnect=wait_in_hook)
def wait_in_hook_stream(gen: Stream) -> Iterator[Any]:
    gen.patch_signals({"hooked": True})
    yield gen.sleep(0.01)
    gen.close()
    yield None


@app.post("/close-and-wait")
def close_and_wait() -> Any:
    results = []
    for gen in list(idle):
        gen.close()
        results.append(gen.wait_closed(5))
    idle.clear()
    return jsonify(results)


@app.post("/poke")
def poke() -> Any:
    size = int(request.args.get("size", "65536"))
    n = int(request.args.get("n", "1"))
    event = SSE.patch_elements(f"<div id='p'>{'y' * size}</div>")
    refused = 0
    for gen in list(idle):
        for _ in range(n):
            try:
                gen.send(event)
            except StreamClosed:
                refused += 1
                break
    return jsonify(refused=refused)


@app.get("/kept-socket")
@datastar.sse
def kept_socket(gen: Stream) -> Iterator[Any]:
    # The socket as the view saw it, used again once the stream gave its thread back.
    sock = gen.environ["gunicorn.socket"]
    yield gen.sleep(0)
    try:
        state = (
            None
            if sock.fileno() == -1
            else sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
        )
        gen.patch_signals({"state": state})
    except OSError as e:
        gen.patch_signals({"error": str(e)})


@app.get("/stats")
def stats() -> Any:
    return jsonify(open=len(open_streams()), progress=progress, ended=ended, finals=finals)


def wrapped(environ: dict[str, Any], start_response: Any) -> Any:
    """The app behind a middleware that wraps ``start_response`` (as error trackers do).

    It hides gunicorn's response object: every stream takes the portable path and
    keeps its thread.
    """

    def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        return start_response(status, headers, exc_info)

    return app.wsgi_app(environ, start)
