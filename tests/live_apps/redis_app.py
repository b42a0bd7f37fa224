"""A Flask app whose broadcasts cross gunicorn workers through Redis, for tests/test_redis_bus.py.

The Redis URL comes from ``FLASK_DATASTAR_REDIS_URL``. Every event is a
``datastar-patch-signals`` event, so the tests read what happened on the wire:

- ``GET /sse``: first ``{"pid": <worker pid>, "clicks": n}``, then nothing of its
  own (no tick): whatever else arrives was broadcast, or is a resync,
  ``{"resync": <pid>, "clicks": n}``.
- ``POST /click``: ``INCR`` the counter in Redis and broadcast ``{"clicks": n}``;
  answers the new count and the pid.
- ``POST /say?text=...``: broadcast ``{"said": text}`` without touching Redis data
  (works while Redis is down); answers the pid.
- ``GET /stats``: the pid, the number of streams this worker holds, its threads.
"""

from __future__ import annotations

import os
import threading

import redis
from flask import Flask, request

from flask_datastar import SSE, FlaskDatastar

app = Flask(__name__)
app.config.from_prefixed_env()
app.config["DATASTAR_HEARTBEAT"] = 2.0
datastar = FlaskDatastar(app)
store = redis.Redis.from_url(app.config["DATASTAR_REDIS_URL"], socket_connect_timeout=2)


def count() -> int:
    return int(store.get("clicks") or 0)


def resync(gen):
    gen.patch_signals({"resync": os.getpid(), "clicks": count()})


clients = datastar.registry(app, "redis-test", on_resync=resync)


@app.get("/sse")
@datastar.sse(on_connect=clients.register)
def sse(gen):
    gen.patch_signals({"pid": os.getpid(), "clicks": count()})
    yield gen.sleep(None)


@app.post("/click")
def click():
    clicks = int(store.incr("clicks"))
    clients.broadcast(SSE.patch_signals({"clicks": clicks}))
    return {"clicks": clicks, "pid": os.getpid()}


@app.post("/say")
def say():
    clients.broadcast(SSE.patch_signals({"said": request.args["text"]}))
    return {"pid": os.getpid()}


@app.get("/stats")
def stats():
    return {
        "pid": os.getpid(),
        "streams": len(clients),
        "threads": sorted(thread.name for thread in threading.enumerate()),
    }
