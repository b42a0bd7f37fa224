"""The transports on real sockets: chunk framing, partial sends, backlog, the watcher."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from flask_datastar.transport import (
    Chunk,
    QueueTransport,
    SocketTransport,
    SocketWatcher,
    TransportClosed,
)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    yield a, b
    a.close()
    b.close()


def test_chunk_framing_is_what_gunicorn_writes() -> None:
    chunk = Chunk("event: x\ndata: é\n\n")
    assert chunk.data == "event: x\ndata: é\n\n".encode()
    assert chunk.framed == b"13\r\nevent: x\ndata: \xc3\xa9\n\n\r\n"
    assert chunk.head == b"13\r\n"  # the size line is made once, however many sockets
    assert len(chunk) == 19


def test_queue_transport_is_bounded_for_others_not_for_the_owner() -> None:
    queue = QueueTransport(max_bytes=10)
    queue.write(Chunk(b"12345"))
    queue.write(Chunk(b"67890"))
    with pytest.raises(TransportClosed, match="not reading"):
        queue.write(Chunk(b"x"))
    queue.write_unbounded(Chunk(b"owner"))
    assert queue.pending() == 15
    assert queue.take() == b"1234567890owner"
    assert queue.pending() == 0 and queue.take() == b""


def read_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        data += sock.recv(n - len(data))
    return bytes(data)


def test_partial_sends_wait_in_the_backlog_in_order(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair
    flags: list[bool] = []
    transport = SocketTransport(server, max_backlog=1024 * 1024, on_backlog=flags.append)
    chunks = [Chunk(bytes([65 + i % 26]) * 3000) for i in range(40)]
    for chunk in chunks:
        transport.write(chunk)  # never blocks
    assert transport.pending() > 0 and flags == [True]
    expected = b"".join(c.framed for c in chunks)
    received = bytearray()
    while len(received) < len(expected):
        received += client.recv(65536)
        transport.flush()
    assert bytes(received) == expected
    assert transport.pending() == 0 and flags == [True, False]


def test_bytes_of_one_stream_are_framed_as_a_chunk_in_order_with_chunks(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    # A stream's own bytes (its compressed events) need no Chunk: the transport frames
    # them, also when they wait in the backlog behind a partial send.
    server, client = pair
    transport = SocketTransport(server, max_backlog=1024 * 1024)
    parts: list[Chunk | bytes] = [Chunk(b"a" * 5000), b"\x00\xff" * 2000, b"tail", Chunk(b"end")]
    for part in parts:
        transport.write(part)
    transport.write(b"")  # nothing: an empty chunk would end the response
    expected = b"".join(
        part.framed if isinstance(part, Chunk) else b"%X\r\n%s\r\n" % (len(part), part)
        for part in parts
    )
    assert transport.pending() > 0  # some of it waited in the backlog
    received = bytearray()
    while len(received) < len(expected):
        received += client.recv(65536)
        transport.flush()
    assert bytes(received) == expected
    transport.close()
    with pytest.raises(TransportClosed, match="closed"):
        transport.write(b"")
    with pytest.raises(TransportClosed, match="closed"):
        transport.write(b"late")


def test_a_chunk_of_a_subclass_is_framed_as_a_chunk(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    # Stream.send takes any Chunk, a subclass's too (one that carries a label, say): the
    # transport frames it from its data, as it did before it took bytes as well.
    class LabelledChunk(Chunk):
        __slots__ = ("label",)

    server, client = pair
    transport = SocketTransport(server, max_backlog=8192)
    chunk = LabelledChunk(b"data: x\n\n")
    transport.write(chunk)
    assert read_exactly(client, len(chunk.framed)) == b"9\r\ndata: x\n\n\r\n"


def test_backlog_overflow_closes_the_transport(pair: tuple[socket.socket, socket.socket]) -> None:
    server, _ = pair
    transport = SocketTransport(server, max_backlog=8192)
    with pytest.raises(TransportClosed, match="not reading"):
        for _ in range(1000):
            transport.write(Chunk(b"x" * 1000))
    assert transport.closed
    with pytest.raises(TransportClosed, match="closed"):
        transport.write(Chunk(b"late"))


def test_a_send_error_closes_the_transport(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    client.close()
    transport = SocketTransport(server, max_backlog=8192)
    with pytest.raises(TransportClosed, match="failed"):
        for _ in range(10):
            transport.write(Chunk(b"x" * 100))


class Owner:
    def __init__(self) -> None:
        self.gone = threading.Event()
        self.reason = ""
        self.writable = threading.Event()

    def _peer_gone(self, reason: str) -> None:
        self.reason = reason
        self.gone.set()

    def _socket_writable(self) -> None:
        self.writable.set()


def test_watcher_sees_fin_and_ignores_pipelined_bytes() -> None:
    watcher = SocketWatcher.get()
    assert SocketWatcher.get() is watcher  # one per process
    server, client = socket.socketpair()
    try:
        owner = Owner()
        watcher.add(server, owner)
        client.sendall(b"GET /next HTTP/1.1\r\n\r\n")  # pipelining: not a disconnect
        assert not owner.gone.wait(0.3)
        watcher.want_write(server, True)
        assert owner.writable.wait(5)
        watcher.want_write(server, False)
        watcher.remove(server)
        owner2 = Owner()
        server2, client2 = socket.socketpair()
        try:
            watcher.add(server2, owner2)
            client2.shutdown(socket.SHUT_WR)  # FIN
            assert owner2.gone.wait(5)
            assert owner2.reason == "the client closed the connection"
        finally:
            watcher.remove(server2)
            server2.close()
            client2.close()
    finally:
        watcher.remove(server)
        server.close()
        client.close()


def test_the_owners_own_events_never_wait_nor_fail_and_its_loop_drains_them(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """The stream's own thread may run while the application holds a lock: its sends
    neither wait nor fail. Its loop then waits, outside the handler, for the backlog."""
    from flask_datastar.stream import Stream, StreamConfig

    server, client = pair
    gen = Stream({}, StreamConfig(max_backlog=4096, send_timeout=10))
    gen._owner = threading.get_ident()
    gen._transport = SocketTransport(server, max_backlog=4096)
    small = "event: s\ndata: " + "s" * 1000 + "\n\n"
    sent = []
    while gen._transport.pending() == 0:  # until the kernel's buffers are full
        gen.send(small)
        sent.append(small)
    big = "event: b\ndata: " + "b" * 100_000 + "\n\n"
    gen.send(big)  # returns at once, far over the bound
    sent.append(big)
    assert not gen.closed and gen._transport.pending() > 100_000
    # Another thread may add within what the owner already queued, not beyond.
    other = threading.Thread(target=gen.send, args=(small,))
    other.start()
    other.join()
    sent.append(small)
    assert not gen.closed
    expected = b"".join(Chunk(e).framed for e in sent)
    received = bytearray()

    def read_slowly() -> None:
        while len(received) < len(expected):
            received.extend(client.recv(2048))

    reader = threading.Timer(0.2, read_slowly)
    reader.start()
    gen._drain_owner()  # what the stream's loop does before it goes on
    assert gen._transport.pending() <= 4096
    while gen._transport.pending():
        gen._transport.flush()
    reader.join(10)
    assert bytes(received) == expected
    assert not gen.closed


def test_the_owners_small_events_do_not_widen_the_bound(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    # Ticks and heartbeats to a client that reads nothing must not let broadcasts
    # pile up past max_backlog.
    server, _ = pair
    transport = SocketTransport(server, max_backlog=8192)
    small = Chunk(b"x" * 1000)
    while transport.pending() == 0:
        transport.write(small, bounded=False)
    for _ in range(4):
        transport.write(small, bounded=False)  # the owner's ticks
    with pytest.raises(TransportClosed, match="not reading"):
        for _ in range(100):
            transport.write(small)  # a broadcaster's
    assert transport.pending() <= 8192 + len(small.framed)


def test_a_clean_end_needs_room_for_the_servers_terminating_chunk(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """After the backlog, the server writes its terminating chunk with a blocking send.
    A client that takes nothing (its buffers full, our backlog empty) would hold that
    send until the TCP user timeout, which gunicorn then logs as an error: the end is
    not clean, and the stream is cut instead (found by the torture test)."""
    server, client = pair
    transport = SocketTransport(server, max_backlog=8192)
    server.setblocking(False)
    try:
        while True:
            server.send(b"x" * 4096)  # fill the kernel's buffers behind the transport
    except BlockingIOError:
        pass
    server.setblocking(True)
    assert transport.pending() == 0
    assert not transport.flush_blocking(0.3)
    # Once the client reads, there is room again, and the end is clean.
    client.setblocking(False)
    try:
        while client.recv(65536):
            pass
    except BlockingIOError:
        pass
    assert transport.flush_blocking(0.3)
