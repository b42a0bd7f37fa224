"""The app of tests/test_engine.py: streams on the scheduler, released threads, admission.

Settings come from ``FLASK_DATASTAR_*`` variables (``app.config.from_prefixed_env()``).

- ``GET /tick?interval=S&count=N&x=V``: a signal patch every *S* s (*N* of them, or
  for ever), each with the step's thread name, the query's ``x`` and ``g.marker``.
- ``GET /once``: one patch, no pause: the stream ends on the server's thread.
- ``GET /slow?seconds=S``: after its first pause, a step that blocks for *S* s.
- ``GET /owned``: a handler on its own thread (``own_thread=True``).
- ``GET /boom``: a handler that raises in a scheduled step.
- ``GET /goodbye?seconds=S&file=F``: an ``on_disconnect`` hook that takes *S* s, then
  writes *F*.
- ``GET /beats``: registered for the broadcasts of a periodic job (every 0.1 s).
- ``POST /broadcast?v=V``: broadcast ``{"b": V}`` to the ``/tick`` streams.
- ``GET /stats``: this worker's pid, thread count, open streams, teardowns, limits.

The identity is the ``X-User`` header, if any (for the fair share).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import Any

from flask import Flask, current_app, g, jsonify, request

from flask_datastar import SSE, FlaskDatastar, Stream, open_streams
from flask_datastar.stream import process_stream_limit, process_thread_limit

app = Flask(__name__)
app.config.from_prefixed_env()
datastar = FlaskDatastar(app)
ticks = datastar.registry(app, "ticks")
beats = datastar.registry(app, "beats")

teardowns: list[str] = []


@datastar.identity_loader
def identity() -> str | None:
    return request.headers.get("X-User")


@app.before_request
def mark() -> None:
    g.marker = request.args.get("marker", "")


@app.teardown_request
def record_teardown(error: BaseException | None) -> None:
    marker = request.args.get("marker")
    if marker:
        teardowns.append(marker)


@datastar.every(0.1)
def beat() -> None:
    beats.broadcast(SSE.patch_signals({"beat": time.time(), "app": current_app.name}))


@app.get("/tick")
@datastar.sse(on_connect=ticks.register)
def tick(gen: Stream) -> Iterator[Any]:
    interval = float(request.args.get("interval", "0.2"))
    count = int(request.args.get("count", "0"))
    n = 0
    while True:
        n += 1
        gen.patch_signals(
            {
                "n": n,
                "x": request.args.get("x"),
                "marker": g.marker,
                "thread": threading.current_thread().name,
                "pid": os.getpid(),
                "t": time.time(),
            }
        )
        if count and n >= count:
            return
        yield gen.sleep(interval)


@app.get("/once")
@datastar.sse
def once(gen: Stream) -> None:
    gen.patch_signals({"once": True})


@app.get("/slow")
@datastar.sse
def slow(gen: Stream) -> Iterator[Any]:
    seconds = float(request.args.get("seconds", "1.5"))
    yield gen.sleep(0)
    time.sleep(seconds)
    gen.patch_signals({"slept": seconds})
    yield gen.sleep()


@app.get("/owned")
@datastar.sse(own_thread=True)
def owned(gen: Stream) -> Iterator[Any]:
    while True:
        gen.patch_signals({"thread": threading.current_thread().name})
        yield gen.sleep(0.2)


@app.get("/boom")
@datastar.sse
def boom(gen: Stream) -> Iterator[Any]:
    gen.patch_signals({"before": True})
    yield gen.sleep(0.05)
    raise LookupError("boom in a scheduled step")


def slow_goodbye(gen: Stream) -> None:
    time.sleep(float(request.args.get("seconds", "1")))
    with open(request.args["file"], "w") as file:
        file.write("bye")


@app.get("/goodbye")
@datastar.sse(on_disconnect=slow_goodbye)
def goodbye(gen: Stream) -> Iterator[Any]:
    gen.patch_signals({"hello": True})
    yield gen.sleep()


@app.get("/beats")
@datastar.sse(on_connect=beats.register)
def beats_stream(gen: Stream) -> Iterator[Any]:
    yield gen.sleep()


@app.post("/broadcast")
def broadcast() -> tuple[str, int]:
    ticks.broadcast(SSE.patch_signals({"b": request.args.get("v", "")}))
    return "", 204


@app.get("/stats")
def stats() -> Any:
    job = beat.job()
    return jsonify(
        pid=os.getpid(),
        threads=threading.active_count(),
        open=len(open_streams()),
        teardowns=teardowns,
        limit=process_stream_limit(),
        thread_limit=process_thread_limit(),
        beat_runs=None if job is None else job.runs,
    )
