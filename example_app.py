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
it: ``WEB_CONCURRENCY=3 gunicorn -c gunicorn.conf.py example_app:app``.
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
# After a Redis outage, each tab gets the current content again.
clients = datastar.registry(
    app, "fat-cqrs", on_resync=lambda gen: gen.patch_elements(render_content())
)

clicks = 0
# Changing the state, rendering it and queueing the broadcast happen under one
# lock, so the broadcasts leave in the order of the states they show.
state_lock = threading.Lock()

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
  <script type="module" src="{{ datastar_url() }}"></script>
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

    store = redis.Redis.from_url(app.config["DATASTAR_REDIS_URL"])


def read_clicks() -> int:
    global clicks
    if store is not None:
        try:
            clicks = int(store.get("fat-cqrs:clicks") or 0)
        except redis.RedisError:
            pass  # Redis is down: the clock keeps ticking with the last count seen
    return clicks


def add_click() -> None:
    global clicks
    if store is None:
        clicks += 1
        return
    try:
        clicks = int(store.incr("fat-cqrs:clicks"))
    except redis.RedisError:
        abort(503, "The click counter (Redis) is unavailable; try again in a moment.")


# ---------------------------------------------------------------------------------------


content_template = app.jinja_env.from_string(CONTENT)  # compiled once, not per render
last_render: tuple[tuple[str, int], str] = (("", -1), "")


def render_content() -> str:
    # Every tab shows the same content within a second: render it once per change.
    global last_render
    state = (time.strftime("%H:%M:%S"), read_clicks())
    if last_render[0] != state:
        last_render = (state, content_template.render(now=state[0], clicks=state[1]))
    return last_render[1]


@app.get("/")
def index() -> str:
    return render_template_string(PAGE, content=render_content())


@app.get("/sse")
@datastar.sse(on_connect=clients.register, on_disconnect=clients.unregister)
def sse(gen: Stream) -> Iterator[object]:
    while True:
        # No selector: in "outer" mode Datastar morphs #content by its id.
        with state_lock:
            gen.patch_elements(render_content())
        yield gen.sleep(1)


@app.post("/click")
def click() -> tuple[str, int]:
    with state_lock:
        add_click()
        # The newest content supersedes any older one still waiting to be written.
        clients.broadcast(
            SSE.patch_elements(render_content(), selector="#content"), coalesce="content"
        )
    return "", 204


if __name__ == "__main__":
    import os

    app.run(host="127.0.0.1", port=int(os.environ.get("PORT", "8989")), threaded=True)
