"""read_signals and is_datastar_request: good input, and bad input that must give a 4xx."""

from __future__ import annotations

import html
import io
import json
from urllib.parse import quote

import pytest
from flask import Flask, jsonify
from flask.testing import FlaskClient

from flask_datastar import is_datastar_request, read_signals


@pytest.fixture
def echo(app: Flask) -> FlaskClient:
    @app.route("/echo", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    def echo_view():  # type: ignore[no-untyped-def]
        first = read_signals()
        # A second call must give the same signals, even though the body was read.
        assert read_signals() is first
        return jsonify(signals=first, datastar=is_datastar_request())

    return app.test_client()


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
@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=utf-8", "text/plain"]
)
def test_body_methods_read_the_json_body(echo: FlaskClient, method: str, content_type: str) -> None:
    rv = echo.open(
        "/echo", method=method, data=json.dumps(SIGNALS).encode(), content_type=content_type
    )
    assert rv.status_code == 200
    assert rv.json == {"signals": SIGNALS, "datastar": False}


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
    rv = echo.post("/echo", data=json.dumps(value, ensure_ascii=False).encode("utf-8"))
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


def test_body_over_the_limit_is_a_413(app: Flask) -> None:
    app.extensions.pop("datastar")
    app.config["DATASTAR_MAX_SIGNALS_BYTES"] = 100

    from flask_datastar import FlaskDatastar

    FlaskDatastar(app)

    @app.route("/echo", methods=["GET", "POST"])
    def echo_view():  # type: ignore[no-untyped-def]
        return jsonify(read_signals())

    client = app.test_client()
    ok = json.dumps({"a": "x" * 80}).encode()
    assert client.post("/echo", data=ok).status_code == 200
    big = json.dumps({"a": "x" * 200}).encode()
    rv = client.post("/echo", data=big)
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

    assert app.test_client().post("/echo", data=b'{"a":1}').json == {"a": 1}
