"""read_signals and is_datastar_request: good input, and bad input that must give a 4xx."""

from __future__ import annotations

import decimal
import html
import io
import json
import sys
from typing import Any
from urllib.parse import quote

import pytest
from flask import Flask, jsonify
from flask.json.provider import DefaultJSONProvider, JSONProvider
from flask.testing import FlaskClient

from flask_datastar import is_datastar_request, read_signals
from flask_datastar.signals import dumps_signals
from tests.helpers import GunicornServer, RawHTTPStream, post, require_module


@pytest.fixture
def echo(app: Flask) -> FlaskClient:
    @app.route("/echo", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    def echo_view():  # type: ignore[no-untyped-def]
        first = read_signals()
        # A second call must give the same signals, even though the body was read.
        assert read_signals() is first
        return jsonify(signals=first, datastar=is_datastar_request())

    return datastar_client(app)


def datastar_client(app: Flask) -> FlaskClient:
    """The test client of *app*, sending ``Datastar-Request: true`` as Datastar's actions do."""
    client = app.test_client()
    client.environ_base["HTTP_DATASTAR_REQUEST"] = "true"
    return client


SIGNALS = {"count": 3, "user": {"name": "Ada", "tags": ["a", "b"]}, "on": True, "x": None}


@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_query_methods_read_the_datastar_parameter(echo: FlaskClient, method: str) -> None:
    rv = echo.open(
        "/echo?datastar=" + quote(json.dumps(SIGNALS)),
        method=method,
        headers={"Datastar-Request": "true"},
    )
    assert rv.status_code == 200
    assert rv.json == {"signals": SIGNALS, "datastar": True}


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH"])
@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8"])
def test_body_methods_read_the_json_body(echo: FlaskClient, method: str, content_type: str) -> None:
    rv = echo.open(
        "/echo", method=method, data=json.dumps(SIGNALS).encode(), content_type=content_type
    )
    assert rv.status_code == 200
    assert rv.json == {"signals": SIGNALS, "datastar": True}


@pytest.mark.parametrize(
    ("method", "kwargs"),
    [
        ("GET", {}),
        ("DELETE", {}),
        ("POST", {}),
        ("POST", {"data": b"   ", "content_type": "application/json"}),
        # contentType: 'form' sends form fields, not signals.
        ("POST", {"data": {"name": "Ada"}}),
    ],
)
def test_no_signals_gives_an_empty_dict(
    echo: FlaskClient, method: str, kwargs: dict[str, object]
) -> None:
    rv = echo.open("/echo", method=method, **kwargs)  # type: ignore[arg-type]
    assert rv.status_code == 200
    assert rv.json["signals"] == {}


def test_unicode_survives(echo: FlaskClient) -> None:
    value = {"text": "é ü 中文 \u2028 😀"}
    rv = echo.post(
        "/echo",
        data=json.dumps(value, ensure_ascii=False).encode("utf-8"),
        content_type="application/json",
    )
    assert rv.json["signals"] == value


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object, not list (an array)"),
        (b'"text"', "must be a JSON object, not str (a string)"),
        (b"42", "must be a JSON object"),
        (b"null", "must be a JSON object, not NoneType (null)"),
        (b"\xff\xfe{}", "not valid UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ],
)
def test_bad_body_is_a_400_that_says_why(echo: FlaskClient, body: bytes, message: str) -> None:
    rv = echo.post("/echo", data=body, content_type="application/json")
    assert rv.status_code == 400
    assert message in html.unescape(rv.get_data(as_text=True))


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("datastar=%7Bbad", "'datastar' query parameter are not valid JSON"),
        ("datastar=%5B%5D", "must be a JSON object"),
        ("datastar=", "not valid JSON"),
    ],
)
def test_bad_query_is_a_400(echo: FlaskClient, query: str, message: str) -> None:
    rv = echo.get("/echo?" + query)
    assert rv.status_code == 400
    assert message in html.unescape(rv.get_data(as_text=True))


def test_a_query_string_that_is_not_utf8_is_a_400(echo: FlaskClient) -> None:
    # gunicorn refuses raw non-ASCII bytes in the request line, but the development
    # server and other WSGI servers hand them on (as latin-1, per PEP 3333).
    raw = b'datastar={"text":"\xed\xa0\x80"}'.decode("latin-1")
    rv = echo.get("/echo", environ_overrides={"QUERY_STRING": raw})
    assert rv.status_code == 400
    message = html.unescape(rv.get_data(as_text=True))
    assert "The query string is not valid UTF-8" in message


def test_body_over_the_limit_is_a_413(app: Flask) -> None:
    app.extensions.pop("datastar")
    app.config["DATASTAR_MAX_SIGNALS_BYTES"] = 100

    from flask_datastar import FlaskDatastar

    FlaskDatastar(app)

    @app.route("/echo", methods=["GET", "POST"])
    def echo_view():  # type: ignore[no-untyped-def]
        return jsonify(read_signals())

    client = datastar_client(app)
    ok = json.dumps({"a": "x" * 80}).encode()
    assert client.post("/echo", data=ok, content_type="application/json").status_code == 200
    big = json.dumps({"a": "x" * 200}).encode()
    rv = client.post("/echo", data=big, content_type="application/json")
    assert rv.status_code == 413
    assert "DATASTAR_MAX_SIGNALS_BYTES" in rv.get_data(as_text=True)
    # A chunked body carries no Content-Length: the limit still holds.
    rv = client.post(
        "/echo",
        input_stream=io.BytesIO(big),
        headers={"Transfer-Encoding": "chunked"},
        # What gunicorn sets for a chunked request body.
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert rv.status_code == 413
    rv = client.get("/echo?datastar=" + quote(big.decode()))
    assert rv.status_code == 413


def test_works_without_the_extension() -> None:
    app = Flask(__name__)

    @app.post("/echo")
    def echo_view():  # type: ignore[no-untyped-def]
        return jsonify(read_signals())

    assert datastar_client(app).post("/echo", json={"a": 1}).json == {"a": 1}


# A lone UTF-16 surrogate written as a JSON escape is valid JSON, but no text: a browser's
# JSON.stringify writes one for half an emoji ("😀".slice(0, 1)), and encoding it to UTF-8
# later (every event carrying it) raises UnicodeEncodeError.
LONE_SURROGATES = [
    pytest.param(r'{"text": "\ud800"}', "\\ud800", id="high"),
    pytest.param(r'{"text": "x\uDFFFy"}', "\\udfff", id="low-uppercase-hex"),
    pytest.param(r'{"text": "\udc00\ud800"}', "\\udc00", id="pair-reversed"),
    pytest.param(r'{"text": "\ud83d\\ude00"}', "\\ud83d", id="second-half-escaped-away"),
    pytest.param(r'{"user": {"tags": ["ok", {"deep": "\udbff"}]}}', "\\udbff", id="nested"),
    pytest.param(r'{"user": {"\ud800name": "Ada"}}', "\\ud800", id="object-key"),
    pytest.param(r'{"\udc01": 1}', "\\udc01", id="top-level-key"),
]


@pytest.mark.parametrize(("body", "escape"), LONE_SURROGATES)
def test_a_lone_surrogate_in_the_body_is_a_400(echo: FlaskClient, body: str, escape: str) -> None:
    rv = echo.post("/echo", data=body.encode(), content_type="application/json")
    assert rv.status_code == 400
    message = html.unescape(rv.get_data(as_text=True))
    assert "The Datastar signals in the request body contain a lone surrogate" in message
    assert f"({escape})" in message


@pytest.mark.parametrize(("body", "escape"), LONE_SURROGATES)
def test_a_lone_surrogate_in_the_query_is_a_400(echo: FlaskClient, body: str, escape: str) -> None:
    rv = echo.get("/echo?datastar=" + quote(body))
    assert rv.status_code == 400
    message = html.unescape(rv.get_data(as_text=True))
    assert "in the 'datastar' query parameter contain a lone surrogate" in message
    assert f"({escape})" in message


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # An escaped pair is one character, as JSON.stringify-with-ASCII clients send it.
        (r'{"text": "\ud83d\ude00 \uD83D\uDE00"}', {"text": "😀 😀"}),
        # An escaped backslash followed by "ud800" is six plain characters.
        (r'{"text": "\\ud800", "\\udc00": 1}', {"text": "\\ud800", "\\udc00": 1}),
        # Neighbours of the surrogate range.
        (r'{"text": "\ud7ff\ue000"}', {"text": "\ud7ff\ue000"}),
    ],
)
def test_text_that_only_looks_like_a_surrogate_is_accepted(
    echo: FlaskClient, body: str, expected: dict[str, object]
) -> None:
    for rv in (
        echo.post("/echo", data=body.encode(), content_type="application/json"),
        echo.get("/echo?datastar=" + quote(body)),
    ):
        assert rv.status_code == 200
        assert rv.json["signals"] == expected


def test_a_lone_surrogate_at_the_deepest_nesting_accepted_is_a_400(app: Flask) -> None:
    @app.post("/read")
    def read_view() -> str:
        read_signals()
        return "read"  # (jsonify would meet the recursion limit before read_signals)

    client = datastar_client(app)

    def nested(depth: int, text: str) -> bytes:
        return b'{"a": ' + b"[" * depth + text.encode() + b"]" * depth + b"}"

    # The deepest nesting json.loads accepts at the depth of a view's stack.
    low, high = 1, 100_000
    while low < high:
        mid = (low + high + 1) // 2
        if (
            client.post(
                "/read", data=nested(mid, '"x"'), content_type="application/json"
            ).status_code
            == 200
        ):
            low = mid
        else:
            high = mid - 1
    for depth in range(low - 10, low + 2):
        rv = client.post("/read", data=nested(depth, r'"\ud800"'), content_type="application/json")
        assert rv.status_code == 400, depth
        message = html.unescape(rv.get_data(as_text=True))
        assert "lone surrogate" in message or "nested too deeply" in message


@pytest.mark.live
def test_chat_refuses_a_lone_surrogate_and_keeps_working_under_gunicorn() -> None:
    # Before the fix, this message was stored: every later /say was a 500 and every new
    # /sse aborted before its first event, until 50 newer messages pushed it out.
    with GunicornServer("examples.chat:app", threads=6, config="gunicorn.conf.py") as server:
        say = server.url + "/say"
        json_body = {"Content-Type": "application/json", "Datastar-Request": "true"}
        status, _, body = post(say, body=rb'{"author": "Eve", "text": "\ud83d"}', headers=json_body)
        assert status == 400
        assert b"lone surrogate" in body
        # In the name too.
        status, _, _ = post(say, body=rb'{"author": "\udc00", "text": "hi"}', headers=json_body)
        assert status == 400

        with RawHTTPStream(server.port, "/sse") as tab:
            assert tab.status == 200
            events = tab.events(timeout=10)
            assert "No messages yet." in (next(events).elements or "")
            status, _, _ = post(say, json={"author": "Ada", "text": "still here 😀"})
            assert status == 200
            assert "still here 😀" in (next(events).elements or "")
        with RawHTTPStream(server.port, "/sse") as later:
            assert later.status == 200
            assert "still here 😀" in (next(later.events(timeout=10)).elements or "")


class DecimalProvider(DefaultJSONProvider):
    """Reads numbers with a fraction as Decimal, as a money app would."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return super().loads(s, parse_float=decimal.Decimal, **kwargs)


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_read_signals_uses_the_apps_json_provider(method: str) -> None:
    app = Flask(__name__)
    app.json = DecimalProvider(app)
    seen = []

    @app.route("/r", methods=["GET", "POST"])
    def view() -> str:
        seen.append(read_signals())
        return ""

    body = '{"price": 0.10, "text": "\\ud83d\\ude00"}'
    client = datastar_client(app)
    if method == "GET":
        rv = client.get("/r?datastar=" + quote(body))
    else:
        rv = client.post("/r", data=body, content_type="application/json")
    assert rv.status_code == 200
    assert seen == [{"price": decimal.Decimal("0.10"), "text": "😀"}]
    assert isinstance(seen[0]["price"], decimal.Decimal)


def test_read_signals_with_a_custom_provider_still_refuses_lone_surrogates() -> None:
    app = Flask(__name__)
    app.json = DecimalProvider(app)

    @app.post("/r")
    def view() -> str:
        read_signals()
        return ""

    rv = datastar_client(app).post(
        "/r", data='{"p": 1.5, "t": "\\ud800"}', content_type="application/json"
    )
    assert rv.status_code == 400
    assert b"lone surrogate" in rv.data


def test_read_signals_with_orjson() -> None:
    orjson = require_module("orjson")

    class OrjsonProvider(JSONProvider):
        def dumps(self, obj: Any, **kwargs: Any) -> str:
            return str(orjson.dumps(obj).decode())

        def loads(self, s: str | bytes, **kwargs: Any) -> Any:
            return orjson.loads(s)

    app = Flask(__name__)
    app.json = OrjsonProvider(app)

    @app.post("/r")
    def view() -> Any:
        return jsonify(read_signals())

    client = datastar_client(app)
    assert client.post(
        "/r", data='{"b": [1, 2.5], "a": null}', content_type="application/json"
    ).json == {"b": [1, 2.5], "a": None}
    rv = client.post("/r", data='{"b": ', content_type="application/json")
    assert rv.status_code == 400
    assert b"not valid JSON" in rv.data


# Python's json module reads these, JSON does not: the browser's JSON.parse refuses them,
# so echoing them back in a patch-signals event would break the client's parse.
NOT_FINITE = [
    pytest.param('{"n": NaN}', "NaN", id="nan"),
    pytest.param('{"n": Infinity}', "Infinity", id="infinity"),
    pytest.param('{"a": {"b": [1, -Infinity]}}', "-Infinity", id="minus-infinity-nested"),
    pytest.param('{"n": 1e999999}', "1e999999", id="overflow-exponent"),
    pytest.param('{"n": -1.5E+400}', "-1.5E+400", id="negative-overflow"),
    pytest.param('{"n": ' + "9" * 400 + ".5}", "99999", id="overflow-digits"),
]


@pytest.mark.parametrize(("body", "token"), NOT_FINITE)
def test_a_number_that_is_not_finite_is_a_400(echo: FlaskClient, body: str, token: str) -> None:
    for rv, where in [
        (echo.post("/echo", data=body, content_type="application/json"), "the request body"),
        (echo.get("/echo?datastar=" + quote(body)), "the 'datastar' query parameter"),
    ]:
        assert rv.status_code == 400, body
        message = html.unescape(rv.get_data(as_text=True))
        assert f"The Datastar signals in {where} hold the number" in message
        assert token in message
        assert "not JSON" in message or "too large" in message


@pytest.mark.parametrize(("body", "token"), NOT_FINITE)
def test_a_custom_json_provider_still_refuses_numbers_that_are_not_finite(
    body: str, token: str
) -> None:
    app = Flask(__name__)
    app.json = DecimalProvider(app)  # reads 1e999999 as a (finite) Decimal, NaN as a float

    @app.post("/r")
    def view() -> Any:
        return jsonify(read_signals())

    rv = datastar_client(app).post("/r", data=body, content_type="application/json")
    if token in ("NaN", "Infinity", "-Infinity"):
        assert rv.status_code == 400
        assert b"not JSON" in rv.data
    else:
        # A Decimal holds any exponent: the app asked for it, and it is echoed as JSON.
        assert rv.status_code == 200
        json.loads(rv.data)


def test_the_words_nan_and_infinity_in_a_string_are_text(echo: FlaskClient) -> None:
    body = {"a": "NaN", "b": "Infinity 1e999999", "c": 1e308, "d": -1.5e-400}
    rv = echo.post("/echo", data=json.dumps(body), content_type="application/json")
    assert rv.status_code == 200
    assert rv.json["signals"] == {"a": "NaN", "b": "Infinity 1e999999", "c": 1e308, "d": -0.0}


@pytest.mark.parametrize(
    "number",
    [
        str(int(sys.float_info.max) + 10**292),  # 309 digits: past the largest double
        "-" + "1" + "0" * 400,
        "7" * (sys.get_int_max_str_digits() + 1),  # past Python's own limit as well
    ],
)
def test_an_integer_beyond_a_floats_range_is_a_400(echo: FlaskClient, number: str) -> None:
    # JavaScript reads it as Infinity; Python would keep it exact and echo it back.
    body = '{"n": ' + number + "}"
    for rv in (
        echo.post("/echo", data=body, content_type="application/json"),
        echo.get("/echo?datastar=" + quote(body)),
    ):
        assert rv.status_code == 400
        message = html.unescape(rv.get_data(as_text=True))
        assert "hold the number" in message and "too large for a float" in message


def test_the_largest_integer_a_float_holds_is_accepted(echo: FlaskClient) -> None:
    largest = int(sys.float_info.max)
    body = f'{{"a": {largest}, "b": -{largest}, "c": 9007199254740993}}'
    rv = echo.post("/echo", data=body, content_type="application/json")
    assert rv.status_code == 200
    assert json.loads(rv.data)["signals"] == {"a": largest, "b": -largest, "c": 2**53 + 1}


def test_a_custom_provider_refuses_an_integer_longer_than_pythons_limit() -> None:
    app = Flask(__name__)
    app.json = DecimalProvider(app)

    @app.post("/r")
    def view() -> Any:
        return jsonify(read_signals())

    digits = sys.get_int_max_str_digits()
    rv = datastar_client(app).post(
        "/r", data='{"n": ' + "7" * (digits + 1) + "}", content_type="application/json"
    )
    assert rv.status_code == 400
    message = html.unescape(rv.get_data(as_text=True))
    assert f"an integer of more than {digits} digits" in message


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")])
def test_dumps_signals_refuses_to_write_what_is_not_json(app: Flask, number: float) -> None:
    with app.app_context(), pytest.raises(ValueError, match="finite"):
        dumps_signals({"score": number})
    with pytest.raises(ValueError, match="finite"):
        dumps_signals({"score": number})
