"""How bytes reach a client: the direct socket path and the portable queue path.

Nothing here knows Flask or Datastar; a stream owns one transport at a time and
calls it under the stream's lock.

- :class:`QueueTransport`, the portable path: events wait in a bounded buffer
  that the stream's own thread hands to the WSGI server. It works on every
  server, TLS and HTTP/1.0 included.
- :class:`SocketTransport`, the direct path: once the server has sent the
  headers and the first chunk, events are framed as HTTP/1.1 chunks and
  written straight to the client socket with non-blocking sends, from
  whichever thread sends them. No stream thread wakes for a broadcast, and a
  client that stops reading costs one failed non-blocking send per event until
  its bounded backlog overflows and the stream is ended.
- :class:`SocketWatcher`, one thread per process that watches every direct
  socket with epoll: a client's FIN ends its stream at once, and a backlog is
  flushed as soon as its socket is writable again.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import select
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

__all__ = [
    "DIRECT_WRITES_SUPPORTED",
    "Chunk",
    "QueueTransport",
    "SocketTransport",
    "SocketWatcher",
    "TransportClosed",
    "acknowledged",
    "direct_socket",
    "wait_writable",
]

log = logging.getLogger(__name__)

#: Whether this platform has what the direct path needs: epoll (with ``EPOLLRDHUP``, to
#: see a client's FIN), non-blocking gathered sends and ``MSG_NOSIGNAL``. Linux has them;
#: elsewhere (macOS, Windows) every stream takes the portable queue path.
DIRECT_WRITES_SUPPORTED = (
    sys.platform.startswith("linux")
    and hasattr(select, "epoll")
    and hasattr(select, "EPOLLRDHUP")
    and hasattr(select, "poll")
    and hasattr(socket, "MSG_NOSIGNAL")
    and hasattr(socket, "MSG_DONTWAIT")
    and hasattr(socket.socket, "sendmsg")
)

# Looked up when a send happens, not at import: the names do not exist everywhere.
_SEND_FLAGS = getattr(socket, "MSG_DONTWAIT", 0) | getattr(socket, "MSG_NOSIGNAL", 0)

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _encode(text: str) -> bytes:
    """Encode *text* as UTF-8, never failing.

    A lone surrogate (which JSON's ``\\ud800`` escapes can produce) has no UTF-8
    form; it becomes U+FFFD, the replacement character, rather than an error that
    would end every stream the event was meant for.
    """
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return _LONE_SURROGATE.sub("\ufffd", text).encode("utf-8")


try:  # SIOCOUTQ (Linux's TIOCOUTQ on a socket); Windows has no fcntl
    import fcntl
    import termios

    _SIOCOUTQ: int | None = termios.TIOCOUTQ
except (ImportError, AttributeError):  # pragma: no cover - platform dependent
    _SIOCOUTQ = None


def _unacknowledged(sock: socket.socket) -> int:
    """Bytes written to *sock* that its peer has not acknowledged yet (Linux's SIOCOUTQ)."""
    assert _SIOCOUTQ is not None
    raw = fcntl.ioctl(sock.fileno(), _SIOCOUTQ, b"\0\0\0\0")
    return int.from_bytes(raw, sys.byteorder, signed=True)


def wait_writable(sock: socket.socket, timeout: float) -> bool:
    """Wait up to *timeout* seconds for *sock* to be writable; return whether it is.

    ``select.select`` cannot watch a file descriptor of 1024 or more, which a worker
    holding a thousand clients reaches: ``poll`` has no such limit.
    """
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(sock, select.POLLOUT)
        return bool(poller.poll(max(0, int(timeout * 1000))))
    _, writable, _ = select.select([], [sock], [], timeout)  # Windows: no poll, no limit
    return bool(writable)


class TransportClosed(ConnectionError):
    """Raised by a write on a transport that can no longer reach its client."""


class Chunk:
    """One event's bytes, encoded once, with the size line of its HTTP/1.1 chunk.

    A broadcast builds one ``Chunk`` and writes it to every stream, so the
    encoding and the framing are paid once, whatever the number of clients.
    """

    __slots__ = ("data", "head", "_framed")

    def __init__(self, data: bytes | str) -> None:
        self.data = _encode(data) if isinstance(data, str) else bytes(data)
        if not self.data:
            # As an HTTP/1.1 chunk, nothing is "0\r\n\r\n": the end of the response.
            raise ValueError("A chunk cannot be empty: there is no empty event.")
        self.head = b"%X\r\n" % len(self.data)
        self._framed: bytes | None = None

    @property
    def framed(self) -> bytes:
        """The data as one chunk of HTTP/1.1 chunked transfer encoding.

        Exactly what gunicorn's own Response.write() puts on the wire. Built
        on first use and kept: a broadcast writes these same bytes to every
        socket with one plain send() (the queue path never needs them).
        """
        framed = self._framed
        if framed is None:
            framed = self._framed = self.head + self.data + b"\r\n"
        return framed

    def __len__(self) -> int:
        return len(self.data)


class Transport(Protocol):
    """What a stream needs of the way its bytes travel."""

    direct: bool

    def write(self, chunk: Chunk) -> None: ...

    def pending(self) -> int: ...


class QueueTransport:
    """The portable path: a bounded buffer drained by the stream's own thread.

    :param max_bytes: the most bytes that may wait; a write past it raises
        :class:`TransportClosed`, which ends the stream.
    """

    direct = False

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._parts: list[bytes] = []
        self._size = 0
        # What other threads queued since the owner last took the buffer: only that
        # counts against the bound, as on the direct path. The owner's own events
        # wait for its next yield whatever their size.
        self._others = 0

    def write(self, chunk: Chunk) -> None:
        """Buffer an event from another thread, unless the client is not reading.

        The client counts as not reading when events of other threads already
        wait and this one would take them past *max_bytes*; a single event
        of any size is taken when nothing else of theirs waits.
        """
        if self._others and self._others + len(chunk.data) > self.max_bytes:
            raise TransportClosed(
                f"The client is not reading: more than {self.max_bytes} bytes are waiting."
            )
        self.write_unbounded(chunk)
        self._others += len(chunk.data)

    def write_unbounded(self, chunk: Chunk) -> None:
        """Buffer *chunk* whatever the size (for the stream's own thread, which drains it)."""
        self._parts.append(chunk.data)
        self._size += len(chunk.data)

    def pending(self) -> int:
        return self._size

    def take(self) -> bytes:
        """Remove and return everything waiting, as one body chunk."""
        data = b"".join(self._parts)
        self._parts.clear()
        self._size = 0
        self._others = 0
        return data


class SocketTransport:
    """The direct path: chunks written straight to the client socket, never waiting.

    :param sock: the client socket, whose headers and first chunk the server
        has already sent.
    :param max_backlog: the most bytes kept for a client whose socket buffer is
        full; past it the transport is closed.
    :param on_backlog: called with ``True`` when a backlog appears and
        ``False`` when it is gone, so that the watcher asks for writability.
    """

    direct = True

    def __init__(
        self,
        sock: socket.socket,
        max_backlog: int,
        on_backlog: Callable[[bool], None] | None = None,
    ) -> None:
        self.sock = sock
        self.max_backlog = max_backlog
        self._backlog = bytearray()
        # How far the stream's own (unbounded) writes have grown the backlog past the
        # bound: other threads may add max_backlog on top of it before the client
        # counts as not reading. Reset when the backlog is empty.
        self._allowance = 0
        self._on_backlog = on_backlog
        self.closed = False

    def pending(self) -> int:
        return len(self._backlog)

    def close(self) -> None:
        """Stop writing: later writes raise :class:`TransportClosed`; the backlog is kept."""
        if not self.closed:
            self.closed = True
            if self._backlog and self._on_backlog is not None:
                # Nothing will ever flush it: stop asking to be told of writability.
                self._on_backlog(False)

    def write(self, chunk: Chunk | bytes, bounded: bool = True) -> None:
        """Send *chunk* without waiting; what the socket does not take waits in the backlog.

        :param chunk: the event, or bytes of this stream alone (its compressed
            events), framed here as one chunk: a :class:`Chunk` only pays when
            the same bytes go to many sockets. Empty bytes send nothing (an
            empty chunk would end the response).
        :param bounded: close the transport rather than let the backlog grow more
            than *max_backlog* past what unbounded writes (the stream's own) put there.
        """
        if isinstance(chunk, Chunk):  # a subclass's too: Stream.send takes any Chunk
            framed = chunk.framed
        elif chunk:
            framed = b"%X\r\n%s\r\n" % (len(chunk), chunk)
        elif self.closed:
            raise TransportClosed("The client connection is closed.")
        else:
            return
        if self._backlog or self.closed:
            self.write_bytes(framed, bounded)
            return
        try:
            # One buffer, built once per chunk (not an iovec per socket): the cheapest
            # call there is, paid once per stream of a broadcast.
            sent = self.sock.send(framed, _SEND_FLAGS)
        except BlockingIOError:
            sent = 0
        except OSError as e:
            self.close()
            raise TransportClosed(f"The client connection failed: {e}.") from e
        if sent < len(framed):
            self._backlog += framed[sent:]
            if not bounded:
                self._grant(len(self._backlog))
            if self._on_backlog is not None:
                self._on_backlog(True)

    def write_bytes(self, data: bytes, bounded: bool = True) -> None:
        """Send already framed bytes, keeping what does not fit in the backlog.

        :param data: whole chunks.
        :param bounded: as for :meth:`write`.
        """
        if self.closed:
            raise TransportClosed("The client connection is closed.")
        if self._backlog:
            self._backlog += data
            self.flush()
            if not bounded:
                self._grant(len(self._backlog))
            elif len(self._backlog) > self._allowance + self.max_backlog:
                self.close()
                raise TransportClosed(
                    f"The client is not reading: its backlog is over {self.max_backlog} bytes."
                )
            return
        sent = self._send(data)
        if sent < len(data):
            self._backlog += data[sent:]
            if not bounded:
                self._grant(len(self._backlog))
            if self._on_backlog is not None:
                self._on_backlog(True)

    def _grant(self, size: int) -> None:
        # Only the stream's own events larger than the bound widen it, by their size:
        # small ones (ticks, heartbeats) to a client that reads nothing must not.
        if size > self.max_backlog:
            self._allowance = max(self._allowance, size)

    def flush(self) -> bool:
        """Send as much of the backlog as the socket takes; return whether it is empty."""
        if self._backlog and not self.closed:
            sent = self._send(self._backlog)
            del self._backlog[:sent]
            if not self._backlog:
                self._allowance = 0
                if self._on_backlog is not None:
                    self._on_backlog(False)
        return not self._backlog

    def _send(self, data: bytes | bytearray) -> int:
        try:
            return self.sock.send(data, _SEND_FLAGS)
        except BlockingIOError:
            return 0
        except OSError as e:
            self.close()
            raise TransportClosed(f"The client connection failed: {e}.") from e

    def flush_blocking(self, timeout: float) -> bool:
        """Wait up to *timeout* seconds for the backlog to drain (a stream's normal end)."""
        deadline = time.monotonic() + timeout
        try:
            while not self.closed and not self.flush():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                wait_writable(self.sock, min(left, 1.0))
        except TransportClosed:
            return False  # the client left meanwhile: an unclean end, not a server error
        if self.closed:
            return False
        # The server writes its terminating chunk next: see acknowledged().
        return acknowledged(self.sock, deadline - time.monotonic())


def acknowledged(sock: socket.socket, timeout: float) -> bool:
    """Wait up to *timeout* seconds for the client to acknowledge every byte sent to *sock*.

    Return whether it did, with no error pending on the socket: then the server's
    terminating chunk goes out at once, and the connection may carry more requests.
    A client that stopped reading would hold that blocking send (for ever, once the
    stream has given the connection its default user timeout back), or the send
    would report the ETIMEDOUT of a connection the kernel gave up on, which the
    server logs as an error. ``True`` where the platform cannot tell (no
    ``SIOCOUTQ``).

    :param sock: the client socket, all of whose bytes the server has written.
    :param timeout: seconds to wait at most (a round trip, for a live client).
    """
    if _SIOCOUTQ is None:
        return True
    deadline = time.monotonic() + timeout
    pause = 0.001
    while True:
        try:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                return False
            if _unacknowledged(sock) == 0:
                return True
        except OSError:
            return False
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(pause, left))
        pause = min(pause * 2, 0.1)


def _header(headers: Any, name: str) -> bool:
    return any(str(key).lower() == name for key, _ in headers)


def direct_socket(
    environ: Mapping[str, Any], server_response: object, own_encoding: str | None = None
) -> socket.socket | None:
    """Return the client socket when the direct path is safe for this response, else ``None``.

    The direct path writes HTTP/1.1 chunks behind the server's back, so it is
    taken only where that framing is certain: gunicorn, a plain TCP socket in
    blocking mode, HTTP/1.1, a chunked response (as gunicorn's own response
    object reports it) without ``Content-Length`` or ``Content-Encoding``, not
    ``HEAD``; a ``Content-Encoding`` is allowed only when it is the stream's own
    (*own_encoding*: the stream compresses what it writes itself). A WSGI
    middleware that wraps ``start_response`` hides gunicorn's
    response object and so turns the direct path off; one that rewrites the
    body without touching the headers cannot be seen, and must not be used
    with the direct path (set ``DATASTAR_DIRECT_WRITES = False``).

    :param environ: the WSGI environ of the request.
    :param server_response: the object ``start_response`` is bound to.
    :param own_encoding: the ``Content-Encoding`` the stream set and applies itself.
    """
    if not DIRECT_WRITES_SUPPORTED:
        return None
    sock = environ.get("gunicorn.socket")
    # gevent and eventlet sockets are not socket.socket; TLS needs its own framing.
    if type(sock) is not socket.socket or isinstance(sock, ssl.SSLSocket):
        return None
    if sock.gettimeout() is not None:
        return None
    if environ.get("SERVER_PROTOCOL") != "HTTP/1.1" or environ.get("REQUEST_METHOD") == "HEAD":
        return None
    try:
        from gunicorn.http.wsgi import Response as GunicornResponse  # type: ignore[import-untyped]
    except ImportError:  # pragma: no cover - "gunicorn.socket" implies gunicorn
        return None
    if not isinstance(server_response, GunicornResponse):
        return None
    if not getattr(server_response, "chunked", False) or not server_response.headers_sent:
        return None
    headers = server_response.headers
    if _header(headers, "content-length"):
        return None
    # Compression: the stream's own encoding only; any other means something else
    # (a middleware) rewrites the body, which the direct path would bypass.
    encodings = [str(value) for key, value in headers if str(key).lower() == "content-encoding"]
    if encodings and encodings != [own_encoding]:
        return None
    return sock


class _Watched(Protocol):
    def _peer_gone(self, reason: str) -> None: ...

    def _socket_writable(self) -> bool: ...


class _Entry:
    __slots__ = ("sock", "owner", "mask")

    def __init__(self, sock: socket.socket, owner: _Watched, mask: int) -> None:
        self.sock = sock
        self.owner = owner
        self.mask = mask


class SocketWatcher:
    """One thread per process watching every direct socket with epoll.

    Readable with ``recv(MSG_PEEK)`` returning ``b""`` means the client sent
    FIN: its stream ends at once instead of at the next failed write. A client
    that sends bytes is pipelining: those bytes stay unread, so the socket is
    then watched for its FIN alone (``EPOLLRDHUP``), which ``poll`` confirms
    while they wait.

    epoll reports file descriptor numbers, and the kernel hands a closed
    socket's number to the next connection: an event read just before one
    socket left and another took its number may belong to the old one. So the
    watcher never ends a stream on an event alone; it asks the socket it holds
    now for its state, and acts only on what that socket reports.
    """

    _instance: SocketWatcher | None = None
    _instance_lock = threading.Lock()

    def __init__(self) -> None:
        if not DIRECT_WRITES_SUPPORTED:
            raise RuntimeError(
                "The socket watcher needs epoll (Linux); streams use the portable queue path"
                " elsewhere."
            )
        self.IN = select.EPOLLIN | select.EPOLLRDHUP
        self.OUT = select.EPOLLOUT
        self._epoll = select.epoll()
        self._lock = threading.Lock()
        self._watched: dict[int, _Entry] = {}
        self._pid = os.getpid()
        self._thread = threading.Thread(
            target=self._run, name="flask_datastar-socket-watcher", daemon=True
        )
        self._thread.start()

    @classmethod
    def get(cls) -> SocketWatcher:
        """Return this process's watcher, starting it on first use (and after a fork)."""
        with cls._instance_lock:
            if cls._instance is None or cls._instance._pid != os.getpid():
                cls._instance = cls()
            return cls._instance

    def add(self, sock: socket.socket, owner: _Watched) -> None:
        """Watch *sock* for its client's FIN on behalf of *owner*."""
        fd = sock.fileno()
        with self._lock:
            old = self._watched.pop(fd, None)
            if old is not None:
                # A socket that closed without being removed left its number behind.
                try:
                    self._epoll.unregister(fd)
                except OSError:
                    pass
            self._watched[fd] = _Entry(sock, owner, self.IN)
            self._epoll.register(fd, self.IN)

    def want_write(self, sock: socket.socket, wanted: bool) -> None:
        """Ask to be told (through ``owner._socket_writable()``) when *sock* can take data."""
        with self._lock:
            fd, entry = self._find(sock)
            if entry is None:
                return
            mask = (entry.mask | self.OUT) if wanted else (entry.mask & ~self.OUT)
            self._set_mask(fd, entry, mask)

    def remove(self, sock: socket.socket) -> None:
        """Stop watching *sock*; a newer socket that took its number is left alone."""
        with self._lock:
            fd, entry = self._find(sock)
            if entry is None:
                return
            del self._watched[fd]
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass  # already closed: the kernel dropped it from the set itself

    def _find(self, sock: socket.socket) -> tuple[int, _Entry | None]:
        # Under self._lock. Only the entry of this very socket object counts.
        fd = sock.fileno()
        entry = self._watched.get(fd)
        if entry is not None and entry.sock is sock:
            return fd, entry
        if fd == -1:  # closed already: find it by identity
            for number, candidate in self._watched.items():
                if candidate.sock is sock:
                    return number, candidate
        return fd, None

    def _set_mask(self, fd: int, entry: _Entry, mask: int) -> None:
        # Under self._lock.
        if mask != entry.mask:
            entry.mask = mask
            try:
                self._epoll.modify(fd, mask)
            except (OSError, ValueError):
                pass  # the socket closed meanwhile; its owner is about to remove it

    def __len__(self) -> int:
        return len(self._watched)

    def _run(self) -> None:
        while True:
            try:
                events = self._epoll.poll(1.0)
            except InterruptedError:
                continue
            for fd, mask in events:
                with self._lock:
                    entry = self._watched.get(fd)
                if entry is None:
                    continue
                try:
                    self._handle(fd, mask, entry)
                except Exception:  # the watcher must outlive any one stream
                    log.exception("flask_datastar: error while watching a client socket")

    def _handle(self, fd: int, mask: int, entry: _Entry) -> None:
        sock, owner = entry.sock, entry.owner
        if mask & self.OUT:
            if not owner._socket_writable():
                # Nothing left to flush (or the stream ended): a level-triggered
                # EPOLLOUT left set would wake this thread in a busy loop.
                with self._lock:
                    if self._watched.get(fd) is entry:
                        self._set_mask(fd, entry, entry.mask & ~self.OUT)
        if not mask & (self.IN | select.EPOLLERR | select.EPOLLHUP):
            return
        gone = _probe(sock, hangup=bool(mask & (select.EPOLLERR | select.EPOLLHUP)))
        if gone is None:
            return  # alive: the event was stale, or the client is pipelining
        with self._lock:
            if self._watched.get(fd) is not entry:
                # Its stream ended and the next one on the same connection (or on a new
                # one with the same number) watches it now: epoll reports the state
                # again for that entry, whose owner is the one to tell.
                return
            if gone == "":
                # Pipelined bytes wait for the server and keep the socket readable: stop
                # watching for reading, but not for the FIN that may follow them (the
                # client leaving). Without EPOLLRDHUP the stream outlived its client.
                self._set_mask(fd, entry, entry.mask & ~select.EPOLLIN)
                return
            del self._watched[fd]
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass
        owner._peer_gone(gone)


def _probe(sock: socket.socket, hangup: bool = False) -> str | None:
    """Ask *sock* itself whether its client has gone.

    :param hangup: epoll reported a hang-up or an error; it is confirmed on the
        socket as it is now (the event may have been about an earlier socket).
    :return: why the client is gone; ``""`` when it sent bytes (pipelining)
        and no FIN after them; ``None`` when nothing happened.
    """
    if hangup:
        try:
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            now = poller.poll(0)
        except (OSError, ValueError):
            return "the connection was closed"
        if now and now[0][1] & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
            return "the connection was reset"
    try:
        data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as e:
        if sock.fileno() == -1:
            return "the connection was closed"
        return f"the connection failed ({errno.errorcode.get(e.errno or 0, e)})"
    if data and not _read_shut(sock):
        return ""
    return "the client closed the connection"


def _read_shut(sock: socket.socket) -> bool:
    """Whether *sock*'s peer has sent FIN, even with bytes still waiting to be read.

    ``recv(MSG_PEEK)`` shows the FIN only once every byte before it is read, which
    the server may never do (a pipelined request, for a stream that does not end).
    """
    try:
        poller = select.poll()
        poller.register(sock, select.POLLRDHUP)
        return any(events & select.POLLRDHUP for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False
