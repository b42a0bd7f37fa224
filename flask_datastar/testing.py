"""Read Server-Sent Event streams in tests.

A parser for the ``text/event-stream`` format and a helper that iterates an endless
streamed response from Flask's test client, for applications' own tests::

    from flask_datastar.testing import iter_events

    def test_counter(client):
        response = client.get("/updates", buffered=False)
        first, second = iter_events(response, limit=2)
        assert first.event == "datastar-patch-elements"
        assert first.selector == "#counter"

This module depends on the standard library only, so it works with any WSGI test client
and any server that speaks the format.
"""

from __future__ import annotations

import codecs
import json
import time
from collections.abc import Generator, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "SSEParser",
    "ServerSentEvent",
    "StreamingResponse",
    "iter_events",
    "parse_events",
]


@dataclass(frozen=True)
class ServerSentEvent:
    """One event read from a stream, with accessors for Datastar's ``key value`` data lines.

    :param event: The event type; ``"message"`` when the block had no ``event`` field.
    :param id: The ``id`` field of this block, or ``None`` when the block had none. Unlike a
        browser's ``lastEventId`` it does not carry over from earlier events; see
        :attr:`SSEParser.last_event_id` for that.
    :param retry: The ``retry`` field of this block in milliseconds, or ``None``.
    :param data: The value of each ``data`` line, in order.
    """

    event: str = "message"
    id: str | None = None
    retry: int | None = None
    data: list[str] = field(default_factory=list)

    def datalines(self, key: str) -> list[str]:
        """Return the values of the ``data: <key> <value>`` lines for one key, in order.

        A line matches only when the key is followed by a space, as the protocol requires
        even for an empty value, so a bare ``data: elements`` is not an ``elements`` line.

        :param key: The Datastar data key, such as ``"elements"`` or ``"selector"``.
        """
        prefix = f"{key} "
        return [line[len(prefix) :] for line in self.data if line.startswith(prefix)]

    def datavalue(self, key: str) -> str | None:
        """Return the lines of one key joined by ``"\\n"``, as the Datastar client reads them.

        :param key: The Datastar data key.
        :return: ``None`` when the event has no line for the key.
        """
        lines = self.datalines(key)
        return "\n".join(lines) if lines else None

    @property
    def elements(self) -> str | None:
        """The HTML of a ``datastar-patch-elements`` event, its lines joined by ``"\\n"``."""
        return self.datavalue("elements")

    @property
    def selector(self) -> str | None:
        """The ``selector`` value, or ``None`` when the event targets elements by id."""
        return self.datavalue("selector")

    @property
    def mode(self) -> str | None:
        """The ``mode`` value as sent; ``None`` means the client's default, ``outer``."""
        return self.datavalue("mode")

    @property
    def signals(self) -> Any:
        """The JSON of the ``signals`` lines, decoded, or ``None`` when there are none.

        :raises json.JSONDecodeError: The joined lines are not valid JSON.
        """
        raw = self.datavalue("signals")
        return None if raw is None else json.loads(raw)


class SSEParser:
    """Turn a ``text/event-stream`` body, fed in pieces of any size, into events.

    Follows the WHATWG HTML "event stream interpretation" rules: lines end in ``\\r\\n``,
    ``\\r`` or ``\\n`` (also when the two bytes of ``\\r\\n`` arrive in separate pieces);
    a leading byte order mark is dropped; lines starting with ``:`` are comments; a line
    without a colon is a field with an empty value; one space after the colon is removed;
    ``retry`` is kept only when it is all ASCII digits and ``id`` only when it holds no
    NUL; unknown fields are ignored; a blank line ends the event.

    Intentional divergences, chosen so tests see what the server really sent:

    - A block with an ``event`` field but no ``data`` is returned (a browser's
      ``EventSource`` drops it); a block with neither, such as a lone ``retry:`` or
      ``id:`` sent to flush headers, returns nothing but updates :attr:`retry` and
      :attr:`last_event_id`.
    - Bytes must be valid UTF-8; invalid bytes raise :class:`UnicodeDecodeError` instead
      of becoming U+FFFD.

    An event not yet ended by a blank line is held back until it is, and dropped if the
    stream ends first, as a browser does; :attr:`has_pending` tells whether that is so.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
        self._buffer = ""
        self._at_stream_start = True
        # A piece that ended in "\r" may be followed by the "\n" of the same line ending.
        self._skip_lf = False
        self._event_type: str | None = None
        self._event_id: str | None = None
        self._event_retry: int | None = None
        self._data: list[str] = []
        self._event_started = False
        self.comments = 0
        """How many comment lines (heartbeats) have been read."""
        self.last_event_id: str | None = None
        """The last ``id`` seen, kept across events as a browser keeps it."""
        self.retry: int | None = None
        """The last valid ``retry`` value seen, in milliseconds."""

    @property
    def has_pending(self) -> bool:
        """Whether a partial line or an event without its closing blank line is held."""
        return bool(self._buffer) or self._event_started

    def feed(self, chunk: bytes | str) -> list[ServerSentEvent]:
        """Parse the next piece of the stream and return the events it completed.

        :param chunk: Bytes (decoded as UTF-8, also across piece boundaries) or text.
        """
        text = self._decoder.decode(chunk) if isinstance(chunk, bytes) else chunk
        if self._at_stream_start and text:
            self._at_stream_start = False
            if text.startswith("\ufeff"):
                text = text[1:]
        if self._skip_lf and text:
            self._skip_lf = False
            if text.startswith("\n"):
                text = text[1:]
        self._buffer += text
        events: list[ServerSentEvent] = []
        start = 0
        buffer = self._buffer
        length = len(buffer)
        while start < length:
            cr = buffer.find("\r", start)
            lf = buffer.find("\n", start)
            if cr == -1 and lf == -1:
                break
            if cr == -1 or (lf != -1 and lf < cr):
                end, next_start = lf, lf + 1
            elif cr + 1 < length:
                end = cr
                next_start = cr + 2 if buffer[cr + 1] == "\n" else cr + 1
            else:
                end, next_start = cr, cr + 1
                self._skip_lf = True
            event = self._process_line(buffer[start:end])
            if event is not None:
                events.append(event)
            start = next_start
        self._buffer = buffer[start:]
        return events

    def _process_line(self, line: str) -> ServerSentEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            self.comments += 1
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event_type = value
        elif name == "data":
            self._data.append(value)
        elif name == "id":
            if "\0" not in value:
                self._event_id = value
                self.last_event_id = value
        elif name == "retry":
            if value.isascii() and value.isdigit():
                self._event_retry = int(value)
                self.retry = self._event_retry
        else:
            return None
        self._event_started = True
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        event: ServerSentEvent | None = None
        if self._data or self._event_type is not None:
            event = ServerSentEvent(
                event=self._event_type or "message",
                id=self._event_id,
                retry=self._event_retry,
                data=self._data,
            )
        self._event_type = None
        self._event_id = None
        self._event_retry = None
        self._data = []
        self._event_started = False
        return event


def parse_events(text: bytes | str) -> list[ServerSentEvent]:
    """Parse a whole stream body and return its complete events.

    :param text: The body; an event without its closing blank line is dropped.
    """
    return SSEParser().feed(text)


class StreamingResponse(Protocol):
    """A response whose body is an iterable, such as Flask's ``TestResponse``."""

    @property
    def response(self) -> Iterable[bytes | str]:
        """The body iterable, which the WSGI application returned."""
        ...  # pragma: no cover

    def close(self) -> None:
        """Close the body iterable."""
        ...  # pragma: no cover


def iter_events(
    response: StreamingResponse,
    limit: int | None = None,
    timeout: float | None = 10.0,
) -> Generator[ServerSentEvent, None, None]:
    """Yield the events of a streamed response, then close it.

    Reads ``response.response`` piece by piece and never ``response.data``, which would
    wait for an endless stream to end. The response is closed when the iteration stops
    for any reason (the limit, a ``break``, an error, the generator being discarded), so
    the application's generator gets :class:`GeneratorExit` at its ``yield`` and its
    ``finally`` blocks run before this returns control::

        response = client.get("/updates", buffered=False)
        events = list(iter_events(response, limit=3))

    :param response: A test client response made with ``buffered=False``.
    :param limit: Stop after this many events; ``None`` reads until the stream ends.
    :param timeout: Seconds the whole iteration may take, or ``None`` for no bound. The
        pieces are read in the calling thread, so the time is checked after each piece:
        a stream that blocks without sending anything, not even a heartbeat, blocks this
        too.
    :raises TimeoutError: The time ran out before ``limit`` events arrived.
    """
    parser = SSEParser()
    deadline = None if timeout is None else time.monotonic() + timeout
    count = 0
    try:
        if limit is not None and limit <= 0:
            return
        for piece in response.response:
            for event in parser.feed(piece):
                yield event
                count += 1
                if limit is not None and count >= limit:
                    return
            if deadline is not None and time.monotonic() >= deadline:
                wanted = "the end of the stream" if limit is None else f"{limit} events"
                raise TimeoutError(
                    f"Waited {timeout} s for {wanted} but got {count} event(s). Check that"
                    " the view sends what the test waits for, or raise 'timeout'."
                )
    finally:
        response.close()
