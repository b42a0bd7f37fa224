"""The load generator of ``fanout.py``: raw SSE clients, stalled clients and the clicker.

- :class:`SSEClient`: one ``GET /sse`` on a non-blocking socket, read by an
  asyncio loop reader callback that parses HTTP/1.1 chunked framing and SSE
  events by hand (strictly: a framing error fails the client). Each read
  carries the kernel's receive timestamp (``SO_TIMESTAMPNS``), so the time an
  event reached the client does not include the time the single-threaded
  client took to get to it; the time the client saw it is kept too, and the
  difference (the client's lag) is reported.
- :class:`StalledClient`: a ``GET /sse`` with a tiny receive buffer that is
  never read, until the end of the run.
- ``python _client.py hold ...``: a stream holder, one of the processes that
  hold the N streams between them (``--client-procs``), so the load generator
  can use more than one core. It opens its share of the streams, says so on
  stdout, then answers the commands ``fanout.py`` writes on its stdin (one JSON
  line per answer) and, at the end, writes every stream's arrivals to a file.
- ``python _client.py click ...``: the clicker, run as a separate process so
  its POST timings do not depend on the SSE clients' event loop. It sends
  ``POST /click`` on a fixed schedule from a few keep-alive connections and
  prints the send times and latencies as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import http.client
import json
import pickle
import re
import selectors
import socket
import struct
import sys
import threading
import time
from array import array
from concurrent.futures import ThreadPoolExecutor
from typing import Any

# <linux/asm-generic/socket.h>: SO_TIMESTAMPNS (the "old" value; on 64-bit
# platforms its timespec is two 64-bit fields). Python does not export it.
SO_TIMESTAMPNS = 35
_CMSG_SPACE = socket.CMSG_SPACE(16)
_TIMESPEC = struct.Struct("qq")
_READ_SIZE = 256 * 1024

COUNT_RE = re.compile(rb"Button clicks: <strong>(\d+)</strong>")


def request_bytes(host: str, port: int, path: str) -> bytes:
    """The request a Datastar ``@get`` sends for the stream (signals in the query)."""
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n"
        "Datastar-Request: true\r\nUser-Agent: fanout-benchmark\r\n\r\n"
    ).encode("ascii")


class SSEClient:
    """One open stream, read by the event loop; records when each new count arrived.

    :param host: the server's address.
    :param port: the server's port.
    :param path: the stream's path and query.
    """

    __slots__ = (
        "host",
        "port",
        "path",
        "sock",
        "raw",
        "body",
        "headers_done",
        "max_count",
        "arrivals",
        "events",
        "bytes",
        "error",
        "first_event",
        "timestamps",
        "_loop",
    )

    def __init__(self, host: str, port: int, path: str) -> None:
        self.host = host
        self.port = port
        self.path = path
        self.sock: socket.socket | None = None
        self.raw = bytearray()
        self.body = bytearray()
        self.headers_done = False
        self.max_count = -1
        #: (count, kernel receive time, time the client saw it), for each new highest count.
        self.arrivals: list[tuple[int, float, float]] = []
        self.events = 0
        self.bytes = 0
        self.error: str | None = None
        self.first_event = asyncio.Event()
        self.timestamps = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    async def connect(self) -> None:
        """Open the connection, send the request and start reading in the loop."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        try:
            await loop.sock_connect(sock, (self.host, self.port))
            await loop.sock_sendall(sock, request_bytes(self.host, self.port, self.path))
        except OSError as e:
            self._fail(f"connect: {e}")
            return
        loop.add_reader(sock.fileno(), self._on_readable)

    def close(self) -> None:
        """Stop reading and close the socket; safe to repeat."""
        sock, self.sock = self.sock, None
        if sock is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(sock.fileno())
            sock.close()

    def _fail(self, message: str) -> None:
        if self.error is None:
            self.error = message
        self.first_event.set()
        self.close()

    def _on_readable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        try:
            data, ancdata, _flags, _addr = sock.recvmsg(_READ_SIZE, _CMSG_SPACE)
        except BlockingIOError:
            return
        except OSError as e:
            self._fail(f"read: {errno.errorcode.get(e.errno or 0, e)}")
            return
        seen = time.time()
        if not data:
            self._fail("the server closed the stream")
            return
        arrived = seen
        for level, kind, value in ancdata:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(value) >= 16:
                sec, nsec = _TIMESPEC.unpack_from(value)
                arrived = sec + nsec * 1e-9
                self.timestamps += 1
        self.bytes += len(data)
        try:
            self._feed(data, arrived, seen)
        except ValueError as e:
            self._fail(f"protocol error: {e}")

    def _feed(self, data: bytes, arrived: float, seen: float) -> None:
        raw = self.raw
        raw += data
        if not self.headers_done:
            end = raw.find(b"\r\n\r\n")
            if end < 0:
                if len(raw) > 16384:
                    raise ValueError("no end of headers in the first 16 KiB")
                return
            head = bytes(raw[:end]).decode("latin-1").lower()
            del raw[: end + 4]
            status = head.split("\r\n", 1)[0]
            if not status.startswith("http/1.1 200"):
                raise ValueError(f"unexpected status line {status!r}")
            if "\r\ntransfer-encoding: chunked" not in head:
                raise ValueError("the response is not chunked")
            if "\r\ncontent-type: text/event-stream" not in head:
                raise ValueError("the response is not text/event-stream")
            self.headers_done = True
        body = self.body
        pos = 0
        size = len(raw)
        # Only whole chunks are taken; a partial one waits in ``raw`` for the next read.
        while pos < size:
            line_end = raw.find(b"\r\n", pos, pos + 18)
            if line_end < 0:
                if size - pos >= 18:
                    raise ValueError(f"bad chunk-size line {bytes(raw[pos : pos + 18])!r}")
                break
            line = bytes(raw[pos:line_end])
            if not line or line.strip(b"0123456789abcdefABCDEF"):
                raise ValueError(f"bad chunk-size line {line!r}")
            length = int(line, 16)
            if length == 0:
                raise ValueError("the stream ended (terminating chunk)")
            data_end = line_end + 2 + length
            if data_end + 2 > size:
                break
            if raw[data_end : data_end + 2] != b"\r\n":
                raise ValueError("a chunk does not end with CRLF")
            body += raw[line_end + 2 : data_end]
            pos = data_end + 2
        del raw[:pos]
        end = body.rfind(b"\n\n")
        if end < 0:
            return
        block = bytes(body[: end + 2])
        del body[: end + 2]
        self.events += block.count(b"\n\n")
        best = self.max_count
        for match in COUNT_RE.finditer(block):
            count = int(match.group(1))
            if count > best:
                best = count
        if best > self.max_count:
            if self.max_count < 0:
                # The first state (a heartbeat comment may come before it).
                self.first_event.set()
            self.max_count = best
            self.arrivals.append((best, arrived, seen))


class StalledClient:
    """A stream that is opened and then never read, with a tiny receive buffer.

    Over loopback the server's kernel would size its send buffer for a 64 KiB
    segment size (about 4 MB here, minutes of events before a send ever
    fails); the client announces an Ethernet segment size instead, so the
    server's send buffer is what it would be for a client on a real network
    (about 70 KB) and the stream backs up within seconds.

    :param host: the server's address.
    :param port: the server's port.
    :param path: the stream's path and query.
    :param rcvbuf: the receive buffer asked for (the kernel doubles it).
    :param mss: the TCP maximum segment size announced to the server.
    """

    def __init__(
        self, host: str, port: int, path: str, rcvbuf: int = 4096, mss: int = 1448
    ) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Before connect, so the window and segment size the server sees stay small.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
        self.sock.settimeout(10)
        self.sock.connect((host, port))
        self.sock.sendall(request_bytes(host, port, path))

    def close(self) -> None:
        self.sock.close()


def count_ended(stalled: list[StalledClient], timeout: float) -> int:
    """Read the stalled clients at last; return how many streams the server had ended.

    A stream counts as ended when its data runs out into a close (FIN or reset)
    within *timeout* seconds; one that still has data or stays silent is alive.

    :param stalled: the clients, read here for the first time.
    :param timeout: seconds to wait in all.
    """
    ended = 0
    # epoll, not select(): with a thousand streams open these descriptors pass 1024.
    with selectors.DefaultSelector() as selector:
        for client in stalled:
            client.sock.setblocking(False)
            selector.register(client.sock, selectors.EVENT_READ)
        waiting = len(stalled)
        deadline = time.monotonic() + timeout
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for key, _ in selector.select(left):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(_READ_SIZE)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    ended += 1
                    waiting -= 1
                    selector.unregister(sock)
    return ended


# -- the clicker process --------------------------------------------------------


def run_clicker(
    host: str, port: int, rate: float, count: int, start_at: float, mark: int = 0
) -> dict[str, Any]:
    """Send *count* ``POST /click`` at *rate* per second from ``start_at`` (``time.time()``).

    :param mark: the index of the first click of the measurement window.
    :return: ``sends`` (wall-clock send times of the clicks answered 204, in
        send order), ``latencies`` (seconds, same order), ``errors``, ``cpu``
        (this process's CPU seconds), ``window_cpu`` (its CPU seconds from the
        click *mark* on, until the last answer) and ``lateness`` (how far behind
        the schedule the last click was sent, in seconds).
    """
    local = threading.local()
    results: list[tuple[float, float] | None] = [None] * count
    errors: list[str] = []
    body = b"{}"
    headers = {
        "Content-Type": "application/json",
        "Datastar-Request": "true",
        "Content-Length": str(len(body)),
    }

    def connection() -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(local, "conn", None)
        # gunicorn closes a connection idle for its --keep-alive (5 s here); a request sent
        # as it does so fails. Connections idle for a while are replaced before use.
        if conn is not None and local.used is not None and time.monotonic() - local.used > 2.0:
            conn.close()
            conn = None
        if conn is None:
            conn = http.client.HTTPConnection(host, port, timeout=60)
            conn.connect()
            assert conn.sock is not None
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            local.conn = conn
            local.used = None
        return conn

    def click(index: int) -> None:
        for attempt in (1, 2):
            conn = None
            reused = False
            try:
                conn = connection()
                reused = local.used is not None
                sent = time.time()
                started = time.perf_counter()
                conn.request("POST", "/click", body=body, headers=headers)
                response = conn.getresponse()
                response.read()
                elapsed = time.perf_counter() - started
                local.used = time.monotonic()
            except (OSError, http.client.HTTPException) as e:
                if conn is not None:
                    conn.close()
                local.conn = None
                # A kept-alive connection the server had just closed: the request never
                # reached the app, so sending it again on a new connection is safe.
                stale = isinstance(
                    e, (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected)
                )
                if attempt == 1 and reused and stale:
                    continue
                errors.append(f"click {index}: {e!r}")
                return
            if response.status != 204:
                errors.append(f"click {index}: status {response.status}")
                return
            results[index] = (sent, elapsed)
            return

    lateness = 0.0
    cpu_start = cpu_mark = time.process_time()
    with ThreadPoolExecutor(max_workers=16, thread_name_prefix="click") as pool:
        for index in range(count):
            due = start_at + index / rate
            delay = due - time.time()
            if delay > 0:
                time.sleep(delay)
            else:
                lateness = -delay
            if index == mark:
                cpu_mark = time.process_time()
            pool.submit(click, index)
    done = sorted(r for r in results if r is not None)
    return {
        "sends": [s for s, _ in done],
        "latencies": [lat for _, lat in done],
        "errors": errors,
        "cpu": time.process_time() - cpu_start,
        "window_cpu": time.process_time() - cpu_mark,
        "lateness": lateness,
    }


# -- the stream holder process --------------------------------------------------------


async def open_clients(
    host: str, port: int, path: str, n: int, concurrency: int
) -> list[SSEClient]:
    """Open *n* streams, *concurrency* at a time, each until its first state arrived.

    Once *concurrency* streams have failed, the rest are not tried: a server that
    queues streams it cannot serve would otherwise cost 30 s per wave of them.

    :return: the clients; one that failed has ``error`` set, one that did not get
        its first state within 30 s has ``max_count`` still -1.
    """
    clients = [SSEClient(host, port, path) for _ in range(n)]
    gate = asyncio.Semaphore(concurrency)
    failed = 0

    async def open_one(client: SSEClient) -> None:
        nonlocal failed
        async with gate:
            if failed >= concurrency:
                client.error = "not tried: too many streams had failed already"
                return
            await client.connect()
            # Holding the gate until the first event paces the server's thread creation.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(client.first_event.wait(), 30)
            if client.max_count < 0:
                failed += 1

    await asyncio.gather(*(open_one(client) for client in clients))
    return clients


def _reply(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def hold(host: str, port: int, path: str, n: int, concurrency: int, out: str) -> None:
    """Hold *n* streams and answer ``fanout.py``'s commands on stdin until ``dump``.

    First line on stdout: ``{"opened", "not_open", "reasons", "connect_s"}``. Then,
    for each line on stdin:

    - ``mark``: ``{"events"}``, the events received so far by all streams;
    - ``wait FINAL SECONDS``: wait until every open stream shows a count of FINAL
      or more (or SECONDS passed), then ``{"done"}``;
    - ``dump``: write every stream's arrivals to *out* (pickled: a list of
      ``(counts, kernel times, seen times, error, timestamped)``, the first three
      as arrays), close the streams, answer ``{"dumped"}`` and exit.

    :param out: the file the arrivals go to.
    """
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    clients = await open_clients(host, port, path, n, concurrency)
    not_open = [c for c in clients if c.max_count < 0]
    _reply(
        {
            "opened": n - len(not_open),
            "not_open": len(not_open),
            "reasons": sorted({c.error or "no first event in 30 s" for c in not_open})[:3],
            "connect_s": time.monotonic() - started,
        }
    )
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while True:
            line = await reader.readline()
            if not line:
                return  # fanout.py is gone
            command, *args = line.decode().split()
            if command == "mark":
                _reply({"events": sum(c.events for c in clients)})
            elif command == "wait":
                final, deadline = int(args[0]), time.monotonic() + float(args[1])
                done = False
                while time.monotonic() < deadline:
                    done = all(c.max_count >= final or c.sock is None for c in clients)
                    if done:
                        break
                    await asyncio.sleep(0.05)
                _reply({"done": done})
            elif command == "dump":
                for client in clients:
                    client.close()
                data = [
                    (
                        array("q", [a[0] for a in c.arrivals]),
                        array("d", [a[1] for a in c.arrivals]),
                        array("d", [a[2] for a in c.arrivals]),
                        c.error,
                        c.timestamps > 0,
                    )
                    for c in clients
                ]
                with open(out, "wb") as f:
                    pickle.dump(data, f, protocol=pickle.HIGHEST_PROTOCOL)
                _reply({"dumped": len(data)})
                return
            else:
                raise SystemExit(f"unknown command {command!r}")
    finally:
        for client in clients:
            client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The load generator of fanout.py (internal).")
    sub = parser.add_subparsers(dest="command", required=True)
    holder = sub.add_parser("hold")
    holder.add_argument("--host", default="127.0.0.1")
    holder.add_argument("--port", type=int, required=True)
    holder.add_argument("--path", required=True)
    holder.add_argument("--streams", type=int, required=True)
    holder.add_argument("--concurrency", type=int, required=True)
    holder.add_argument("--out", required=True)
    click = sub.add_parser("click")
    click.add_argument("--host", default="127.0.0.1")
    click.add_argument("--port", type=int, required=True)
    click.add_argument("--rate", type=float, required=True)
    click.add_argument("--count", type=int, required=True)
    click.add_argument("--start-at", type=float, required=True)
    click.add_argument("--mark", type=int, default=0, help="first click of the window")
    args = parser.parse_args(argv)
    if args.command == "hold":
        coro = hold(args.host, args.port, args.path, args.streams, args.concurrency, args.out)
        try:
            import uvloop
        except ImportError:
            asyncio.run(coro)
        else:
            # A cheaper loop leaves more of the core to parsing: the holders must not be
            # the bottleneck at 10,000 streams.
            uvloop.run(coro)
        return 0
    result = run_clicker(args.host, args.port, args.rate, args.count, args.start_at, args.mark)
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
