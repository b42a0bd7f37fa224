"""A chat shared by every tab: one command, one fat morph to all.

Every tab holds a stream (``/sse``) in a registry. Saying something POSTs the
``$author`` and ``$text`` signals; the view appends the message, re-renders the
last 50 messages and broadcasts them to every tab as one ``#messages`` patch
(a fat morph: each tab ends up showing the same list, whatever it missed),
then answers the sender alone with a signal patch that empties its input. A
tab that connects, or reconnects after a network blip, gets the full list
from its stream handler.

Run it with Flask's development server or with gunicorn (from the repository root)::

    python examples/chat.py                         # http://127.0.0.1:5000/
    gunicorn -c gunicorn.conf.py examples.chat:app   # http://127.0.0.1:8989/
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Iterator

from flask import Flask, render_template_string

from flask_datastar import SSE, DatastarResponse, FlaskDatastar, Stream, read_signals

app = Flask(__name__)
app.config.from_prefixed_env()
datastar = FlaskDatastar(app)
clients = datastar.registry(app, "chat")

MAX_LENGTH = 500
messages: deque[tuple[str, str, str]] = deque(maxlen=50)
# Appending, rendering and queueing the broadcast under one lock keeps the
# broadcasts in the order of the states they show.
state_lock = threading.Lock()

PAGE = """\
<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Chat</title>
  {{ datastar_script() }}
</head>
<body data-init="{{ sse_get('/sse') }}">
  <h1>Chat</h1>
  <form id="say" data-signals="{author: '', text: ''}" data-on:submit="{{ sse_post('/say') }}">
    <input id="author" data-bind:author placeholder="Your name" size="12" autocomplete="off">
    <input id="text" data-bind:text placeholder="Say something" size="40" autocomplete="off">
    <button id="send">Send</button>
    <span id="error"></span>
  </form>
  {{ messages|safe }}
</body>
</html>"""

MESSAGES = """\
<ol id="messages">
{%- for at, author, text in messages %}
  <li><small>{{ at }}</small> <b>{{ author }}</b>: <span class="text">{{ text }}</span></li>
{%- else %}
  <li class="empty">No messages yet.</li>
{%- endfor %}
</ol>"""

ERROR = '<span id="error">{{ text }}</span>'


def render_messages() -> str:
    return render_template_string(MESSAGES, messages=messages)


@app.get("/")
def index() -> str:
    with state_lock:
        return render_template_string(PAGE, messages=render_messages())


@app.get("/sse")
@datastar.sse(on_connect=clients.register)
def sse(gen: Stream) -> Iterator[object]:
    with state_lock:
        gen.patch_elements(render_messages())
    yield gen.sleep(None)


@app.post("/say")
def say() -> DatastarResponse:
    signals = read_signals()
    author = str(signals.get("author", "")).strip()[:40] or "anonymous"
    text = str(signals.get("text", "")).strip()
    if not text or len(text) > MAX_LENGTH:
        error = f"Write between 1 and {MAX_LENGTH} characters."
        return DatastarResponse(SSE.patch_elements(render_template_string(ERROR, text=error)))
    with state_lock:
        messages.append((time.strftime("%H:%M:%S"), author, text))
        clients.broadcast(SSE.patch_elements(render_messages()), coalesce="messages")
    return DatastarResponse(
        [
            SSE.patch_signals({"text": ""}),
            SSE.patch_elements(render_template_string(ERROR, text="")),
        ]
    )


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ.get("PORT", "5000")), threaded=True)
