"""Signals: state that lives in the page, travels with every request, and is patched back.

``data-signals`` declares the page's signals, ``data-bind:name`` ties an input to
``$name`` both ways, and ``data-text="$greeting"`` shows a signal. Every action
(``@post('/greet')``) sends the signals as JSON; the view reads them with
``read_signals()`` and answers with a ``datastar-patch-signals`` event, which
merges into the page's signals (and so into the bound input). Signals whose
name starts with an underscore stay in the page: the client never sends them.

Run it with Flask's development server or with gunicorn (from the repository root)::

    python examples/signals.py                         # http://127.0.0.1:5000/
    gunicorn -c gunicorn.conf.py examples.signals:app   # http://127.0.0.1:8989/
"""

from __future__ import annotations

import json
import os

from flask import Flask, render_template_string

from flask_datastar import SSE, DatastarResponse, FlaskDatastar, read_signals

app = Flask(__name__)
app.config.from_prefixed_env()
datastar = FlaskDatastar(app)

PAGE = """\
<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Signals</title>
  {{ datastar_script() }}
</head>
<body data-signals="{name: '', shout: false, greeting: '', _draft: 'stays in the page'}">
  <h1>Signals</h1>
  <p><label>Your name <input id="name" data-bind:name autocomplete="off"></label>
     <label><input id="shout" type="checkbox" data-bind:shout> shout</label></p>
  <p>Typed so far (computed in the page, no request): <span id="length"
     data-text="$name.length + ' characters'"></span></p>
  <p><button id="greet" data-on:click="{{ sse_post('/greet') }}">Greet me</button>
     <button id="reset" data-on:click="{{ sse_post('/reset') }}">Reset</button></p>
  <p id="greeting" data-text="$greeting"></p>
  <p>The server received: <code id="received">nothing yet</code></p>
</body>
</html>"""


@app.get("/")
def index() -> str:
    return render_template_string(PAGE)


@app.post("/greet")
def greet() -> DatastarResponse:
    signals = read_signals()
    name = str(signals.get("name", "")).strip() or "stranger"
    greeting = f"Hello, {name}!"
    if signals.get("shout") is True:
        greeting = greeting.upper()
    received = json.dumps(signals, sort_keys=True)
    return DatastarResponse(
        [
            SSE.patch_signals({"greeting": greeting}),
            # Jinja escapes the text: whatever the user typed stays text.
            SSE.patch_elements(
                render_template_string('<code id="received">{{ text }}</code>', text=received)
            ),
        ]
    )


@app.post("/reset")
def reset() -> DatastarResponse:
    # A merge patch: only these signals change, and the bound inputs follow.
    return DatastarResponse(SSE.patch_signals({"name": "", "shout": False, "greeting": ""}))


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ.get("PORT", "5000")), threaded=True)
