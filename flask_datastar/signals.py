"""Reading the signals a Datastar client sends with each request."""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Mapping
from typing import Any

from flask import current_app, has_app_context, request
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import BadRequest, RequestEntityTooLarge, UnsupportedMediaType

from .guards import check_csrf
from .sse import _dumps_json, _find_not_finite, _not_finite_error

__all__ = ["DEFAULT_MAX_SIGNALS_BYTES", "dumps_signals", "is_datastar_request", "read_signals"]

#: The default of ``DATASTAR_MAX_SIGNALS_BYTES``.
DEFAULT_MAX_SIGNALS_BYTES = 1024 * 1024

# Methods whose signals travel in the query string (fetch sends no body with them).
_QUERY_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})
# Parsed once per request, so a view and a stream hook can both call read_signals().
_ENVIRON_KEY = "flask_datastar.signals"
_FORM_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data"})
# A "\\ud800"-style escape: JSON's only way to a surrogate code point, since the raw text
# itself holds none (the body is decoded strictly, and werkzeug leaves undecodable
# percent-escapes of the query string as they are). Searching for it costs well under a
# millisecond per megabyte; only a payload that has one is checked further.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def is_datastar_request() -> bool:
    """Tell whether the current request was sent by the Datastar client.

    Every request of the client's actions carries ``Datastar-Request: true``.
    """
    return request.headers.get("Datastar-Request", "").lower() == "true"


def _max_signals_bytes() -> int:
    state = current_app.extensions.get("datastar")
    if state is not None:
        return int(state.config.max_signals_bytes)
    return int(current_app.config.get("DATASTAR_MAX_SIGNALS_BYTES", DEFAULT_MAX_SIGNALS_BYTES))


class _NotJSONNumber(ValueError):
    """A number Python's json module reads but JSON has not: NaN, Infinity, or an overflow."""


def _refuse_constant(token: str) -> Any:
    raise _NotJSONNumber(f"the number {token}, which is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        shown = text if len(text) <= 40 else text[:20] + "..." + text[-10:]
        raise _NotJSONNumber(
            f"the number {shown}, too large for a float: JavaScript reads it as Infinity"
        )
    return value


# The largest integer a JavaScript number holds without becoming Infinity.
_MAX_FLOAT_INT = int(sys.float_info.max)
_MAX_FLOAT_DIGITS = len(str(_MAX_FLOAT_INT))


def _float_sized_int(text: str) -> int:
    # Counted before converting: int() of a long digit string takes quadratic time
    # when an application has lifted Python's limit (sys.set_int_max_str_digits(0)).
    digits = len(text) - text.startswith("-")
    if digits <= _MAX_FLOAT_DIGITS:
        value = int(text)
        if abs(value) <= _MAX_FLOAT_INT:
            return value
    shown = text if len(text) <= 40 else text[:20] + "..." + text[-10:]
    raise _NotJSONNumber(
        f"the number {shown} ({digits} digits), too large for a float: JavaScript reads it"
        " as Infinity"
    )


def _loads(text: str) -> tuple[Any, bool]:
    """Parse *text* with the app's JSON provider; tell whether its numbers were checked.

    Flask's default provider is the standard library underneath, whose hooks refuse
    ``NaN``, ``Infinity`` and numbers beyond a float's range as they are read:
    ``parse_constant`` is called only for those words; ``parse_float`` and
    ``parse_int`` make a 1 MB body of nothing but numbers take about 1.6 times as long
    to parse (a few milliseconds more), and a body of text no longer. A provider that
    overrides ``loads`` may set the same hooks itself, so it is called as it is and its
    result checked afterwards.
    """
    provider = current_app.json
    if type(provider).loads is DefaultJSONProvider.loads:
        value = provider.loads(
            text,
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
            parse_int=_float_sized_int,
        )
        return value, True
    return provider.loads(text), False


def _parse(raw: bytes | str, where: str) -> dict[str, Any]:
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRequest(f"The Datastar signals in {where} are not valid UTF-8: {e}.") from None
    else:
        text = raw
    try:
        # The app's provider, as request.get_json() would use: a custom one (orjson,
        # or one that reads numbers as Decimal) reads the signals too.
        value, numbers_checked = _loads(text)
    except RecursionError:
        raise BadRequest(f"The Datastar signals in {where} are nested too deeply.") from None
    except _NotJSONNumber as e:
        raise BadRequest(
            f"The Datastar signals in {where} hold {e}. Send finite numbers (JSON.stringify"
            " writes NaN and Infinity as null)."
        ) from None
    except ValueError as e:
        if "integer string conversion" in str(e):
            limit = sys.get_int_max_str_digits()
            raise BadRequest(
                f"The Datastar signals in {where} hold an integer of more than {limit} digits,"
                " Python's limit (sys.set_int_max_str_digits): send it as a string."
            ) from None
        raise BadRequest(f"The Datastar signals in {where} are not valid JSON: {e}.") from None
    if not isinstance(value, dict):
        raise BadRequest(
            f"The Datastar signals in {where} must be a JSON object, not {type(value).__name__}"
            f" ({_json_type(value)})."
        )
    if not numbers_checked or _SURROGATE_ESCAPE.search(text) is not None:
        _check_text_and_numbers(value, where)
    return value


def _check_text_and_numbers(value: dict[str, Any], where: str) -> None:
    """Refuse signals holding a lone UTF-16 surrogate or a float that is not finite.

    ``json.loads`` joins an escaped pair (``\\ud83d\\ude00``) into one character but
    keeps a lone half (``\\ud83d``, which a browser's ``JSON.stringify`` writes for half
    an emoji) as a surrogate code point: valid JSON, yet no text. Every event carrying it
    would fail to encode as UTF-8, long after this request. A custom JSON provider may
    also have read ``NaN`` or ``1e999`` as a float that no JSON text can carry back.
    Serializing the parsed value as UTF-8 is one pass in C over every key, string and
    number, and fails exactly on those.

    :param value: The parsed signals.
    :param where: Where they came from, for the message.
    :raises werkzeug.exceptions.BadRequest: a surrogate or such a float was found.
    """
    try:
        # default=str: a custom JSON provider may have made values (Decimal) that the
        # stdlib cannot serialise; only keys, strings and floats matter here.
        json.dumps(value, ensure_ascii=False, allow_nan=False, default=str).encode("utf-8")
    except RecursionError:
        # Called a few frames deeper than json.loads, it can meet the limit first.
        raise BadRequest(f"The Datastar signals in {where} are nested too deeply.") from None
    except UnicodeEncodeError as e:
        code = ord(e.object[e.start])
        raise BadRequest(
            f"The Datastar signals in {where} contain a lone surrogate (\\u{code:04x}), half"
            " of a UTF-16 pair, which is not text. Send whole characters: both halves of"
            " a pair (such as an emoji cut in two), or neither."
        ) from None
    except ValueError as e:
        if "JSON compliant" not in str(e):
            raise
        path, number = _find_not_finite(value)
        raise BadRequest(
            f"The Datastar signals in {where} hold {number} at {path}, which is not JSON:"
            " send finite numbers (JSON.stringify writes NaN and Infinity as null)."
        ) from None


def dumps_signals(signals: Mapping[str, Any]) -> str:
    """Serialise *signals* for a ``datastar-patch-signals`` event with the app's JSON provider.

    Inside an application context this is :attr:`flask.Flask.json`, so values
    that :func:`flask.jsonify` accepts (``date``, ``Decimal``, ``UUID``,
    dataclasses) work here too. With Flask's default provider, or a subclass of
    it, the text is compact and keeps the mapping's key order (the provider's
    ``sort_keys`` and ``ensure_ascii`` are not applied: the order may matter to
    the page, and the stream is UTF-8). Any other provider (such as one built
    on orjson) is used as it is. Without an application context it is the
    standard library's :func:`json.dumps`, compact and in key order.

    :meth:`Stream.patch_signals <flask_datastar.Stream.patch_signals>` calls it;
    pass its result to :meth:`SSE.patch_signals
    <flask_datastar.ServerSentEventGenerator.patch_signals>` to build an event
    for a broadcast the same way.

    :param signals: the signals, a JSON merge patch.
    :raises ValueError: a float in *signals* is not finite.
    """
    obj = signals if isinstance(signals, dict) else dict(signals)
    if not has_app_context():
        return _dumps_json(obj)
    provider = current_app.json
    if isinstance(provider, DefaultJSONProvider):
        try:
            return provider.dumps(
                obj, separators=(",", ":"), ensure_ascii=False, sort_keys=False, allow_nan=False
            )
        except ValueError as e:
            if "JSON compliant" not in str(e):
                raise
            raise _not_finite_error(obj) from None
    text: str | bytes = provider.dumps(obj)
    # A provider should return str; one returning orjson's bytes as they are is forgiven.
    return text.decode("utf-8") if isinstance(text, bytes) else text


def _json_type(value: object) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"


def read_signals() -> dict[str, Any]:
    """Return the signals sent with the current request as a dict.

    ``GET``, ``HEAD`` and ``DELETE`` requests carry them as JSON in the
    ``datastar`` query parameter; other methods as a body of type
    ``application/json``. A request without signals gives ``{}``, and so does
    a form post (``contentType: 'form'``), whose fields are in
    :attr:`flask.Request.form`. Signals whose name starts with ``_`` are never
    sent by the client. The result is parsed once per request; later calls
    return the same dict.

    A ``POST``, ``PUT``, ``PATCH`` or ``DELETE`` request must first pass the
    CSRF check (:func:`flask_datastar.guards.check_csrf`), unless
    ``DATASTAR_CSRF`` is off or the view is exempt.

    :raises flask_datastar.guards.CSRFError: the request may come from
        another site's page (a 403).
    :raises werkzeug.exceptions.UnsupportedMediaType: the body is not empty
        and its ``Content-Type`` is neither ``application/json`` nor a form
        type: ``text/plain``, which any page can post to another site, is
        refused rather than read as JSON.
    :raises werkzeug.exceptions.BadRequest: the signals are not valid UTF-8,
        not valid JSON, nested too deeply, not a JSON object, or hold a lone
        UTF-16 surrogate (``"\\ud800"``) in a key or a string: it is no text,
        and no event could carry it. Also when they hold ``NaN``, ``Infinity``,
        ``-Infinity``, which Python's ``json`` module reads but JSON has not (the
        browser's ``JSON.parse`` would refuse them when echoed back), or a number
        beyond a float's range (``1e999999``, an integer of 309 digits), which
        JavaScript reads as ``Infinity``. With a custom JSON provider the range
        is the provider's (a ``Decimal`` holds any exponent), and an integer
        longer than Python's limit (``sys.get_int_max_str_digits()``, 4300
        digits by default) is a 400 too.
    :raises werkzeug.exceptions.RequestEntityTooLarge: the body is larger than
        ``DATASTAR_MAX_SIGNALS_BYTES``.
    """
    check_csrf(from_signals=True)
    cached = request.environ.get(_ENVIRON_KEY)
    if cached is None:
        cached = request.environ[_ENVIRON_KEY] = _read_signals()
    return cached


def _read_signals() -> dict[str, Any]:
    limit = _max_signals_bytes()
    if request.method in _QUERY_METHODS:
        try:
            raw = request.args.get("datastar")
        except UnicodeDecodeError as e:
            # Servers other than gunicorn pass raw non-ASCII bytes of the request line on.
            raise BadRequest(
                f"The query string is not valid UTF-8 ({e}): percent-encode the Datastar"
                " signals as UTF-8, as the Datastar client does."
            ) from None
        if raw is None:
            return {}
        if len(raw) > limit:
            raise RequestEntityTooLarge(
                f"The Datastar signals are larger than the limit of {limit} bytes"
                " (DATASTAR_MAX_SIGNALS_BYTES)."
            )
        return _parse(raw, "the 'datastar' query parameter")
    if request.mimetype in _FORM_TYPES:
        return {}
    json_body = request.mimetype == "application/json"
    if not json_body and request.content_length:
        raise _not_json()
    if request.content_length is not None and request.content_length > limit:
        raise RequestEntityTooLarge(
            f"The request body of {request.content_length} bytes is larger than the limit of"
            f" {limit} bytes for Datastar signals (DATASTAR_MAX_SIGNALS_BYTES)."
        )
    if request.content_length is not None:
        body = request.get_data(cache=True)
    else:
        # A chunked body has no Content-Length: read one byte past the limit to tell.
        body = request.stream.read(limit + 1)
    if len(body) > limit:
        raise RequestEntityTooLarge(
            f"The request body is larger than the limit of {limit} bytes for Datastar signals"
            " (DATASTAR_MAX_SIGNALS_BYTES)."
        )
    if not body.strip():
        return {}
    if not json_body:
        raise _not_json()
    return _parse(body, "the request body")


def _not_json() -> UnsupportedMediaType:
    sent = f"is of type '{request.mimetype}'" if request.mimetype else "has no Content-Type"
    return UnsupportedMediaType(
        f"The request body {sent}, but Datastar signals are read only from an"
        " 'application/json' body, as Datastar's actions send them: set 'Content-Type:"
        " application/json', or send a form ('multipart/form-data' or"
        " 'application/x-www-form-urlencoded') and read it from request.form."
    )
