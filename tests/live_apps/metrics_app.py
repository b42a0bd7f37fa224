"""A Flask app with Prometheus metrics, broadcasting through Redis, for tests/test_metrics.py.

The Redis URL comes from ``FLASK_DATASTAR_REDIS_URL``; gunicorn runs it with
``PROMETHEUS_MULTIPROC_DIR`` set.

- ``GET /room/<name>/sse``: registers the stream and sends ``{"pid": <worker pid>}``
  from ``on_connect``, then nothing of its own.
- ``POST /say?text=...``: broadcast ``{"said": text}`` to every stream of every worker.
- ``GET /metrics``: the Prometheus scrape, added up across workers.
- ``GET /snapshot``: this worker's :func:`flask_datastar.metrics.snapshot`.
"""

from __future__ import annotations

import os

from flask import Flask, request

from flask_datastar import SSE, FlaskDatastar, metrics

app = Flask(__name__)
app.config.from_prefixed_env()
datastar = FlaskDatastar(app)
clients = datastar.registry(app, "metrics-test")


def connect(gen):
    clients.register(gen)
    gen.patch_signals({"pid": os.getpid()})


@app.get("/room/<name>/sse")
@datastar.sse(on_connect=connect)
def sse(gen, name):
    yield gen.sleep(None)


@app.post("/say")
def say():
    clients.broadcast(SSE.patch_signals({"said": request.args["text"]}))
    return {"pid": os.getpid()}


@app.get("/snapshot")
def snapshot():
    return metrics.snapshot()


app.add_url_rule("/metrics", view_func=metrics.metrics_view())
