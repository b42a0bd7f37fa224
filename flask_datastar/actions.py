"""Action expressions for ``data-on:*`` and ``data-init`` attributes, and the client's URL.

The strings built here go inside HTML attributes and JavaScript at once. Every
value is encoded so that the result contains none of ``"``, ``'``, ``<``,
``>``, ``&`` or a line break outside of an escape: it is safe in a quoted
attribute whether or not the template escapes it again.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

# The client's release and address live in .client; imported here so that the names
# keep working from flask_datastar.actions.
from .client import DATASTAR_CDN_URL, DATASTAR_VERSION, datastar_url

__all__ = [
    "DATASTAR_CDN_URL",
    "DATASTAR_VERSION",
    "JS",
    "datastar_url",
    "js_literal",
    "sse_delete",
    "sse_get",
    "sse_patch",
    "sse_post",
    "sse_put",
]

_IDENTIFIER = re.compile(r"[A-Za-z_$][A-Za-z0-9_$]*\Z")
# Everything that could end the string, the attribute or the script element,
# or that JavaScript treats as a line break. And "@": the client rewrites every
# "@name(" of an expression into an action call, inside string literals too.
_UNSAFE = re.compile(r"[\\'\"<>&@\x00-\x1f\x7f\u2028\u2029]")
_SHORT_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


class JS(str):
    """A raw JavaScript expression, passed through :func:`js_literal` unencoded.

    Use it for what JSON cannot express, such as a regular expression:
    ``sse_get("/feed", filter_signals={"include": JS("/^feed/")})``. Never
    build one from user input.
    """

    __slots__ = ()


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    return _SHORT_ESCAPES.get(char) or (
        f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"
    )


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def js_literal(value: Any) -> str:
    """Encode a Python value as a JavaScript literal that is safe inside an HTML attribute.

    Strings become single-quoted literals with every dangerous character
    escaped; mappings become object literals (keys that are not identifiers are
    quoted); sequences become arrays; ``None`` becomes ``null``.

    :param value: a string, number, bool, ``None``, mapping, sequence or :class:`JS`.
    """
    if isinstance(value, JS):
        return str(value)
    if isinstance(value, str):
        return "'" + _UNSAFE.sub(_escape_char, value) + "'"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} has no JavaScript literal; pass a finite number.")
        return json.dumps(value)
    if isinstance(value, Mapping):
        items = []
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"Object keys must be strings, not {type(key).__name__}.")
            name = key if _IDENTIFIER.match(key) else js_literal(key)
            items.append(f"{name}: {js_literal(item)}")
        return "{" + ", ".join(items) + "}"
    if isinstance(value, Sequence):
        return "[" + ", ".join(js_literal(item) for item in value) + "]"
    raise TypeError(f"{type(value).__name__} has no JavaScript literal.")


def _action(method: str, url: str, options: Mapping[str, Any]) -> str:
    if not isinstance(url, str):
        raise TypeError(f"The URL must be a string, not {type(url).__name__}.")
    if not options:
        return f"@{method}({js_literal(url)})"
    # Keyword arguments are snake_case in Python; the client's options are camelCase.
    opts = {_camel(key): value for key, value in options.items()}
    return f"@{method}({js_literal(url)}, {js_literal(opts)})"


def sse_get(url: str, **options: Any) -> str:
    """Return the ``@get`` action expression for *url*.

    ``sse_get("/sse", retry="always")`` gives ``@get('/sse', {retry: 'always'})``.
    Keyword names are turned into the client's camelCase option names
    (``content_type`` -> ``contentType``, ``open_when_hidden`` -> ``openWhenHidden``).

    :param url: the address, encoded so that no value can escape its string.
    :param options: the action's options (``retry``, ``headers``,
        ``content_type``, ``filter_signals``, ``selector``, ...).
    """
    return _action("get", url, options)


def sse_post(url: str, **options: Any) -> str:
    """Return the ``@post`` action expression for *url*; see :func:`sse_get`."""
    return _action("post", url, options)


def sse_put(url: str, **options: Any) -> str:
    """Return the ``@put`` action expression for *url*; see :func:`sse_get`."""
    return _action("put", url, options)


def sse_patch(url: str, **options: Any) -> str:
    """Return the ``@patch`` action expression for *url*; see :func:`sse_get`."""
    return _action("patch", url, options)


def sse_delete(url: str, **options: Any) -> str:
    """Return the ``@delete`` action expression for *url*; see :func:`sse_get`."""
    return _action("delete", url, options)
