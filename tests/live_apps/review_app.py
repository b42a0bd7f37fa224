"""Routes for the adversarial review tests (tests/test_review.py).

They are added to the live test app of :mod:`tests.live_apps.streams`, so its
``/sse``, ``/click``, ``/big``, ``/close-all`` and ``/stats`` routes are here too.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from flask import jsonify

from flask_datastar import SSE, Stream
from tests.live_apps.streams import app, clients, connect, datastar, disconnects

__all__ = ["app"]

swallowed = [0]


def render_state() -> Any:
    # An application bug: a dict where an event (SSE.patch_signals(...)) was meant.
    return {"count": 1}


@app.get("/review/swallow")
@datastar.sse(on_connect=connect, on_disconnect=lambda gen: disconnects.append(gen.close_reason))
def swallow(gen: Stream) -> Iterator[Any]:
    """A "resilient" loop, as applications write them: an error at the yield is
    logged and the loop goes on (a counter stands in for the log line)."""
    gen.patch_signals({"up": True})
    while True:
        try:
            yield render_state()
            yield gen.sleep(1)
        except Exception:
            swallowed[0] += 1


@app.get("/review/finally-send")
@datastar.sse(on_connect=connect, on_disconnect=lambda gen: disconnects.append(gen.close_reason))
def finally_send(gen: Stream) -> Iterator[Any]:
    """Says goodbye on its own stream in ``finally``: StreamClosed from its own stream
    'needs no catching' (StreamClosed's docstring)."""
    try:
        gen.patch_signals({"up": True})
        yield gen.sleep()
    finally:
        gen.patch_signals({"online": False})


@app.get("/review/big-then-work")
@datastar.sse(on_disconnect=lambda gen: disconnects.append(gen.close_reason))
def big_then_work(gen: Stream) -> Iterator[Any]:
    """Sends a large initial state, then keeps working in the same step (a query, a
    render) before its first pause, as a page's first render does."""
    gen.patch_signals({"path": gen.path, "pad": "x" * 100_000})
    clients.register(gen)
    time.sleep(1.0)
    while True:
        yield gen.sleep()


@app.get("/review/stats")
def review_stats() -> Any:
    from flask_datastar import open_streams

    return jsonify(
        swallowed=swallowed[0],
        open=len(open_streams()),
        registered=len(clients),
        disconnects=disconnects,
    )


@app.post("/review/big-broadcast")
def big_broadcast() -> tuple[str, int]:
    clients.broadcast(SSE.patch_signals({"big": "y" * 100_000}))
    return "", 204
