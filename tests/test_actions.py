"""Action expressions and the client URL: encoding that no input can break out of."""

from __future__ import annotations

import html
import json
import re
import subprocess

import pytest
from flask import Flask, render_template_string

from flask_datastar import (
    DATASTAR_CDN_URL,
    JS,
    datastar_url,
    js_literal,
    sse_delete,
    sse_get,
    sse_patch,
    sse_post,
    sse_put,
)
from tests.helpers import require_tool


@pytest.mark.parametrize(
    ("fn", "method"),
    [
        (sse_get, "get"),
        (sse_post, "post"),
        (sse_put, "put"),
        (sse_patch, "patch"),
        (sse_delete, "delete"),
    ],
)
def test_every_method(fn, method: str) -> None:  # type: ignore[no-untyped-def]
    assert fn("/x") == f"@{method}('/x')"
    assert fn("/x", retry="always") == f"@{method}('/x', {{retry: 'always'}})"


def test_options() -> None:
    assert sse_get("/sse", retry="always") == "@get('/sse', {retry: 'always'})"
    assert (
        sse_post(
            "/form",
            content_type="form",
            open_when_hidden=True,
            headers={"X-CSRF-Token": "t'k"},
            retry_max_count=3,
            filter_signals={"include": JS("/^todo/"), "exclude": None},
        )
        == "@post('/form', {contentType: 'form', openWhenHidden: true,"
        " headers: {'X-CSRF-Token': 't\\x27k'}, retryMaxCount: 3,"
        " filterSignals: {include: /^todo/, exclude: null}})"
    )


HOSTILE = [
    "/a'b",
    '/a"b',
    "/</script><script>alert(1)</script>",
    "/x\ny\r\u2028\u2029",
    "/back\\slash",
    "/&amp;",
    "/<img src=x onerror=alert(1)>",
    "/\x00\x1b\x7f",
]


@pytest.mark.parametrize("url", HOSTILE)
def test_no_value_escapes_its_string(url: str) -> None:
    expr = sse_post(url, headers={"X": url})
    # Nothing that ends the JS string, the attribute or the element survives unescaped.
    for char in '"<>&\n\r\u2028\u2029\x00':
        assert char not in expr
    inner = expr[len("@post(") :]
    literal = re.match(r"'((?:[^'\\]|\\.)*)'", inner)
    assert literal is not None
    assert inner[literal.end()] == ","


@pytest.mark.parametrize("value", HOSTILE)
def test_literals_decode_to_the_value_in_javascript(value: str) -> None:
    # node evaluates the literal exactly as a browser would.
    node = require_tool("node")
    literal = js_literal({"v": value, "n": [1, 2.5, None, True]})
    out = subprocess.run(
        [node, "-e", f"process.stdout.write(JSON.stringify({literal}))"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout) == {"v": value, "n": [1, 2.5, None, True]}


def test_js_literal_rejects() -> None:
    with pytest.raises(ValueError, match="finite"):
        js_literal(float("nan"))
    with pytest.raises(TypeError, match="no JavaScript literal"):
        js_literal(object())
    with pytest.raises(TypeError, match="keys must be strings"):
        js_literal({1: 2})
    with pytest.raises(TypeError, match="URL must be a string"):
        sse_get(None)  # type: ignore[arg-type]


def test_jinja_globals_render_safely(app: Flask) -> None:
    with app.test_request_context():
        out = render_template_string(
            '<button data-on:click="{{ sse_post(url) }}"></button>', url="/a'\"<b>"
        )
    attr = re.fullmatch(r'<button data-on:click="([^"]*)"></button>', out)
    assert attr is not None
    assert html.unescape(attr.group(1)) == sse_post("/a'\"<b>")


def test_datastar_url(app: Flask) -> None:
    assert DATASTAR_CDN_URL.endswith("/datastar@v1.0.2/bundles/datastar.js")
    assert datastar_url() == DATASTAR_CDN_URL
    with app.app_context():
        assert datastar_url() == DATASTAR_CDN_URL
        assert render_template_string("{{ datastar_url() }}") == DATASTAR_CDN_URL
    app.config["DATASTAR_JS_URL"] = "/static/datastar.js"
    with app.app_context():
        assert datastar_url() == "/static/datastar.js"


def test_at_sign_is_escaped() -> None:
    # The client rewrites "@name(" into an action call even inside string literals.
    assert js_literal("@post('/x')") == "'\\x40post(\\x27/x\\x27)'"
    assert "@" not in sse_post("/a@b", headers={"X": "@get('/y')"})[1:]
