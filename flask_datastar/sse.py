"""The Datastar 1.0 wire format: Server-Sent Event text, with no Flask import.

Every function here is pure: it takes Python values and returns the text of
one event, ready to be written to a ``text/event-stream`` response. The names
and keyword arguments are those of the official Python SDK (``datastar-py``),
so code written for it keeps working after changing the import.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Any, Protocol, runtime_checkable

from markupsafe import escape

__all__ = [
    "DEFAULT_RETRY_DURATION",
    "SSE",
    "SSE_HEADERS",
    "DatastarEvent",
    "ElementPatchMode",
    "ElementPatchNamespace",
    "EventType",
    "ServerSentEventGenerator",
    "comment",
    "js_string",
]

#: Headers of every Datastar stream. ``Connection: keep-alive``, which the
#: Datastar SDK spec asks for on HTTP/1.1, is deliberately absent: it is a
#: hop-by-hop header that PEP 3333 forbids applications to set, and gunicorn
#: drops it anyway. ``X-Accel-Buffering: no`` stops nginx from buffering.
SSE_HEADERS: dict[str, str] = {
    "Cache-Control": "no-cache",
    "Content-Type": "text/event-stream",
    "X-Accel-Buffering": "no",
}

#: The client's reconnection delay in milliseconds when the server sends none.
DEFAULT_RETRY_DURATION = 1000


class EventType(str, Enum):
    """The two event types of the Datastar 1.0 protocol."""

    PATCH_ELEMENTS = "datastar-patch-elements"
    PATCH_SIGNALS = "datastar-patch-signals"

    def __str__(self) -> str:
        return self.value


class ElementPatchMode(str, Enum):
    """How patched elements are applied to the page."""

    OUTER = "outer"
    INNER = "inner"
    REPLACE = "replace"
    PREPEND = "prepend"
    APPEND = "append"
    BEFORE = "before"
    AFTER = "after"
    REMOVE = "remove"

    def __str__(self) -> str:
        return self.value


class ElementPatchNamespace(str, Enum):
    """The namespace in which patched elements are created."""

    HTML = "html"
    SVG = "svg"
    MATHML = "mathml"

    def __str__(self) -> str:
        return self.value


@runtime_checkable
class HasHTML(Protocol):
    """An object that renders itself as HTML, such as :class:`markupsafe.Markup`."""

    def __html__(self) -> str: ...


class DatastarEvent(str):
    """The text of one complete event, as returned by :class:`ServerSentEventGenerator`.

    A plain :class:`str` subclass, so it can be yielded, concatenated and
    written as it is; the type tells a stream that the text is already framed.
    """

    __slots__ = ()


Elements = str | HasHTML
Signals = Mapping[str, Any] | str

_SURROGATE = re.compile("[\ud800-\udfff]")
# The line terminators of the event-stream format. str.splitlines() would also
# split on U+2028, U+0085 and friends, which are ordinary text in HTML and JSON.
_NEWLINES = re.compile(r"\r\n|\r|\n")

# Modes the client accepts without a selector: it then matches each
# top-level element of the patch by its id.
_MODES_WITHOUT_SELECTOR = frozenset({ElementPatchMode.OUTER, ElementPatchMode.REPLACE})


# The HTML attribute name grammar (HTML Living Standard, "Attributes"): one or more
# characters other than controls, space, '"', "'", ">", "/", "=" and noncharacters. "<"
# too: the tokenizer takes it into the name, but only as a parse error. Lone surrogates
# are no characters at all, and no event could encode one as UTF-8.
_NONCHARACTERS = "\ufdd0-\ufdef" + "".join(
    f"{chr(plane * 0x10000 + 0xFFFE)}{chr(plane * 0x10000 + 0xFFFF)}" for plane in range(17)
)
_NAME_CHAR = f"[^\\x00-\\x20\\x7f-\\x9f\"'>/=<\\ud800-\\udfff{_NONCHARACTERS}]"
_ATTRIBUTE_NAME = re.compile(f"{_NAME_CHAR}+\\Z")
# One ready-made attribute: a name, then nothing or "=" and a value that is double-quoted,
# single-quoted, or unquoted (no whitespace, quotes, "=", "<", ">" or "`", not empty).
# Quoted values may hold anything but their quote; the characters no event can carry are
# refused everywhere.
_ATTRIBUTE = re.compile(
    f"{_NAME_CHAR}+"
    "(?:="
    "(?:\"[^\"\\ud800-\\udfff]*\"|'[^'\\ud800-\\udfff]*'"
    "|[^\\x00-\\x20\"'=<>`\\ud800-\\udfff]+))?\\Z"
)
# WHATWG URL parsing: leading C0 controls and spaces are stripped, tabs and newlines
# removed anywhere, then a scheme is an ASCII letter, letters, digits, "+", "-" or ".",
# and ":". Anything else makes the URL relative.
_C0_OR_SPACE = "".join(chr(c) for c in range(0x21))
_TAB_OR_NEWLINE = re.compile("[\t\n\r]")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+\-.]*):")
_REDIRECT_SCHEMES = frozenset({"http", "https"})


def _attribute_name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"An attribute name must be a string, not {type(name).__name__}.")
    if not _ATTRIBUTE_NAME.match(name):
        raise ValueError(
            f"{name!r} is not an HTML attribute name: a name is one or more characters other"
            " than spaces, controls, quotes, '>', '/', '=', '<' and noncharacters."
        )
    return name


def _attribute(attribute: object) -> str:
    if not isinstance(attribute, str):
        raise TypeError(f"An attribute must be a string, not {type(attribute).__name__}.")
    if not _ATTRIBUTE.match(attribute):
        raise ValueError(
            f"{attribute!r} is not exactly one attribute: write 'name', 'name=value' or"
            " 'name=\"value\"' (a value without its quote character), one per string, or"
            " pass a mapping, whose values are escaped for you."
        )
    return attribute


def _redirect_scheme(location: str) -> str | None:
    """Return the scheme a browser reads in *location*, lowercased, or None if relative."""
    match = _SCHEME.match(_TAB_OR_NEWLINE.sub("", location.lstrip(_C0_OR_SPACE)))
    return match.group(1).lower() if match else None


def _lines(text: str) -> list[str]:
    return _NEWLINES.split(text)


def _single_line(name: str, value: str) -> str:
    if _NEWLINES.search(value):
        raise ValueError(f"The {name} {value!r} must not contain a line break.")
    return value


def _mode(value: ElementPatchMode | str | None) -> ElementPatchMode:
    if value is None:
        return ElementPatchMode.OUTER
    try:
        return ElementPatchMode(value)
    except ValueError:
        choices = ", ".join(m.value for m in ElementPatchMode)
        raise ValueError(f"Unknown patch mode {value!r}; use one of: {choices}.") from None


def _namespace(value: ElementPatchNamespace | str | None) -> ElementPatchNamespace:
    if value is None:
        return ElementPatchNamespace.HTML
    try:
        return ElementPatchNamespace(value)
    except ValueError:
        choices = ", ".join(n.value for n in ElementPatchNamespace)
        raise ValueError(f"Unknown namespace {value!r}; use one of: {choices}.") from None


def _event(
    event_type: EventType,
    data_lines: list[str],
    event_id: str | None,
    retry_duration: int | None,
) -> DatastarEvent:
    out = [f"event: {event_type.value}\n"]
    if event_id is not None:
        event_id = _single_line("event_id", str(event_id))
        if "\0" in event_id:
            # The event-stream format ignores such an id: the event would arrive without it.
            raise ValueError(f"The event_id {event_id!r} must not contain NUL.")
        out.append(f"id: {event_id}\n")
    if retry_duration is not None:
        if isinstance(retry_duration, bool) or not isinstance(retry_duration, int):
            raise TypeError(
                f"'retry_duration' must be an int of milliseconds, not {retry_duration!r}."
            )
        if retry_duration < 0:
            raise ValueError(f"'retry_duration' must not be negative, got {retry_duration}.")
        if retry_duration != DEFAULT_RETRY_DURATION:
            out.append(f"retry: {retry_duration}\n")
    for line in data_lines:
        out.append(f"data: {line}\n")
    out.append("\n")
    return DatastarEvent("".join(out))


def _dumps_json(value: object) -> str:
    """Return *value* as compact JSON in key order, refusing NaN and the infinities.

    :func:`json.dumps` writes ``float("nan")`` as ``NaN``, which is no JSON: the
    browser's ``JSON.parse`` would refuse the whole event.

    :param value: anything :func:`json.dumps` serialises.
    :raises ValueError: a float in it is not finite; the message says where.
    """
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError as e:
        if "JSON compliant" not in str(e):
            raise
        raise _not_finite_error(value) from None


def _not_finite_error(value: object) -> ValueError:
    """Return the error for signals holding a float that JSON cannot carry, saying where.

    :param value: the signals that failed to serialise.
    """
    path, number = _find_not_finite(value)
    return ValueError(
        f"The signals hold {number} at {path or 'the top level'}, which is not JSON (its"
        " numbers are finite): send None (null) or a finite number instead."
    )


def _find_not_finite(value: object) -> tuple[str, str]:
    # Walked only once serialising has failed; iterative, since the value may be deep.
    stack: list[tuple[str, object]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return path, repr(item)
        if isinstance(item, Mapping):
            stack.extend((f"{path}[{key!r}]", child) for key, child in item.items())
        elif isinstance(item, (list, tuple)):
            stack.extend((f"{path}[{i}]", child) for i, child in enumerate(item))
    return "", "a float that is not finite"


def comment(text: str = "") -> str:
    """Return an SSE comment block, which the client ignores (used for heartbeats).

    :param text: the comment; must be a single line.
    """
    _single_line("comment", text)
    return f": {text}\n\n" if text else ":\n\n"


def js_string(value: str) -> str:
    """Encode *value* as a JavaScript string literal that is safe anywhere in HTML.

    JSON-encodes it, then escapes ``<``, ``>`` and ``&`` so the literal can
    neither close a ``<script>`` element nor start an HTML entity, U+2028 and
    U+2029, which older JavaScript engines treat as line breaks, and any lone
    UTF-16 surrogate, which no page or event could be encoded with.

    :param value: any text.
    """
    literal = (
        json.dumps(value, ensure_ascii=False)
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )
    if _SURROGATE.search(literal) is None:
        return literal
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", literal)


def _patch_elements(
    html: str | None,
    selector: str | None,
    mode: ElementPatchMode | str | None,
    use_view_transition: bool | None,
    view_transition_selector: str | None,
    namespace: ElementPatchNamespace | str | None,
    event_id: str | None,
    retry_duration: int | None,
) -> DatastarEvent:
    """Build a ``datastar-patch-elements`` event (see :meth:`SSE.patch_elements`)."""
    patch_mode = _mode(mode)
    patch_namespace = _namespace(namespace)
    if selector is not None:
        _single_line("selector", selector)
    if not selector and patch_mode not in _MODES_WITHOUT_SELECTOR:
        raise ValueError(
            f"Patch mode {patch_mode.value!r} needs a 'selector': only 'outer' and"
            " 'replace' can match elements by their id."
        )
    data = []
    if selector:
        data.append(f"selector {selector}")
    if patch_mode is not ElementPatchMode.OUTER:
        data.append(f"mode {patch_mode.value}")
    if use_view_transition:
        data.append("useViewTransition true")
        if view_transition_selector:
            _single_line("view_transition_selector", view_transition_selector)
            data.append(f"viewTransitionSelector {view_transition_selector}")
    if patch_namespace is not ElementPatchNamespace.HTML:
        data.append(f"namespace {patch_namespace.value}")
    if html:
        data.extend(f"elements {line}" for line in _lines(html))
    return _event(EventType.PATCH_ELEMENTS, data, event_id, retry_duration)


#: The events of the last few distinct calls: the same text, built once.
_patch_elements_cached = functools.lru_cache(maxsize=64, typed=True)(_patch_elements)


class ServerSentEventGenerator:
    """Build the text of Datastar events.

    Every method is a classmethod returning a :class:`DatastarEvent`; the same
    names on a stream (``gen.patch_elements(...)``) send the event instead.
    Values equal to the protocol's defaults are left off the wire.
    """

    __slots__ = ()

    @classmethod
    def patch_elements(
        cls,
        elements: Elements | None = None,
        selector: str | None = None,
        mode: ElementPatchMode | str | None = None,
        use_view_transition: bool | None = None,
        view_transition_selector: str | None = None,
        namespace: ElementPatchNamespace | str | None = None,
        event_id: str | None = None,
        retry_duration: int | None = None,
    ) -> DatastarEvent:
        """Return a ``datastar-patch-elements`` event.

        :param elements: HTML (a string or an object with ``__html__``); each of
            its lines becomes one ``data: elements`` line.
        :param selector: CSS selector of the target; without it each top-level
            element is matched by its ``id``.
        :param mode: one of :class:`ElementPatchMode`; modes other than
            ``outer`` and ``replace`` need a *selector*.
        :param use_view_transition: wrap the patch in a view transition.
        :param view_transition_selector: the element the view transition is
            scoped to (client 1.0.2); sent only with *use_view_transition*.
        :param namespace: one of :class:`ElementPatchNamespace`, for SVG and
            MathML fragments.
        :param event_id: the SSE ``id``, sent back as ``Last-Event-ID`` on retry.
        :param retry_duration: the client's reconnection delay in milliseconds.
        """
        html = elements
        if html is not None and type(html) is not str:
            if isinstance(html, HasHTML):
                html = html.__html__()
            if not isinstance(html, str):
                raise TypeError(
                    "'elements' must be a string or have an '__html__' method,"
                    f" not {type(html).__name__}."
                )
        args = (
            html,
            selector,
            mode,
            use_view_transition,
            view_transition_selector,
            namespace,
            event_id,
            retry_duration,
        )
        try:
            # Every tab of a fat-morph app sends the same content each tick: build it once.
            return _patch_elements_cached(*args)
        except TypeError:
            return _patch_elements(*args)  # an argument that cannot be a cache key

    @classmethod
    def remove_elements(
        cls, selector: str, event_id: str | None = None, retry_duration: int | None = None
    ) -> DatastarEvent:
        """Return an event that removes the elements matching *selector*.

        :param selector: CSS selector of the elements to remove.
        :param event_id: the SSE ``id``.
        :param retry_duration: the client's reconnection delay in milliseconds.
        """
        if not selector:
            raise ValueError("'remove_elements' needs a non-empty 'selector'.")
        return cls.patch_elements(
            selector=selector,
            mode=ElementPatchMode.REMOVE,
            event_id=event_id,
            retry_duration=retry_duration,
        )

    @classmethod
    def patch_signals(
        cls,
        signals: Signals,
        event_id: str | None = None,
        only_if_missing: bool | None = None,
        retry_duration: int | None = None,
    ) -> DatastarEvent:
        """Return a ``datastar-patch-signals`` event.

        The signals are an RFC 7386 JSON merge patch: ``None`` removes a signal
        and nested objects merge.

        :param signals: a mapping, serialised as compact JSON in key order, or a
            JSON text sent line by line as given.
        :param event_id: the SSE ``id``.
        :param only_if_missing: set only the signals the page does not have yet.
        :param retry_duration: the client's reconnection delay in milliseconds.
        """
        if isinstance(signals, str):
            text = signals
        elif isinstance(signals, Mapping):
            text = _dumps_json(signals)
        else:
            raise TypeError(
                f"'signals' must be a mapping or a JSON string, not {type(signals).__name__}."
            )
        data = ["onlyIfMissing true"] if only_if_missing else []
        data.extend(f"signals {line}" for line in _lines(text))
        return _event(EventType.PATCH_SIGNALS, data, event_id, retry_duration)

    @classmethod
    def execute_script(
        cls,
        script: str,
        auto_remove: bool = True,
        attributes: Mapping[str, str] | Sequence[str] | None = None,
        event_id: str | None = None,
        retry_duration: int | None = None,
    ) -> DatastarEvent:
        """Return an event that runs *script* in the browser.

        The protocol has no event of its own for this: the script is appended to
        ``body`` as a ``<script>`` element.

        :param script: JavaScript source. It is sent as it is: quote any value
            that comes from a user with :func:`js_string`.
        :param auto_remove: the element removes itself once it has run.
        :param attributes: extra attributes, as a mapping (values are HTML-escaped;
            each name must match the HTML attribute name grammar) or as ready-made
            strings, each exactly one attribute: ``defer``, ``type=module`` or
            ``type="module"``.
        :param event_id: the SSE ``id``.
        :param retry_duration: the client's reconnection delay in milliseconds.
        :raises ValueError: an attribute name is not one (``"src=x a"``, a space, a
            quote, ``>``...), or a string is not exactly one attribute.
        """
        parts = ["<script"]
        if auto_remove:
            parts.append(' data-effect="el.remove()"')
        if isinstance(attributes, Mapping):
            parts.extend(f' {_attribute_name(k)}="{escape(v)}"' for k, v in attributes.items())
        elif attributes is not None:
            if isinstance(attributes, str):
                raise TypeError(
                    "'attributes' must be a mapping or a list of strings, not a string."
                )
            parts.extend(f" {_attribute(attr)}" for attr in attributes)
        parts.append(f">{script}</script>")
        return cls.patch_elements(
            "".join(parts),
            selector="body",
            mode=ElementPatchMode.APPEND,
            event_id=event_id,
            retry_duration=retry_duration,
        )

    @classmethod
    def redirect(
        cls, location: str, event_id: str | None = None, retry_duration: int | None = None
    ) -> DatastarEvent:
        """Return an event that sends the browser to *location*.

        Only ``http:``, ``https:`` and relative URLs are accepted: a ``javascript:``
        URL would run code in the page, and ``data:``, ``vbscript:``, ``file:``,
        ``blob:`` or ``mailto:`` have no place in a redirect an application builds from
        data. The scheme is read as a browser reads it, after stripping leading
        controls and spaces and removing tabs and newlines, case-insensitively. An
        absolute or ``//host`` URL may still lead to another site: check where a
        user-supplied *location* goes. For another scheme, write the script yourself:
        ``execute_script(f"window.location.href = {js_string(url)}")``.

        :param location: the URL; JSON-encoded, so no value can break out of it.
        :param event_id: the SSE ``id``.
        :param retry_duration: the client's reconnection delay in milliseconds.
        :raises ValueError: the URL has another scheme.
        """
        scheme = _redirect_scheme(location)
        if scheme is not None and scheme not in _REDIRECT_SCHEMES:
            raise ValueError(
                f"Refusing to redirect to a {scheme!r} URL ({location[:40]!r}): only http,"
                " https and relative URLs are allowed. A 'javascript:' or 'data:' URL would"
                " run code in the page."
            )
        return cls.execute_script(
            f"setTimeout(() => window.location.href = {js_string(location)})",
            event_id=event_id,
            retry_duration=retry_duration,
        )

    @classmethod
    def console_log(
        cls, message: str, event_id: str | None = None, retry_duration: int | None = None
    ) -> DatastarEvent:
        """Return an event that writes *message* to the browser's console.

        :param message: any text; JSON-encoded, so no value can break out of it.
        :param event_id: the SSE ``id``.
        :param retry_duration: the client's reconnection delay in milliseconds.
        """
        return cls.execute_script(
            f"console.log({js_string(message)})",
            event_id=event_id,
            retry_duration=retry_duration,
        )

    @classmethod
    def console_error(
        cls, message: str, event_id: str | None = None, retry_duration: int | None = None
    ) -> DatastarEvent:
        """Return an event that writes *message* to the browser's console as an error.

        :param message: any text; JSON-encoded, so no value can break out of it.
        :param event_id: the SSE ``id``.
        :param retry_duration: the client's reconnection delay in milliseconds.
        """
        return cls.execute_script(
            f"console.error({js_string(message)})",
            event_id=event_id,
            retry_duration=retry_duration,
        )


SSE = ServerSentEventGenerator
