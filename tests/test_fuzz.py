"""Property-based tests: hostile input to read_signals and to every helper that writes
caller data into HTML, JavaScript, headers or the SSE framing.

Each property runs a fixed, derandomized set of examples (the same on every run, in CI
too), within a budget of about 20 seconds for the module; ``FLASK_DATASTAR_FUZZ=10``
runs ten times as many for a longer local hunt. Every bug found here also has a plain
regression test beside the code it concerns.
"""

from __future__ import annotations

import html as html_lib
import io
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flask_datastar import (
    DatastarResponse,
    FlaskDatastar,
    js_literal,
    read_signals,
    set_all,
    sse_get,
    sse_post,
)
from flask_datastar.sse import (
    SSE,
    DatastarEvent,
    ElementPatchMode,
    ElementPatchNamespace,
    comment,
    js_string,
)
from flask_datastar.testing import ServerSentEvent, SSEParser
from tests.helpers import require_tool

_SCALE = int(os.environ.get("FLASK_DATASTAR_FUZZ", "1"))


def fuzz(examples: int) -> settings:
    """A fixed budget: the same examples on every run, no example database, no deadline."""
    return settings(
        max_examples=examples * _SCALE,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# Every character, lone surrogates included (hypothesis leaves them out by default).
ANY_CHAR = st.characters(codec=None, exclude_categories=())
ANY_TEXT = st.text(ANY_CHAR, max_size=60)
# Text without surrogates, as a str from a decoded request is.
TEXT = st.text(max_size=60)
# The characters that frame things: line breaks of SSE, HTML and JavaScript, quotes,
# tags, entities, the "@" of actions, script-ish words.
NASTY = st.sampled_from(
    [
        "\n",
        "\r",
        "\r\n",
        "\u2028",
        "\u2029",
        "\x85",
        "\x00",
        "\x0c",
        "\t",
        " ",
        '"',
        "'",
        "`",
        "<",
        ">",
        "&",
        "/",
        "=",
        "\\",
        "@",
        ":",
        "</script>",
        "<!--",
        "<script>",
        "${x}",
        "data: ",
        "event: x",
        "id: 1",
        "\ufeff",
        "\ud800",
        "\U0001f600",
        "javascript:",
        "__proto__",
    ]
)
HOSTILE = st.lists(st.one_of(NASTY, ANY_TEXT), max_size=8).map("".join)
HOSTILE_TEXT = st.lists(st.one_of(NASTY.filter(lambda s: s != "\ud800"), TEXT), max_size=8).map(
    "".join
)


def _normalise_newlines(text: str) -> str:
    return re.sub(r"\r\n|\r", "\n", text)


DATA_KEYS = {
    "datastar-patch-elements": {
        "selector",
        "mode",
        "useViewTransition",
        "viewTransitionSelector",
        "namespace",
        "elements",
    },
    "datastar-patch-signals": {"signals", "onlyIfMissing"},
}


def one_event(text: str, event_type: str) -> ServerSentEvent:
    """Parse *text* as a browser would and check it is exactly one well-framed event."""
    assert isinstance(text, DatastarEvent)
    assert "\r" not in text  # "\n" is the only line end the builders write
    lines = text.split("\n")
    assert lines[-2:] == ["", ""] and "" not in lines[:-2]  # one blank line: one event
    assert lines[0] == f"event: {event_type}"
    for line in lines[1:-2]:
        field, _, value = line.partition(": ")
        assert field in ("id", "retry", "data"), line
        if field == "data":
            assert value.split(" ", 1)[0] in DATA_KEYS[event_type], line
    parser = SSEParser()
    # Fed as text: on the wire a lone surrogate becomes U+FFFD, which frames nothing.
    events = parser.feed(text)
    assert len(events) == 1 and not parser.has_pending and parser.comments == 0
    assert events[0].event == event_type
    return events[0]


# --- The SSE builders ------------------------------------------------------------------

OPTIONAL_LINE = st.none() | HOSTILE
EVENT_ID = st.none() | HOSTILE
RETRY = st.none() | st.integers(min_value=0, max_value=10**12)


def _has_newline(value: str | None) -> bool:
    return value is not None and ("\n" in value or "\r" in value)


def _check_id_and_retry(event: ServerSentEvent, event_id: str | None, retry: int | None) -> None:
    assert event.id == event_id
    assert event.retry == (None if retry in (None, 1000) else retry)


@fuzz(400)
@given(
    elements=st.none() | HOSTILE,
    selector=OPTIONAL_LINE,
    mode=st.none() | st.sampled_from(list(ElementPatchMode)),
    use_view_transition=st.none() | st.booleans(),
    view_transition_selector=OPTIONAL_LINE,
    namespace=st.none() | st.sampled_from(list(ElementPatchNamespace)),
    event_id=EVENT_ID,
    retry_duration=RETRY,
)
def test_patch_elements_is_one_event_that_carries_its_input(
    elements: str | None,
    selector: str | None,
    mode: ElementPatchMode | None,
    use_view_transition: bool | None,
    view_transition_selector: str | None,
    namespace: ElementPatchNamespace | None,
    event_id: str | None,
    retry_duration: int | None,
) -> None:
    refused = (
        _has_newline(selector)
        or _has_newline(event_id)
        or (
            use_view_transition
            and view_transition_selector
            and _has_newline(view_transition_selector)
        )
        or (not selector and mode not in (None, ElementPatchMode.OUTER, ElementPatchMode.REPLACE))
        or (event_id is not None and "\0" in event_id)
    )
    try:
        text = SSE.patch_elements(
            elements,
            selector=selector,
            mode=mode,
            use_view_transition=use_view_transition,
            view_transition_selector=view_transition_selector,
            namespace=namespace,
            event_id=event_id,
            retry_duration=retry_duration,
        )
    except ValueError:
        assert refused
        return
    assert not refused
    event = one_event(text, "datastar-patch-elements")
    assert event.elements == (_normalise_newlines(elements) if elements else None)
    assert event.selector == (selector or None)
    assert event.mode == (None if mode in (None, ElementPatchMode.OUTER) else mode.value)
    assert event.datavalue("namespace") == (
        None if namespace in (None, ElementPatchNamespace.HTML) else namespace.value
    )
    assert event.datavalue("useViewTransition") == ("true" if use_view_transition else None)
    assert event.datavalue("viewTransitionSelector") == (
        view_transition_selector if use_view_transition and view_transition_selector else None
    )
    _check_id_and_retry(event, event_id, retry_duration)


JSON_LEAF = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # NaN and the infinities included: they must be refused
    | HOSTILE
)
JSON_VALUE = st.recursive(
    JSON_LEAF,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(HOSTILE, children, max_size=4)
    ),
    max_leaves=12,
)


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


@fuzz(300)
@given(
    signals=st.dictionaries(HOSTILE, JSON_VALUE, max_size=5),
    only_if_missing=st.none() | st.booleans(),
    event_id=EVENT_ID,
    retry_duration=RETRY,
)
def test_patch_signals_is_one_event_of_json(
    signals: dict[str, Any],
    only_if_missing: bool | None,
    event_id: str | None,
    retry_duration: int | None,
) -> None:
    refused = not _finite(signals) or _has_newline(event_id) or "\0" in (event_id or "")
    try:
        text = SSE.patch_signals(
            signals,
            event_id=event_id,
            only_if_missing=only_if_missing,
            retry_duration=retry_duration,
        )
    except ValueError:
        assert refused
        return
    assert not refused
    event = one_event(text, "datastar-patch-signals")

    def strict(token: str) -> None:
        raise AssertionError(f"{token} is not JSON")

    raw = event.datavalue("signals")
    assert raw is not None
    # What JSON.parse reads: no NaN, no Infinity, and the same value back.
    assert json.loads(raw, parse_constant=strict) == signals
    assert event.datavalue("onlyIfMissing") == ("true" if only_if_missing else None)
    _check_id_and_retry(event, event_id, retry_duration)


@fuzz(150)
@given(text=HOSTILE)
def test_patch_signals_sends_a_json_text_line_by_line(text: str) -> None:
    event = one_event(SSE.patch_signals(text), "datastar-patch-signals")
    assert event.datavalue("signals") == _normalise_newlines(text)


# An independent reading of the HTML attribute name grammar, character by character.
def _is_attribute_name(name: str) -> bool:
    def ok(char: str) -> bool:
        code = ord(char)
        return not (
            code <= 0x20
            or 0x7F <= code <= 0x9F
            or char in "\"'>/=<"
            or 0xD800 <= code <= 0xDFFF
            or 0xFDD0 <= code <= 0xFDEF
            or (code & 0xFFFE) == 0xFFFE
        )

    return bool(name) and all(ok(char) for char in name)


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _lower(name: str) -> str:
    # The tokenizer lowercases ASCII letters only.
    return name.translate(_ASCII_LOWER)


def _start_tag(html: str) -> tuple[list[tuple[str, str]], str]:
    """Tokenize the ``<script ...>`` start tag as the HTML tokenizer does (WHATWG 13.2.5).

    Returns the attributes, in order, duplicates dropped as the tokenizer drops them,
    and the text after the tag.
    """
    assert html.startswith("<script")
    s = html.replace("\0", "\ufffd")
    i, n = len("<script"), len(html)
    attrs: list[tuple[str, str]] = []
    ws = "\t\n\x0c "

    def emit(name: str, value: str) -> None:
        if name not in (a for a, _ in attrs):
            attrs.append((name, value))

    while i < n:
        c = s[i]
        if c in ws or c == "/":
            i += 1
            continue
        if c == ">":
            return attrs, s[i + 1 :]
        # Attribute name state; "=" as the first character is part of the name.
        start, i = i, i + 1
        while i < n and s[i] not in ws and s[i] not in "/>=":
            i += 1
        name = _lower(s[start:i])
        while i < n and s[i] in ws:
            i += 1
        if i >= n or s[i] != "=":
            emit(name, "")
            continue
        i += 1
        while i < n and s[i] in ws:
            i += 1
        if i < n and s[i] in "\"'":
            end = s.index(s[i], i + 1)
            value, i = s[i + 1 : end], end + 1
        elif i < n and s[i] == ">":
            value = ""
        else:
            start = i
            while i < n and s[i] not in ws and s[i] != ">":
                i += 1
            value = s[start:i]
        emit(name, html_lib.unescape(value))
    raise AssertionError("the start tag never ends")


ATTRIBUTE_NAME = st.one_of(
    st.text(st.characters(codec=None, exclude_categories=()), min_size=0, max_size=12),
    st.from_regex(r"[a-zA-Z][a-zA-Z0-9:_.@\-]{0,12}", fullmatch=True),
    st.lists(st.one_of(NASTY, st.sampled_from(["src", "a", "on"])), max_size=4).map("".join),
)


@fuzz(300)
@given(
    script=HOSTILE,
    auto_remove=st.booleans(),
    attributes=st.dictionaries(ATTRIBUTE_NAME, HOSTILE, max_size=4),
    event_id=st.none() | HOSTILE_TEXT.filter(lambda s: not _has_newline(s) and "\0" not in s),
)
def test_execute_script_attributes_stay_attributes(
    script: str, auto_remove: bool, attributes: dict[str, str], event_id: str | None
) -> None:
    valid = all(_is_attribute_name(name) for name in attributes)
    try:
        text = SSE.execute_script(
            script, auto_remove=auto_remove, attributes=attributes, event_id=event_id
        )
    except ValueError as e:
        assert not valid and "attribute name" in str(e)
        return
    assert valid
    event = one_event(text, "datastar-patch-elements")
    assert event.selector == "body" and event.mode == "append"
    html = event.elements
    assert html is not None
    attrs, rest = _start_tag(html)
    expected: list[tuple[str, str]] = [("data-effect", "el.remove()")] if auto_remove else []
    for name, value in attributes.items():
        if _lower(name) not in (a for a, _ in expected):
            expected.append((_lower(name), _normalise_newlines(value).replace("\0", "\ufffd")))
    assert attrs == expected
    # The script follows the tag as it was given (the caller's JavaScript, sent as is).
    assert rest == _normalise_newlines(script).replace("\0", "\ufffd") + "</script>"


ATTRIBUTE_STRING = st.one_of(
    HOSTILE,
    st.tuples(
        ATTRIBUTE_NAME,
        st.sampled_from(["", "=", '="', "='", "= "]),
        HOSTILE,
        st.sampled_from(["", '"', "'"]),
    ).map("".join),
)


@fuzz(300)
@given(attributes=st.lists(ATTRIBUTE_STRING, max_size=3))
def test_a_ready_made_attribute_string_is_exactly_one_attribute(attributes: list[str]) -> None:
    try:
        text = SSE.execute_script("go()", auto_remove=False, attributes=attributes)
    except ValueError as e:
        assert "one attribute" in str(e)
        return
    html = one_event(text, "datastar-patch-elements").elements
    assert html is not None
    attrs, rest = _start_tag(html)
    assert rest == "go()</script>"
    names = [_lower(a.split("=", 1)[0]) for a in attributes]
    # Each string gave one attribute (a repeated name is dropped, as the tokenizer does).
    assert [name for name, _ in attrs] == list(dict.fromkeys(names))
    for name in names:
        assert _is_attribute_name(name)


# --- JavaScript, checked by node ---------------------------------------------------------

_NODE_WORKER = r"""
const rl = require('readline').createInterface({input: process.stdin});
rl.on('line', (line) => {
  const {code} = JSON.parse(line);
  let out;
  try {
    const value = new Function(code)();
    out = {ok: value === undefined ? null : value};
  } catch (e) {
    out = {error: String(e && e.name) + ': ' + String(e && e.message)};
  }
  process.stdout.write(JSON.stringify(out) + '\n');
});
"""


class Node:
    """One node process that runs snippets sent line by line, for thousands of examples."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [require_tool("node"), "-e", _NODE_WORKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            encoding="utf-8",
        )

    def run(self, code: str) -> Any:
        """Run *code* as a function body and return what it returns, through JSON.

        Numbers come back as floats, as JavaScript has them: ``JSON.stringify`` writes
        ``4e16`` as ``40000000000000000``, which Python would read as an int.
        """
        assert self.process.stdin is not None and self.process.stdout is not None
        # ASCII JSON: a lone surrogate travels as an escape and arrives as itself.
        self.process.stdin.write(json.dumps({"code": code}) + "\n")
        self.process.stdin.flush()
        out = json.loads(self.process.stdout.readline(), parse_int=float)
        assert "error" not in out, (out["error"], code)
        return out["ok"]

    def close(self) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.close()
        self.process.wait(timeout=10)
        self.process.stdout.close()  # or a ResourceWarning, at whatever test GC runs in


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    worker = Node()
    try:
        yield worker
    finally:
        worker.close()


def _as_javascript(value: Any) -> Any:
    """*value* with its numbers as floats, as they come back from node."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, dict):
        return {k: _as_javascript(v) for k, v in value.items()}
    return [_as_javascript(v) for v in value]


# What may never appear in a literal, outside an escape: the end of a script element or
# an attribute, the start of a tag or an entity, a JavaScript line break.
_NEVER_IN_A_LITERAL = '"<>&\n\r\u2028\u2029\x00'


@fuzz(300)
@given(value=HOSTILE)
def test_js_string_is_the_value_in_javascript(node: Node, value: str) -> None:
    literal = js_string(value)
    assert not set("<>&\n\r\u2028\u2029") & set(literal)
    literal.encode("utf-8")  # writable into any page
    assert node.run(f"return {literal};") == value


JS_VALUE = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | HOSTILE,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(HOSTILE, children, max_size=4)
    ),
    max_leaves=12,
)


@fuzz(300)
@given(value=JS_VALUE)
def test_js_literal_is_the_value_in_javascript(node: Node, value: Any) -> None:
    literal = js_literal(value)
    assert not set(_NEVER_IN_A_LITERAL + "@") & set(literal)
    literal.encode("utf-8")
    assert node.run(f"return ({literal});") == _as_javascript(value)


@fuzz(200)
@given(url=HOSTILE, headers=st.dictionaries(HOSTILE, HOSTILE, max_size=3), payload=JS_VALUE)
def test_action_arguments_reach_the_action_as_given(
    node: Node, url: str, headers: dict[str, str], payload: Any
) -> None:
    stubs = "const get = (u, o) => [u, o], post = get, setAll = (v) => [v];"
    for expression, expected in [
        (sse_get(url, headers=headers), [url, {"headers": headers}]),
        # None leaves the option out, so that the client's default applies.
        (sse_post(url, payload=payload), [url, None if payload is None else {"payload": payload}]),
        (set_all(payload), [payload]),
    ]:
        assert expression.startswith("@") and "@" not in expression[1:]
        assert not set(_NEVER_IN_A_LITERAL) & set(expression)
        assert node.run(f"{stubs} return {expression[1:]};") == _as_javascript(expected)


@fuzz(300)
@given(value=HOSTILE)
def test_redirect_and_console_carry_the_value_and_nothing_else(node: Node, value: str) -> None:
    harness = (
        "let out = null; const window = {location: {}};"
        " const setTimeout = (f) => f();"
        " const console = {log: (m) => { out = m; }, error: (m) => { out = m; }};"
    )
    events = [SSE.console_log(value), SSE.console_error(value)]
    protocol = node.run(
        f"try {{ return new URL({js_string(value)}, 'https://example.com/a/').protocol; }}"
        " catch (e) { return null; }"
    )
    try:
        events.append(SSE.redirect(value))
    except ValueError:
        # Refused: the browser would have read a scheme other than http and https.
        assert protocol not in ("http:", "https:")
    else:
        # Accepted: the browser goes to an http(s) URL, or the URL does not parse.
        assert protocol in ("http:", "https:", None)
    for text in events:
        html = one_event(text, "datastar-patch-elements").elements
        assert html is not None
        attrs, rest = _start_tag(html)
        assert attrs == [("data-effect", "el.remove()")]
        code = rest.removesuffix("</script>")
        assert rest.endswith("</script>") and "<" not in code and "\n" not in code
        result = node.run(f"{harness} {code}; return out ?? window.location.href;")
        assert result == value


@fuzz(100)
@given(text=HOSTILE)
def test_a_comment_is_one_comment_line(text: str) -> None:
    try:
        block = comment(text)
    except ValueError:
        assert _has_newline(text)
        return
    parser = SSEParser()
    assert parser.feed(block) == []
    assert parser.comments == 1 and not parser.has_pending


# --- read_signals through Flask's test client ------------------------------------------

LIMIT = 4096


class Seen(list[Any]):
    """The signals the view read, the last one only; its repr stays short for reports."""

    def __repr__(self) -> str:
        return "<Seen>"


def _client(app: Flask) -> FlaskClient:
    """A test client that sends ``Datastar-Request: true``, as Datastar's actions do."""
    client = app.test_client()
    client.environ_base["HTTP_DATASTAR_REQUEST"] = "true"
    return client


@pytest.fixture(scope="module")
def signals_app() -> tuple[Flask, Seen]:
    app = Flask(__name__)
    app.config.update(TESTING=True, DATASTAR_MAX_SIGNALS_BYTES=LIMIT)
    FlaskDatastar(app)
    seen = Seen()

    @app.route("/s", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    def view() -> str:
        seen[:] = [read_signals()]
        return "ok"

    return app, seen


# JSON-ish text: valid JSON, what Python's json reads but JSON has not, and breakage.
JSONISH_ATOM = st.one_of(
    st.integers(min_value=-(10**400), max_value=10**400).map(str),
    st.floats()
    .map(repr)
    .map(lambda r: {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}.get(r, r)),
    st.sampled_from(
        [
            "NaN",
            "-Infinity",
            "1e999999",
            "-1E+400",
            "1" * 310,
            "1" * 5000,
            "0.1e-999",
            "-0",
            "true",
            "null",
            '"\\ud800"',
            '"\\ud83d\\ude00"',
            '"\\u0000"',
            '"a\\"b"',
            "tru",
            "[",
            "{",
            "}",
            ",",
            ":",
        ]
    ),
    HOSTILE_TEXT.map(json.dumps),
    HOSTILE_TEXT.map(lambda s: json.dumps(s, ensure_ascii=False)),
)
JSONISH = st.recursive(
    JSONISH_ATOM,
    lambda children: (
        st.lists(children, max_size=4).map(lambda xs: "[" + ",".join(xs) + "]")
        | st.lists(st.tuples(HOSTILE_TEXT.map(json.dumps), children), max_size=4).map(
            lambda kv: "{" + ",".join(f"{k}:{v}" for k, v in kv) + "}"
        )
    ),
    max_leaves=10,
)
SIGNALS_TEXT = st.one_of(
    JSONISH.map(lambda v: '{"a":' + v + "}"),
    JSONISH,
    st.integers(min_value=1, max_value=3000).map(lambda d: '{"a":' + "[" * d + "]" * d + "}"),
)


class _Pairs(list[tuple[str, Any]]):
    """A JSON object as all its pairs: a repeated key's earlier values are checked too."""


def _strict_json_object(text: str) -> bool:
    """Whether *text* is a JSON object that JSON.parse reads, every number finite."""

    def refuse(token: str) -> None:
        raise ValueError(token)

    def in_range(item: Any) -> bool:
        if isinstance(item, bool):
            return True
        if isinstance(item, (int, float)):
            return abs(item) <= sys.float_info.max
        if isinstance(item, (list, tuple)):
            return all(in_range(v) for v in item)
        return True

    try:
        value = json.loads(text, parse_constant=refuse, object_pairs_hook=_Pairs)
        # Keys and strings must be text: no lone surrogate.
        json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8")
        return isinstance(value, _Pairs) and in_range(value)
    except (ValueError, RecursionError):
        return False


def _check_response(status: int, size: int | None, text: str | None, seen: list[Any]) -> None:
    """A 200, 400 or 413 as the limit says; accepted exactly when JSON.parse would agree."""
    assert status in (200, 400, 413), status
    if size is not None:
        assert (status == 413) == (size > LIMIT)
    if status == 200:
        value = seen[-1]
        assert isinstance(value, dict)
        # Whatever is accepted can be echoed back as JSON and written as UTF-8.
        json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8")
    # Far from the recursion limit, where the oracle and the view agree on what is too deep.
    if text is not None and status != 413 and text.strip() and text.count("[") < 500:
        assert (status == 200) == _strict_json_object(text), (status, text[:200])


@fuzz(400)
@given(text=SIGNALS_TEXT, method=st.sampled_from(["POST", "PUT", "PATCH"]))
def test_json_ish_bodies_are_a_200_400_or_413(
    signals_app: tuple[Flask, Seen], text: str, method: str
) -> None:
    app, seen = signals_app
    body = text.encode("utf-8", "surrogatepass")
    rv = _client(app).open("/s", method=method, data=body, content_type="application/json")
    decodable = True
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        decodable = False
    _check_response(rv.status_code, len(body), text if decodable else None, seen)


@fuzz(300)
@given(text=SIGNALS_TEXT, method=st.sampled_from(["GET", "DELETE"]))
def test_json_ish_queries_are_a_200_400_or_413(
    signals_app: tuple[Flask, Seen], text: str, method: str
) -> None:
    app, seen = signals_app
    encoded = quote(text.encode("utf-8", "surrogatepass"), safe="")
    rv = _client(app).open(f"/s?datastar={encoded}", method=method)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate: its bytes are no UTF-8, and the parameter is read with them
        # replaced, so neither its length nor its text is the one sent.
        _check_response(rv.status_code, None, None, seen)
    else:
        # The limit counts the characters of the decoded parameter.
        _check_response(rv.status_code, len(text), text, seen)


@fuzz(300)
@given(
    body=st.binary(max_size=LIMIT + 200),
    content_type=st.sampled_from(
        ["application/json", "text/plain", "", "application/json; charset=latin-1"]
    ),
    chunked=st.booleans(),
)
def test_any_bytes_in_a_body_are_a_200_400_or_413(
    signals_app: tuple[Flask, Seen], body: bytes, content_type: str, chunked: bool
) -> None:
    app, seen = signals_app
    client = _client(app)
    if chunked:
        rv = client.post(
            "/s",
            input_stream=io.BytesIO(body),
            content_type=content_type or None,
            headers={"Transfer-Encoding": "chunked"},
            environ_overrides={"wsgi.input_terminated": True},
        )
    else:
        rv = client.post("/s", data=body, content_type=content_type or None)
    if content_type.partition(";")[0] != "application/json":
        # Signals come from JSON bodies only: any other body is a 415 (an empty one
        # carries no signals); a chunked body is read, up to the limit, to tell.
        if chunked:
            expected = 413 if len(body) > LIMIT else 415 if body.strip() else 200
        else:
            expected = 415 if body else 200
        assert rv.status_code == expected
        return
    assert rv.status_code in (200, 400, 413)
    assert (rv.status_code == 413) == (len(body) > LIMIT)
    if rv.status_code == 200:
        assert isinstance(seen[-1], dict)
        json.dumps(seen[-1], allow_nan=False, ensure_ascii=False).encode("utf-8")


@fuzz(200)
@given(raw=st.binary(max_size=300))
def test_any_query_string_is_a_200_400_or_413(signals_app: tuple[Flask, Seen], raw: bytes) -> None:
    app, seen = signals_app
    # As a server hands the request line on: bytes as latin-1 (PEP 3333).
    query = "datastar=" + raw.decode("latin-1")
    rv = app.test_client().get("/s", environ_overrides={"QUERY_STRING": query})
    assert rv.status_code in (200, 400)
    if rv.status_code == 200:
        json.dumps(seen[-1], allow_nan=False, ensure_ascii=False).encode("utf-8")


# --- Headers ---------------------------------------------------------------------------


@fuzz(100)
@given(name=HOSTILE_TEXT, value=HOSTILE_TEXT)
def test_a_header_cannot_carry_a_line_break(name: str, value: str) -> None:
    try:
        response = DatastarResponse("", headers={name: value})
    except ValueError as e:
        assert "not a valid HTTP header name" in str(e) or (
            _has_newline(value) and "newline" in str(e)
        )
        return
    for key, item in response.headers.to_wsgi_list():
        assert not set("\r\n") & set(key + item)


def test_a_line_break_in_a_header_name_is_refused() -> None:
    """Found by fuzzing: Werkzeug checks header values, not names; the development
    server then wrote an injected ``Set-Cookie`` line."""
    with pytest.raises(ValueError, match="not a valid HTTP header name"):
        DatastarResponse("", headers={"X-A: 1\r\nSet-Cookie": "evil=1"})
