"""The floor for ``fanout.py``: the least a server can do to serve the CQRS demo.

A plain :class:`asyncio.Protocol` on uvloop, no framework, one process, one
thread. It serves what ``example_app.py`` serves and sends the same bytes on
the wire for the events:

- ``GET /``: the page, with the current ``#content``.
- ``GET /sse``: an HTTP/1.1 chunked ``text/event-stream`` that starts, as
  flask_datastar's does, with a ``:`` comment and the full ``#content`` patch,
  then gets the same patch again one second after its previous one (each
  stream on its own phase, as the example's per-tab ``yield gen.sleep(1)``).
- ``POST /click``: counts a click, renders the content once and writes the
  same chunk (the patch with ``selector #content``) to every open stream, then
  answers 204.

The content is rendered by ``example_app.render_content`` itself (once per
change, as in the example), and each event is framed once and written to every
stream with one ``transport.write``: a C-level ``send`` per stream. The
per-stream ticks come from one timer: every stream's period is the same, so a
FIFO of (due time, stream) stays in due order and one ``call_at`` for its head
serves them all. A stream whose unsent bytes pass 64 KiB (a client that stopped
reading) is aborted, as flask_datastar ends it.

Run it with ``python benchmarks/floor_server.py --port 8990`` (the repository
root must be importable: it runs from any directory).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import email.utils
import resource
import sys
import time
from pathlib import Path
from typing import cast

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import example_app  # noqa: E402

TICK = 1.0
#: Unsent bytes past which a stream is ended (flask_datastar's DATASTAR_MAX_BACKLOG).
MAX_BACKLOG = 64 * 1024
#: The end of a request's headers; a request whose headers pass 16 KiB is refused.
MAX_HEAD = 16 * 1024


def frame_patch(html: str, selector: str | None = None) -> bytes:
    """Return the ``datastar-patch-elements`` event for *html* as one HTTP/1.1 chunk.

    The event's text is exactly what ``flask_datastar.SSE.patch_elements`` makes
    (checked at start-up by :func:`check_bytes`).

    :param html: the elements, one ``data: elements`` line per line.
    :param selector: the ``data: selector`` line, if any.
    """
    lines = ["event: datastar-patch-elements\n"]
    if selector:
        lines.append(f"data: selector {selector}\n")
    lines += [f"data: elements {line}\n" for line in html.splitlines()]
    lines.append("\n")
    data = "".join(lines).encode()
    return b"%X\r\n%s\r\n" % (len(data), data)


def check_bytes() -> None:
    """Fail at start-up if the floor's events differ from flask_datastar's by one byte."""
    from flask_datastar import SSE

    html = example_app.render_content()
    for selector in (None, "#content"):
        ours = frame_patch(html, selector)
        theirs = str(SSE.patch_elements(html, selector=selector)).encode()
        if ours != b"%X\r\n%s\r\n" % (len(theirs), theirs):
            raise SystemExit(
                f"The floor's event (selector={selector!r}) differs from flask_datastar's:"
                f"\n{ours!r}\n{theirs!r}\nUpdate frame_patch() to the new wire format."
            )


class Cache:
    """The framed tick and click events, made once per content change."""

    def __init__(self) -> None:
        self._tick: tuple[str, bytes] = ("", b"")
        self._click: tuple[str, bytes] = ("", b"")
        self._date: tuple[int, bytes] = (0, b"")

    def tick(self) -> bytes:
        html = example_app.render_content()
        if self._tick[0] is not html:
            self._tick = (html, frame_patch(html))
        return self._tick[1]

    def click(self) -> bytes:
        html = example_app.render_content()
        if self._click[0] is not html:
            self._click = (html, frame_patch(html, "#content"))
        return self._click[1]

    def date(self) -> bytes:
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, email.utils.formatdate(now, usegmt=True).encode())
        return self._date[1]


class Floor:
    """The server's state: the open streams, the tick queue and the page parts."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.cache = Cache()
        self.streams: set[Connection] = set()
        # (due, stream) in due order: every stream's period is TICK.
        self.ticks: collections.deque[tuple[float, Connection]] = collections.deque()
        self.timer: asyncio.TimerHandle | None = None
        head, _, tail = PAGE.partition("\x00")
        self.page_head, self.page_tail = head.encode(), tail.encode()

    def schedule(self, stream: Connection, due: float) -> None:
        self.ticks.append((due, stream))
        if self.timer is None:
            self.timer = self.loop.call_at(due, self.run_ticks)

    def run_ticks(self) -> None:
        self.timer = None
        ticks = self.ticks
        now = self.loop.time()
        while ticks and ticks[0][0] <= now:
            due, stream = ticks.popleft()
            if stream.open:
                stream.send(self.cache.tick())
                ticks.append((due + TICK, stream))
        if ticks:
            self.timer = self.loop.call_at(ticks[0][0], self.run_ticks)

    def click(self) -> None:
        example_app.add_click()
        chunk = self.cache.click()
        for stream in list(self.streams):
            stream.send(chunk)


class Connection(asyncio.Protocol):
    """One client connection: keep-alive requests, or one event stream."""

    __slots__ = ("floor", "transport", "buffer", "open", "streaming")

    def __init__(self, floor: Floor) -> None:
        self.floor = floor
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.open = True
        self.streaming = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, but behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        self.floor.streams.discard(self)

    def eof_received(self) -> bool:
        return False  # close the connection

    def send(self, chunk: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(chunk)
        if transport.get_write_buffer_size() > MAX_BACKLOG:
            self.open = False
            self.floor.streams.discard(self)
            transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.streaming:
            return  # a stream's client has nothing more to say
        self.buffer += data
        while not self.streaming:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEAD:
                    self.respond(b"431 Request Header Fields Too Large", b"")
                    self.close()
                return
            head = self.buffer[:end].decode("latin-1")
            request_line, *header_lines = head.split("\r\n")
            length = 0
            for line in header_lines:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length :]
            method, _, rest = request_line.partition(" ")
            path = rest.partition(" ")[0].partition("?")[0]
            self.handle(method, path)

    def handle(self, method: str, path: str) -> None:
        floor = self.floor
        if method == "GET" and path == "/sse":
            self.streaming = True
            assert self.transport is not None
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nServer: floor\r\nDate: %s\r\nConnection: keep-alive\r\n"
                b"Transfer-Encoding: chunked\r\nCache-Control: no-cache\r\n"
                b"Content-Type: text/event-stream\r\nX-Accel-Buffering: no\r\n\r\n"
                b"3\r\n:\n\n\r\n%s" % (floor.cache.date(), floor.cache.tick())
            )
            floor.streams.add(self)
            floor.schedule(self, floor.loop.time() + TICK)
        elif method == "GET" and path == "/":
            html = example_app.render_content().encode()
            body = floor.page_head + html + floor.page_tail
            self.respond(b"200 OK", body, b"text/html; charset=utf-8")
        elif method == "POST" and path == "/click":
            floor.click()
            self.respond(b"204 NO CONTENT", None, b"text/html; charset=utf-8")
        else:
            self.respond(b"404 NOT FOUND", b"Not found.\n", b"text/plain")

    def respond(self, status: bytes, body: bytes | None, content_type: bytes = b"") -> None:
        assert self.transport is not None
        head = b"HTTP/1.1 %s\r\nServer: floor\r\nDate: %s\r\nConnection: keep-alive\r\n" % (
            status,
            self.floor.cache.date(),
        )
        if content_type:
            head += b"Content-Type: %s\r\n" % content_type
        if body is not None:
            head += b"Content-Length: %d\r\n" % len(body)
        self.transport.write(head + b"\r\n" + (body or b""))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def render_page() -> str:
    """The example's page with a NUL where the content goes (filled per request)."""
    with example_app.app.test_request_context("/"):
        from flask import render_template_string

        return render_template_string(example_app.PAGE, content="\x00")


PAGE = render_page()


def raise_file_limit() -> None:
    """Raise the open-file limit to its hard limit: one descriptor per stream."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def serve(host: str, port: int, backlog: int) -> None:
    loop = asyncio.get_running_loop()
    floor = Floor(loop)
    server = await loop.create_server(
        lambda: Connection(floor), host, port, backlog=backlog, reuse_address=True
    )
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The floor server of fanout.py.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8990)
    parser.add_argument("--backlog", type=int, default=4096)
    args = parser.parse_args(argv)
    import uvloop

    raise_file_limit()
    check_bytes()
    uvloop.run(serve(args.host, args.port, args.backlog))
    return 0


if __name__ == "__main__":
    sys.exit(main())
