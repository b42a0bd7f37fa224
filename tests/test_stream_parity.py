"""datastar-py parity of a stream's sending methods: every one takes ``event_id`` and
``retry_duration``, and ``patch_signals`` serialises with the app's JSON provider."""

from __future__ import annotations

import datetime
import decimal
import json
import uuid
from typing import Any

import pytest
from flask import Flask
from flask.json.provider import DefaultJSONProvider, JSONProvider

from flask_datastar import SSE, FlaskDatastar, Stream, dumps_signals, sse_stream
from flask_datastar.testing import ServerSentEvent, parse_events
from tests.helpers import require_module


def one_shot(app: Flask, send: Any) -> list[ServerSentEvent]:
    """Run a stream whose handler calls ``send(gen)`` once, and return what it sent."""

    @app.get("/s")
    @sse_stream
    def handler(gen: Stream) -> None:
        send(gen)

    response = app.test_client().get("/s")
    assert response.status_code == 200
    return parse_events(response.data)


@pytest.mark.parametrize(
    ("method", "argument"),
    [
        ("redirect", "/next?a='b'"),
        ("console_log", "hello"),
        ("console_error", "oops"),
        ("patch_signals", {"a": 1}),
        ("remove_elements", "#gone"),
        ("patch_elements", "<p id=p></p>"),
        ("execute_script", "1"),
    ],
)
def test_every_stream_method_takes_event_id_and_retry_duration(
    app: Flask, method: str, argument: Any
) -> None:
    events = one_shot(
        app,
        lambda gen: getattr(gen, method)(argument, event_id="ev-7", retry_duration=2500),
    )
    assert len(events) == 1
    assert events[0].id == "ev-7"
    assert events[0].retry == 2500
    # The stream sends exactly what the pure builder returns.
    expected = getattr(SSE, method)(argument, event_id="ev-7", retry_duration=2500)
    assert parse_events(expected) == events


def test_patch_signals_uses_the_apps_json_provider(app: Flask) -> None:
    when = datetime.date(2026, 6, 2)
    signals = {"z": 1, "when": when, "price": decimal.Decimal("1.50"), "id": uuid.UUID(int=1)}
    events = one_shot(app, lambda gen: gen.patch_signals(signals))
    (line,) = events[0].datalines("signals")
    # Flask's default provider: a date as an HTTP date, Decimal and UUID as strings;
    # key order and compact separators as the stdlib path keeps them.
    assert line == (
        '{"z":1,"when":"Tue, 02 Jun 2026 00:00:00 GMT","price":"1.50",'
        '"id":"00000000-0000-0000-0000-000000000001"}'
    )
    assert json.loads(line) == json.loads(app.json.dumps(signals))


def test_patch_signals_keeps_text_unescaped(app: Flask) -> None:
    # DefaultJSONProvider.ensure_ascii is True; the event stream is UTF-8 and the
    # stdlib path never escaped: neither does the provider path.
    events = one_shot(app, lambda gen: gen.patch_signals({"name": "Zoë 😀"}))
    assert events[0].datalines("signals") == ['{"name":"Zoë 😀"}']


class IsoProvider(DefaultJSONProvider):
    """A provider that only changes how dates look (its default hook)."""

    @staticmethod
    def default(o: Any) -> Any:
        if isinstance(o, datetime.date):
            return o.isoformat()
        return DefaultJSONProvider.default(o)


class PrettyProvider(JSONProvider):
    """A provider that is not Flask's default one: its ``dumps`` is used as it is."""

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        return json.dumps(obj, default=str, indent=1)

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return json.loads(s)


def test_patch_signals_uses_a_subclassed_default_hook() -> None:
    app = Flask(__name__)
    app.json = IsoProvider(app)
    FlaskDatastar(app)
    events = one_shot(app, lambda gen: gen.patch_signals({"when": datetime.date(2026, 6, 2)}))
    assert events[0].datalines("signals") == ['{"when":"2026-06-02"}']


def test_patch_signals_uses_a_custom_provider_as_it_is() -> None:
    app = Flask(__name__)
    app.json = PrettyProvider(app)
    FlaskDatastar(app)
    when = datetime.date(2026, 6, 2)
    events = one_shot(app, lambda gen: gen.patch_signals({"a": [1], "when": when}))
    # One data line per line of the provider's output; the client joins them.
    assert events[0].datalines("signals") == json.dumps(
        {"a": [1], "when": when}, default=str, indent=1
    ).split("\n")


def test_patch_signals_with_orjson() -> None:
    orjson = require_module("orjson")

    class OrjsonProvider(JSONProvider):
        def dumps(self, obj: Any, **kwargs: Any) -> str:
            return str(orjson.dumps(obj).decode())

        def loads(self, s: str | bytes, **kwargs: Any) -> Any:
            return orjson.loads(s)

    app = Flask(__name__)
    app.json = OrjsonProvider(app)
    FlaskDatastar(app)
    moment = datetime.datetime(2026, 6, 2, 12, 30, tzinfo=datetime.timezone.utc)
    events = one_shot(app, lambda gen: gen.patch_signals({"b": moment, "a": "ü"}))
    assert events[0].datalines("signals") == ['{"b":"2026-06-02T12:30:00+00:00","a":"ü"}']


def test_a_raw_json_string_is_sent_as_given(app: Flask) -> None:
    events = one_shot(app, lambda gen: gen.patch_signals('{"b": 1,\n "a": 2}'))
    assert events[0].datalines("signals") == ['{"b": 1,', ' "a": 2}']


def test_dumps_signals_outside_an_app_context_is_the_stdlib() -> None:
    assert dumps_signals({"b": 1, "a": "ü"}) == '{"b":1,"a":"ü"}'
    with pytest.raises(TypeError, match="not JSON serializable"):
        dumps_signals({"when": datetime.date(2026, 6, 2)})


def test_dumps_signals_builds_a_broadcast_event_like_the_stream(app: Flask) -> None:
    with app.app_context():
        event = SSE.patch_signals(dumps_signals({"when": datetime.date(2026, 6, 2)}))
    assert parse_events(event)[0].signals == {"when": "Tue, 02 Jun 2026 00:00:00 GMT"}
