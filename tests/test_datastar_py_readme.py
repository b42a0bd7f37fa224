"""datastar-py's README examples run under Flask with flask_datastar, after the renames
documented in ``docs/datastar-py.rst``.

The examples are read from the installed datastar-py's own README (its package
metadata), not copied here: each code block goes through :data:`RENAMES`, the table
of the documentation, and then runs against a Flask app. A README that changes in a
way the renames do not cover fails here.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask, render_template_string

from flask_datastar import FlaskDatastar
from flask_datastar.testing import ServerSentEvent, SSEParser
from tests.helpers import require_module

#: The renames of ``docs/datastar-py.rst``, in order: (pattern, replacement).
RENAMES: list[tuple[str, str]] = [
    # Imports: a framework's module (datastar_py.quart, .starlette, ..., .attributes)
    # becomes flask_datastar; datastar_py.consts and datastar_py.sse keep their names.
    (r"\bdatastar_py\.(?!consts\b|sse\b)\w+", "flask_datastar"),
    (r"\bdatastar_py\b", "flask_datastar"),
    (r"from quart import Quart", "from flask import Flask"),
    (r"\bQuart\(__name__\)", "Flask(__name__)"),
    # Flask runs views on the server's threads: plain functions, no await.
    (r"\basync def\b", "def"),
    (r"\bawait asyncio\.sleep\(", "time.sleep("),
    (r"\bawait ", ""),
    (r"^import asyncio$", "import time"),
    # read_signals() reads Flask's current request.
    (r"read_signals\(request\)", "read_signals()"),
    (r"def (\w+)\(request\)", r"def \1()"),
    # Start the development server only when run as a script.
    (r"^app\.run\(\)$", 'if __name__ == "__main__":\n    app.run()'),
]

#: What the README leaves out of its snippets ("the containing functions are not
#: shown"): an app, and Flask's rule that a route starts with "/".
SNIPPET_PRELUDE = "import time\nfrom flask import Flask\napp = Flask(__name__)\n"


def rename(code: str) -> str:
    for pattern, replacement in RENAMES:
        code = re.sub(pattern, replacement, code, flags=re.MULTILINE)
    return code


def readme_blocks() -> list[str]:
    require_module("datastar_py", "datastar-py")
    readme = importlib.metadata.metadata("datastar-py")["Description"]
    blocks = re.findall(r"```python\n(.*?)```", readme, re.DOTALL)
    assert len(blocks) >= 7, "datastar-py's README has changed: check the examples."
    return blocks


def block(start: str) -> str:
    """Return the README's code block that starts with *start*."""
    (found,) = [b for b in readme_blocks() if b.startswith(start)]
    return found


def run(code: str) -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": "readme_example"}
    exec(compile(rename(code), "<datastar-py README>", "exec"), namespace)
    return namespace


def events(app: Flask, path: str, n: int) -> list[ServerSentEvent]:
    """Read the first *n* events of a stream, then close it as a client that leaves."""
    response = app.test_client().get(path, buffered=False)
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    parser = SSEParser()
    out: list[ServerSentEvent] = []
    chunks: Iterator[bytes] = iter(response.response)
    try:
        while len(out) < n:
            out.extend(parser.feed(next(chunks)))
    finally:
        response.close()
    return out[:n]


def test_the_quart_example_runs_under_flask() -> None:
    code = block("import asyncio\nfrom datetime import datetime")
    assert "from datastar_py.quart import datastar_response, read_signals" in code
    app = run(code)["app"]
    assert isinstance(app, Flask)
    page = app.test_client().get("/").text
    assert 'data-init="@get(&#39;/updates&#39;)"' in page
    first, second = events(app, "/updates", 2)
    assert first.event == "datastar-patch-elements"
    assert first.elements is not None and first.elements.startswith('<span id="currentTime">')
    assert second.event == "datastar-patch-signals"
    assert set(second.signals) == {"currentTime"}


def test_the_response_helpers_example_runs_under_flask() -> None:
    code = block("# per framework Response import.")
    # The sanic part has no Flask counterpart: a Flask view returns its response.
    code = code.split("# A long lived stream for sanic")[0]
    code = SNIPPET_PRELUDE + "from datastar_py.flask import DatastarResponse\n" + code
    code = re.sub(r'@app\.get\("(?!/)', '@app.get("/', code)
    app = run(code)["app"]
    client = app.test_client()

    zero = client.get("/zero")
    assert zero.status_code == 204
    (one,) = [e.event for e in SSEParser().feed(client.get("/one").data)]
    assert one == "datastar-patch-elements"
    two = SSEParser().feed(client.get("/two").data)
    assert [e.event for e in two] == ["datastar-patch-elements", "datastar-patch-signals"]
    assert two[1].signals == {"mysignal": "myval"}
    many = events(app, "/updates", 2)
    assert [e.elements for e in many] == ["<div id='mydiv'></div>"] * 2


def test_the_decorator_example_runs_under_flask() -> None:
    code = SNIPPET_PRELUDE + block("# Import the decorator from the package specific")
    app = run(code)["app"]
    first, second = events(app, "/my_route", 2)
    assert first.elements == second.elements == "<div id='mydiv'></div>"


def test_the_read_signals_example_runs_under_flask() -> None:
    namespace = run(SNIPPET_PRELUDE + block("from datastar_py.quart import read_signals"))
    app = namespace["app"]
    with app.test_request_context("/updates?datastar=%7B%22a%22%3A1%7D"):
        assert namespace["updates"]() is None  # the snippet stops after reading them
        assert namespace["read_signals"]() == {"a": 1}


def test_the_attribute_examples_run_under_flask() -> None:
    code = block("from datastar_py import attribute_generator as data\n\n# htpy")
    jinja = [line for line in code.splitlines() if line.startswith("<button {{")]
    assert len(jinja) == 1
    namespace = run(code.split("\n# htpy")[0])
    # The Jinja line, as it is, in a Flask app with the extension: 'data' is a global.
    app = Flask(__name__)
    FlaskDatastar(app)
    with app.app_context():
        rendered = render_template_string(jinja[0])
    expected = str(namespace["data"].on("click", "console.log('clicked')").debounce(1000).stop)
    assert rendered == f"<button {expected}>My Button</button>"
    assert expected == (
        'data-on:click__case.kebab__debounce.1000__stop="console.log(&#39;clicked&#39;)"'
    )

    alias = block("from datastar_py.attributes import AttributeGenerator")
    data = run(alias.split("\n# htmy")[0])["data"]
    assert str(data.show("$a")) == 'data-star-show="$a"'


def test_the_action_example_runs_under_flask() -> None:
    submit = run(block("from datastar_py import attribute_generator as data\nfrom"))["submit"]
    assert dict(submit) == {
        "data-on:submit__case.kebab": "@post('/contacts', {contentType: 'form',"
        " retry: 'never', requestCancellation: 'cleanup',"
        " headers: {'X-View': (el.dataset.viewId)}})"
    }


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (
            "from datastar_py import ServerSentEventGenerator as SSE",
            "from flask_datastar import ServerSentEventGenerator as SSE",
        ),
        ("from datastar_py.quart import read_signals", "from flask_datastar import read_signals"),
        ("from datastar_py import consts", "from flask_datastar import consts"),
        (
            "from datastar_py.consts import ElementPatchMode",
            "from flask_datastar.consts import ElementPatchMode",
        ),
        (
            "from datastar_py.starlette import DatastarResponse",
            "from flask_datastar import DatastarResponse",
        ),
        ("    signals = await read_signals()", "    signals = read_signals()"),
        ("    await asyncio.sleep(1)", "    time.sleep(1)"),
        ("async def updates(request):", "def updates():"),
    ],
)
def test_the_renames(before: str, after: str) -> None:
    assert rename(before) == after
