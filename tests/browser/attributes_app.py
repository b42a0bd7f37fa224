"""A test page built with the ``data`` attribute builder and the non-request actions.

``/`` writes its ``data-*`` attributes with the Jinja global ``data`` (datastar-py's
builder as flask_datastar serves it) and its actions with ``set_all``/``toggle_all``/
``peek``; ``/raw`` is the control: the same signals written with datastar-py's own
``attribute_generator``, which leaves an ``@`` in a string value as it is.
"""

from __future__ import annotations

from datastar_py import attribute_generator as datastar_py_data
from flask import Flask, render_template_string

from flask_datastar import FlaskDatastar, peek, set_all, toggle_all

#: A signal value with what the client would rewrite into an action call.
AT_TEXT = "mail me @get('/x') or @post(\"/y\") </p> & done"

app = Flask(__name__)
app.config.from_prefixed_env()
datastar = FlaskDatastar(app)

PAGE = """\
<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Attribute builder</title>
  <script type="module" src="{{ datastar_url() }}"></script>
</head>
<body {{ raw_signals if raw_signals else data.signals(signals) }}>
  <p id="msg" {{ data.text("$msg") }}></p>
  <p id="counts" {{ data.text("$todo.a + ',' + $todo.b + ',' + $other") }}></p>
  <p id="flags" {{ data.text("$open.x + ',' + $open.y + ',' + $keep") }}></p>
  <p id="peeked" {{ data.text("$typed + ':' + " + peek("$todo.a")) }}></p>
  <button id="reset" {{ data.on("click", set_all(0, include="^todo\\\\.")).prevent }}>reset</button>
  <button id="toggle" {{ data.on("click", toggle_all(include="^open\\\\.")) }}>toggle</button>
  <button id="bump" {{ data.on("click", "$todo.a = $todo.a + 1") }}>bump</button>
  <input id="typed" {{ data.bind("typed") }}>
  <p id="typed-out" {{ data.text("$typed") }}></p>
  <div {{ data.on_interval("$ticks = $ticks + 1").duration("50ms") }}></div>
  <p id="ticks" {{ data.show("$ticks > 2") }}>ticking</p>
</body>
</html>"""

SIGNALS = {
    "msg": AT_TEXT,
    "todo": {"a": 3, "b": 4},
    "other": 5,
    "open": {"x": True, "y": False},
    "keep": True,
    "typed": "",
    "ticks": 0,
}


@app.get("/")
def index() -> str:
    return page(None)


@app.get("/raw")
def raw() -> str:
    return page(datastar_py_data.signals(SIGNALS))


def page(raw_signals: object) -> str:
    return render_template_string(
        PAGE,
        signals=SIGNALS,
        raw_signals=raw_signals,
        peek=peek,
        set_all=set_all,
        toggle_all=toggle_all,
    )
