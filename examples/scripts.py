"""Remove elements, run a script, log to the console, redirect: commands for the browser.

Each button POSTs a command whose answer is one Datastar event:

- ``SSE.remove_elements("#note-2")`` removes elements by CSS selector;
- ``SSE.execute_script(code)`` appends a ``<script>`` to ``body`` that runs
  once and removes itself;
- ``SSE.console_log(text)`` logs text; the text is JSON-encoded into the
  script, so no value can break out of its string;
- ``SSE.redirect(url)`` sends the browser elsewhere (the URL is encoded the
  same way; never pass a ``javascript:`` URL you did not write).

``execute_script`` runs the code it is given: quote any value that comes from
a user with ``js_string()``, as ``reveal()`` does below.

Run it with Flask's development server or with gunicorn (from the repository root)::

    python examples/scripts.py                         # http://127.0.0.1:5000/
    gunicorn -c gunicorn.conf.py examples.scripts:app   # http://127.0.0.1:8989/
"""

from __future__ import annotations

import os

from flask import Flask, abort, render_template_string, request

from flask_datastar import SSE, DatastarResponse, FlaskDatastar, js_string, read_signals

app = Flask(__name__)
app.config.from_prefixed_env()
datastar = FlaskDatastar(app)

NOTES = {1: "Backups ran at 02:00.", 2: "A new version is out.", 3: "Disk 80% full."}

PAGE = """\
<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Commands for the browser</title>
  {{ datastar_script() }}
</head>
<body data-signals="{secret: 'The cake is a lie'}">
  <h1>Commands for the browser</h1>
  <h2>Remove elements</h2>
  <ul id="notes">
  {%- for id, text in notes.items() %}
    <li id="note-{{ id }}">{{ text }}
      <button id="dismiss-{{ id }}"
              data-on:click="{{ sse_post('/dismiss/%d' % id) }}">Dismiss</button>
    </li>
  {%- endfor %}
  </ul>
  <h2>Run a script</h2>
  <p><input id="secret" data-bind:secret size="30">
     <button id="reveal" data-on:click="{{ sse_post('/reveal') }}">Show it in a script</button>
     <output id="revealed"></output></p>
  <h2>Log to the console</h2>
  <p><button id="log" data-on:click="{{ sse_post('/log') }}">Log a greeting</button>
     (open the developer tools)</p>
  <h2>Redirect</h2>
  <p><button id="leave" data-on:click="{{ sse_post('/leave') }}">Go to the other page</button></p>
</body>
</html>"""

ELSEWHERE = """\
<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>Elsewhere</title></head>
<body><h1 id="elsewhere">You were redirected here (from={{ origin }}).</h1>
<p><a href="/">Back</a></p></body>
</html>"""


@app.get("/")
def index() -> str:
    return render_template_string(PAGE, notes=NOTES)


@app.post("/dismiss/<int:note>")
def dismiss(note: int) -> DatastarResponse:
    if note not in NOTES:
        abort(404)
    return DatastarResponse(SSE.remove_elements(f"#note-{note}"))


@app.post("/reveal")
def reveal() -> DatastarResponse:
    secret = str(read_signals().get("secret", ""))
    # User input inside JavaScript: encoded with js_string(), never pasted in.
    script = f"document.getElementById('revealed').textContent = {js_string(secret)}"
    return DatastarResponse(SSE.execute_script(script))


@app.post("/log")
def log() -> DatastarResponse:
    return DatastarResponse(SSE.console_log("Hello from the server!"))


@app.post("/leave")
def leave() -> DatastarResponse:
    return DatastarResponse(SSE.redirect("/elsewhere?from=scripts"))


@app.get("/elsewhere")
def elsewhere() -> str:
    return render_template_string(ELSEWHERE, origin=request.args.get("from", ""))


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ.get("PORT", "5000")), threaded=True)
