"""A ticker shared by every tab: rendered once per second per process, broadcast to all.

Where ``clock.py`` gives each tab its own loop (``yield gen.sleep(1)``), this one
renders the time once per second, whatever the number of tabs, and broadcasts the
same HTML to every open stream: ``@datastar.every(1.0)`` runs ``tick`` on the
stream scheduler's pool, in each process (each gunicorn worker), with the app's
context. A tab's stream does nothing but wait (``yield gen.sleep()``): it holds a
socket and no thread, and costs nothing between two broadcasts.

The stream sends the current state first, so a tab that (re)connects shows the
time at once rather than at the next tick::

    python examples/ticker.py                         # http://127.0.0.1:5000/
    gunicorn -c gunicorn.conf.py examples.ticker:app   # http://127.0.0.1:8989/
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

from flask import Flask, render_template_string

from flask_datastar import SSE, FlaskDatastar, Stream

app = Flask(__name__)
app.config.from_prefixed_env()  # FLASK_DATASTAR_JS_URL=/static/datastar.js, ...
datastar = FlaskDatastar(app)
tabs = datastar.registry(app, "ticker")

PAGE = """\
<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Ticker</title>
  {{ datastar_script() }}
</head>
<body data-init="{{ sse_get('/ticker') }}">
  <h1>Ticker</h1>
  {{ content|safe }}
</body>
</html>"""


def render() -> str:
    """The shared content: the time, and how many tabs this process serves."""
    return (
        '<div id="ticker">'
        f'<p>Server time: <strong id="time">{time.strftime("%H:%M:%S")}</strong></p>'
        f'<p>Tabs on this process: <strong id="tabs">{len(tabs)}</strong></p>'
        "</div>"
    )


@datastar.every(1.0)
def tick() -> None:
    # One render and one broadcast for every tab; a newer tick supersedes an older one
    # still waiting for a slow tab.
    tabs.broadcast(SSE.patch_elements(render()), coalesce="ticker")


@app.get("/")
def index() -> str:
    return render_template_string(PAGE, content='<div id="ticker"></div>')


@app.get("/ticker")
@datastar.sse(on_connect=tabs.register)
def ticker(gen: Stream) -> Iterator[object]:
    gen.patch_elements(render())  # the state now; the ticks follow
    yield gen.sleep()  # until the tab goes away: the broadcasts do the rest


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ.get("PORT", "5000")), threaded=True)
