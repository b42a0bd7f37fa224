"""Byte-exact tests of the wire format (flask_datastar.sse), with no Flask app."""

from __future__ import annotations

import json

import pytest
from markupsafe import Markup

from flask_datastar.sse import (
    SSE,
    SSE_HEADERS,
    DatastarEvent,
    ElementPatchMode,
    ElementPatchNamespace,
    ServerSentEventGenerator,
    comment,
    js_string,
)


def test_alias_and_headers() -> None:
    assert SSE is ServerSentEventGenerator
    assert SSE_HEADERS == {
        "Cache-Control": "no-cache",
        "Content-Type": "text/event-stream",
        "X-Accel-Buffering": "no",
    }
    # PEP 3333 forbids hop-by-hop headers; gunicorn would drop it anyway.
    assert "Connection" not in SSE_HEADERS


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (
            {"elements": '<div id="a">x</div>'},
            'event: datastar-patch-elements\ndata: elements <div id="a">x</div>\n\n',
        ),
        (
            {"elements": "<p>a</p>", "selector": "#b", "mode": "inner"},
            "event: datastar-patch-elements\ndata: selector #b\ndata: mode inner\n"
            "data: elements <p>a</p>\n\n",
        ),
        (
            {"elements": "<p>a</p>", "mode": ElementPatchMode.OUTER},
            "event: datastar-patch-elements\ndata: elements <p>a</p>\n\n",
        ),
        (
            {"elements": "<p id=x></p>", "mode": "replace"},
            "event: datastar-patch-elements\ndata: mode replace\ndata: elements <p id=x></p>\n\n",
        ),
        (
            {"elements": "<i></i>", "selector": "#s", "use_view_transition": True},
            "event: datastar-patch-elements\ndata: selector #s\ndata: useViewTransition true\n"
            "data: elements <i></i>\n\n",
        ),
        (
            {
                "elements": "<i></i>",
                "selector": "#s",
                "use_view_transition": True,
                "view_transition_selector": "#main",
            },
            "event: datastar-patch-elements\ndata: selector #s\ndata: useViewTransition true\n"
            "data: viewTransitionSelector #main\ndata: elements <i></i>\n\n",
        ),
        (
            # Without a view transition, its selector means nothing: left off.
            {"elements": "<i id=i></i>", "view_transition_selector": "#main"},
            "event: datastar-patch-elements\ndata: elements <i id=i></i>\n\n",
        ),
        (
            {"elements": "<i id=i></i>", "use_view_transition": False},
            "event: datastar-patch-elements\ndata: elements <i id=i></i>\n\n",
        ),
        (
            {"elements": "<circle id=c r=1 />", "namespace": "svg"},
            "event: datastar-patch-elements\ndata: namespace svg\n"
            "data: elements <circle id=c r=1 />\n\n",
        ),
        (
            {"elements": "<mi id=m>x</mi>", "namespace": ElementPatchNamespace.MATHML},
            "event: datastar-patch-elements\ndata: namespace mathml\n"
            "data: elements <mi id=m>x</mi>\n\n",
        ),
        (
            {"elements": "<b id=b></b>", "namespace": "html"},
            "event: datastar-patch-elements\ndata: elements <b id=b></b>\n\n",
        ),
        (
            {"elements": "<b id=b></b>", "event_id": "42", "retry_duration": 3000},
            "event: datastar-patch-elements\nid: 42\nretry: 3000\ndata: elements <b id=b></b>\n\n",
        ),
        (
            # 1000 ms is the client's default: left off the wire.
            {"elements": "<b id=b></b>", "retry_duration": 1000},
            "event: datastar-patch-elements\ndata: elements <b id=b></b>\n\n",
        ),
        (
            {"elements": "<b id=b></b>", "retry_duration": 0},
            "event: datastar-patch-elements\nretry: 0\ndata: elements <b id=b></b>\n\n",
        ),
        (
            {"selector": "#gone", "mode": "remove"},
            "event: datastar-patch-elements\ndata: selector #gone\ndata: mode remove\n\n",
        ),
        (
            {"elements": "<li>x</li>", "selector": "ul", "mode": "append"},
            "event: datastar-patch-elements\ndata: selector ul\ndata: mode append\n"
            "data: elements <li>x</li>\n\n",
        ),
    ],
)
def test_patch_elements(kwargs: dict[str, object], expected: str) -> None:
    event = SSE.patch_elements(**kwargs)  # type: ignore[arg-type]
    assert event == expected
    assert isinstance(event, DatastarEvent)


@pytest.mark.parametrize("mode", ["prepend", "append", "before", "after", "inner"])
def test_every_mode_with_selector(mode: str) -> None:
    event = SSE.patch_elements("<i></i>", selector="#t", mode=mode)
    assert event == (
        f"event: datastar-patch-elements\ndata: selector #t\ndata: mode {mode}\n"
        "data: elements <i></i>\n\n"
    )


@pytest.mark.parametrize(
    ("html", "lines"),
    [
        ("<a>\n</a>", ["<a>", "</a>"]),
        ("<a>\r\n</a>", ["<a>", "</a>"]),
        ("<a>\r</a>", ["<a>", "</a>"]),
        ("<a>\n\n</a>", ["<a>", "", "</a>"]),
        # Only CR, LF and CRLF end a line: U+2028, U+0085, form feed are text.
        ("<a>\u2028\u0085\x0c</a>", ["<a>\u2028\u0085\x0c</a>"]),
    ],
)
def test_elements_split_only_on_sse_newlines(html: str, lines: list[str]) -> None:
    event = SSE.patch_elements(html, selector="#x", mode="inner")
    body = "".join(f"data: elements {line}\n" for line in lines)
    assert event == (
        f"event: datastar-patch-elements\ndata: selector #x\ndata: mode inner\n{body}\n"
    )


def test_elements_accepts_html_objects() -> None:
    html = Markup("<p id='m'>{}</p>").format("<b>")
    assert SSE.patch_elements(html) == (
        "event: datastar-patch-elements\ndata: elements <p id='m'>&lt;b&gt;</p>\n\n"
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"elements": "<i></i>", "mode": "sideways"}, "Unknown patch mode 'sideways'"),
        ({"elements": "<i></i>", "namespace": "xml"}, "Unknown namespace 'xml'"),
        ({"elements": "<i></i>", "mode": "inner"}, "needs a 'selector'"),
        ({"mode": "remove"}, "needs a 'selector'"),
        ({"elements": "<i></i>", "selector": "#a\n#b"}, "must not contain a line break"),
        ({"elements": "<i id=i></i>", "event_id": "1\r2"}, "must not contain a line break"),
        ({"elements": "<i id=i></i>", "retry_duration": -1}, "must not be negative"),
    ],
)
def test_patch_elements_rejects(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SSE.patch_elements(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [1.5, "100", True])
def test_retry_duration_type(bad: object) -> None:
    with pytest.raises(TypeError, match="retry_duration"):
        SSE.patch_elements("<i id=i></i>", retry_duration=bad)  # type: ignore[arg-type]


def test_elements_type_is_checked() -> None:
    with pytest.raises(TypeError, match="'elements' must be a string"):
        SSE.patch_elements(42)  # type: ignore[arg-type]


def test_remove_elements() -> None:
    assert SSE.remove_elements("#a, .b", event_id="7") == (
        "event: datastar-patch-elements\nid: 7\ndata: selector #a, .b\ndata: mode remove\n\n"
    )
    with pytest.raises(ValueError, match="non-empty 'selector'"):
        SSE.remove_elements("")


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (
            {"signals": {"count": 1, "user": {"name": "Ada"}}},
            'event: datastar-patch-signals\ndata: signals {"count":1,"user":{"name":"Ada"}}\n\n',
        ),
        (
            # Key order is kept; None removes a signal (RFC 7386).
            {"signals": {"z": None, "a": [1, 2]}},
            'event: datastar-patch-signals\ndata: signals {"z":null,"a":[1,2]}\n\n',
        ),
        (
            {"signals": {"a": 1}, "only_if_missing": True},
            'event: datastar-patch-signals\ndata: onlyIfMissing true\ndata: signals {"a":1}\n\n',
        ),
        (
            {"signals": {"a": 1}, "only_if_missing": False},
            'event: datastar-patch-signals\ndata: signals {"a":1}\n\n',
        ),
        (
            {"signals": '{\n  "a": 1,\n  "b": 2\n}'},
            'event: datastar-patch-signals\ndata: signals {\ndata: signals   "a": 1,\n'
            'data: signals   "b": 2\ndata: signals }\n\n',
        ),
        (
            {"signals": {"msg": "line1\nline2"}, "event_id": "s1", "retry_duration": 500},
            "event: datastar-patch-signals\nid: s1\nretry: 500\n"
            'data: signals {"msg":"line1\\nline2"}\n\n',
        ),
        (
            {"signals": {"text": "é\u2028"}},
            'event: datastar-patch-signals\ndata: signals {"text":"é\u2028"}\n\n',
        ),
    ],
)
def test_patch_signals(kwargs: dict[str, object], expected: str) -> None:
    assert SSE.patch_signals(**kwargs) == expected  # type: ignore[arg-type]


def test_patch_signals_rejects_other_types() -> None:
    with pytest.raises(TypeError, match="mapping or a JSON string"):
        SSE.patch_signals([1, 2])  # type: ignore[arg-type]


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")])
def test_patch_signals_refuses_to_write_what_is_not_json(number: float) -> None:
    # json.dumps would write NaN / Infinity, which JSON.parse in the browser refuses.
    with pytest.raises(ValueError, match="finite") as info:
        SSE.patch_signals({"ok": 1, "user": {"score": number}})
    assert f"hold {number!r} at ['user']['score'], which is not JSON" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "expected_tag"),
    [
        ({"script": "go()"}, '<script data-effect="el.remove()">go()</script>'),
        ({"script": "go()", "auto_remove": False}, "<script>go()</script>"),
        (
            {"script": "go()", "attributes": {"type": "module", "data-x": 'a"<b>'}},
            '<script data-effect="el.remove()" type="module"'
            ' data-x="a&#34;&lt;b&gt;">go()</script>',
        ),
        (
            {"script": "go()", "auto_remove": False, "attributes": ['type="module"', "defer"]},
            '<script type="module" defer>go()</script>',
        ),
    ],
)
def test_execute_script(kwargs: dict[str, object], expected_tag: str) -> None:
    assert SSE.execute_script(**kwargs) == (  # type: ignore[arg-type]
        "event: datastar-patch-elements\ndata: selector body\ndata: mode append\n"
        f"data: elements {expected_tag}\n\n"
    )


def test_execute_script_multiline_and_options() -> None:
    event = SSE.execute_script("a()\nb()", event_id="e", retry_duration=2000)
    assert event == (
        "event: datastar-patch-elements\nid: e\nretry: 2000\ndata: selector body\n"
        'data: mode append\ndata: elements <script data-effect="el.remove()">a()\n'
        "data: elements b()</script>\n\n"
    )


def test_execute_script_rejects_attribute_string() -> None:
    with pytest.raises(TypeError, match="not a string"):
        SSE.execute_script("x()", attributes='type="module"')


def _script(event: str) -> str:
    prefix = "data: elements "
    lines = [line[len(prefix) :] for line in event.split("\n") if line.startswith(prefix)]
    html = "\n".join(lines)
    assert html.startswith('<script data-effect="el.remove()">') and html.endswith("</script>")
    return html[len('<script data-effect="el.remove()">') : -len("</script>")]


HOSTILE = [
    "plain",
    'it\'s "quoted"',
    "</script><script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    "line\nbreak\r\nand\rmore",
    "back\\slash ` ${template}",
    "\u2028\u2029 separators",
    "&amp; entities &lt;",
]


@pytest.mark.parametrize("value", HOSTILE)
def test_redirect_and_console_encode_their_argument(value: str) -> None:
    for event, call in [
        (SSE.redirect(value), "setTimeout(() => window.location.href = {})"),
        (SSE.console_log(value), "console.log({})"),
        (SSE.console_error(value), "console.error({})"),
    ]:
        code = _script(event)
        literal = js_string(value)
        assert code == call.format(literal)
        # Nothing can close the script element, start a tag or break a line.
        assert "<" not in code and ">" not in code.replace("=>", "")
        assert "\n" not in code and "\r" not in code
        # The literal decodes back to exactly the value.
        assert json.loads(literal) == value


def test_redirect_exact_bytes() -> None:
    assert SSE.redirect("/next?a=1&b='2'") == (
        "event: datastar-patch-elements\ndata: selector body\ndata: mode append\n"
        'data: elements <script data-effect="el.remove()">setTimeout(() =>'
        " window.location.href = \"/next?a=1\\u0026b='2'\")</script>\n\n"
    )


def test_comment() -> None:
    assert comment() == ":\n\n"
    assert comment("ping") == ": ping\n\n"
    with pytest.raises(ValueError):
        comment("a\nb")


@pytest.mark.parametrize(
    "name",
    [
        "src=//evil/x.js a",  # the attack: a second attribute smuggled into the name
        "a b",
        "a\tb",
        "a\nb",
        "a\x0cb",
        'a"',
        "a'",
        "a>",
        "a/",
        "a=",
        "<a",
        "",
        "\x00",
        "a\x1f",
        "\x7f",
        "a\x85",  # a C1 control
        "\ufdd0",  # noncharacters
        "a\ufffe",
        "\U0010ffff",
        "\ud800",  # half of a UTF-16 pair, which no event can carry
    ],
)
def test_execute_script_refuses_an_attribute_name_outside_the_html_grammar(name: str) -> None:
    with pytest.raises(ValueError, match="attribute name") as info:
        SSE.execute_script("go()", attributes={name: "1"})
    assert repr(name) in str(info.value)


@pytest.mark.parametrize(
    "name",
    ["type", "data-on:click__debounce.500ms", "x@y", "é", "[attr]", "a&b", "\U0001f600"],
)
def test_execute_script_writes_a_valid_attribute_name_as_it_is(name: str) -> None:
    # Names are validated, not escaped: the tokenizer reads no character reference in a
    # name, so escaping "&" would have changed it.
    event = SSE.execute_script("go()", auto_remove=False, attributes={name: 'v"<'})
    assert f'data: elements <script {name}="v&#34;&lt;">go()</script>\n' in event


@pytest.mark.parametrize(
    "attribute",
    ["defer", 'type="module"', "type='module'", "type=module", 'data-x="a>b c=d"', "n=''"],
)
def test_execute_script_accepts_one_well_formed_attribute_per_string(attribute: str) -> None:
    event = SSE.execute_script("go()", auto_remove=False, attributes=[attribute, "async"])
    assert f"data: elements <script {attribute} async>go()</script>\n" in event


@pytest.mark.parametrize(
    "attribute",
    [
        "src=//evil/x.js a",  # two attributes in one string
        'a="1" onload="x()"',
        'a="1"b',
        'a="x',  # an unclosed quote swallows the rest of the tag
        "a='x",
        "a=",
        "a=b>",
        "a=`b`",
        "a b",
        "",
        " defer",
        "defer ",
        "a\nb",
        'on"load=x',
    ],
)
def test_execute_script_refuses_an_attribute_string_that_is_not_one_attribute(
    attribute: str,
) -> None:
    with pytest.raises(ValueError, match="one attribute") as info:
        SSE.execute_script("go()", attributes=[attribute])
    assert repr(attribute) in str(info.value)


@pytest.mark.parametrize(
    "location",
    [
        "javascript:alert(1)",
        "JavaScript:alert(1)",
        "JAVASCRIPT:alert(1)",
        " javascript:alert(1)",
        "\x00\x01\x1f javascript:alert(1)",  # browsers strip leading C0 controls and spaces
        "java\tscript:alert(1)",  # ... and remove tabs and newlines anywhere
        "java\nscr\ript:alert(1)",
        "j\ta\nv\ra\tscript:alert(1)",
        "vbscript:msgbox(1)",
        "data:text/html,<script>alert(1)</script>",
        "DATA:text/html;base64,PHNjcmlwdD4=",
        "file:///etc/passwd",
        "blob:https://example.com/uuid",
        "mailto:someone@example.com",
        "x-custom+scheme.1:whatever",
    ],
)
def test_redirect_refuses_every_scheme_but_http_and_https(location: str) -> None:
    with pytest.raises(ValueError, match="redirect") as info:
        SSE.redirect(location)
    assert "http" in str(info.value)


@pytest.mark.parametrize(
    "location",
    [
        "/next",
        "next",
        "?page=2",
        "#top",
        "",
        "https://example.com/a?b=1",
        "HTTP://example.com/",
        "  https://example.com/",
        "//example.com/path",
        "/javascript:alert(1)",  # a path, not a scheme
        "./javascript:alert(1)",
        "1javascript:alert(1)",  # a scheme starts with a letter: this is a relative path
        "java script:alert(1)",  # a space ends the scheme: a relative path
        "\u00a0javascript:alert(1)",  # browsers strip only C0 controls and ASCII space
    ],
)
def test_redirect_accepts_http_https_and_relative_urls(location: str) -> None:
    assert js_string(location) in SSE.redirect(location)


def test_an_event_id_with_nul_is_refused() -> None:
    # Found by tests/test_fuzz.py: browsers ignore an "id" field that holds NUL, so the
    # event went out without its id and a reconnecting client sent a stale Last-Event-ID.
    with pytest.raises(ValueError, match="NUL"):
        SSE.patch_elements("<i id=i></i>", event_id="a\x00b")
    with pytest.raises(ValueError, match="NUL"):
        SSE.patch_signals({"a": 1}, event_id="\x00")


@pytest.mark.parametrize("value", ["\ud800", "a\udfffb", "\udc00\ud800"])
def test_js_string_escapes_a_lone_surrogate(value: str) -> None:
    # Found by tests/test_fuzz.py: the raw surrogate made the literal impossible to write
    # as UTF-8, so a page or event that held it failed to encode. Escaped, it is the same
    # JavaScript string.
    literal = js_string(value)
    literal.encode("utf-8")
    assert json.loads(literal) == value
    assert SSE.console_log(value).encode("utf-8")
