"""Per-tab messages: a keyed registry and a tab id signal.

Each page load gets a tab id, rendered into the ``$tabId`` signal. The tab's
stream (``/sse``) sends its signals like any action, so ``on_connect`` can read
the id and register the stream under it: ``clients.register(gen, key=tab_id)``.
Commands then reach one tab with ``clients.send_to(tab_id, event)``, or every
tab with ``clients.broadcast(event)``: here, the list of open tabs.

Try it with two tabs: "Ping me" answers only the tab that asked; a message
typed for another tab's id appears only there. The ids are plain strings, so
``send_to`` also works across processes once a Redis bus carries the registry
(see redis_cqrs.py); the list of open tabs, though, comes from
``clients.keys()``, which knows only this process's streams.

Run it with Flask's development server or with gunicorn (from the repository root)::

    python examples/unicast.py                         # http://127.0.0.1:5000/
    gunicorn -c gunicorn.conf.py examples.unicast:app   # http://127.0.0.1:8989/
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator

from flask import Flask, render_template_string

from flask_datastar import SSE, DatastarResponse, FlaskDatastar, Stream, js_literal, read_signals

app = Flask(__name__)
app.config.from_prefixed_env()
datastar = FlaskDatastar(app)
clients = datastar.registry(app, "tabs")

PAGE = """\
<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Per-tab messages</title>
  {{ datastar_script() }}
</head>
<body data-signals="{tabId: {{ js(tab_id) }}, to: '', message: ''}"
      data-init="{{ sse_get('/sse') }}">
  <h1>Per-tab messages</h1>
  <p>This tab is <code id="me">{{ tab_id }}</code>.</p>
  <p><button id="ping" data-on:click="{{ sse_post('/ping') }}">Ping me</button></p>
  <p><label>To tab <input id="to" data-bind:to size="10" autocomplete="off"></label>
     <label>Message <input id="message" data-bind:message autocomplete="off"></label>
     <button id="send" data-on:click="{{ sse_post('/send') }}">Send</button>
     <span id="status"></span></p>
  <div id="tabs"></div>
  <h2>Inbox of this tab</h2>
  <ul id="inbox"></ul>
</body>
</html>"""

TABS = """\
<div id="tabs">
  <p>Open tabs (click one to address it):
  {%- for key in keys %}
    <button class="tab" data-tab="{{ key }}" data-on:click="$to = {{ js(key) }}"
            data-attr:disabled="$tabId == {{ js(key) }}">{{ key }}</button>
  {%- endfor %}
  </p>
</div>"""

ITEM = "<li>{{ text }}</li>"
STATUS = '<span id="status">{{ text }}</span>'
# js_literal() writes a JavaScript string that is safe inside an HTML attribute.
app.jinja_env.globals["js"] = js_literal


def broadcast_tabs() -> None:
    keys = sorted(str(key) for key in clients.keys())
    clients.broadcast(SSE.patch_elements(render_template_string(TABS, keys=keys)), coalesce="tabs")


def connected(gen: Stream) -> None:
    # read_signals() works in the stream's hooks: the request is still there.
    clients.register(gen, key=str(read_signals().get("tabId", "")))
    broadcast_tabs()


def disconnected(gen: Stream) -> None:
    clients.unregister(gen)
    broadcast_tabs()


def deliver(key: str, text: str) -> None:
    clients.send_to(
        key,
        SSE.patch_elements(
            render_template_string(ITEM, text=text), selector="#inbox", mode="append"
        ),
    )


@app.get("/")
def index() -> str:
    return render_template_string(PAGE, tab_id=secrets.token_hex(4))


@app.get("/sse")
@datastar.sse(on_connect=connected, on_disconnect=disconnected)
def sse(gen: Stream) -> Iterator[object]:
    yield gen.sleep(None)  # Nothing of its own to say: the commands speak through it.


@app.post("/ping")
def ping() -> tuple[str, int]:
    deliver(str(read_signals().get("tabId", "")), f"pong at {time.strftime('%H:%M:%S')}")
    return "", 204


@app.post("/send")
def send() -> DatastarResponse:
    signals = read_signals()
    target = str(signals.get("to", "")).strip()
    message = str(signals.get("message", "")).strip()
    if target not in {str(key) for key in clients.keys()}:
        status = f"No open tab is called {target!r}."
        return DatastarResponse(SSE.patch_elements(render_template_string(STATUS, text=status)))
    deliver(target, f"from {signals.get('tabId')}: {message}")
    return DatastarResponse(
        [
            SSE.patch_signals({"message": ""}),
            SSE.patch_elements(render_template_string(STATUS, text=f"Sent to {target}.")),
        ]
    )


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ.get("PORT", "5000")), threaded=True)
