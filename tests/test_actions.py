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
    FETCH_OPTIONS,
    JS,
    action_generator,
    datastar_url,
    js_literal,
    peek,
    set_all,
    sse_delete,
    sse_get,
    sse_patch,
    sse_post,
    sse_put,
    toggle_all,
)
from tests.helpers import require_module, require_tool


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


# -- option checking, filters and the non-request actions (datastar-py parity) ----------


@pytest.mark.parametrize(
    ("options", "suggestion"),
    [
        ({"retrys": 3}, "'retry'"),
        ({"retry_max_counts": 3}, "'retry_max_count'"),
        ({"openWhenHiden": True}, "'openWhenHidden'"),
        ({"contenttype": "form"}, "'content_type'"),
        ({"include_signal": "^a"}, "'include_signals'"),
    ],
)
def test_an_unknown_option_is_an_error_naming_the_nearest(
    options: dict[str, object], suggestion: str
) -> None:
    (name,) = options
    with pytest.raises(TypeError, match=f"unknown option '{name}'. Did you mean {suggestion}"):
        sse_post("/x", **options)


def test_an_unknown_option_far_from_any_lists_them_all() -> None:
    with pytest.raises(TypeError, match="unknown option 'zzz'. The options .* retry_max_count"):
        sse_get("/x", zzz=1)


def test_every_option_of_the_client_is_accepted_in_both_spellings() -> None:
    assert set(FETCH_OPTIONS.values()) == {
        "contentType",
        "filterSignals",
        "selector",
        "headers",
        "openWhenHidden",
        "payload",
        "requestCancellation",
        "retry",
        "retryInterval",
        "retryScaler",
        "retryMaxWait",
        "retryMaxCount",
    }
    values = {
        "content_type": "form",
        "filter_signals": {"include": "^a"},
        "selector": "#f",
        "headers": {"X": "1"},
        "open_when_hidden": True,
        "payload": {"a": 1},
        "request_cancellation": "disabled",
        "retry": "error",
        "retry_interval": 100,
        "retry_scaler": 1.5,
        "retry_max_wait": 5000,
        "retry_max_count": 3,
    }
    snake = sse_post("/x", **values)
    camel = sse_post("/x", **{FETCH_OPTIONS[key]: value for key, value in values.items()})
    assert snake == camel
    for name in FETCH_OPTIONS.values():
        assert f"{name}: " in snake


def test_none_leaves_the_clients_default() -> None:
    # The client falls back to its default only for an absent option, not for null.
    assert sse_get("/x", retry=None, selector=None) == "@get('/x')"


def test_the_same_option_twice_is_an_error() -> None:
    with pytest.raises(TypeError, match="'retryMaxCount' twice"):
        sse_get("/x", retry_max_count=1, retryMaxCount=2)


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"retry": "sometimes"}, ValueError, "'retry'; use one of: auto, error, always, never"),
        ({"content_type": "xml"}, ValueError, "'content_type'; use one of: json, form"),
        ({"requestCancellation": "x"}, ValueError, "auto, cleanup, disabled"),
        ({"retry_interval": -1}, ValueError, "at least 0 for 'retry_interval'"),
        ({"retry_max_count": True}, ValueError, "at least 0 for 'retry_max_count'"),
        ({"retry_scaler": float("nan")}, ValueError, "at least 0 for 'retry_scaler'"),
        ({"open_when_hidden": "yes"}, TypeError, "True or False for 'open_when_hidden'"),
        ({"selector": "#f"}, ValueError, "needs content_type='form'"),
        (
            {"filter_signals": {"include": "a"}, "include_signals": "b"},
            TypeError,
            "both 'filter_signals' and 'include_signals'",
        ),
        ({"include_signals": 3}, TypeError, "'include' must be a regular expression pattern"),
    ],
)
def test_option_values_are_checked(
    options: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=re.escape(message)):
        sse_post("/x", **options)


def test_an_expression_is_accepted_for_any_checked_option() -> None:
    assert sse_get("/x", retry=JS("$mode"), request_cancellation=JS("ctl")) == (
        "@get('/x', {retry: $mode, requestCancellation: ctl})"
    )


def test_include_and_exclude_signals_become_filter_signals() -> None:
    assert sse_get("/x", include_signals="^todo\\.", exclude_signals=JS("/secret/")) == (
        "@get('/x', {filterSignals: {include: new RegExp('^todo\\\\.'), exclude: /secret/}})"
    )


def test_non_request_actions() -> None:
    assert peek("$bar") == "@peek(() => ($bar))"
    assert set_all(True) == "@setAll(true)"
    assert set_all(JS("$all"), include="^user\\.") == (
        "@setAll($all, {include: new RegExp('^user\\\\.')})"
    )
    assert set_all("x", exclude="^_") == "@setAll('x', {exclude: new RegExp('^_')})"
    assert toggle_all() == "@toggleAll()"
    assert toggle_all("^is", "Open$") == (
        "@toggleAll({include: new RegExp('^is'), exclude: new RegExp('Open$')})"
    )
    with pytest.raises(TypeError, match="non-empty expression"):
        peek("  ")


def test_action_generator_has_datastar_pys_names() -> None:
    assert action_generator.get("/x", retry="never") == sse_get("/x", retry="never")
    assert action_generator.delete("/x") == "@delete('/x')"
    assert action_generator.toggle_all("^a") == toggle_all("^a")
    theirs = require_module("datastar_py", "datastar-py")
    for name in ("get", "post", "put", "patch", "delete", "peek", "set_all", "toggle_all"):
        assert callable(getattr(theirs.action_generator, name))
        assert callable(getattr(action_generator, name)), name


def test_datastar_pys_js_expression_is_javascript() -> None:
    attributes = require_module("datastar_py.attributes", "datastar-py")
    expression = attributes.JSExpression("el.dataset.viewId")
    assert sse_post("/c", headers={"X-View": expression}) == (
        "@post('/c', {headers: {'X-View': (el.dataset.viewId)}})"
    )
    assert peek(expression) == "@peek(() => (el.dataset.viewId))"


@pytest.mark.parametrize("value", HOSTILE)
def test_filters_and_values_decode_to_the_value_in_javascript(value: str) -> None:
    # node runs each expression with stand-ins for the actions, as the client calls them.
    node = require_tool("node")
    expressions = [
        set_all(value, include=value, exclude=value),
        toggle_all(value, value),
        sse_get("/x", include_signals=value, exclude_signals=value, headers={"h": value}),
    ]
    for expr in expressions:
        for char in '"<>&\n\r\u2028\u2029\x00':
            assert char not in expr
        assert "@" not in expr[1:]
    script = (
        "const out = [];"
        "const setAll = (v, f) => out.push([v, f.include.source, f.exclude.source]);"
        "const toggleAll = (f) => out.push([f.include.source, f.exclude.source]);"
        "const get = (u, o) => out.push([u, o.filterSignals.include.source,"
        " o.filterSignals.exclude.source, o.headers.h]);"
        + ";".join(expr[1:] for expr in expressions)
        + ";process.stdout.write(JSON.stringify(out))"
    )
    result = subprocess.run([node, "-e", script], capture_output=True, text=True, check=True)
    # RegExp(source).source is the pattern, "/" escaped.
    source = subprocess.run(
        [
            node,
            "-e",
            f"process.stdout.write(JSON.stringify(new RegExp({js_literal(value)}).source))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    pattern = json.loads(source)
    assert json.loads(result.stdout) == [
        [value, pattern, pattern],
        [pattern, pattern],
        ["/x", pattern, pattern, value],
    ]


def test_js_literal_escapes_a_lone_surrogate() -> None:
    # Found by tests/test_fuzz.py: js_literal("\ud800") held the raw surrogate, which no
    # page can be encoded with (a 500 when rendered).
    node = require_tool("node")
    literal = js_literal({"v": "a\ud800b", "\udfff": 1})
    literal.encode("utf-8")
    out = subprocess.run(
        [node, "-e", f"process.stdout.write(JSON.stringify({literal}))"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout) == {"v": "a\ud800b", "\udfff": 1}


def test_a_proto_key_is_an_own_property() -> None:
    # Found by tests/test_fuzz.py: in an object literal, "__proto__": v sets the prototype
    # instead of a property, so {"__proto__": {...}} in a payload or header reached the
    # action as {}.
    node = require_tool("node")
    value = {"__proto__": {"a": 1}, "b": {"__proto__": 2}}
    literal = js_literal(value)
    out = subprocess.run(
        [node, "-e", f"process.stdout.write(JSON.stringify({literal}))"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout) == value
    assert sse_post("/x", payload=value).count("['__proto__']") == 2
