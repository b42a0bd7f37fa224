"""A counter for the CSRF browser test: commands by JSON and by form, and an attacker page.

``app`` is the application, with the default CSRF check: its page adds to the
counter with a JSON ``@post`` and with a ``contentType: 'form'`` post. It
counts the requests the check refused, so the test can tell that the attacks
arrived. ``attacker`` is another site's app (served on another origin) whose
page tries every request a page can make a browser send cross-site without a
preflight, and two that need one.
"""

from __future__ import annotations

import threading

from flask import Flask, render_template_string, request

from flask_datastar import SSE, CSRFError, DatastarResponse, FlaskDatastar, read_signals

app = Flask(__name__)
app.config.from_prefixed_env()
datastar = FlaskDatastar(app)

state = {"count": 0, "refused": 0}
lock = threading.Lock()

PAGE = """\
<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>Counter</title>{{ datastar_script() }}</head>
<body data-signals="{step: 1}">
  <p id="count">{{ count }}</p>
  <button id="json" data-on:click="@post('/add')">Add 1 (JSON)</button>
  <form id="form" data-on:submit="@post('/add-form', {contentType: 'form'})">
    <input name="step" value="2">
    <button id="submit">Add 2 (form)</button>
  </form>
</body>
</html>"""

COUNT = '<p id="count">{{ count }}</p>'


def add(step: int) -> DatastarResponse:
    with lock:
        state["count"] += step
        count = state["count"]
    return DatastarResponse(SSE.patch_elements(render_template_string(COUNT, count=count)))


@app.get("/")
def index() -> str:
    return render_template_string(PAGE, count=state["count"])


@app.post("/add")
def add_json() -> DatastarResponse:
    return add(int(read_signals().get("step", 0)))


@app.post("/add-form")
def add_form() -> DatastarResponse:
    read_signals()  # a form post has none; the check runs all the same
    return add(int(request.form.get("step", "0")))


@app.get("/state")
def get_state() -> dict[str, int]:
    with lock:
        return dict(state)


@app.errorhandler(CSRFError)
def refused(error: CSRFError) -> tuple[str, int]:
    with lock:
        state["refused"] += 1
    return str(error.description), 403


attacker = Flask("attacker")
attacker.config.from_prefixed_env()  # FLASK_TARGET: the app's address

ATTACK = """\
<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>Win a prize</title></head>
<body>
  <iframe name="sink-plain"></iframe><iframe name="sink-urlencoded"></iframe>
  <iframe name="sink-multipart"></iframe>
  <form id="plain" method="post" action="{{ target }}/add" enctype="text/plain"
        target="sink-plain">
    <input name='{"step": 100, "x": "' value='"}'>
  </form>
  <form id="urlencoded" method="post" action="{{ target }}/add-form"
        target="sink-urlencoded">
    <input name="step" value="100">
  </form>
  <form id="multipart" method="post" action="{{ target }}/add-form"
        enctype="multipart/form-data" target="sink-multipart">
    <input name="step" value="100">
  </form>
  <script>
    window.results = {};
    const target = {{ target|tojson }};
    const attempt = (name, url, init) =>
      fetch(url, {method: "POST", credentials: "include", ...init})
        .then(r => { window.results[name] = "sent:" + r.type })
        .catch(e => { window.results[name] = "blocked:" + e.name });
    window.attack = () => {
      for (const id of ["plain", "urlencoded", "multipart"]) document.getElementById(id).submit();
      // Simple requests: sent without a preflight, the answer is opaque.
      attempt("text-plain", target + "/add",
              {mode: "no-cors", headers: {"Content-Type": "text/plain"}, body: '{"step": 100}'});
      attempt("form-fetch", target + "/add-form",
              {mode: "no-cors", body: new URLSearchParams({step: "100"})});
      // These need a preflight, which the app does not answer with CORS headers.
      attempt("json", target + "/add",
              {headers: {"Content-Type": "application/json"}, body: '{"step": 100}'});
      attempt("header", target + "/add",
              {headers: {"Content-Type": "application/json", "Datastar-Request": "true"},
               body: '{"step": 100}'});
    };
  </script>
</body>
</html>"""


@attacker.get("/")
def attack_page() -> str:
    return render_template_string(ATTACK, target=attacker.config["TARGET"])
