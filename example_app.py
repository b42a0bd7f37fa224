"""Fat morph + CQRS: the datastar-cl guide's ``fat-cqrs.lisp``, in Flask.

Every tab holds one GET stream (``/sse``, the query side) that patches the
whole ``#content`` every second; a click POSTs a command (``/click``) that
increments the counter and broadcasts the new content to every open tab.

Run it with ``python example_app.py`` (Flask's development server) or, as in
production, ``gunicorn -c gunicorn.conf.py example_app:app``; then open
http://127.0.0.1:8989/ in two tabs. Every setting can come from the
environment: ``FLASK_DATASTAR_HEARTBEAT=5``.

With ``FLASK_DATASTAR_REDIS_URL=redis://localhost:6379/0`` the counter lives in
Redis and clicks reach the tabs of every worker, so several workers can serve
it: ``WEB_CONCURRENCY=3 gunicorn -c gunicorn.conf.py example_app:app``. Should Redis
stall or fail, the clocks keep ticking and a click gets a 503 until it is back.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from flask import Flask, abort, render_template_string

from flask_datastar import SSE, FlaskDatastar, Stream

app = Flask(__name__)
app.config.from_prefixed_env()
datastar = FlaskDatastar(app)
# After a Redis outage, each tab gets the current content again (from memory: this
# runs in the bus's listener thread, which must not wait for Redis).
clients = datastar.registry(
    app, "fat-cqrs", on_resync=lambda gen: gen.patch_elements(render_content())
)

# The highest count this process has seen, so the count a tab shows never goes back.
clicks = 0
# Changing the count, rendering it and writing or queueing the result happen under one
# lock, so every tab sees the counts in order. A call to Redis may stall: it never
# happens under this lock, or a stalled Redis would stop every clock of the worker.
state_lock = threading.Lock()
# Broadcasts leave one at a time, in the order of the counts they show. With Redis a
# broadcast is a PUBLISH, so this is not state_lock: a slow one holds up no tick.
broadcast_lock = threading.Lock()

CONTENT = """\
<div id="content">
  <button data-on:click="{{ sse_post('/click') }}">Click me</button>
  <p>Time: <strong>{{ now }}</strong></p>
  <p>Button clicks: <strong>{{ clicks }}</strong></p>
  <hr>
  <p>Below is a paragraph with <code>data-ignore-morph</code>. It is never touched by morphing,
  so you can edit it freely.</p>
  <div data-ignore-morph="true">
    <p contenteditable="true" style="background-color: #ddd; padding:0.5em;">
      Edit me: morphing will not reset my content!</p>
  </div>
</div>"""

PAGE = """\
<!doctype html>
<html>
<head>
  <meta charset="utf-8">
  <title>Fat CQRS</title>
  {{ datastar_script() }}
</head>
<body data-init="{{ sse_get('/sse') }}">
  <h1>Fat CQRS</h1>
  <p>The time updates every 1s via the SSE loop. Click the button: the count pushes instantly
  to all clients.</p>
  {{ content|safe }}
</body>
</html>"""


# -- the counter in Redis, when FLASK_DATASTAR_REDIS_URL is set -----------------------
# Each worker is a process with its own globals: with several workers the count must
# live in Redis, where INCR is atomic, so every worker shows the same number.
store = None
if app.config["DATASTAR_REDIS_URL"]:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # Short timeouts: while Redis stalls, a click gets a prompt 503 instead of a thread
    # that hangs. No retry: an INCR that timed out may have counted, do not send it twice.
    store = redis.Redis.from_url(
        app.config["DATASTAR_REDIS_URL"],
        socket_connect_timeout=0.5,
        socket_timeout=0.5,
        retry=Retry(NoBackoff(), 0),
    )
KEY = "fat-cqrs:clicks"
next_read = 0.0  # when read_clicks() may read Redis again
read_lock = threading.Lock()


def count_in_redis() -> int | None:
    """Count a click in Redis and return the new count; None without Redis."""
    if store is None:
        return None
    try:
        return int(store.incr(KEY))
    except redis.RedisError:
        abort(503, "The click counter (Redis) is unavailable; try again in a moment.")


def read_clicks() -> int | None:
    """Return the count in Redis, read at most once a second per process, else None."""
    # The tick of whichever tab comes first reads it; the others go on meanwhile.
    global next_read
    if store is None or not read_lock.acquire(blocking=False):
        return None
    try:
        if time.monotonic() < next_read:
            return None
        next_read = time.monotonic() + 1
        return int(store.get(KEY) or 0)
    except redis.RedisError:
        return None  # Redis stalls or is down: the clock ticks with the last count seen
    finally:
        read_lock.release()


def add_click(counted: int | None = None) -> None:
    """Count one more click, or take the count Redis gave; call it under state_lock."""
    global clicks
    clicks = clicks + 1 if counted is None else max(clicks, counted)


# ---------------------------------------------------------------------------------------


content_template = app.jinja_env.from_string(CONTENT)  # compiled once, not per render
last_render: tuple[tuple[str, int], str] = (("", -1), "")


def render_content() -> str:
    # Every tab shows the same content within a second: render it once per change.
    global last_render
    state = (time.strftime("%H:%M:%S"), clicks)
    rendered_state, html = last_render  # read once: another thread may replace it
    if rendered_state != state:
        html = content_template.render(now=state[0], clicks=state[1])
        last_render = (state, html)
    return html


@app.get("/")
def index() -> str:
    return render_template_string(PAGE, content=render_content())


@app.get("/sse")
@datastar.sse(on_connect=clients.register)
def sse(gen: Stream) -> Iterator[object]:
    while True:
        latest = read_clicks()  # before taking the lock: it may wait for Redis
        with state_lock:
            if latest is not None:
                add_click(latest)  # the clicks other workers counted
            # No selector: in "outer" mode Datastar morphs #content by its id.
            gen.patch_elements(render_content())
        yield gen.sleep(1)


@app.post("/click")
def click() -> tuple[str, int]:
    counted = count_in_redis()  # before taking a lock: it may wait for Redis
    with broadcast_lock:
        with state_lock:
            add_click(counted)
            content = render_content()
        # The newest content supersedes any older one still waiting to be written.
        clients.broadcast(SSE.patch_elements(content, selector="#content"), coalesce="content")
    return "", 204


if __name__ == "__main__":
    import os

    app.run(host="127.0.0.1", port=int(os.environ.get("PORT", "8989")), threaded=True)
