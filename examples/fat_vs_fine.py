"""Fat morph or fine-grained patches: two ways to push a change to every tab.

Every tab holds a stream (``/sse``) registered in a registry. A vote POSTs a
command; the server changes its state and broadcasts the change in one of two
styles, chosen per vote with the ``$mode`` signal:

- **fat morph**: re-render the whole ``#board`` and let Datastar morph it into
  the page. The server needs no idea of what changed, one render fits every
  tab, and an update that is superseded before it leaves is dropped
  (``coalesce="board"``). It sends the most bytes.
- **fine-grained**: send only the elements that changed (``#votes-N`` and
  ``#total``), matched by their ids. Few bytes, but the command must know
  which parts of the page its change touches.

The page shows the size of the last update. Datastar's own advice is to start
fat and go fine where measurements say so.

Run it with Flask's development server or with gunicorn (from the repository root)::

    python examples/fat_vs_fine.py                         # http://127.0.0.1:5000/
    gunicorn -c gunicorn.conf.py examples.fat_vs_fine:app   # http://127.0.0.1:8989/
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

from flask import Flask, abort, render_template_string

from flask_datastar import SSE, FlaskDatastar, Stream, read_signals

app = Flask(__name__)
app.config.from_prefixed_env()
datastar = FlaskDatastar(app)
clients = datastar.registry(app, "fat-vs-fine")

ITEMS = {
    1: ("Fat morph", "Re-render the whole region; Datastar morphs it in."),
    2: ("Fine-grained", "Send only what changed, addressed by id."),
    3: ("Signals", "Patch a JSON merge into the page's signals."),
    4: ("Polling", "Ask again every few seconds (please don't)."),
}
votes = dict.fromkeys(ITEMS, 0)
last_update = "No votes yet."
# State changes, renders and broadcasts happen under one lock, so the tabs see
# the states in the order they happened.
state_lock = threading.Lock()

PAGE = """\
<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Fat morph vs fine-grained</title>
  {{ datastar_script() }}
</head>
<body data-signals="{mode: 'fat'}" data-init="{{ sse_get('/sse') }}">
  <h1>Which way to update a page?</h1>
  <p>Send my votes as:
    <label><input type="radio" name="mode" value="fat" data-bind:mode> a fat morph</label>
    <label><input type="radio" name="mode" value="fine" data-bind:mode> fine-grained patches</label>
  </p>
  {{ board|safe }}
  {{ status|safe }}
</body>
</html>"""

BOARD = """\
<section id="board">
  <ul>
  {%- for id, (name, blurb) in items.items() %}
    <li id="item-{{ id }}">
      <strong>{{ name }}</strong>: {{ blurb }}
      <span id="votes-{{ id }}">{{ votes[id] }}</span> votes
      <button id="vote-{{ id }}" data-on:click="{{ sse_post('/vote/%d' % id) }}">+1</button>
    </li>
  {%- endfor %}
  </ul>
  <p>Total: <span id="total">{{ votes.values()|sum }}</span> votes</p>
</section>"""

STATUS = '<p id="last-update">{{ text }}</p>'


def render_board() -> str:
    return render_template_string(BOARD, items=ITEMS, votes=votes)


def render_status() -> str:
    return render_template_string(STATUS, text=last_update)


@app.get("/")
def index() -> str:
    with state_lock:
        return render_template_string(PAGE, board=render_board(), status=render_status())


@app.get("/sse")
@datastar.sse(on_connect=clients.register)
def sse(gen: Stream) -> Iterator[object]:
    # The full state on every (re)connect; after that, only broadcasts arrive.
    with state_lock:
        gen.patch_elements(render_board())
        gen.patch_elements(render_status())
    yield gen.sleep(None)


@app.post("/vote/<int:item>")
def vote(item: int) -> tuple[str, int]:
    global last_update
    if item not in ITEMS:
        abort(404)
    fine = read_signals().get("mode") == "fine"
    with state_lock:
        votes[item] += 1
        if fine:
            event = SSE.patch_elements(
                f'<span id="votes-{item}">{votes[item]}</span>'
                f'<span id="total">{sum(votes.values())}</span>'
            )
            clients.broadcast(event)
        else:
            event = SSE.patch_elements(render_board())
            clients.broadcast(event, coalesce="board")
        style = f"fine-grained patch of #votes-{item} and #total" if fine else "fat morph of #board"
        last_update = f"Last update: a {style}, {len(event.encode())} bytes."
        clients.broadcast(SSE.patch_elements(render_status()), coalesce="status")
    return "", 204


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ.get("PORT", "5000")), threaded=True)
