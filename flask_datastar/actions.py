"""Action expressions for ``data-on:*`` and ``data-init`` attributes, and the client's URL.

The strings built here go inside HTML attributes and JavaScript at once. Every
value is encoded so that the result contains none of ``"``, ``'``, ``<``,
``>``, ``&``, ``@`` or a line break outside of an escape: it is safe in a
quoted attribute whether or not the template escapes it again. Only what is
JavaScript by definition is written as it is: a :class:`JS` value and the
expression given to :func:`peek`.

The ``data-*`` attribute builder (:data:`attribute_generator`, the Jinja
global ``data``) is datastar-py's, loaded on first use.
"""

from __future__ import annotations

import difflib
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
    "FETCH_OPTIONS",
    "JS",
    "ActionGenerator",
    "AttributeGenerator",
    "action_generator",
    "attribute_generator",
    "datastar_url",
    "js_literal",
    "peek",
    "set_all",
    "sse_delete",
    "sse_get",
    "sse_patch",
    "sse_post",
    "sse_put",
    "toggle_all",
]

_IDENTIFIER = re.compile(r"[A-Za-z_$][A-Za-z0-9_$]*\Z")
# Everything that could end the string, the attribute or the script element,
# or that JavaScript treats as a line break. And "@": the client rewrites every
# "@name(" of an expression into an action call, inside string literals too. And lone
# UTF-16 surrogates, with which no page could be encoded.
_UNSAFE = re.compile(r"[\\'\"<>&@\x00-\x1f\x7f\u2028\u2029\ud800-\udfff]")
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
    quoted, and ``__proto__`` is a computed key, so that it stays a property
    instead of setting the prototype); sequences become arrays; ``None`` becomes
    ``null``.

    :param value: a string, number, bool, ``None``, mapping, sequence or :class:`JS`.
    """
    if isinstance(value, JS):
        return str(value)
    foreign = _foreign_expression(value)
    if foreign is not None:
        return foreign
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
            if key == "__proto__":
                # Written plainly, this key sets the object's prototype, not a property.
                name = f"[{js_literal(key)}]"
            else:
                name = key if _IDENTIFIER.match(key) else js_literal(key)
            items.append(f"{name}: {js_literal(item)}")
        return "{" + ", ".join(items) + "}"
    if isinstance(value, Sequence):
        return "[" + ", ".join(js_literal(item) for item in value) + "]"
    raise TypeError(f"{type(value).__name__} has no JavaScript literal.")


def _foreign_expression(value: object) -> str | None:
    """Return datastar-py's ``JSExpression`` as JavaScript (as :class:`JS`), else ``None``.

    Recognised by name, so that datastar-py is not imported for it: code that
    passes ``data.JSExpression("el.dataset.id")`` keeps working.
    """
    cls = type(value)
    if cls.__name__ == "JSExpression" and cls.__module__.startswith("datastar_py"):
        return f"({value.value})"  # type: ignore[attr-defined]
    return None


#: The options of Datastar 1.0's fetch actions (``@get``, ``@post``, ...): each
#: Python keyword and the client's name for it. The client (1.0.x,
#: ``plugins/actions/fetch.ts``) ignores any other name without a word.
FETCH_OPTIONS: dict[str, str] = {
    "content_type": "contentType",
    "filter_signals": "filterSignals",
    "selector": "selector",
    "headers": "headers",
    "open_when_hidden": "openWhenHidden",
    "payload": "payload",
    "request_cancellation": "requestCancellation",
    "retry": "retry",
    "retry_interval": "retryInterval",
    "retry_scaler": "retryScaler",
    "retry_max_wait": "retryMaxWait",
    "retry_max_count": "retryMaxCount",
}
# datastar-py's shorthands for filterSignals: {include: ..., exclude: ...}.
_FILTER_SHORTHANDS = {"include_signals": "include", "exclude_signals": "exclude"}
# The camelCase names are accepted as they are, as before this check existed.
_OPTION_NAMES = {**FETCH_OPTIONS, **{camel: camel for camel in FETCH_OPTIONS.values()}}
_CHOICES = {
    "contentType": ("json", "form"),
    "retry": ("auto", "error", "always", "never"),
    "requestCancellation": ("auto", "cleanup", "disabled"),
}
_NUMBERS = ("retryInterval", "retryScaler", "retryMaxWait", "retryMaxCount")


def _is_js(value: object) -> bool:
    return isinstance(value, JS) or _foreign_expression(value) is not None


def _unknown_option(method: str, name: str) -> TypeError:
    known = [*FETCH_OPTIONS, *_FILTER_SHORTHANDS]
    close = difflib.get_close_matches(name, [*known, *FETCH_OPTIONS.values()], n=1, cutoff=0.6)
    if not close:
        close = difflib.get_close_matches(name.lower(), known, n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return TypeError(
        f"'{method}' got an unknown option {name!r}.{hint} The options of Datastar 1.0's"
        f" fetch actions are: {', '.join(known)} (camelCase names work too)."
    )


def _regexp(pattern: object, name: str) -> str:
    """Return a JavaScript ``RegExp`` for a signal filter: a pattern string, or JavaScript."""
    if _is_js(pattern):
        return js_literal(pattern)
    if not isinstance(pattern, str):
        raise TypeError(
            f"{name!r} must be a regular expression pattern (a string) or JS(...),"
            f" not {type(pattern).__name__}."
        )
    return f"new RegExp({js_literal(pattern)})"


def _signal_filter(include: object, exclude: object, prefix: str = "") -> str | None:
    parts = []
    if include is not None:
        parts.append(f"include: {_regexp(include, prefix + 'include')}")
    if exclude is not None:
        parts.append(f"exclude: {_regexp(exclude, prefix + 'exclude')}")
    return "{" + ", ".join(parts) + "}" if parts else None


def _check_value(method: str, key: str, name: str, value: Any) -> None:
    if _is_js(value):
        return
    choices = _CHOICES.get(name)
    if choices is not None and value not in choices:
        raise ValueError(
            f"'{method}' got {value!r} for {key!r}; use one of: {', '.join(choices)},"
            " or JS(...) for an expression."
        )
    if name in _NUMBERS and (
        isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0
    ):
        raise ValueError(f"'{method}' needs a number of at least 0 for {key!r}, not {value!r}.")
    if name == "openWhenHidden" and not isinstance(value, bool):
        raise TypeError(f"'{method}' needs True or False for {key!r}, not {value!r}.")


def _action(method: str, url: str, options: Mapping[str, Any]) -> str:
    if not isinstance(url, str) and not _is_js(url):
        raise TypeError(f"The URL must be a string, not {type(url).__name__}.")
    helper = f"sse_{method}"
    opts: dict[str, Any] = {}
    shorthand: dict[str, Any] = {}
    for key, value in options.items():
        if key in _FILTER_SHORTHANDS:
            shorthand[_FILTER_SHORTHANDS[key]] = value
            continue
        name = _OPTION_NAMES.get(key)
        if name is None:
            raise _unknown_option(helper, key)
        if name in opts:
            raise TypeError(f"'{helper}' got the option {name!r} twice (in two spellings).")
        # None leaves the client's default, as datastar-py does: the client only
        # falls back to its default for an absent option, not for null.
        if value is not None:
            _check_value(helper, key, name, value)
            opts[name] = value
    filters = _signal_filter(shorthand.get("include"), shorthand.get("exclude"))
    if filters is not None:
        if "filterSignals" in opts:
            raise TypeError(
                f"'{helper}' got both 'filter_signals' and 'include_signals'/'exclude_signals';"
                " pass one of them."
            )
        opts["filterSignals"] = JS(filters)
    if "selector" in opts and opts.get("contentType", "json") == "json":
        raise ValueError(
            f"'{helper}' got a 'selector', which picks the form to send: it needs"
            " content_type='form' (the client ignores it otherwise)."
        )
    if not opts:
        return f"@{method}({js_literal(url)})"
    return f"@{method}({js_literal(url)}, {js_literal(opts)})"


def sse_get(url: str, **options: Any) -> str:
    """Return the ``@get`` action expression for *url*.

    ``sse_get("/sse", retry="always")`` gives ``@get('/sse', {retry: 'always'})``.
    Keyword names are turned into the client's camelCase option names
    (``content_type`` -> ``contentType``, ``open_when_hidden`` -> ``openWhenHidden``);
    the camelCase names are accepted too. An option set to ``None`` is left
    out, so the client's default applies.

    The options are those of :data:`FETCH_OPTIONS`; any other name is a
    :class:`TypeError` that names the nearest valid one (``retrys=3``: did
    you mean ``retry``?). ``content_type``, ``retry`` and
    ``request_cancellation`` must be one of the client's values, the retry
    numbers at least 0, unless given as :class:`JS`.

    :param url: the address, encoded so that no value can escape its string.
    :param options: the action's options (``retry``, ``headers``,
        ``content_type``, ``filter_signals``, ``selector``, ...), and as in
        datastar-py ``include_signals`` / ``exclude_signals``: a regular
        expression pattern (or :class:`JS`) for ``filterSignals``'
        ``include`` / ``exclude``.
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


def peek(expression: str) -> str:
    """Return ``@peek(() => (expression))``: read signals without subscribing to them.

    ``peek("$bar")`` in ``data-text="$foo + {{ peek('$bar') }}"`` re-evaluates
    when ``$foo`` changes, not when ``$bar`` does.

    :param expression: a Datastar expression, which is JavaScript: it is written
        as it is, so never build it from user input (quote values with
        :func:`js_literal`). datastar-py's ``JSExpression`` works too.
    """
    code: object = expression
    if _foreign_expression(expression) is not None:
        code = expression.value  # type: ignore[attr-defined]
    if not isinstance(code, str) or not code.strip():
        raise TypeError(f"'peek' needs a non-empty expression string, not {code!r}.")
    return f"@peek(() => ({code}))"


def set_all(value: Any, include: str | JS | None = None, exclude: str | JS | None = None) -> str:
    """Return the ``@setAll`` expression: set every matching signal to *value*.

    ``set_all(False, include="^todo\\.")`` gives
    ``@setAll(false, {include: new RegExp('^todo\\\\.')})``.

    :param value: a Python value, encoded as :func:`js_literal` does, or
        :class:`JS` for an expression such as ``JS("$all")``.
    :param include: a regular expression pattern of the signal paths to set
        (all without it), or :class:`JS` for a regular expression literal.
    :param exclude: a pattern of the signal paths to leave alone.
    """
    filters = _signal_filter(include, exclude)
    if filters is None:
        return f"@setAll({js_literal(value)})"
    return f"@setAll({js_literal(value)}, {filters})"


def toggle_all(include: str | JS | None = None, exclude: str | JS | None = None) -> str:
    """Return the ``@toggleAll`` expression: negate every matching boolean signal.

    :param include: a regular expression pattern of the signal paths to toggle
        (all without it), or :class:`JS` for a regular expression literal.
    :param exclude: a pattern of the signal paths to leave alone.
    """
    filters = _signal_filter(include, exclude)
    return f"@toggleAll({filters or ''})"


class ActionGenerator:
    """Every action of Datastar 1.0 under the names of datastar-py's ``action_generator``.

    ``action_generator.post("/todos", content_type="form")`` is
    :func:`sse_post`; ``peek``, ``set_all`` and ``toggle_all`` are the
    functions of this module. Datastar Pro's actions (``@clipboard``,
    ``@fit``) are not part of the open-source client and have no helper.
    """

    __slots__ = ()

    get = staticmethod(sse_get)
    post = staticmethod(sse_post)
    put = staticmethod(sse_put)
    patch = staticmethod(sse_patch)
    delete = staticmethod(sse_delete)
    peek = staticmethod(peek)
    set_all = staticmethod(set_all)
    toggle_all = staticmethod(toggle_all)


#: The actions, as datastar-py's ``from datastar_py import action_generator``.
action_generator = ActionGenerator()


_EXTRA_HINT = (
    "The 'data-*' attribute builder is datastar-py's: install it with"
    " 'pip install flask_datastar[datastar]' (or 'pip install datastar-py')."
)
_generator_class: list[type[Any]] = []


def _attribute_generator_class() -> type[Any]:
    """Return datastar-py's ``AttributeGenerator``, with ``signals`` escaping ``@``.

    datastar-py writes ``data-signals`` values with :func:`json.dumps`. The
    Datastar client (1.0.x) rewrites every ``@name(`` of an expression into an
    action call, inside string literals too, so a signal value such as
    ``"see @get(it)"`` breaks the whole ``data-signals`` expression. Written
    as ``\\u0040`` it stays text. Every other attribute is theirs unchanged:
    its output was checked against the 1.0 client (``data-on:click__debounce.500ms``,
    ``data-init``, ``data-signals__ifmissing``, ``data-computed:foo-bar__case.camel``).
    """
    if _generator_class:
        return _generator_class[0]
    try:
        from datastar_py import attributes
    except ImportError as e:
        raise ImportError(f"{_EXTRA_HINT} ({e})") from None

    class _AttributeGenerator(attributes.AttributeGenerator):
        def __init__(self, alias: str = "data-") -> None:
            super().__init__(alias)
            self._flask_datastar_alias = alias

        def signals(
            self,
            signals_dict: Mapping[str, Any] | None = None,
            /,
            *,
            expressions_: bool = False,
            **signals: Any,
        ) -> Any:
            attr = super().signals(signals_dict, expressions_=expressions_, **signals)
            merged = {**(signals_dict or {}), **signals}
            if expressions_ or _holds_expression(merged):
                return attr  # code by intent: an "@" in it may be an action call
            # Plain data: json.dumps, as datastar-py writes it, where an "@" can only
            # be inside a string, so escaping every one changes no code.
            text = json.dumps(merged, allow_nan=False).replace("@", "\\u0040")
            return attributes.SignalsAttr(value=text, alias=self._flask_datastar_alias)

    _generator_class.append(_AttributeGenerator)
    return _AttributeGenerator


def _holds_expression(value: object) -> bool:
    if isinstance(value, Mapping):
        return any(_holds_expression(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_expression(item) for item in value)
    return _is_js(value)


class AttributeGenerator:
    """datastar-py's ``data-*`` attribute builder, imported when first used.

    ``data.on("click", sse_post("/vote")).debounce("500ms").stop`` renders as
    ``data-on:click__case.kebab__debounce.500ms__stop="@post(&#39;/vote&#39;)"``
    (``__case.kebab`` keeps the event name as written): every
    attribute and modifier of ``datastar_py.attributes.AttributeGenerator``,
    with one fix (see :data:`attribute_generator`). Needs the ``datastar``
    extra (``pip install flask_datastar[datastar]``); without it, using it
    raises an :class:`ImportError` that says so.

    :param alias: the prefix of every attribute, for an aliased client bundle.
    """

    __slots__ = ("alias", "_generator")

    def __init__(self, alias: str = "data-") -> None:
        self.alias = alias
        self._generator: Any = None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)  # copy, pickle and Jinja's probes
        generator = self._generator
        if generator is None:
            generator = self._generator = _attribute_generator_class()(alias=self.alias)
        return getattr(generator, name)

    def __repr__(self) -> str:
        return f"<AttributeGenerator {self.alias!r}>"


#: The ``data-*`` attribute builder, as datastar-py's ``attribute_generator``;
#: the Jinja global ``data`` in every app that uses :class:`~flask_datastar.FlaskDatastar`.
#: ``data.signals(...)`` writes an ``@`` inside a string value as ``\\u0040``,
#: which the client would otherwise rewrite into an action call.
attribute_generator = AttributeGenerator()
