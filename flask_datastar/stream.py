"""One Server-Sent Event stream: the ``gen`` object, its life cycle and ``with_sse``.

A :class:`Stream` lives inside the response iterator that the WSGI server
runs on its own thread (the *owner* thread; under gunicorn gthread, one pool
thread). The handler runs on that thread too, one step at a time: it sends
with ``gen.patch_elements(...)`` and pauses with ``yield gen.sleep(seconds)``,
during which events sent from other threads (broadcasts) still reach the
client at once. No extra thread is started per stream.

The life of a stream:

1. ``on_connect(gen)`` runs; what it sends (and any broadcast that reaches the
   stream from then on) is buffered.
2. The first chunk goes out through the server, with the headers: what was
   buffered, or a comment line.
3. The stream takes its transport: the direct socket path where the framing is
   known (gunicorn, plain HTTP/1.1), the portable queue path elsewhere
   (see :mod:`flask_datastar.transport`).
4. The handler runs; a heartbeat comment is written whenever nothing else was
   sent for ``heartbeat`` seconds.
5. The stream ends when the handler returns or raises, the client leaves, or
   :meth:`Stream.close` is called; ``on_disconnect(gen)`` then runs exactly once.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import metrics, selfcheck
from .scheduler import Job, scheduler
from .sse import (
    ElementPatchMode,
    ElementPatchNamespace,
    Elements,
    ServerSentEventGenerator,
    Signals,
    comment,
)
from .transport import (
    DIRECT_WRITES_SUPPORTED,
    Chunk,
    QueueTransport,
    SocketTransport,
    SocketWatcher,
    TransportClosed,
    _probe,
    acknowledged,
    direct_socket,
    wait_writable,
)

if TYPE_CHECKING:
    from .compression import Encoder
    from .registry import SSERegistry

__all__ = [
    "Sleep",
    "Stream",
    "StreamClosed",
    "StreamConfig",
    "check_event",
    "close_all_streams",
    "drain_streams",
    "open_streams",
    "with_sse",
]

log = logging.getLogger(__name__)

_HEARTBEAT = Chunk(comment())


class StreamClosed(ConnectionError):
    """Raised when sending on a stream that has ended.

    Inside a handler it needs no catching when it comes from the handler's own
    stream: that stream has ended, and the handler ends quietly with it. Raised
    by *another* stream (the handler wrote to a peer that left), it is an
    error like any other, and ends the handler's stream too.

    :param message: what happened.
    :param stream: the stream that has ended.
    """

    def __init__(self, message: str = "", stream: Stream | None = None) -> None:
        super().__init__(message)
        self.stream = stream


def check_event(event: str | bytes) -> None:
    """Raise :class:`ValueError` unless *event* is the text of whole events.

    An event ends with a blank line. Text without one would be merged by the
    client with whatever comes next, and an empty event would be framed as the
    end of the response: both are refused where they are sent, not on the wire.

    :param event: the text to send.
    """
    if isinstance(event, bytes):
        complete = event.endswith((b"\n\n", b"\r\r", b"\r\n\r\n"))
    elif isinstance(event, str):
        complete = event.endswith(("\n\n", "\r\r", "\r\n\r\n"))
    else:
        raise TypeError(
            f"An event is text (str or bytes), not {type(event).__name__}; build it with"
            " 'SSE.patch_elements(...)' and friends."
        )
    if not event:
        raise ValueError(
            "Cannot send an empty event; build events with 'SSE.patch_elements(...)' and"
            " friends, and skip the send when there is nothing to say."
        )
    if not complete:
        preview = event[-40:]
        raise ValueError(
            f"Cannot send {preview!r}: an event must end with a blank line ('\\n\\n')."
            " Build events with 'SSE.patch_elements(...)' and friends."
        )


@functools.lru_cache(maxsize=128, typed=True)
def _chunk_of(event: str | bytes) -> Chunk:
    """The checked and encoded chunk of *event*; the last few are kept, as they repeat."""
    check_event(event)
    return Chunk(event)


@dataclass(frozen=True)
class StreamConfig:
    """The settings a stream runs with (``DATASTAR_*`` keys, read once by the extension).

    :param heartbeat: seconds of silence after which a comment line is sent;
        ``0`` turns heartbeats off.
    :param max_backlog: bytes that may wait for a client that does not read
        before its stream is ended.
    :param direct_writes: allow the direct socket path where it is safe.
    :param send_timeout: seconds the stream's own thread waits for a slow
        client to take its backlog (also at a normal end), and the TCP user
        timeout of the connection: a client that acknowledges nothing for
        that long is gone.
    :param release_threads: on the direct path under gunicorn, give the
        server's thread back once the handler first pauses (the stream then
        holds a socket, not a thread).
    :param max_lifetime: end a stream after about this many seconds (between
        80 % and 100 % of it, at random), abruptly, so that its client
        reconnects: tabs spread over the workers again after a scale-out.
        ``None``: streams live as long as their tabs.
    :param retry: ``(low, high)`` milliseconds: each stream first tells its
        client a random reconnection delay in that range (``retry:``), so
        that the tabs of a worker that dies do not all come back at once.
        ``None``: the client's default (1 s).
    """

    heartbeat: float = 15.0
    max_backlog: int = 64 * 1024
    direct_writes: bool = True
    send_timeout: float = 30.0
    release_threads: bool = True
    max_lifetime: float | None = None
    retry: tuple[int, int] | None = None


class Sleep:
    """A pause in a handler, returned by :meth:`Stream.sleep` and yielded by the handler."""

    __slots__ = ("seconds",)

    def __init__(self, seconds: float | None) -> None:
        if seconds is not None:
            # a float here, in the handler, as time.sleep() takes it (a
            # Decimal, a huge int): a due time that failed later in a scheduled step
            # left the stream open and silent for good.
            if isinstance(seconds, (str, bytes)):
                raise TypeError(f"A pause is a number of seconds, not {seconds!r}.")
            seconds = float(seconds)
            # "not >= 0" also refuses NaN (float("nan") from a query
            # string), which as a due time stopped the timer of every stream.
            if not seconds >= 0:
                raise ValueError(f"Cannot sleep for {seconds!r} seconds: a pause is 0 or more.")
        self.seconds = seconds

    def __repr__(self) -> str:
        return f"<Sleep {self.seconds!r}>"


#: An ``on_connect`` or ``on_disconnect`` function, called with the stream.
Hook = Callable[["Stream"], object]
#: What a handler may yield: an event to send, a pause, or ``None`` (a checkpoint).
HandlerItem = str | bytes | Sleep | None
#: A stream handler: called with the stream; a generator lives as long as it loops.
Handler = Callable[["Stream"], Iterable[HandlerItem] | None]


_open: set[Stream] = set()
_open_lock = threading.Lock()
# Per client (identity or address): the streams it holds in this process.
_by_client: dict[Any, int] = {}
# Streams that hold a server thread for their whole life (own_thread, or the
# queue path), counted against the thread limit.
_thread_held: list[int] = [0]
#: The stream whose context is current: the stream's steps and hooks run in it.
_current: contextvars.ContextVar[Stream | None] = contextvars.ContextVar(
    "flask_datastar_stream", default=None
)
# A stream's phases on the scheduler.
_RUNNING, _CLOSING, _DONE = 0, 1, 2


_process_limit: list[int | None] = [None]
_thread_limit: list[int | None] = [None]


def set_process_stream_limit(limit: int | None, threads: int | None = None) -> None:
    """Set how many streams this process may hold when ``DATASTAR_MAX_STREAMS`` is unset.

    The gunicorn hooks set them from the worker: the file descriptors it may
    open for streams that hold no thread, and ``--threads`` less a reserve for
    the streams that keep one (``own_thread=True``, or the portable path).

    :param limit: the number of streams, or ``None`` for no limit.
    :param threads: the number of those that may hold a server thread, or
        ``None`` for no such limit.
    """
    _process_limit[0] = limit
    _thread_limit[0] = threads


def process_stream_limit() -> int | None:
    """Return the limit set by :func:`set_process_stream_limit`."""
    return _process_limit[0]


def process_thread_limit() -> int | None:
    """Return the thread limit set by :func:`set_process_stream_limit`."""
    return _thread_limit[0]


def may_release(environ: Mapping[str, Any], config: StreamConfig) -> bool:
    """Whether a stream of this request can give its server thread back (see Stream._release).

    A prediction made in the view, for admission: the direct path under
    gunicorn, plain HTTP/1.1. A middleware that hides gunicorn's response
    object can still keep the stream on the portable path, holding a thread.
    """
    return (
        config.direct_writes
        and config.release_threads
        and DIRECT_WRITES_SUPPORTED
        and type(environ.get("gunicorn.socket")) is socket.socket
        and environ.get("SERVER_PROTOCOL") == "HTTP/1.1"
        and environ.get("REQUEST_METHOD") != "HEAD"
    )


def open_streams() -> list[Stream]:
    """Return the streams open in this process."""
    with _open_lock:
        return list(_open)


def close_all_streams(reconnect: bool = True, spread: float = 0.0) -> int:
    """End every stream open in this process, for a server shutting down.

    :param reconnect: end them so the clients reconnect (to another worker or
        to the restarted server) instead of ending cleanly.
    :param spread: with *reconnect*, give each client a random retry delay of
        up to this many seconds first, so they do not all come back at once.
    :return: the number of streams ended.
    """
    streams = open_streams()
    for stream in streams:
        if reconnect and spread > 0:
            stream._end_spread(spread)
        else:
            stream.close(reconnect=reconnect)
    return len(streams)


#: While this process stops: the retry spread of :func:`drain_streams`, else ``None``.
_draining: list[float | None] = [None]


def drain_streams(spread: float = 0.0) -> int:
    """End every stream of this process, now and from now on, so clients go elsewhere.

    For a worker that stops: each open stream is ended so that its client
    reconnects (to another worker), and every stream asked for after this call
    (a server still answers requests on kept-alive connections for a moment
    while it stops) is turned away the same way, before its handler runs.

    :param spread: give each client a random retry delay of up to this many
        seconds, so they do not all come back at once.
    :return: the number of streams ended now.
    """
    with _open_lock:  # before the snapshot: a stream admitted later sees the flag
        _draining[0] = spread
    return close_all_streams(reconnect=True, spread=spread)


class Stream:
    """One client's event stream: the ``gen`` that handlers and hooks receive.

    Every sending method may be called from any thread; events on one stream
    keep the order in which the calls were made. Sending on a stream that
    has ended raises :class:`StreamClosed`.

    Streams are made by :func:`~flask_datastar.sse_response` and the
    decorators, not directly.
    """

    # Thousands of them live at once: no per-instance __dict__.
    __slots__ = (
        "environ",
        "config",
        "key",
        "identity",
        "sent_events",
        "_on_connect",
        "_on_disconnect",
        "_lock",
        "_wake",
        "_done",
        "_transport",
        "_path",
        "_closed",
        "_abort",
        "_close_reason",
        "_disconnected",
        "_owner",
        "_last_write",
        "_pending_sleep",
        "_server_response",
        "_registries",
        "_started",
        "own_thread",
        "_context",
        "_ctx_lock",
        "_release_context",
        "_job",
        "_steps",
        "_wake_at",
        "_backlogged",
        "_phase",
        "_released",
        "_sock",
        "_close_deadline",
        "_end_written",
        "_error",
        "_client_key",
        "_holds_thread",
        "_expires_at",
        "_encoder",  # compression: this stream's compressor, or None
        "resumed",  # resume (issue 11): set by a registry with a replay log
        "_probed_at",
    )

    def __init__(
        self,
        environ: Mapping[str, Any],
        config: StreamConfig | None = None,
        on_connect: Hook | None = None,
        on_disconnect: Hook | None = None,
        own_thread: bool = False,
    ) -> None:
        self.environ = environ
        self.config = config or StreamConfig()
        #: The key this stream was registered under, for unicast.
        self.key: Any = None
        #: Who the stream belongs to: what the extension's identity loader returned
        #: in the view that opened it (``None``: anonymous, or no loader).
        self.identity: Any = None
        self._on_connect = [on_connect] if on_connect else []
        self._on_disconnect = [on_disconnect] if on_disconnect else []
        self._lock = threading.Lock()
        # Only the owner thread ever waits, so a bare lock serves as its wake-up call
        # (a Condition costs a deque and five bound methods per stream). Held while
        # nobody has called; released by _notify(); taken back by the owner's wait.
        self._wake = threading.Lock()
        self._wake.acquire()
        self._done: threading.Event | None = None
        self._transport: QueueTransport | SocketTransport = QueueTransport(self.config.max_backlog)
        self._path = "pending"
        self._closed = False
        self._abort = False
        self._close_reason = ""
        self._disconnected = False
        self._owner: int | None = None
        self._last_write = time.monotonic()
        self._pending_sleep: Sleep | None = None
        self._server_response: object = None
        self._registries: set[SSERegistry] = set()
        self._started = False
        self.sent_events = 0
        #: Whether the handler runs on the stream's own thread (the server's) instead
        #: of the scheduler's pool: for handlers that block between two yields.
        self.own_thread = own_thread
        # Every step, hook and the end run in this context: a copy of the view's, where
        # the request context stays pushed until the stream ends (see _hold_request).
        self._context = contextvars.copy_context()
        self._context.run(_current.set, self)
        self._ctx_lock = threading.Lock()
        self._release_context: Callable[[], None] | None = None
        self._job: Job | None = None
        self._steps: Iterator[HandlerItem] | None = None
        self._wake_at = 0.0
        # When the backlog went over its bound (0.0: it is not): the handler waits.
        self._backlogged = 0.0
        # _RUNNING, then _CLOSING once the handler is closed, then _DONE.
        self._phase = _RUNNING
        self._released = False
        self._sock: socket.socket | None = None
        self._close_deadline = 0.0
        self._end_written = False
        self._error: BaseException | None = None
        self._client_key: Any = None
        self._holds_thread = False
        lifetime = self.config.max_lifetime
        # Jittered, so that streams opened together (after a restart) do not end together.
        self._expires_at = (
            float("inf")
            if lifetime is None
            else time.monotonic() + lifetime * random.uniform(0.8, 1.0)
        )
        # Compression (flask_datastar.compression): set by the response before on_connect.
        self._encoder: Encoder | None = None
        # -- resume (issue 11) -------------------------------------------------------
        #: Whether a registry with a replay log wrote this stream the events its client
        #: missed (it reconnected with a ``Last-Event-ID`` the log still covers): the
        #: handler then skips the full state. ``False`` for a new tab, and for one whose
        #: gap the log no longer covers: send it the full state.
        self.resumed = False
        # When the scheduler last asked the direct socket whether its client left.
        self._probed_at = time.monotonic()

    def __repr__(self) -> str:
        state = f"closed: {self._close_reason}" if self._closed else "open"
        return f"<Stream {self.environ.get('PATH_INFO', '')!r} {self._path} {state}>"

    # -- what the application sees ------------------------------------------------

    @property
    def path(self) -> str:
        """How events reach this client: ``"direct"``, ``"queue"``, or ``"pending"`` before
        the first chunk is out."""
        return self._path

    @property
    def closed(self) -> bool:
        """Whether the stream has ended."""
        return self._closed

    @property
    def close_reason(self) -> str:
        """Why the stream ended, for logs; empty while it is open."""
        return self._close_reason

    @property
    def last_event_id(self) -> str | None:
        """The ``Last-Event-ID`` the client sent when it reconnected, if any."""
        value = self.environ.get("HTTP_LAST_EVENT_ID")
        return str(value) if value is not None else None

    def send(self, event: str | bytes | Chunk) -> None:
        """Send one complete event (text ending in a blank line), as built by :class:`SSE`.

        :param event: the event text, or a :class:`~flask_datastar.transport.Chunk`.
        :raises StreamClosed: the stream has ended.
        :raises ValueError: *event* is empty, or does not end with a blank line.
        """
        if isinstance(event, Chunk):
            chunk = event
        else:
            try:
                # The same event for many streams (a tick of every tab): encoded once.
                chunk = _chunk_of(event)
            except TypeError:
                check_event(event)  # says what is wrong
                raise
        owner = self._is_own_write()
        with self._lock:
            self._write_locked(chunk, owner)

    def _is_own_write(self) -> bool:
        """Whether the caller is the stream's handler or hook (its events are never refused)."""
        return _current.get() is self or threading.get_ident() == self._owner

    def patch_elements(
        self,
        elements: Elements | None = None,
        selector: str | None = None,
        mode: ElementPatchMode | str | None = None,
        use_view_transition: bool | None = None,
        view_transition_selector: str | None = None,
        namespace: ElementPatchNamespace | str | None = None,
        event_id: str | None = None,
        retry_duration: int | None = None,
    ) -> None:
        """Send a ``datastar-patch-elements`` event; see :meth:`SSE.patch_elements`."""
        self.send(
            ServerSentEventGenerator.patch_elements(
                elements,
                selector=selector,
                mode=mode,
                use_view_transition=use_view_transition,
                view_transition_selector=view_transition_selector,
                namespace=namespace,
                event_id=event_id,
                retry_duration=retry_duration,
            )
        )

    def remove_elements(
        self, selector: str, event_id: str | None = None, retry_duration: int | None = None
    ) -> None:
        """Remove the elements matching *selector*; see :meth:`SSE.remove_elements`."""
        self.send(ServerSentEventGenerator.remove_elements(selector, event_id, retry_duration))

    def patch_signals(
        self,
        signals: Signals,
        event_id: str | None = None,
        only_if_missing: bool | None = None,
        retry_duration: int | None = None,
    ) -> None:
        """Send a ``datastar-patch-signals`` event; see :meth:`SSE.patch_signals`.

        A mapping is serialised with the app's JSON provider when the call is
        made in an application context (as in a handler or a view), so a
        ``date`` or a custom provider such as orjson works as with
        :func:`flask.jsonify`; see :func:`~flask_datastar.signals.dumps_signals`.
        """
        if isinstance(signals, Mapping):
            from .signals import dumps_signals  # Flask glue, imported where it is used

            signals = dumps_signals(signals)
        self.send(
            ServerSentEventGenerator.patch_signals(
                signals,
                event_id=event_id,
                only_if_missing=only_if_missing,
                retry_duration=retry_duration,
            )
        )

    def execute_script(
        self,
        script: str,
        auto_remove: bool = True,
        attributes: Mapping[str, str] | Sequence[str] | None = None,
        event_id: str | None = None,
        retry_duration: int | None = None,
    ) -> None:
        """Run *script* in the browser; see :meth:`SSE.execute_script`."""
        self.send(
            ServerSentEventGenerator.execute_script(
                script, auto_remove, attributes, event_id, retry_duration
            )
        )

    def redirect(
        self, location: str, event_id: str | None = None, retry_duration: int | None = None
    ) -> None:
        """Send the browser to *location*; see :meth:`SSE.redirect`."""
        self.send(ServerSentEventGenerator.redirect(location, event_id, retry_duration))

    def console_log(
        self, message: str, event_id: str | None = None, retry_duration: int | None = None
    ) -> None:
        """Write *message* to the browser's console; see :meth:`SSE.console_log`."""
        self.send(ServerSentEventGenerator.console_log(message, event_id, retry_duration))

    def console_error(
        self, message: str, event_id: str | None = None, retry_duration: int | None = None
    ) -> None:
        """Write *message* to the browser's console as an error; see :meth:`SSE.console_error`."""
        self.send(ServerSentEventGenerator.console_error(message, event_id, retry_duration))

    def sleep(self, seconds: float | None = None) -> Sleep:
        """Return a pause for the handler to yield: ``yield gen.sleep(1)``.

        While the handler sleeps, events from other threads are delivered and
        heartbeats are sent. ``None`` sleeps until the stream ends.

        :param seconds: how long to pause.
        """
        if self._pending_sleep is not None:
            self._pending_sleep = None
            raise RuntimeError(
                "'gen.sleep()' only pauses when it is yielded: write 'yield gen.sleep(1)'."
            )
        pause = Sleep(seconds)  # checks it
        self._pending_sleep = pause
        return pause

    def _end_spread(self, spread: float) -> None:
        """End the stream so its client reconnects after a random delay of up to *spread* s."""
        delay = int(1000 + random.random() * spread * 1000)
        try:
            self.send(f"retry: {delay}\n\n")
        except StreamClosed:
            return
        self.close(reconnect=True)

    def close(self, reconnect: bool = False) -> None:
        """End the stream from any thread.

        :param reconnect: end it abruptly, so that the client reconnects (the
            Datastar client does not reopen a stream that ended cleanly).
        """
        self._end("closed by the server", abort=reconnect)

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Block until the stream has ended; return whether it has.

        :param timeout: seconds to wait at most.
        """
        if self._is_own_write() and not self._disconnected:
            raise RuntimeError(
                "'wait_closed' was called on the stream's own thread (in its handler or a"
                " hook), where the stream cannot end while it waits; call it from another"
                " thread."
            )
        with self._lock:
            if self._disconnected:
                return True
            if self._done is None:
                self._done = threading.Event()
            done = self._done
        return done.wait(timeout)

    # -- used by the registry and the socket watcher ------------------------------

    def _write_locked(self, chunk: Chunk, owner: bool) -> None:
        if self._closed:
            raise StreamClosed(f"The stream has ended ({self._close_reason}).", self)
        transport = self._transport
        encoder = self._encoder
        try:
            # No send ever waits here, where the application may hold its own locks.
            # The owner's own events are never refused: they wait for its next yield
            # (queue path), or in the backlog, which its loop drains before going on
            # (direct path). Other threads' events are bounded by max_backlog.
            if encoder is not None:
                # Compression: this stream's own bytes, compressed in send order under
                # its lock (the encoder counts them for metrics).
                data = encoder.compress(chunk.data)
                if isinstance(transport, SocketTransport):
                    transport.write(data, not owner)
                elif owner:
                    transport.write_unbounded(Chunk(data))
                else:
                    transport.write(Chunk(data))
            elif isinstance(transport, SocketTransport):
                transport.write(chunk, not owner)
            elif owner:
                transport.write_unbounded(chunk)
            else:
                transport.write(chunk)
        except TransportClosed as e:
            metrics.event_dropped(self)  # metrics: the event this stream could not take
            self._end_locked(str(e), abort=True)
            raise StreamClosed(f"The stream has ended ({e})", self) from None
        self._last_write = time.monotonic()
        self.sent_events += 1
        metrics.event_sent(self, chunk)  # metrics: events, heartbeats, bytes before compression
        if not transport.direct:
            self._notify()

    def _notify(self) -> None:
        try:
            self._wake.release()
        except RuntimeError:
            pass  # already released: the owner has a wake-up waiting

    def _wake_job(self) -> None:
        """Run the stream's next scheduler step now (it ended, or its backlog drained)."""
        job = self._job
        if job is not None and self._phase != _DONE:
            scheduler().submit(job)

    def _drain_owner(self) -> None:
        """Wait, outside the handler, until the backlog is back under its bound."""
        transport = self._transport
        assert isinstance(transport, SocketTransport)
        deadline = time.monotonic() + self.config.send_timeout
        while True:
            with self._lock:
                if self._closed:
                    raise StreamClosed(f"The stream has ended ({self._close_reason}).", self)
                try:
                    transport.flush()
                    if transport.pending() <= self.config.max_backlog:
                        return
                except TransportClosed as e:
                    self._end_locked(str(e), abort=True)
                    raise StreamClosed(str(e), self) from None
            left = deadline - time.monotonic()
            if left <= 0:
                self._end(f"the client took no data for {self.config.send_timeout} s", abort=True)
                raise StreamClosed(self._close_reason, self)
            wait_writable(transport.sock, min(left, 1.0))

    def _peer_gone(self, reason: str) -> None:
        self._end(reason, abort=True)

    def _socket_writable(self) -> bool:
        """Flush the backlog (the watcher saw the socket writable); return whether some is left."""
        with self._lock:
            transport = self._transport
            if self._closed or not isinstance(transport, SocketTransport):
                return False
            try:
                left = not transport.flush()
            except TransportClosed as e:
                self._end_locked(str(e), abort=True)
                return False
            if self._backlogged and transport.pending() <= self.config.max_backlog:
                self._wake_job()  # the handler waited for the client to catch up
            return left

    def _end(self, reason: str, abort: bool) -> None:
        with self._lock:
            self._end_locked(reason, abort)

    def _end_locked(self, reason: str, abort: bool) -> None:
        if not self._closed:
            if not abort and self._encoder is not None:
                self._finish_encoding_locked()  # compression: a clean end ends the body
            self._closed = True
            self._abort = abort
            self._close_reason = reason
            transport = self._transport
            if isinstance(transport, SocketTransport):
                # Nothing for the watcher to do any more: a closed stream that stayed
                # watched would keep waking it (its backlog is never flushed), and its
                # socket's number may soon belong to another client.
                SocketWatcher.get().remove(transport.sock)
        elif abort:
            self._abort = True
        if abort and isinstance(self._transport, SocketTransport):
            self._transport.close()
        self._notify()
        self._wake_job()

    def _finish_encoding_locked(self) -> None:
        """Compression: write the compressor's last bytes, so a clean end is a whole body."""
        encoder, self._encoder = self._encoder, None
        assert encoder is not None
        transport = self._transport
        try:
            tail = Chunk(encoder.finish())
            if isinstance(transport, QueueTransport):
                transport.write_unbounded(tail)
            else:
                transport.write(tail, bounded=False)
        except (TransportClosed, ValueError):
            pass  # the client is gone (or nothing was left): the end is unclean anyway

    # -- the owner thread ---------------------------------------------------------

    def _admit(
        self,
        limit: int | None,
        holds_thread: bool = False,
        thread_limit: int | None = None,
        client: Any = None,
        client_limit: int | None = None,
    ) -> str | None:
        """Count the stream as open unless a limit says no; return ``None``, or why not.

        The checks and the count are one step, so concurrent opens cannot
        overshoot a limit.

        :param limit: the streams this process may hold.
        :param holds_thread: this stream keeps a server thread for its life.
        :param thread_limit: the streams that may keep one.
        :param client: who opens it (identity or address), for the fair share.
        :param client_limit: the streams one client may hold.
        :return: ``None`` when admitted; else ``"draining"``, ``"full"``,
            ``"threads"`` or ``"client"``.
        """
        with _open_lock:
            if _draining[0] is not None:
                return "draining"
            if limit is not None and len(_open) >= limit:
                return "full"
            if holds_thread and thread_limit is not None and _thread_held[0] >= thread_limit:
                return "threads"
            if client is not None and client_limit is not None:
                if _by_client.get(client, 0) >= client_limit:
                    return "client"
                _by_client[client] = _by_client.get(client, 0) + 1
                self._client_key = client
            if holds_thread:
                _thread_held[0] += 1
                self._holds_thread = True
            _open.add(self)
            return None

    def _enter(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call ``fn(*args)`` in the stream's context (the request context is there)."""
        if _current.get() is self:
            return fn(*args)
        with self._ctx_lock:  # a Context is entered by one thread at a time
            return self._context.run(fn, *args)

    def _hold_request(self) -> None:
        """Keep a copy of the view's request context pushed in the stream's context.

        Flask tears the view's own context down when the view returns, before
        the body is sent. The stream's steps run later, on other threads: they
        get a copy (as :func:`flask.copy_current_request_context` makes), with
        the view's ``g``, whose teardown runs when the stream ends.
        """
        self._release_context = self._enter(_push_request_copy)

    def _connect(self) -> None:
        """Run the ``on_connect`` hooks, in the view, before the response leaves.

        An error here is an ordinary error of the view: Flask turns it into
        its response (a 500, or the status of an ``abort(403)``), and the
        hooks' writes to the session reach the response's cookie.
        """
        self._owner = threading.get_ident()
        retry = self.config.retry
        if retry is not None:
            # First on the wire: the delay this client waits before it reconnects.
            self.send(Chunk(f"retry: {random.randint(*retry)}\n\n"))
        for hook in self._on_connect:
            try:
                self._enter(hook, self)
            except StreamClosed as e:
                if e.stream is not None and e.stream is not self:
                    raise
                # Closed meanwhile (by another thread, or too much waited): the
                # response goes out and ends at once, as any closed stream's does.
                return

    def _abandon(self) -> None:
        """End a stream whose response never ran (the view failed after opening it)."""
        if self._started:
            return  # its response iterator ends it
        self._end("the response was never sent", abort=False)
        self._disconnect()

    def _bound_unacknowledged_data(self, bound: bool = True) -> None:
        """Give up on a peer that acknowledges nothing for ``send_timeout`` seconds.

        A client that vanished without FIN or RST (a sleeping laptop, a dropped
        NAT entry) lets writes succeed until the send buffer fills, then TCP
        retransmits for about 15 minutes before it fails, holding the thread.
        ``TCP_USER_TIMEOUT`` bounds that; the heartbeat keeps data in flight so
        the bound applies even to a quiet stream.
        """
        sock = self._client_socket()
        option = getattr(socket, "TCP_USER_TIMEOUT", None)
        if option is None or sock is None:
            return
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        # After a clean end the connection may carry more requests (keep-alive): give
        # it the kernel's default back, or its idle wait would end in an ETIMEDOUT
        # that the server logs as an error.
        value = int(self.config.send_timeout * 1000) if bound else 0
        try:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
        except OSError:
            pass  # not TCP after all, or the platform refuses: keep the kernel's default

    def _add_hooks(self, on_connect: Hook | None, on_disconnect: Hook | None) -> None:
        if on_disconnect is not None:
            self._on_disconnect.append(on_disconnect)
        if on_connect is not None:
            self._on_connect.append(on_connect)
            before = _session_modified()
            on_connect(self)
            if _session_modified() and not before:
                raise RuntimeError(
                    "The 'on_connect' hook of 'with_sse' changed the session, but this"
                    " stream's response headers have already left: the session cookie"
                    " cannot change any more. Pass the hook to '@datastar.sse(on_connect=...)',"
                    " where it runs in the view, or change the session in a short request."
                )

    def _disconnect(self) -> None:
        with self._lock:
            if self._disconnected:
                return
        try:
            for hook in reversed(self._on_disconnect):
                try:
                    # As a step: on whichever thread the end runs, the hook is the
                    # stream's own (its wait_closed() is refused, not a deadlock).
                    self._step(functools.partial(hook, self))
                except Exception:
                    log.exception("flask_datastar: error in an on_disconnect hook")
            for registry in list(self._registries):
                registry.unregister(self)
        finally:
            release, self._release_context = self._release_context, None
            if release is not None:
                try:
                    self._enter(release)  # the request's teardown functions run here
                except Exception:
                    log.exception("flask_datastar: error while tearing down the stream's request")
            with self._lock:
                self._disconnected = True
                done = self._done
            if done is not None:
                done.set()
            # Nothing keeps a registry (its bus subscription) or the request's copy alive
            # through an ended stream that waits for the garbage collector (the stream
            # and its context, and its scheduler job, refer to each other).
            self._registries.clear()
            self._job = None
            self._enter(_current.set, None)  # last: later calls enter the context anew
            with _open_lock:
                if self in _open:
                    _open.discard(self)
                    key = self._client_key
                    if key is not None:
                        left = _by_client.get(key, 1) - 1
                        if left > 0:
                            _by_client[key] = left
                        else:
                            _by_client.pop(key, None)
                    if self._holds_thread:
                        _thread_held[0] -= 1
                        self._holds_thread = False
            metrics.stream_closed(self)  # metrics: open streams by route

    def _take_direct_path(self) -> None:
        sock = None
        if self.config.direct_writes:
            own = None if self._encoder is None else self._encoder.name  # compression
            sock = direct_socket(self.environ, self._server_response, own_encoding=own)
        with self._lock:
            if sock is None or self._closed:
                self._path = "queue"
                return
            waiting = self._transport
            assert isinstance(waiting, QueueTransport)
            watcher = SocketWatcher.get()
            transport = SocketTransport(sock, self.config.max_backlog)
            # The transport's socket, whichever it is then: _release() replaces it.
            transport._on_backlog = lambda wanted: watcher.want_write(transport.sock, wanted)
            self._transport = transport
            self._path = "direct"
            watcher.add(sock, self)
            data = waiting.take()
            if data:
                try:
                    transport.write(Chunk(data))
                except TransportClosed as e:
                    self._end_locked(str(e), abort=True)

    def _client_socket(self) -> socket.socket | None:
        """The client's socket, where the WSGI server tells it (the stream's own once released)."""
        if self._sock is not None:
            return self._sock
        sock = self.environ.get("gunicorn.socket") or self.environ.get("werkzeug.socket")
        return sock if isinstance(sock, socket.socket) else None

    def _abort_connection(self) -> None:
        """Cut the connection so the client sees an abrupt end and reconnects.

        The server's next write on the socket (gunicorn's terminating chunk) must then
        fail with ``EPIPE``, which it ignores quietly, and at once.
        """
        sock = self._client_socket()
        if sock is None:
            return
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # the kernel has already given up on the connection: see below
        # A connection that TCP_USER_TIMEOUT ended (a window shut for send_timeout) keeps
        # ETIMEDOUT pending, and the next write reports it instead of EPIPE: gunicorn
        # logs that as an error, with a traceback. Without the user timeout, no new
        # ETIMEDOUT can come before that write (on_disconnect hooks run in between);
        # then reading SO_ERROR clears one that came already.
        self._bound_unacknowledged_data(bound=False)
        try:
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError:
            pass

    def _run(self, handler: Handler) -> Iterator[bytes]:
        """The response iterator: drive *handler* and hand bytes to the server.

        The handler's first steps run here, on the server's thread, up to its
        first pause: a handler that sends and returns never leaves it, and
        its connection may carry the next request. From its first pause on,
        its steps run on the scheduler (unless ``own_thread``); on the direct
        path the server's thread is then given back (see :meth:`_release`),
        elsewhere it waits, with no timeout, for bytes to hand to the server.
        """
        self._started = True
        self._owner = threading.get_ident()
        selfcheck.stream_started(self)  # self-check: a hook that reads the body before the server
        handler_iter: Iterator[HandlerItem] | None = None
        server_ends = True  # the server writes the response's end after the last chunk
        handed_off = False
        try:
            self._bound_unacknowledged_data()
            with self._lock:
                pending = self._transport
                first = pending.take() if isinstance(pending, QueueTransport) else b""
                if not first and self._encoder is not None:  # compression: the heartbeat too
                    first = self._encoder.compress(_HEARTBEAT.data)
            # The headers leave with the first non-empty chunk: never make the client wait.
            yield first or _HEARTBEAT.data
            self._last_write = time.monotonic()
            self._take_direct_path()
            if not self._closed:
                handler_iter = self._start(handler)
            if self.own_thread:
                # Opened while the process stops: its first state, then to another worker.
                yield from self._loop(handler_iter, leave=_draining[0])
                return
            handler_iter = yield from self._first_steps(handler_iter)
            if handler_iter is None or self._closed:
                return
            # from here on no step runs on this thread, which the server
            # may give to other requests (at once, once released): their sends are
            # not the stream's own (unbounded), nor is their wait_closed() a deadlock.
            self._owner = None
            self._steps, handler_iter = handler_iter, None
            self._job = Job(self._tick, str(self.environ.get("PATH_INFO", "")))
            if self._release():
                handed_off = True
                self._wake_job()
                return
            over = False
            with _open_lock:
                if not self._holds_thread:
                    # Kept by the portable path after all: count it where it belongs.
                    limit = _thread_limit[0]
                    over = limit is not None and _thread_held[0] >= limit
                    if not over:
                        _thread_held[0] += 1
                        self._holds_thread = True
            if over:
                # admission expected this stream to give its thread back (a
                # middleware hiding gunicorn's response, no file descriptor left...): past
                # the thread limit it is turned away as admission would, with a retry.
                log.info(
                    "flask_datastar: refused a stream of %s: every server thread that"
                    " streams may hold is taken",
                    self.environ.get("PATH_INFO", ""),
                )
                self._end_spread(3.0)
            self._wake_job()
            yield from self._park()
        except GeneratorExit:
            server_ends = False  # a write failed, or the server stops: it writes no end
            self._end("the server closed the response", abort=False)
            raise
        except BaseException as e:
            self._end(f"the handler raised {type(e).__name__}", abort=True)
            raise
        finally:
            if not handed_off:
                try:
                    if handler_iter is not None and hasattr(handler_iter, "close"):
                        self._close_handler(handler_iter)
                    self._wait_for_steps()
                finally:
                    self._finish(server_ends)

    def _first_steps(
        self, steps: Iterator[HandlerItem] | None
    ) -> Generator[bytes, None, Iterator[HandlerItem] | None]:
        """Run the handler here up to its first pause; return its steps, or ``None`` at its end."""
        while True:
            if isinstance(self._transport, QueueTransport):
                with self._lock:
                    data = self._transport.take()
                if data:
                    yield data  # the server writes it; a failed write closes this generator
            if steps is None or self._closed:
                # an open handler goes back to _run, which closes it in the
                # stream's context (dropped here, its finally ran without the request).
                return steps
            item, alive = self._next_step(steps)
            if not alive:
                steps = None
            elif isinstance(item, Sleep):
                self._pending_sleep = None
                self._wake_at = (
                    float("inf") if item.seconds is None else time.monotonic() + item.seconds
                )
                if _draining[0] is not None:
                    self._end_spread(_draining[0])
                return steps
            elif isinstance(item, (str, bytes)):
                try:
                    self.send(Chunk(item))  # _next_step checked it already
                except StreamClosed:
                    pass
            # the handler's own events are unbounded; before its first pause
            # it waits here for a slow client, as _loop does, instead of growing the backlog.
            transport = self._transport
            if (
                isinstance(transport, SocketTransport)
                and transport.pending() > self.config.max_backlog
            ):
                try:
                    self._drain_owner()
                except StreamClosed:
                    pass  # ended: the next turn returns

    def _park(self) -> Iterator[bytes]:
        """Hand what the scheduler's steps queue to the server, until the stream has ended."""
        while True:
            with self._lock:
                data = b""
                if isinstance(self._transport, QueueTransport):
                    data = self._transport.take()
                    if data and self._backlogged:
                        self._wake_job()  # the handler waited for this take
                done = self._closed and self._phase != _RUNNING
            if data:
                yield data  # the server writes it; a failed write closes this generator
                continue
            if done:
                if self._error is not None:
                    raise self._error  # the handler's, for the server to report
                return
            # No timeout: every send, and the end, release it (see _notify).
            self._wake.acquire()

    def _wait_for_steps(self) -> None:
        """Wait until the scheduler has closed the handler (the stream has ended)."""
        if self._job is None:
            return
        self._wake_job()
        while True:
            with self._lock:
                if self._phase != _RUNNING:
                    return
            self._wake.acquire(timeout=1.0)

    def _release(self) -> bool:
        """Give the server's thread back, keeping the connection; return whether it was.

        Only on the direct path under gunicorn, whose response object and
        socket are known: the stream takes a duplicate of the client socket,
        and the server's own file descriptor is pointed at an unconnected
        socket of the same kind, so that gunicorn's end of the response
        (no terminating chunk: the stream writes it; then a close, or a
        graceful close) touches nothing the client sees. The connection then
        closes when the stream ends, whatever its keep-alive.
        """
        server_response: Any = self._server_response
        transport = self._transport
        if (
            not self.config.release_threads
            or not isinstance(transport, SocketTransport)
            or server_response is None
            or not hasattr(server_response, "force_close")
        ):
            return False
        with self._lock:
            if self._closed:
                return False
            old = transport.sock
            try:
                own = old.dup()
            except OSError:
                return False  # out of file descriptors: keep the thread
            try:
                # an unconnected socket of the same kind, not an AF_UNIX
                # pair: the application may hold gunicorn's socket object (read from
                # the environ before this), and TCP options on it must keep working;
                # a write fails (EPIPE), and a shutdown or close touches no client.
                dead = socket.socket(old.family, old.type, old.proto)
            except OSError:
                own.close()
                return False
            try:
                if isinstance(self.environ, dict):
                    # What the application reads as the client's socket from now on:
                    # set before gunicorn's number stops being the client's.
                    self.environ["gunicorn.socket"] = own
                watcher = SocketWatcher.get()
                # Unregister before the number changes what it stands for: epoll keys
                # its entries on the open file, which the duplicate keeps alive.
                watcher.remove(old)
                transport.sock = own
                watcher.add(own, self)
                if transport.pending():
                    watcher.want_write(own, True)
                os.dup2(dead.fileno(), old.fileno())
            finally:
                dead.close()
            self._sock = own
            self._released = True
            # gunicorn writes no terminating chunk and keeps no connection alive.
            server_response.chunked = False
            server_response.force_close()
        with _open_lock:
            if self._holds_thread:
                _thread_held[0] -= 1
                self._holds_thread = False
        return True

    # -- the scheduler's steps ----------------------------------------------------

    def _tick(self) -> None:
        """One scheduler step of the stream: the handler's next step, heartbeat, or end."""
        if self._phase != _DONE:
            self._enter(self._advance)

    def _advance(self) -> None:
        if self._phase == _CLOSING:
            self._finish_released()
            return
        if self._phase == _DONE:
            return
        config = self.config
        now = time.monotonic()
        steps = self._steps
        if steps is not None and not self._closed and not self._backlogged and now >= self._wake_at:
            try:
                item, alive = self._next_step(steps)
            except BaseException as e:  # SystemExit too: the stream must still wind down
                self._failed(e)
                item, alive = None, False
            if not alive:
                self._steps = steps = None
            elif isinstance(item, Sleep):
                self._pending_sleep = None
                now = time.monotonic()
                self._wake_at = float("inf") if item.seconds is None else now + item.seconds
            else:
                if isinstance(item, (str, bytes)):
                    try:
                        self.send(Chunk(item))  # _next_step checked it already
                    except StreamClosed:
                        pass
                self._wake_at = now  # an event or a checkpoint: go on at the next turn
        transport = self._transport
        # the queue path too; there the server's thread takes the queue
        # (see _park), and the steps must not outrun it for a client that reads nothing.
        if not self._closed and (self._backlogged or transport.pending()):
            # Under the lock that the flush which drains the backlog takes too: a flush
            # between the check and the mark would find no mark, and wake no one.
            # (Nothing waiting and no mark: nothing to do, and no lock to take.)
            with self._lock:
                over = transport.pending() > config.max_backlog
                if not over:
                    self._backlogged = 0.0
                elif not self._backlogged:
                    self._backlogged = now
                else:
                    over = now - self._backlogged >= config.send_timeout
                    if over:
                        self._end_locked(
                            f"the client took no data for {config.send_timeout} s", abort=True
                        )
        if now >= self._expires_at and not self._closed:
            self._expire()
        heartbeat = config.heartbeat
        if heartbeat > 0 and not self._closed and now - self._last_write >= heartbeat:
            try:
                self.send(_HEARTBEAT)
            except StreamClosed:
                pass
        if heartbeat > 0 and not self._closed and now - self._probed_at >= heartbeat:
            self._probed_at = now
            self._check_peer()
        if self._closed:
            self._wind_down()
            return
        due = self._expires_at
        if steps is not None:
            wake = self._backlogged + config.send_timeout if self._backlogged else self._wake_at
            due = min(due, wake)
        if heartbeat > 0:
            due = min(due, self._last_write + heartbeat)
        job = self._job
        assert job is not None
        if due <= now:
            scheduler().submit(job)  # runs again after this turn, behind the others
        elif due != float("inf"):
            scheduler().schedule(job, due)
        else:
            scheduler().cancel(job)

    def _expire(self) -> None:
        """End a stream that reached its ``max_lifetime``, so that its client reconnects."""
        self._end("it reached DATASTAR_MAX_LIFETIME", abort=True)

    def _check_peer(self) -> None:
        """End the stream if its client has gone, asking the direct socket itself.

        The socket watcher reports a FIN at once; this is the backstop, once per
        heartbeat interval, so that an event it did not report (whatever the cause)
        cannot leave a stream writing for ever to a client that has left and still
        reads (a half-closed socket takes every byte, so no write fails).
        """
        with self._lock:
            transport = self._transport
            if self._closed or not isinstance(transport, SocketTransport) or transport.closed:
                return
            sock = transport.sock
        gone = _probe(sock)
        if gone:
            log.debug("flask_datastar: %r: found by its heartbeat: %s", self, gone)
            self._end(gone, abort=True)

    def _failed(self, error: BaseException) -> None:
        """The handler raised in a scheduled step: end the stream abruptly, report the error.

        As when it raised on the server's thread: the client reconnects, and the
        error reaches the server (which logs it) through the response iterator
        when the stream still has one; a released stream logs it here.
        """
        self._steps = None
        self._error = error
        self._end(f"the handler raised {type(error).__name__}", abort=True)
        if self._released:
            log.error(
                "flask_datastar: the handler of %s raised",
                self.environ.get("PATH_INFO", ""),
                exc_info=error,
            )

    def _wind_down(self) -> None:
        """The stream has ended: close the handler, then end the connection's part."""
        steps, self._steps = self._steps, None
        if steps is not None and hasattr(steps, "close"):
            self._close_handler(steps)
        if self._job is not None:
            scheduler().cancel(self._job)
        if not self._released:
            # The server's thread ends the connection (see _run's finally).
            with self._lock:
                self._phase = _DONE
            self._notify()
            return
        self._phase = _CLOSING
        self._close_deadline = time.monotonic() + self.config.send_timeout
        self._finish_released()

    def _finish_released(self) -> None:
        """End a released stream's connection: its last bytes, the end of the response."""
        transport = self._transport
        assert isinstance(transport, SocketTransport)
        sock = transport.sock
        with self._lock:
            if not self._abort and not transport.closed:
                try:
                    if not self._end_written:
                        # The end of the chunked response, once: after it the client
                        # knows the stream ended cleanly and does not reconnect.
                        self._end_written = True
                        transport.write_bytes(b"0\r\n\r\n", bounded=False)
                    flushed = transport.flush()
                except TransportClosed:
                    self._abort = True
                    flushed = True
                if not flushed:
                    now = time.monotonic()
                    if now < self._close_deadline:
                        # A slow reader at the end: look again shortly (rare, and cheap).
                        job = self._job
                        assert job is not None
                        scheduler().schedule(job, min(self._close_deadline, now + 0.05))
                        return
                    self._abort = True
            self._phase = _DONE
        SocketWatcher.get().remove(sock)
        try:
            if self._abort:
                sock.shutdown(socket.SHUT_RDWR)
            else:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the client has gone already
        sock.close()
        log.debug("flask_datastar: %r ended %s", self, "abruptly" if self._abort else "cleanly")
        self._disconnect()

    def _close_handler(self, steps: Iterator[HandlerItem]) -> None:
        """Close the handler, so its ``finally`` and ``with`` blocks run.

        Sending there on its own ended stream raises :class:`StreamClosed`,
        which needs no catching; any other error is logged, and does not turn
        a clean end into a cut connection.
        """
        try:
            self._step(steps.close)  # type: ignore[attr-defined]
        except StreamClosed as e:
            if e.stream is not None and e.stream is not self:
                log.exception("flask_datastar: error while closing the handler of %r", self)
        except Exception:
            log.exception("flask_datastar: error while closing the handler of %r", self)

    def _start(self, handler: Handler) -> Iterator[HandlerItem] | None:
        """Call the handler; return its steps, or ``None`` once it has nothing more to do."""
        try:
            result = self._step(lambda: handler(self))
        except StreamClosed as e:
            self._own_end(e)
            return None
        if result is None:
            self._end("the handler returned", abort=False)
            return None
        if isinstance(result, (str, bytes)):
            try:
                check_event(result)
            except ValueError as e:
                self._misused(e)
                return None
            try:
                self.send(Chunk(result))  # checked above: a Chunk is not checked again
            except StreamClosed:
                pass
            self._end("the handler returned", abort=False)
            return None
        if inspect.iscoroutine(result) or inspect.isasyncgen(result):
            if inspect.iscoroutine(result):
                result.close()  # never awaited, and never will be: say so quietly
            self._misused(TypeError(ASYNC_HANDLER))
            return None
        try:
            steps: Iterator[HandlerItem] = iter(result)
        except TypeError:
            self._misused(
                TypeError(
                    f"A stream handler returned {type(result).__name__}; return None, an event,"
                    " or make it a generator ('yield gen.sleep(1)')."
                )
            )
            return None
        return steps

    def _own_end(self, error: StreamClosed) -> None:
        """The handler stopped on *error*: quietly if its own stream ended, else it failed."""
        if error.stream is not None and error.stream is not self and not self._closed:
            # It wrote to another stream that has ended and did not catch it: an
            # error like any other, which must not leave this stream open.
            raise error
        self._end("the handler returned", abort=False)

    def _misused(self, error: Exception) -> None:
        """The handler gave the stream something it cannot send: log it, end cleanly.

        A clean end keeps the client from reconnecting straight into the same
        mistake (the Datastar client reopens only streams that broke off).
        """
        log.error(
            "flask_datastar: ending the stream %s: %s",
            self.environ.get("PATH_INFO", ""),
            error,
            exc_info=error if error.__traceback__ is not None else None,
        )
        self._end(f"the handler failed: {error}", abort=False)

    def _check_item(self, item: object) -> Exception | None:
        if item is None or isinstance(item, Sleep):
            return None
        if isinstance(item, (str, bytes)):
            try:
                check_event(item)
            except ValueError as e:
                return e
            return None
        return TypeError(
            f"A stream handler yielded {type(item).__name__}; yield events (str or bytes),"
            " 'gen.sleep(seconds)' or None."
        )

    def _next_step(self, steps: Iterator[HandlerItem]) -> tuple[HandlerItem, bool]:
        """Run the handler's next step; return what it yielded and whether it goes on.

        What it yields that cannot be sent is thrown back into it at its
        ``yield``, so the traceback names the line; left uncaught, the stream
        ends (see :meth:`_misused`).
        """
        try:
            item = self._step(next, steps)
            problem = self._check_item(item)
            if problem is None:
                return item, True
            throw = getattr(steps, "throw", None)
            if throw is not None:
                try:
                    item = self._step(throw, problem)
                except BaseException as e:
                    if e is problem:
                        self._misused(problem)
                        return None, False
                    raise
                if self._check_item(item) is None:
                    return item, True  # it caught the error and went on with a good item
            # Once per step: a handler that swallows the error and yields the same
            # thing again would otherwise be thrown into forever, deaf to close().
            self._misused(problem)
            return None, False
        except StopIteration:
            self._end("the handler returned", abort=False)
            return None, False
        except StreamClosed as e:
            self._own_end(e)
            return None, False

    def _step(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)``, a step of the handler or a hook, in the stream's context.

        There, :func:`current_stream` returns this stream.
        """
        started = time.monotonic()  # metrics: slow steps
        try:
            return self._enter(fn, *args)
        finally:
            metrics.step_done(self, started)  # metrics: counts the step if it was slow

    def _loop(
        self, handler_iter: Iterator[HandlerItem] | None, leave: float | None = None
    ) -> Iterator[bytes]:
        """Run the handler's steps, hand queued bytes to the server, send heartbeats.

        :param leave: end the stream after the handler's first step, with a
            random retry delay of up to this many seconds (the process stops).
        """
        wake_at = time.monotonic()
        steps = handler_iter
        heartbeat = self.config.heartbeat
        if leave is not None and steps is None:
            self._end_spread(leave)
        while True:
            if steps is not None and not self._closed and time.monotonic() >= wake_at:
                item, alive = self._next_step(steps)
                if not alive:
                    steps = None
                elif isinstance(item, Sleep):
                    self._pending_sleep = None
                    wake_at = (
                        float("inf") if item.seconds is None else time.monotonic() + item.seconds
                    )
                elif isinstance(item, (str, bytes)):
                    try:
                        self.send(Chunk(item))  # _next_step checked it already
                    except StreamClosed:
                        pass
                if leave is not None:
                    self._end_spread(leave)
            if (
                isinstance(self._transport, SocketTransport)
                and self._transport.pending() > self.config.max_backlog
            ):
                try:
                    self._drain_owner()
                except StreamClosed:
                    return
            wait = 0.0
            with self._lock:
                data = b""
                if isinstance(self._transport, QueueTransport):
                    data = self._transport.take()
                if not data and not self._closed:
                    due = wake_at if steps is not None else float("inf")
                    due = min(due, self._expires_at)
                    if heartbeat > 0:
                        due = min(due, self._last_write + heartbeat)
                    wait = min(due - time.monotonic(), 3600.0)
            if wait > 0:
                # A send or an end in between has released the lock already: no lost wake-up.
                self._wake.acquire(timeout=wait)
                with self._lock:
                    if isinstance(self._transport, QueueTransport):
                        data = self._transport.take()
            if data:
                # The server writes it; a failed write closes this generator.
                yield data
                continue
            if self._closed:
                return
            if time.monotonic() >= self._expires_at:
                self._expire()
                continue
            if heartbeat > 0 and time.monotonic() - self._last_write >= heartbeat:
                try:
                    self.send(_HEARTBEAT)
                except StreamClosed:
                    pass

    def _finish(self, server_ends: bool = True) -> None:
        """End the connection's part of the stream, then run the ``on_disconnect`` hooks.

        :param server_ends: the server writes the response's end next (its
            terminating chunk, with a blocking send), so a clean end first makes
            sure that this send can neither wait nor fail.
        """
        try:
            transport = self._transport
            if isinstance(transport, SocketTransport):
                SocketWatcher.get().remove(transport.sock)
                clean = not self._abort and transport.flush_blocking(self.config.send_timeout)
                if not clean:
                    # A partial chunk may be on the wire: the response must not look
                    # complete, so gunicorn's terminating chunk must fail.
                    self._abort = True
            elif not self._abort and server_ends:
                # The queue path: the server has written every chunk, with blocking
                # sends; the client may have stopped reading, or the kernel may have
                # given up on it (TCP_USER_TIMEOUT) with ETIMEDOUT pending.
                sock = self._client_socket()
                if sock is not None and not acknowledged(sock, self.config.send_timeout):
                    self._abort = True
            if self._abort:
                self._abort_connection()
            else:
                self._bound_unacknowledged_data(bound=False)
            log.debug("flask_datastar: %r ended %s", self, "abruptly" if self._abort else "cleanly")
        finally:
            self._disconnect()


def _push_request_copy() -> Callable[[], None] | None:
    """Push copies of the current app and request contexts; return what pops them.

    Runs in a stream's own context (a copy of the view's). ``None`` outside a
    request (a stream made by hand, in tests).
    """
    try:
        from flask import g
        from flask.globals import _cv_request
    except ImportError:  # pragma: no cover - Flask is a dependency
        return None
    request_ctx = _cv_request.get(None)
    if request_ctx is None:
        return None
    app_ctx = request_ctx.app.app_context()
    # The view's g (what before_request put there), for the handler's steps.
    vars(app_ctx.g).update(vars(g._get_current_object()))
    copy = request_ctx.copy()
    app_ctx.push()
    try:
        copy.push()
    except BaseException:
        app_ctx.pop()
        raise

    def pop() -> None:
        try:
            copy.pop()
        finally:
            app_ctx.pop()

    return pop


def _session_modified() -> bool:
    """Whether the current request's session has changed (``False`` without a request)."""
    from flask import has_request_context, session

    return has_request_context() and bool(getattr(session, "modified", False))


#: Why an ``async def`` handler cannot drive a stream, and what to write instead.
ASYNC_HANDLER = (
    "flask_datastar streams run on the WSGI server's threads and cannot drive 'async def'"
    " handlers or async generators. Write the handler as a plain generator function"
    " ('def', pausing with 'yield gen.sleep(seconds)'), or return 'DatastarResponse(events)'"
    " from an async view for a one-shot answer."
)


def refuse_async(fn: object, what: str) -> None:
    """Raise :class:`TypeError` if *fn* is an ``async def`` function or async generator.

    :param fn: the view or handler.
    :param what: how the caller names it, for the message.
    """
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        name = getattr(fn, "__qualname__", repr(fn))
        raise TypeError(f"{what} {name!r} is 'async def'. {ASYNC_HANDLER}")


def write_each(streams: Iterable[Stream], chunk: Chunk) -> list[tuple[Stream, Exception]]:
    """Write *chunk* to each of *streams*, from a thread that is none of theirs.

    A registry's fan-out: the loop that one broadcast runs for every open tab,
    so it does no more per stream than the write itself. The same as
    ``gen.send(chunk)`` from another thread (the writes are bounded by each
    stream's ``max_backlog``).

    :param streams: the recipients.
    :param chunk: the event, encoded and framed once for all of them.
    :return: the streams that did not take it, each with its error: a
        :class:`StreamClosed`, or anything unexpected, for the caller to log.
    """
    failed: list[tuple[Stream, Exception]] = []
    for gen in streams:
        try:
            if type(gen) is Stream:
                with gen._lock:
                    gen._write_locked(chunk, False)
            else:
                gen.send(chunk)  # a subclass's (or a stand-in's) own send
        except Exception as e:
            failed.append((gen, e))
    return failed


def current_stream() -> Stream:
    """Return the stream whose handler (or hook) is running here.

    :raises RuntimeError: no stream handler is running here.
    """
    stream = _current.get()
    if stream is None:
        raise RuntimeError(
            "'with_sse' needs a running stream: use it inside a generator passed to"
            " 'sse_response' or returned by a view decorated with '@datastar_response'."
        )
    return stream


@contextmanager
def with_sse(
    on_connect: Hook | None = None, on_disconnect: Hook | None = None
) -> Generator[Stream, None, None]:
    """Give the current stream's handler its ``gen``, with lifecycle hooks.

    As datastar-cl's ``with-sse``: ``on_connect(gen)`` runs on entering, before
    the handler sends anything; leaving the block ends the stream (cleanly, or
    abruptly when an exception leaves it); ``on_disconnect(gen)`` runs exactly
    once when the stream ends for any reason (the block was left, the client
    left, the server shut down). ``on_connect`` runs after the response's
    headers have left: a change to the session there raises
    :class:`RuntimeError` (pass the hook to ``@datastar.sse`` instead, where it
    runs in the view)::

        @app.get("/sse")
        @datastar_response
        def sse():
            with with_sse(on_connect=clients.register) as gen:
                while True:
                    gen.patch_elements(render_content())
                    yield gen.sleep(1)

    :param on_connect: called with the stream when it opens.
    :param on_disconnect: called with the stream when it ends.
    """
    gen = current_stream()
    gen._add_hooks(on_connect, on_disconnect)
    try:
        yield gen
    finally:
        # As datastar-cl's with-sse, the block is the stream's life: leaving it ends
        # the stream. (An exception on its way out makes that end abrupt.)
        gen.close()
