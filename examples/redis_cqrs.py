"""The CQRS demo on several gunicorn workers: state and broadcasts through Redis.

``example_app.py`` runs in one process: its counter is a global and its
registry reaches every tab. With several workers each process has its own
memory, so two things move to Redis:

- the state: the click count is a Redis hash, changed atomically by any worker;
- the broadcasts: with ``DATASTAR_REDIS_URL`` set, ``datastar.registry(app,
  name)`` publishes ``broadcast()`` and ``send_to()`` on a Redis channel that
  every worker listens to, and each worker writes them to the streams it holds.

A click may be handled by any worker, and every tab, whichever worker holds
its stream, shows the new count at once. Each tab also shows the worker that
holds its stream, and each content patch the worker that rendered it. Two
clicks handled at the same moment by two workers may reach a tab in either
order; the next tick (every ``TICK_SECONDS``, 1 s by default) repairs that.

Run it (needs a Redis server and ``pip install 'flask_datastar[redis]'``;
``DATASTAR_REDIS_URL`` defaults to ``redis://127.0.0.1:6379/0``)::

    FLASK_DATASTAR_REDIS_URL=redis://127.0.0.1:6379/0 WEB_CONCURRENCY=4 \\
        gunicorn -c gunicorn.conf.py examples.redis_cqrs:app   # http://127.0.0.1:8989/

or, in one process, ``python examples/redis_cqrs.py`` (http://127.0.0.1:5000/).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import redis
from flask import Flask, render_template_string

from flask_datastar import SSE, FlaskDatastar, Stream

app = Flask(__name__)
app.config.from_prefixed_env()
app.config.setdefault("DATASTAR_REDIS_URL", "redis://127.0.0.1:6379/0")
app.config.setdefault("TICK_SECONDS", 1.0)
datastar = FlaskDatastar(app)
# After a Redis outage (messages may have been lost), each tab gets the content again.
clients = datastar.registry(
    app, "redis-cqrs", on_resync=lambda gen: gen.patch_elements(render_content())
)
# One client per worker process: gunicorn imports this module in each worker.
store = redis.Redis.from_url(app.config["DATASTAR_REDIS_URL"], decode_responses=True)
STATE = "flask_datastar:examples:redis_cqrs"

CONTENT = """\
<div id="content">
  <button id="click" data-on:click="{{ sse_post('/click') }}">Click me</button>
  <p>Time: <strong id="time">{{ now }}</strong></p>
  <p>Button clicks: <strong id="clicks">{{ clicks }}</strong>
     (last one handled by worker <span id="clicked-by">{{ clicked_by }}</span>)</p>
  <p>This patch was rendered by worker <span id="rendered-by">{{ pid }}</span>.</p>
</div>"""

PAGE = """\
<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>CQRS with Redis</title>
  {{ datastar_script() }}
</head>
<body data-init="{{ sse_get('/sse') }}">
  <h1>CQRS with Redis</h1>
  <p>The stream of this tab is held by worker <strong id="worker">?</strong>.</p>
  {{ content|safe }}
</body>
</html>"""


def render_content() -> str:
    state = store.hgetall(STATE)
    return render_template_string(
        CONTENT,
        now=time.strftime("%H:%M:%S"),
        clicks=state.get("clicks", "0"),
        clicked_by=state.get("by", "nobody yet"),
        pid=os.getpid(),
    )


@app.get("/")
def index() -> str:
    return render_template_string(PAGE, content=render_content())


@app.get("/sse")
@datastar.sse(on_connect=clients.register)
def sse(gen: Stream) -> Iterator[object]:
    gen.patch_elements(f'<strong id="worker">{os.getpid()}</strong>')
    tick = float(app.config["TICK_SECONDS"])
    while True:
        gen.patch_elements(render_content())
        yield gen.sleep(tick)


@app.post("/click")
def click() -> tuple[str, int]:
    # MULTI/EXEC: the count and who made it change together.
    with store.pipeline() as pipe:
        pipe.hincrby(STATE, "clicks", 1)
        pipe.hset(STATE, "by", str(os.getpid()))
        pipe.execute()
    clients.broadcast(SSE.patch_elements(render_content()), coalesce="content")
    return "", 204


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ.get("PORT", "5000")), threaded=True)
