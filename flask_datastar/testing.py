"""Test applications' own streams: readers, a live gunicorn server, and the clean-up.

- :func:`open_stream` reads a stream of Flask's test client on a thread of its own, so
  every wait has a real timeout (heartbeats or not) and any number of streams close in
  any order;
- :class:`LiveServer` runs the application under real gunicorn gthread on a free port,
  for end-to-end tests, and reads its streams over real HTTP;
- :class:`Cleanup` ends what a test left running: readers, streams, registries' threads;
- :class:`SSEParser`, :func:`parse_events` and :func:`iter_events` parse the
  ``text/event-stream`` format from any source.

The pytest plugin ``flask_datastar.pytest_plugin`` (loaded by itself once
flask_datastar is installed) makes fixtures of these::

    def test_counter(client, datastar_stream):
        stream = datastar_stream(client, "/updates")
        assert stream.next_event(timeout=1).selector == "#counter"
"""

from __future__ import annotations

import codecs
import functools
import http.client
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from flask import Flask, appcontext_pushed
from flask.testing import FlaskClient

from .registry import SSERegistry
from .stream import Stream, open_streams

__all__ = [
    "Cleanup",
    "LiveResponse",
    "LiveServer",
    "SSEParser",
    "ServerSentEvent",
    "StreamEnded",
    "StreamReader",
    "StreamingResponse",
    "iter_events",
    "open_stream",
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
        too. :func:`open_stream` has real timeouts.
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


# -- readers with real timeouts -----------------------------------------------------------


class StreamEnded(EOFError):
    """Raised by :meth:`StreamReader.next_event` when the stream has ended.

    When the stream ended with an error (the handler raised, the connection broke), that
    error is its ``__cause__``.
    """


class _End:
    """What a reader's thread queues last."""


_END = _End()


class StreamReader:
    """An open event stream, read on a thread of its own.

    The thread feeds the events into a queue, so :meth:`next_event` waits for exactly its
    timeout whether or not the server sends heartbeats, and the stream can be closed from
    the test at any moment, in any order with other streams. Made by :func:`open_stream`
    (Flask's test client) and :meth:`LiveServer.stream` (real HTTP); a ``with`` block
    closes it.

    :param path: The path the stream was opened at, for messages.
    :param timeout: The default of every wait, in seconds.
    """

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        #: The HTTP status of the response.
        self.status_code = 0
        #: The response headers, names in lower case.
        self.headers: dict[str, str] = {}
        #: The flask_datastar stream serving this reader, when it is in this process.
        self.stream: Stream | None = None
        #: Every event taken with :meth:`next_event` so far, in order.
        self.received: list[ServerSentEvent] = []
        self._queue: queue.SimpleQueue[ServerSentEvent | _End] = queue.SimpleQueue()
        self._parser = SSEParser()
        self._ended = False
        self._error: BaseException | None = None
        self._error_seen = False
        self._closing = False
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        state = "ended" if self._ended else "open"
        return f"<{type(self).__name__} {self.path!r} {state}>"

    @property
    def comments(self) -> int:
        """How many comment lines (heartbeats) have arrived so far."""
        return self._parser.comments

    def wait_ended(self, timeout: float | None = None) -> bool:
        """Wait until the response has ended by itself; return whether it has.

        The events it sent may still wait to be taken with :meth:`next_event`.

        :param timeout: Seconds to wait; the reader's default when ``None``.
        """
        if self._thread is not None:
            self._thread.join(self.timeout if timeout is None else timeout)
        return self.ended

    def _start(self, target: Callable[[], None]) -> None:
        def run() -> None:
            try:
                target()
            except BaseException as e:  # handed to the test thread, never lost
                if not self._closing:
                    self._error = e
            finally:
                self._queue.put(_END)

        self._thread = threading.Thread(
            target=run, name=f"flask_datastar-test-reader {self.path}", daemon=True
        )
        self._thread.start()

    def _feed(self, piece: bytes | str) -> None:
        for event in self._parser.feed(piece):
            self._queue.put(event)

    def next_event(self, timeout: float | None = None) -> ServerSentEvent:
        """Wait for the next event and return it.

        :param timeout: Seconds to wait; the reader's default when ``None``.
        :raises TimeoutError: No event arrived in time.
        :raises StreamEnded: The stream has ended and every event was taken.
        """
        if not self._ended:
            wait = self.timeout if timeout is None else timeout
            try:
                item = self._queue.get(timeout=max(wait, 0.0))
            except queue.Empty:
                raise TimeoutError(
                    f"No event arrived on {self.path!r} within {wait} s"
                    f" ({len(self.received)} read before). Check that the application"
                    " sends what the test waits for, or raise the timeout."
                ) from None
            if not isinstance(item, _End):
                self.received.append(item)
                return item
            self._ended = True
        self._error_seen = True
        message = f"The stream {self.path!r} has ended after {len(self.received)} event(s)"
        if self._error is not None:
            raise StreamEnded(f"{message}, with an error.") from self._error
        raise StreamEnded(f"{message}.")

    def events(self, count: int, timeout: float | None = None) -> list[ServerSentEvent]:
        """Wait for the next *count* events and return them.

        :param count: How many events.
        :param timeout: Seconds for all of them; the reader's default when ``None``.
        :raises TimeoutError: They did not all arrive in time.
        :raises StreamEnded: The stream ended first.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        return [self.next_event(deadline - time.monotonic()) for _ in range(count)]

    def wait_for(
        self, predicate: Callable[[ServerSentEvent], bool], timeout: float | None = None
    ) -> ServerSentEvent:
        """Skip events until one satisfies *predicate*, and return it.

        :param predicate: Called with each event.
        :param timeout: Seconds to wait in all; the reader's default when ``None``.
        :raises TimeoutError: No such event arrived in time.
        :raises StreamEnded: The stream ended first.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            event = self.next_event(deadline - time.monotonic())
            if predicate(event):
                return event

    def __iter__(self) -> Iterator[ServerSentEvent]:
        """Yield the events until the stream ends, each within the default timeout."""
        while True:
            try:
                yield self.next_event()
            except StreamEnded:
                return

    @property
    def ended(self) -> bool:
        """Whether the response has ended (its events may still wait to be taken)."""
        return self._thread is not None and not self._thread.is_alive()

    def _stop(self) -> None:
        """Make the reading thread stop (called by :meth:`close`)."""
        raise NotImplementedError

    def close(self, timeout: float = 5.0) -> None:
        """End the stream, as when a tab goes away, and wait until its thread is done.

        The application's ``on_disconnect`` hooks have run when this returns. Safe to
        call more than once.

        :param timeout: Seconds to wait for the stream to end.
        :raises RuntimeError: The stream did not end in time (a handler that blocks
            between its ``yield`` statements), or it failed with an error that the test
            never saw through :meth:`next_event`.
        """
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._closing = True
            self._stop()
            thread.join(timeout)
            if thread.is_alive():
                raise RuntimeError(
                    f"The stream {self.path!r} did not end within {timeout} s of being"
                    f" closed: {self._why_stuck()}"
                )
        self._closed()
        if self._error is not None and not self._error_seen:
            self._error_seen = True
            raise RuntimeError(f"The stream {self.path!r} failed: {self._error!r}") from (
                self._error
            )

    def _closed(self) -> None:
        """Release what the reader holds once its thread is done."""

    def _why_stuck(self) -> str:
        """Say why the stream may not have ended when it was closed, and what to do."""
        return (
            "its handler blocks between two 'yield' statements. Pause with"
            " 'yield gen.sleep(seconds)', which a close interrupts."
        )

    def __enter__(self) -> StreamReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


#: The environ key that tells a reader's request apart, to find its stream.
_READER_KEY = "flask_datastar.testing.reader"


class _ClientStreamReader(StreamReader):
    """A stream of Flask's test client, requested and read on the reader's thread.

    The request is made on that thread too: Flask pushes the request context where the
    response is first iterated and pops it where it is closed, so a response read by one
    thread and closed by another, or two responses in one thread closed in the wrong
    order, break the context stack ("Popped wrong request context").
    """

    def __init__(self, client: FlaskClient, path: str, timeout: float, **kwargs: Any) -> None:
        super().__init__(path, timeout)
        self._client = client
        self._kwargs = kwargs
        self._opened = threading.Event()
        self._response: Any = None

    def _open(self, open_timeout: float) -> None:
        self._start(self._run)
        if not self._opened.wait(open_timeout):
            self._closing = True
            raise TimeoutError(
                f"The view of {self.path!r} did not return a response within {open_timeout} s."
            )
        if self._response is None:
            # The request failed (TESTING propagates the view's errors): the thread is
            # ending with the error.
            assert self._thread is not None
            self._thread.join()
            self._error_seen = True
            assert self._error is not None
            raise self._error

    def _run(self) -> None:
        token = object()
        kwargs = dict(self._kwargs)
        kwargs["environ_overrides"] = {**kwargs.get("environ_overrides", {}), _READER_KEY: token}
        try:
            response = self._client.open(self.path, buffered=False, **kwargs)
            self.status_code = response.status_code
            self.headers = {name.lower(): value for name, value in response.headers.items()}
            self.stream = next(
                (s for s in open_streams() if s.environ.get(_READER_KEY) is token), None
            )
            self._response = response
        finally:
            self._opened.set()
        try:
            for piece in response.response:
                self._feed(piece)
                if self._closing and self.stream is None:
                    break  # not a flask_datastar stream: it cannot be told to end sooner
        finally:
            response.close()

    def _why_stuck(self) -> str:
        if self.stream is None:
            return (
                "it is not a flask_datastar stream, which a reader can only leave after"
                " its next piece. Have the response end, or send more."
            )
        return super()._why_stuck()

    def _stop(self) -> None:
        if self.stream is not None:
            # The stream's own loop wakes up, ends the response, and the thread closes it.
            self.stream.close()


def open_stream(
    client: FlaskClient,
    path: str,
    *,
    method: str = "GET",
    signals: Mapping[str, Any] | None = None,
    timeout: float = 5.0,
    **kwargs: Any,
) -> StreamReader:
    """Open a stream with Flask's test client and read it on a thread of its own.

    Returns once the view has answered (its ``on_connect`` hooks have run)::

        stream = open_stream(client, "/sse")
        assert stream.next_event(timeout=1).elements == '<p id="count">0</p>'
        stream.close()

    Close every reader, in any order (the ``datastar_stream`` fixture and
    :class:`Cleanup` do it for you). Do not open streams inside a ``with client:``
    block, whose preserved contexts belong to the test's thread.

    :param client: The test client, such as ``app.test_client()``.
    :param path: The URL path, with its query string if any.
    :param method: The HTTP method.
    :param signals: Datastar signals to send as the client does: in the ``datastar``
        query parameter of a ``GET``, as the JSON body otherwise.
    :param timeout: The default timeout of the reader's waits, and of the view's answer.
    :param kwargs: More arguments for ``client.open`` (``headers``, ``query_string``...).
    :raises TimeoutError: The view did not answer in time.
    """
    kwargs.setdefault("headers", {})
    headers = dict(kwargs["headers"])
    headers.setdefault("Datastar-Request", "true")
    kwargs["headers"] = headers
    if signals is not None:
        if method.upper() == "GET":
            query = dict(kwargs.get("query_string") or {})
            query["datastar"] = json.dumps(signals)
            kwargs["query_string"] = query
        else:
            kwargs["json"] = signals
    reader = _ClientStreamReader(client, path, timeout, method=method, **kwargs)
    reader._open(timeout)
    return reader


# -- the clean-up --------------------------------------------------------------------------


class Cleanup:
    """End what a test left running: readers, live servers, streams, registries' threads.

    Everything opened through :meth:`open_stream` and :meth:`live_server` is closed by
    :meth:`close`, in any order, and so is every flask_datastar stream opened in this
    process since the clean-up was made. The registries of every app whose context was
    pushed meanwhile (each request of the test client pushes one) and of those streams
    get their broadcaster thread stopped, so no thread outlives the test. The
    ``datastar_cleanup`` fixture is one of these; without pytest::

        with Cleanup() as cleanup:
            stream = cleanup.open_stream(client, "/sse")
            ...

    :param timeout: Seconds each stream and each registry may take to finish.
    """

    def __init__(self, timeout: float = 5.0) -> None:
        self.timeout = timeout
        self._before = set(open_streams())
        self._apps: weakref.WeakSet[Flask] = weakref.WeakSet()
        self._registries: list[SSERegistry] = []
        self._readers: list[StreamReader] = []
        self._servers: list[LiveServer] = []
        self._callbacks: list[Callable[[], object]] = []
        self._closed = False
        appcontext_pushed.connect(self._app_seen)

    def _app_seen(self, sender: Flask, **extra: Any) -> None:
        self._apps.add(sender)

    def add(self, item: Flask | SSERegistry | StreamReader | Callable[[], object]) -> None:
        """Have :meth:`close` take care of one more thing.

        :param item: An app (its registries are closed), a registry, a reader, or a
            function to call (after everything else).
        """
        if isinstance(item, Flask):
            self._apps.add(item)
        elif isinstance(item, SSERegistry):
            self._registries.append(item)
        elif isinstance(item, StreamReader):
            self._readers.append(item)
        elif callable(item):
            self._callbacks.append(item)
        else:
            raise TypeError(
                f"Cleanup.add takes an app, a registry, a reader or a function, not"
                f" {type(item).__name__}."
            )

    def open_stream(self, client: FlaskClient, path: str, **kwargs: Any) -> StreamReader:
        """:func:`open_stream`, closed by :meth:`close`; the arguments are the same."""
        self._apps.add(client.application)
        reader = open_stream(client, path, **kwargs)
        self._readers.append(reader)
        return reader

    def live_server(self, app: str, **kwargs: Any) -> LiveServer:
        """Start a :class:`LiveServer`, stopped by :meth:`close`; the arguments are the same."""
        server = LiveServer(app, **kwargs)
        self._servers.append(server)
        server.start()
        return server

    def close(self) -> None:
        """Close and stop everything; safe to call more than once.

        :raises RuntimeError: Something did not end in time, or a stream failed with an
            error that the test never saw; everything else is closed all the same.
        """
        if self._closed:
            return
        self._closed = True
        appcontext_pushed.disconnect(self._app_seen)
        errors: list[BaseException] = []

        def attempt(step: Callable[[], object]) -> None:
            try:
                step()
            except Exception as e:
                errors.append(e)

        # Readers first: each ends its own stream, which runs the app's on_disconnect.
        for reader in self._readers:
            attempt(functools.partial(reader.close, self.timeout))
        for server in self._servers:
            attempt(server.stop)
        streams = [stream for stream in open_streams() if stream not in self._before]
        registries: dict[int, SSERegistry] = {id(r): r for r in self._registries}
        for stream in streams:
            registries.update((id(r), r) for r in list(stream._registries))
        for app in list(self._apps):
            state = app.extensions.get("datastar")
            registries.update((id(r), r) for r in list(getattr(state, "registries", {}).values()))
        for stream in streams:
            stream.close()
        for registry in registries.values():
            if not registry.close(self.timeout):
                errors.append(
                    RuntimeError(
                        f"The broadcaster thread of {registry!r} did not stop within"
                        f" {self.timeout} s: a send blocked."
                    )
                )
        # Whatever else runs threads for the app (schedulers) is stopped here too.
        for callback in self._callbacks:
            attempt(callback)
        if len(errors) == 1:
            raise errors[0]
        if errors:
            raise RuntimeError(
                "Cleaning up failed in several ways: " + "; ".join(map(str, errors))
            ) from errors[0]

    def __enter__(self) -> Cleanup:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# -- a live server -------------------------------------------------------------------------


@dataclass(frozen=True)
class LiveResponse:
    """The whole answer to a request made with :meth:`LiveServer.request`.

    :param status: The HTTP status.
    :param headers: The headers, names in lower case (repeated ones joined by ``", "``).
    :param body: The body.
    """

    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        """The body decoded as UTF-8."""
        return self.body.decode("utf-8")

    @property
    def events(self) -> list[ServerSentEvent]:
        """The events of a ``text/event-stream`` body."""
        return parse_events(self.body)


def _header_dict(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in pairs:
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return headers


class _HTTPStreamReader(StreamReader):
    """A stream of a live server, read over a real HTTP/1.1 connection."""

    def __init__(self, port: int, path: str, headers: Mapping[str, str], timeout: float) -> None:
        super().__init__(path, timeout)
        self._conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            self._conn.request("GET", path, headers=dict(headers))
            sock = self._conn.sock  # before getresponse(), which may let go of it
            self._response = self._conn.getresponse()
        except BaseException:
            self._conn.close()
            raise
        assert isinstance(sock, socket.socket)
        self._sock = sock
        self.status_code = self._response.status
        self.headers = _header_dict(self._response.getheaders())
        # Waits have their timeouts in the test thread; this thread just blocks.
        sock.settimeout(None)
        self._start(self._run)

    def _run(self) -> None:
        while True:
            piece = self._response.read1(65536)
            if not piece:
                return
            self._feed(piece)

    def _stop(self) -> None:
        try:
            # Wakes the thread up in its read; the server sees the client go away.
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _closed(self) -> None:
        self._response.close()
        self._conn.close()


_READY_MARKER = "flask_datastar.testing: the application is loaded in worker"

# gunicorn logs "Booting worker" before the worker imports the application, so an app
# that fails to import would look ready: post_worker_init, which runs after the import,
# logs a line. Without a config file of the user's, the hooks the deployment guide sets
# (the stream cap and a prompt drain on stop) are set.
_CONFIG_TEMPLATE = """\
# Written by flask_datastar.testing.LiveServer.
import runpy as _runpy

_config = {config!r}
_settings = _runpy.run_path(_config) if _config else {{}}
globals().update({{k: v for k, v in _settings.items() if not k.startswith("__")}})
if _config is None:
    from flask_datastar.gunicorn import post_worker_init as _post_worker_init, worker_exit
else:
    _post_worker_init = _settings.get("post_worker_init")


def post_worker_init(worker):
    if _post_worker_init is not None:
        _post_worker_init(worker)
    worker.log.info("{marker} %s", worker.pid)
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _no_control_socket() -> list[str]:
    """Return the option that turns gunicorn's control socket off, where it has one.

    Recent gunicorn releases listen on ``~/.gunicorn/gunicorn.ctl`` by default: servers
    running side by side (tests in parallel) would fight over it.
    """
    config = __import__("gunicorn.config").config
    for setting in getattr(config, "KNOWN_SETTINGS", ()):
        if "--no-control-socket" in (getattr(setting, "cli", None) or ()):
            return ["--no-control-socket"]
    return []


class LiveServer:
    """The application under real gunicorn gthread workers on a free ``127.0.0.1`` port.

    For end-to-end tests of what only a real server does (the direct socket path, the
    stream cap, a client going away)::

        with LiveServer("myapp:create_app()") as server:
            with server.stream("/sse") as stream:
                server.post("/click")
                assert stream.next_event(timeout=2).elements == '<p id="count">1</p>'

    The server runs in a process group of its own and :meth:`stop` ends the whole group.
    Its output goes to a temporary file, quoted by the errors raised here and returned
    by :meth:`log_text`.

    :param app: The application as gunicorn takes it: ``"module:app"``, or
        ``"module:create_app()"`` for a factory.
    :param threads: Threads per worker; each open stream holds one.
    :param workers: Worker processes.
    :param env: Variables set over ``os.environ`` for the server.
    :param cwd: The server's working directory; the current one when ``None``. This
        and the other paths may also be path objects.
    :param pythonpath: Folders put first on the server's ``PYTHONPATH``, after which
        come *cwd* and the inherited ``PYTHONPATH``.
    :param config: A gunicorn config file of the application's own, relative to *cwd*;
        its settings and hooks apply (command line options such as the port win).
        Without it, the hooks of :mod:`flask_datastar.gunicorn` are set.
    :param args: More gunicorn command line options.
    :param startup_timeout: Seconds to wait for every worker to load the application.
    """

    def __init__(
        self,
        app: str,
        *,
        threads: int = 8,
        workers: int = 1,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        pythonpath: Sequence[str] = (),
        config: str | None = None,
        args: Sequence[str] = (),
        startup_timeout: float = 30.0,
    ) -> None:
        self.app = app
        self.threads = threads
        self.workers = workers
        self.env = dict(env or {})
        self.cwd = Path(cwd if cwd is not None else os.getcwd()).resolve()
        self.pythonpath = [os.fspath(path) for path in pythonpath]
        self.config = None if config is None else (self.cwd / config).resolve()
        self.args = list(args)
        self.startup_timeout = startup_timeout
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._log = ""
        self._readers: list[StreamReader] = []

    def __repr__(self) -> str:
        return f"<LiveServer {self.app!r} at {self.url}>"

    @property
    def url(self) -> str:
        """The base URL, such as ``http://127.0.0.1:40123``, without a trailing slash."""
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        """Return what the server has written to its output, also once it has stopped."""
        if self._dir is None:
            return self._log
        path = Path(self._dir.name) / "gunicorn.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> None:
        """Start gunicorn and return once every worker has loaded the application.

        :raises RuntimeError: gunicorn is not installed, or the server exited or was
            not ready in time; the message quotes its output.
        """
        try:
            __import__("gunicorn")
        except ImportError:
            raise RuntimeError(
                "The live server runs the application under gunicorn, which is not"
                " installed: pip install 'flask_datastar[gunicorn]'."
            ) from None
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("The live server is already running; call 'stop()' first.")
        self._dir = tempfile.TemporaryDirectory(prefix="flask_datastar-live-")
        self._log = ""
        try:
            for _ in range(5):
                if self._start_once():
                    return
            raise RuntimeError(
                f"No free port was found for gunicorn. Its output:\n{self.log_text()}"
            )
        except BaseException:
            self.stop()
            raise

    def _command(self, config_file: Path) -> list[str]:
        return [
            sys.executable, "-m", "gunicorn",
            "--worker-class", "gthread",
            "--workers", str(self.workers),
            "--threads", str(self.threads),
            "--bind", f"127.0.0.1:{self.port}",
            "--graceful-timeout", "3",
            "--config", str(config_file),
            *_no_control_socket(),
            *self.args,
            self.app,
        ]  # fmt: skip

    def _start_once(self) -> bool:
        """Start on a free port; return ``False`` when another process took the port."""
        assert self._dir is not None
        folder = Path(self._dir.name)
        config_file = folder / "gunicorn_live.conf.py"
        config = None if self.config is None else str(self.config)
        config_file.write_text(_CONFIG_TEMPLATE.format(config=config, marker=_READY_MARKER))
        log_path = folder / "gunicorn.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        paths = [*self.pythonpath, str(self.cwd), *env.get("PYTHONPATH", "").split(os.pathsep)]
        env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
        self.port = _free_port()
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self._command(config_file),
                cwd=self.cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.startup_timeout
        while True:
            with log_path.open("rb") as log:
                log.seek(offset)
                output = log.read().decode(errors="replace")
            if self.process.poll() is not None:
                if "Address already in use" in output or "Connection in use" in output:
                    return False
                raise RuntimeError(
                    f"gunicorn exited with status {self.process.returncode} while starting"
                    f" {self.app!r}. Its output:\n{output}"
                )
            if output.count(_READY_MARKER) >= self.workers and _accepts(self.port):
                return True
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"gunicorn did not load {self.app!r} in {self.workers} worker(s) within"
                    f" {self.startup_timeout} s. Its output:\n{output}"
                )
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        """Close the readers, stop the server and every process of its group; safe to repeat.

        :param timeout: Seconds gunicorn has to stop before its processes are killed.
        """
        for reader in self._readers:
            try:
                reader.close()
            except RuntimeError:
                pass  # a failed stream of a server that is going away
        process = self.process
        if process is not None and process.returncode is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    break  # the whole group is gone
                try:
                    process.wait(timeout)
                    # The master is gone; a worker it left behind goes with the group.
                    if sig == signal.SIGTERM:
                        os.killpg(process.pid, signal.SIGKILL)
                    break
                except subprocess.TimeoutExpired:
                    continue
                except ProcessLookupError:
                    break
            process.wait()
        if self._dir is not None:
            self._log = self.log_text()
            self._dir.cleanup()
            self._dir = None

    def stream(
        self,
        path: str,
        *,
        signals: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 5.0,
    ) -> StreamReader:
        """Open a stream over HTTP, as the Datastar client does, and read it on a thread.

        :param path: The URL path, with its query string if any.
        :param signals: Signals to send in the ``datastar`` query parameter.
        :param headers: More request headers.
        :param timeout: The default timeout of the reader's waits, and of the answer.
        """
        if signals is not None:
            separator = "&" if "?" in path else "?"
            path += separator + urllib.parse.urlencode({"datastar": json.dumps(signals)})
        all_headers = {"Accept": "text/event-stream", "Datastar-Request": "true"}
        all_headers.update(headers or {})
        reader = _HTTPStreamReader(self.port, path, all_headers, timeout)
        self._readers.append(reader)
        return reader

    def request(
        self,
        method: str,
        path: str,
        *,
        signals: Mapping[str, Any] | None = None,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
    ) -> LiveResponse:
        """Make one request, as the Datastar client does, and return the whole answer.

        :param method: The HTTP method.
        :param path: The URL path, with its query string if any.
        :param signals: Signals to send as the JSON body.
        :param data: The body, instead of *signals*.
        :param headers: More request headers.
        :param timeout: Seconds to wait for the answer.
        """
        all_headers = {"Datastar-Request": "true"}
        if signals is not None:
            data = json.dumps(signals).encode()
            all_headers["Content-Type"] = "application/json"
        all_headers.update(headers or {})
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=data, headers=all_headers)
            response = conn.getresponse()
            return LiveResponse(
                response.status, _header_dict(response.getheaders()), response.read()
            )
        finally:
            conn.close()

    def post(self, path: str, **kwargs: Any) -> LiveResponse:
        """Make a ``POST`` request; the arguments are those of :meth:`request`."""
        return self.request("POST", path, **kwargs)

    def __enter__(self) -> LiveServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
