"""Tests of the test infrastructure: the SSE parser, the raw HTTP client, the servers."""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import pytest
from flask import Flask, Response, request
from flask.testing import FlaskClient

from flask_datastar import SSE, FlaskDatastar, SSERegistry, Stream, open_streams, sse_stream
from flask_datastar.testing import (
    Cleanup,
    LiveServer,
    ServerSentEvent,
    SSEParser,
    StreamEnded,
    iter_events,
    open_stream,
    parse_events,
)
from tests.helpers import (
    ConnectionClosed,
    GunicornServer,
    HeaderDict,
    ProtocolError,
    RawHTTPStream,
    RedisServer,
    datastar_js,
    free_port,
    make_self_signed_cert,
    post,
    process_alive,
    require_module,
    require_tool,
)

# --- SSE parser -------------------------------------------------------------------------


@pytest.mark.parametrize("eol", ["\n", "\r\n", "\r"], ids=["LF", "CRLF", "CR"])
def test_parser_line_endings(eol: str) -> None:
    text = eol.join(
        [
            "event: datastar-patch-elements",
            "id: 7",
            "retry: 2000",
            "data: selector #a",
            "data: elements <div>",
            "data: elements </div>",
            "",
            "data: second",
            "",
            "",
        ]
    )
    assert parse_events(text) == [
        ServerSentEvent(
            event="datastar-patch-elements",
            id="7",
            retry=2000,
            data=["selector #a", "elements <div>", "elements </div>"],
        ),
        ServerSentEvent(data=["second"]),
    ]


def test_parser_mixed_line_endings() -> None:
    assert parse_events(b"data: a\rdata: b\r\ndata: c\n\r\n") == [
        ServerSentEvent(data=["a", "b", "c"])
    ]


@pytest.mark.parametrize(
    ("line", "value"),
    [
        ("data:x", "x"),
        ("data: x", "x"),
        ("data:  x", " x"),
        ("data: x ", "x "),
        ("data:", ""),
        ("data: ", ""),
        ("data", ""),
        ("data: a: b", "a: b"),
    ],
)
def test_parser_strips_one_leading_space(line: str, value: str) -> None:
    assert parse_events(f"{line}\n\n") == [ServerSentEvent(data=[value])]


def test_parser_counts_comments_and_ignores_them() -> None:
    parser = SSEParser()
    assert parser.feed(": heartbeat\n\n:\n\ndata: a\n: inside\n\n") == [ServerSentEvent(data=["a"])]
    assert parser.comments == 3


def test_parser_ignores_unknown_fields() -> None:
    assert parse_events("foo: bar\ndata: a\nData: b\n\n") == [ServerSentEvent(data=["a"])]


@pytest.mark.parametrize(
    ("block", "retry"),
    [("retry: 1500", 1500), ("retry: 15x", None), ("retry: -1", None), ("retry:", None)],
)
def test_parser_retry_must_be_digits(block: str, retry: int | None) -> None:
    parser = SSEParser()
    assert parser.feed(f"{block}\ndata: a\n\n") == [ServerSentEvent(retry=retry, data=["a"])]
    assert parser.retry == retry


def test_parser_id_is_per_event_and_last_event_id_persists() -> None:
    parser = SSEParser()
    events = parser.feed("id: 1\ndata: a\n\ndata: b\n\nid: x\0y\ndata: c\n\nid\ndata: d\n\n")
    assert [event.id for event in events] == ["1", None, None, ""]
    assert parser.last_event_id == ""


def test_parser_block_without_data_or_event_dispatches_nothing() -> None:
    parser = SSEParser()
    assert parser.feed("retry: 500\n\nid: 3\n\n\n\n") == []
    assert (parser.retry, parser.last_event_id) == (500, "3")


def test_parser_returns_event_field_without_data() -> None:
    assert parse_events("event: datastar-patch-signals\n\n") == [
        ServerSentEvent(event="datastar-patch-signals")
    ]


def test_parser_empty_event_field_means_message() -> None:
    assert parse_events("event:\ndata: a\n\n") == [ServerSentEvent(event="message", data=["a"])]


def test_parser_strips_only_a_leading_bom() -> None:
    events = parse_events("\ufeffdata: a\n\n\ufeffdata: b\n\n".encode())
    assert events == [ServerSentEvent(data=["a"])]


def test_parser_holds_an_unfinished_event() -> None:
    parser = SSEParser()
    assert parser.feed("data: a\n") == []
    assert parser.has_pending
    assert parser.feed("\n") == [ServerSentEvent(data=["a"])]
    assert not parser.has_pending
    assert parse_events("data: a\n\ndata: b\n") == [ServerSentEvent(data=["a"])]


def test_parser_rejects_invalid_utf8() -> None:
    with pytest.raises(UnicodeDecodeError):
        SSEParser().feed(b"data: \xff\n\n")


SAMPLE = (
    b"\xef\xbb\xbf: hello\r\n\r\n"
    b"event: datastar-patch-elements\r\n"
    b"id: 1\r"
    b"data: elements <p>caf\xc3\xa9 \xe2\x82\xac</p>\r\n"
    b"\r"
    b"data: a\n"
    b"data:\n"
    b"\n"
)
SAMPLE_EVENTS = [
    ServerSentEvent(
        event="datastar-patch-elements", id="1", data=["elements <p>caf\u00e9 \u20ac</p>"]
    ),
    ServerSentEvent(data=["a", ""]),
]


def test_parser_sample() -> None:
    parser = SSEParser()
    assert parser.feed(SAMPLE) == SAMPLE_EVENTS
    assert parser.comments == 1


@pytest.mark.parametrize("offset", range(len(SAMPLE) + 1))
def test_parser_split_at_every_offset(offset: int) -> None:
    parser = SSEParser()
    events = parser.feed(SAMPLE[:offset]) + parser.feed(SAMPLE[offset:])
    assert events == SAMPLE_EVENTS
    assert parser.comments == 1
    assert not parser.has_pending


def test_parser_one_byte_at_a_time() -> None:
    parser = SSEParser()
    events = [event for i in range(len(SAMPLE)) for event in parser.feed(SAMPLE[i : i + 1])]
    assert events == SAMPLE_EVENTS


def test_parser_cr_then_lf_in_separate_text_pieces() -> None:
    parser = SSEParser()
    assert parser.feed("data: a\r") == []
    assert parser.feed("") == []
    assert parser.feed("\n\r\n") == [ServerSentEvent(data=["a"])]


# --- ServerSentEvent accessors ---------------------------------------------------------


def test_event_accessors() -> None:
    event = ServerSentEvent(
        event="datastar-patch-elements",
        data=[
            "selector #list",
            "mode append",
            "elements <li>",
            "elements ",
            "elements </li>",
            "elementsX no",
            "elements",
        ],
    )
    assert event.datalines("elements") == ["<li>", "", "</li>"]
    assert event.elements == "<li>\n\n</li>"
    assert event.selector == "#list"
    assert event.mode == "append"
    assert event.signals is None
    assert event.datavalue("namespace") is None


def test_event_signals_joins_lines_before_decoding() -> None:
    event = ServerSentEvent(
        event="datastar-patch-signals",
        data=["onlyIfMissing true", 'signals {"a":1,', 'signals "b":{"c":null}}'],
    )
    assert event.signals == {"a": 1, "b": {"c": None}}
    assert event.elements is None
    assert event.selector is None
    assert event.mode is None


# --- iter_events -----------------------------------------------------------------------


@dataclass
class FakeResponse:
    """A response over a list of pieces that records whether it was closed."""

    pieces: Sequence[bytes | str]
    closed: bool = False
    served: list[bytes | str] = field(default_factory=list)

    @property
    def response(self) -> Iterator[bytes | str]:
        for piece in self.pieces:
            self.served.append(piece)
            yield piece

    def close(self) -> None:
        self.closed = True


def test_iter_events_stops_at_limit_and_closes() -> None:
    response = FakeResponse([b"data: 1\n\ndata: 2\n\ndata: 3\n\n", b"data: 4\n\n"])
    assert [event.data for event in iter_events(response, limit=2)] == [["1"], ["2"]]
    assert response.closed
    assert response.served == [response.pieces[0]]


def test_iter_events_reads_to_the_end_without_limit() -> None:
    response = FakeResponse([b"data: 1\n", b"\n", "data: 2\n\n", b"data: cut"])
    assert [event.data for event in iter_events(response)] == [["1"], ["2"]]
    assert response.closed


def test_iter_events_times_out_and_closes() -> None:
    response = FakeResponse([b": ping\n\n"] * 3)
    with pytest.raises(TimeoutError, match="Waited 0 s for 1 events but got 0"):
        list(iter_events(response, limit=1, timeout=0))
    assert response.closed


def test_iter_events_closes_when_the_consumer_breaks() -> None:
    response = FakeResponse([b"data: 1\n\ndata: 2\n\n"])
    events = iter_events(response)
    assert next(events).data == ["1"]
    events.close()
    assert response.closed


def test_iter_events_with_flask_test_client_closes_the_generator() -> None:
    app = Flask(__name__)
    finished = threading.Event()

    @app.get("/stream")
    def stream() -> tuple[Iterator[str], dict[str, str]]:
        def generate() -> Iterator[str]:
            try:
                number = 0
                while True:
                    yield f"event: tick\nid: {number}\ndata: n {number}\n\n"
                    number += 1
            finally:
                finished.set()

        return generate(), {"Content-Type": "text/event-stream"}

    response = app.test_client().get("/stream", buffered=False)
    events = list(iter_events(response, limit=3))
    assert [event.id for event in events] == ["0", "1", "2"]
    assert events[2].datalines("n") == ["2"]
    assert finished.is_set()


# --- open_stream: readers with real timeouts ---------------------------------------------

EXAMPLE_DIR = Path(__file__).resolve().parent.parent / "examples" / "testing-your-app"


@dataclass
class ReaderApp:
    """An app with a registry, for the readers: ``/sse`` streams, ``/say`` broadcasts."""

    app: Flask
    registry: SSERegistry
    disconnected: list[Stream]

    @property
    def client(self) -> FlaskClient:
        client = self.app.test_client()
        client.environ_base["HTTP_DATASTAR_REQUEST"] = "true"  # as Datastar's actions
        return client


@pytest.fixture
def reader_app() -> Iterator[ReaderApp]:
    app = Flask(__name__)
    # No heartbeats: a wait in the stream's own loop would never end.
    app.config.update(TESTING=True, DATASTAR_HEARTBEAT=0)
    datastar = FlaskDatastar(app)
    registry = datastar.registry(app, "readers")
    disconnected: list[Stream] = []

    @app.get("/sse")
    @datastar.sse(on_connect=registry.register, on_disconnect=disconnected.append)
    def sse(gen: Stream) -> Iterator[object]:
        gen.patch_elements(f'<p id="hello">{request.args.get("name", "")}</p>')
        yield gen.sleep()

    @app.post("/say")
    def say() -> tuple[str, int]:
        registry.broadcast(SSE.patch_signals({"said": request.args["what"]}))
        return "", 204

    @app.get("/fails")
    @datastar.sse
    def fails(gen: Stream) -> Iterator[object]:
        gen.patch_elements('<p id="a">a</p>')
        yield gen.sleep(0)
        raise LookupError("the handler failed")

    @app.get("/broken")
    def broken() -> str:
        raise KeyError("the view failed")

    @app.get("/short")
    @datastar.sse
    def short(gen: Stream) -> None:
        gen.patch_signals({"one": 1})

    yield ReaderApp(app, registry, disconnected)
    registry.close()


def reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("flask_datastar-test-reader")]


def test_next_event_has_a_real_timeout_without_heartbeats(reader_app: ReaderApp) -> None:
    client = reader_app.client
    with open_stream(client, "/sse?name=ada") as reader:
        assert reader.status_code == 200
        assert reader.headers["content-type"].startswith("text/event-stream")
        assert reader.next_event().elements == '<p id="hello">ada</p>'
        with pytest.raises(TimeoutError, match="No event arrived on '/sse\\?name=ada'"):
            reader.next_event(timeout=0.1)
        client.post("/say?what=hi")
        assert reader.next_event().signals == {"said": "hi"}
        assert reader.comments == 1  # the first chunk, which carries the headers
        assert [event.event for event in reader.received] == [
            "datastar-patch-elements",
            "datastar-patch-signals",
        ]


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0), (1, 0, 2)], ids=str)
def test_streams_close_in_any_order(reader_app: ReaderApp, order: tuple[int, ...]) -> None:
    client = reader_app.client
    readers = [open_stream(client, f"/sse?name={i}") for i in range(3)]
    assert len(reader_app.registry) == 3
    for reader in readers:
        assert isinstance(reader.stream, Stream)
        assert reader.stream.environ["QUERY_STRING"] == f"name={readers.index(reader)}"
        reader.next_event()
    for count, index in enumerate(order, 1):
        readers[index].close()
        # The stream has ended and its hooks have run when close() returns.
        assert len(reader_app.disconnected) == count
        assert reader_app.disconnected[-1] is readers[index].stream
        assert readers[index].ended
    assert len(reader_app.registry) == 0
    assert not reader_threads()
    assert not [s for s in open_streams() if s in [r.stream for r in readers]]
    readers[0].close()  # again: nothing happens


def test_events_wait_for_and_iteration(reader_app: ReaderApp) -> None:
    client = reader_app.client
    reader = open_stream(client, "/sse", signals={"ignored": True}, timeout=2)
    try:
        for word in ("a", "b", "c"):
            client.post(f"/say?what={word}")
        first, second = reader.events(2)
        assert (first.elements, second.signals) == ('<p id="hello"></p>', {"said": "a"})
        assert reader.wait_for(lambda e: e.signals == {"said": "c"}).signals == {"said": "c"}
        with pytest.raises(TimeoutError):
            reader.events(1, timeout=0.1)
    finally:
        reader.close()
    assert list(reader) == []  # ended: iteration stops at once


def test_a_stream_that_ends_by_itself(reader_app: ReaderApp) -> None:
    reader = open_stream(reader_app.client, "/short")
    assert reader.stream is None or reader.stream.closed
    assert [event.signals for event in reader] == [{"one": 1}]
    with pytest.raises(StreamEnded, match="has ended after 1 event"):
        reader.next_event()
    reader.close()


def test_a_view_error_is_raised_by_open_stream(reader_app: ReaderApp) -> None:
    with pytest.raises(KeyError, match="the view failed"):
        open_stream(reader_app.client, "/broken")
    assert not reader_threads()


def test_a_handler_error_ends_the_stream_and_is_not_lost(reader_app: ReaderApp) -> None:
    reader = open_stream(reader_app.client, "/fails")
    assert reader.next_event().elements == '<p id="a">a</p>'
    with pytest.raises(StreamEnded, match="with an error") as ended:
        reader.next_event()
    assert isinstance(ended.value.__cause__, LookupError)
    reader.close()  # the test saw the error: nothing more to say

    unread = open_stream(reader_app.client, "/fails")
    assert unread.wait_ended()
    with pytest.raises(RuntimeError, match="'/fails' failed: LookupError") as failed:
        unread.close()
    assert isinstance(failed.value.__cause__, LookupError)


@pytest.mark.parametrize(
    ("path", "why"),
    [("/blocks", "blocks between two 'yield'"), ("/plain", "not a flask_datastar stream")],
)
def test_close_says_why_a_stream_did_not_end(reader_app: ReaderApp, path: str, why: str) -> None:
    release = threading.Event()
    blocking = threading.Event()

    @reader_app.app.get("/blocks")
    @sse_stream
    def blocks(gen: Stream) -> Iterator[object]:
        gen.patch_signals({"a": 1})
        yield gen.sleep(0)
        blocking.set()
        release.wait(10)  # not gen.sleep: a close cannot interrupt it

    @reader_app.app.get("/plain")
    def plain() -> Response:
        def body() -> Iterator[str]:
            yield "data: a\n\n"
            blocking.set()
            release.wait(10)

        return Response(body(), mimetype="text/event-stream")

    reader = open_stream(reader_app.client, path)
    reader.next_event()
    # The step after the pause runs on the scheduler: close once it has started.
    assert blocking.wait(5)
    with pytest.raises(RuntimeError, match=f"did not end within 0.1 s of being closed: .*{why}"):
        reader.close(timeout=0.1)
    release.set()
    reader.close()
    assert reader.ended


# --- Cleanup ------------------------------------------------------------------------------


def test_cleanup_ends_streams_registries_and_their_threads(reader_app: ReaderApp) -> None:
    client = reader_app.client
    before = set(threading.enumerate())
    called: list[str] = []
    standalone = SSERegistry("standalone", linger=60)
    with Cleanup() as cleanup:
        owned = cleanup.open_stream(client, "/sse")
        stray = open_stream(client, "/sse")  # not the clean-up's: ended all the same
        client.post("/say?what=x")  # the app's registry starts its broadcaster
        standalone.broadcast(SSE.patch_signals({"a": 1}))
        cleanup.add(standalone)
        cleanup.add(lambda: called.append("callback"))
        assert owned.next_event() and owned.next_event().signals == {"said": "x"}
        assert {t.name for t in set(threading.enumerate()) - before} >= {
            "flask_datastar-broadcaster-readers",
            "flask_datastar-broadcaster-standalone",
        }
    assert stray.wait_ended()
    assert owned.ended and stray.ended
    assert len(reader_app.disconnected) == 2
    assert called == ["callback"]
    assert set(threading.enumerate()) <= before, "a thread outlived the clean-up"
    cleanup.close()  # again: nothing happens


def test_cleanup_reports_what_it_could_not_close(reader_app: ReaderApp) -> None:
    cleanup = Cleanup()
    assert cleanup.open_stream(reader_app.client, "/fails").wait_ended()
    cleanup.add(lambda: 1 / 0)
    with pytest.raises(RuntimeError, match="several ways.*LookupError.*division by zero"):
        cleanup.close()
    with pytest.raises(TypeError, match="an app, a registry, a reader or a function"):
        cleanup.add(42)  # type: ignore[arg-type]


# --- LiveServer -------------------------------------------------------------------------


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.live
def test_live_server_streams_and_stops_its_process_group() -> None:
    server = LiveServer("counter:create_app()", pythonpath=[str(EXAMPLE_DIR)], threads=4)
    with server:
        assert server.url == f"http://127.0.0.1:{server.port}"
        assert server.process is not None
        pgid = server.process.pid
        with server.stream("/sse") as first:
            left_open = server.stream("/sse", signals={"x": 1})
            assert first.next_event().elements == '<p id="count">0</p>'
            assert left_open.next_event().elements == '<p id="count">0</p>'
            with pytest.raises(TimeoutError):
                first.next_event(timeout=0.1)
            assert server.post("/click").status == 204
            assert first.next_event().elements == '<p id="count">1</p>'
        assert first.ended
        missing = server.request("GET", "/nowhere")
        assert (missing.status, missing.headers["content-type"]) == (
            404,
            "text/html; charset=utf-8",
        )
        assert "Not Found" in missing.text
    # Stopping closed the stream left open and ended every process of the group.
    assert left_open.ended
    assert left_open.next_event().elements == '<p id="count">1</p>'
    assert server.process.returncode is not None
    assert not group_alive(pgid)
    assert _refuses(server.port)
    assert "Booting worker" in server.log_text()
    assert not reader_threads()
    server.stop()  # again: nothing happens


@pytest.mark.live
def test_live_server_startup_failure_quotes_the_output() -> None:
    server = LiveServer("no_such_module_here:app", startup_timeout=20)
    with pytest.raises(RuntimeError, match="(?s)exited with status.*no_such_module_here"):
        server.start()
    assert server.process is not None and server.process.returncode is not None
    assert not group_alive(server.process.pid)


def test_live_server_without_gunicorn_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "gunicorn", None)
    with pytest.raises(RuntimeError, match=r"pip install 'flask_datastar\[gunicorn\]'"):
        LiveServer("counter:app").start()


# --- a scripted raw socket server ------------------------------------------------------

REQUEST = "request"
"""Script step: read one request (head and Content-Length body)."""
EOF = "eof"
"""Script step: read until the client sends FIN."""
Step = bytes | str | threading.Event


class ScriptedServer:
    """A one-connection TCP server on a thread that follows a script of steps.

    A ``bytes`` step is sent, :data:`REQUEST` reads a request, :data:`EOF` waits for
    the client's FIN and a :class:`threading.Event` step waits for the test to set it.
    After the last step the connection is closed.

    :param steps: The script.
    """

    def __init__(self, steps: Sequence[Step]) -> None:
        self.steps = list(steps)
        self.requests: list[bytes] = []
        self.saw_eof = False
        self.error: BaseException | None = None
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(10)
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except OSError as exc:
            self.error = exc
            return
        with conn:
            conn.settimeout(10)
            buffer = b""
            try:
                for step in self.steps:
                    if isinstance(step, bytes):
                        conn.sendall(step)
                    elif isinstance(step, threading.Event):
                        step.wait(10)
                    elif step == REQUEST:
                        while b"\r\n\r\n" not in buffer:
                            buffer += self._recv(conn)
                        head, _, buffer = buffer.partition(b"\r\n\r\n")
                        length = 0
                        for line in head.split(b"\r\n")[1:]:
                            name, _, value = line.partition(b":")
                            if name.strip().lower() == b"content-length":
                                length = int(value)
                        while len(buffer) < length:
                            buffer += self._recv(conn)
                        self.requests.append(head + b"\r\n\r\n" + buffer[:length])
                        buffer = buffer[length:]
                    elif step == EOF:
                        while conn.recv(4096):
                            pass
                        self.saw_eof = True
            except OSError as exc:
                # The client may close first on purpose; the test checks what it needs.
                self.error = exc

    @staticmethod
    def _recv(conn: socket.socket) -> bytes:
        data = conn.recv(4096)
        if not data:
            raise ConnectionError("The client closed the connection mid-request.")
        return data

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for step in self.steps:
            if isinstance(step, threading.Event):
                step.set()
        self._thread.join(10)
        self._listener.close()
        assert not self._thread.is_alive(), "The scripted server did not finish."


CHUNKED_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


def test_raw_stream_reads_valid_chunks() -> None:
    long = bytes(range(26))
    body = b"5\r\nhello\r\n1A\r\n" + long + b"\r\n0001\r\n!\r\n0\r\n\r\n"
    with ScriptedServer([REQUEST, CHUNKED_HEAD + body]) as server:
        with RawHTTPStream(server.port, "/s", headers={"Accept": "text/event-stream"}) as raw:
            assert raw.status == 200
            assert raw.reason == "OK"
            assert raw.chunked
            assert raw.headers["content-type"] == "text/event-stream"
            assert [raw.read_chunk(5) for _ in range(5)] == [b"hello", long, b"!", None, None]
    request = server.requests[0]
    assert request.startswith(b"GET /s HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"\r\nAccept: text/event-stream\r\n" in request


def test_raw_stream_chunks_arriving_in_pieces() -> None:
    gates = [threading.Event() for _ in range(4)]
    script: list[Step] = [REQUEST, CHUNKED_HEAD]
    for piece, gate in zip([b"5", b"\r", b"\nhel", b"lo\r"], gates, strict=True):
        script += [gate, piece]
    script += [b"\n0\r\n\r\n"]
    with ScriptedServer(script) as server, RawHTTPStream(server.port, "/") as raw:
        for gate in gates:
            with pytest.raises(TimeoutError):
                raw.read_chunk(timeout=0.05)
            gate.set()
        assert raw.read_chunk(5) == b"hello"
        assert raw.read_chunk(5) is None


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"zz\r\n", id="not-hex"),
        pytest.param(b"5;ext=1\r\nhello\r\n", id="extension"),
        pytest.param(b" 5\r\nhello\r\n", id="leading-space"),
        pytest.param(b"5 \r\nhello\r\n", id="trailing-space"),
        pytest.param(b"-5\r\n", id="negative"),
        pytest.param(b"0x5\r\nhello\r\n", id="0x-prefix"),
        pytest.param(b"\r\nhello\r\n", id="empty-size"),
        pytest.param(b"5\nhello\r\n", id="bare-lf-after-size"),
        pytest.param(b"5\rhello\r\n", id="bare-cr-after-size"),
        pytest.param(b"5\r\nhelloX\r\n", id="no-crlf-after-data"),
        pytest.param(b"5\r\nhello\n", id="bare-lf-after-data"),
        pytest.param(b"5\r\nhello0\r\n\r\n", id="next-size-glued-to-data"),
        pytest.param(b"a\r\nhello\r\n3\r\nabc\r\n0\r\n\r\n", id="short-chunk"),
        pytest.param(b"3\r\nhello\r\n", id="long-chunk"),
        pytest.param(b"0\r\nX-Trailer: 1\r\n\r\n", id="trailer"),
        pytest.param(b"1" * 40 + b"\r\n", id="size-line-too-long"),
    ],
)
def test_raw_stream_rejects_bad_chunk_framing(body: bytes) -> None:
    with ScriptedServer([REQUEST, CHUNKED_HEAD + body]) as server:
        with RawHTTPStream(server.port, "/") as raw, pytest.raises(ProtocolError):
            for _ in range(3):
                raw.read_chunk(timeout=5)


@pytest.mark.parametrize(
    ("body", "good_chunks"),
    [
        pytest.param(b"", 0, id="before-first-chunk"),
        pytest.param(b"5\r", 0, id="in-size-line"),
        pytest.param(b"5\r\nhel", 0, id="mid-chunk"),
        pytest.param(b"5\r\nhello", 0, id="before-crlf"),
        pytest.param(b"5\r\nhello\r\n", 1, id="before-terminator"),
        pytest.param(b"5\r\nhello\r\n0\r\n", 1, id="in-terminator"),
    ],
)
def test_raw_stream_early_close(body: bytes, good_chunks: int) -> None:
    with ScriptedServer([REQUEST, CHUNKED_HEAD + body]) as server:
        with RawHTTPStream(server.port, "/") as raw:
            for _ in range(good_chunks):
                assert raw.read_chunk(5) == b"hello"
            with pytest.raises(ConnectionClosed):
                raw.read_chunk(5)


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(b"HTTP/1.1 200OK\r\n\r\n", id="no-space-after-status"),
        pytest.param(b"HTTP/2 200 OK\r\n\r\n", id="http2"),
        pytest.param(b"HTTP/1.1 20 OK\r\n\r\n", id="short-status"),
        pytest.param(b"HTTP/1.1 200 OK\nA: b\r\n\r\n", id="bare-lf"),
        pytest.param(b"HTTP/1.1 200 OK\r\nA: b\r\n  c\r\n\r\n", id="folded"),
        pytest.param(b"HTTP/1.1 200 OK\r\nA : b\r\n\r\n", id="space-before-colon"),
        pytest.param(b"HTTP/1.1 200 OK\r\nNoColon\r\n\r\n", id="no-colon"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            id="length-and-chunked",
        ),
    ],
)
def test_raw_stream_rejects_bad_heads(head: bytes) -> None:
    with ScriptedServer([REQUEST, head]) as server, pytest.raises(ProtocolError):
        RawHTTPStream(server.port, "/")


def test_raw_stream_closed_before_head() -> None:
    with ScriptedServer([REQUEST, b"HTTP/1.1 200 OK\r\n"]) as server:
        with pytest.raises(ConnectionClosed):
            RawHTTPStream(server.port, "/")


def test_raw_stream_events_across_chunks() -> None:
    body = b"7\r\n: ping\n\r\n8\r\ndata: a\n\r\n4\r\n\ndat\r\n4\r\na: b\r\n2\r\n\n\n\r\n0\r\n\r\n"
    with ScriptedServer([REQUEST, CHUNKED_HEAD + body]) as server:
        with RawHTTPStream(server.port, "/") as raw:
            assert list(raw.events(timeout=5)) == [
                ServerSentEvent(data=["a"]),
                ServerSentEvent(data=["b"]),
            ]
            assert raw.comments == 1


def test_raw_stream_reuses_the_connection() -> None:
    second = b"HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n\r\nok"
    with ScriptedServer([REQUEST, CHUNKED_HEAD + b"0\r\n\r\n", REQUEST, second]) as server:
        with RawHTTPStream(server.port, "/stream") as raw:
            with pytest.raises(RuntimeError, match="read_chunk"):
                raw.request("POST", "/too-early", body=b"x")
            assert raw.read_chunk(5) is None
            raw.request("POST", "/cmd", {"Content-Type": "application/json"}, b'{"a":1}')
            assert (raw.status, raw.chunked, raw.content_length) == (202, False, 2)
            assert raw.read_body(5) == b"ok"
    assert server.requests[1].startswith(b"POST /cmd HTTP/1.1\r\n")
    assert b"\r\nContent-Length: 7\r\n" in server.requests[1]
    assert server.requests[1].endswith(b'\r\n\r\n{"a":1}')


def test_raw_stream_http10_body_until_close() -> None:
    head = b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"
    with ScriptedServer([REQUEST, head + b"data: a\n\n", b"data: b\n\n"]) as server:
        with RawHTTPStream(server.port, "/", http_version="HTTP/1.0") as raw:
            assert not raw.chunked
            assert list(raw.events(timeout=5)) == [
                ServerSentEvent(data=["a"]),
                ServerSentEvent(data=["b"]),
            ]
    assert server.requests[0].startswith(b"GET / HTTP/1.0\r\n")
    with ScriptedServer([REQUEST, head + b"raw"]) as server:
        with RawHTTPStream(server.port, "/", http_version="HTTP/1.0") as raw:
            assert raw.read_until_close(5) == b"raw"


def test_raw_stream_content_length_body_short() -> None:
    with ScriptedServer([REQUEST, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab"]) as server:
        with RawHTTPStream(server.port, "/") as raw, pytest.raises(ConnectionClosed):
            raw.read_body(5)


def test_raw_stream_shutdown_write_sends_fin() -> None:
    with ScriptedServer([REQUEST, CHUNKED_HEAD, EOF, b"0\r\n\r\n"]) as server:
        with RawHTTPStream(server.port, "/") as raw:
            raw.shutdown_write()
            assert raw.read_chunk(5) is None
    assert server.saw_eof


def test_raw_stream_small_receive_buffer() -> None:
    with ScriptedServer([REQUEST, CHUNKED_HEAD]) as server:
        with RawHTTPStream(server.port, "/", rcvbuf=4096) as raw:
            # Linux doubles the value for bookkeeping and enforces a minimum.
            assert raw.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) <= 2 * 4096


def test_header_dict() -> None:
    headers = HeaderDict(
        [("Set-Cookie", "a=1"), ("content-type", "text/plain"), ("SET-COOKIE", "b=2")]
    )
    assert headers["set-cookie"] == "a=1, b=2"
    assert headers["Content-Type"] == "text/plain"
    assert "CONTENT-TYPE" in headers
    assert "Connection" not in headers
    assert headers.get("connection") is None
    assert len(headers) == 2
    assert len(headers.fields) == 3


# --- small helpers ---------------------------------------------------------------------


def test_free_port_can_be_bound() -> None:
    port = free_port()
    with socket.create_server(("127.0.0.1", port)):
        pass


@pytest.mark.parametrize(
    ("ci", "outcome"),
    [("true", pytest.fail.Exception), ("", pytest.skip.Exception)],
)
def test_require_tool_missing(
    monkeypatch: pytest.MonkeyPatch, ci: str, outcome: type[BaseException]
) -> None:
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="Debian package 'redis-server'"):
        require_tool("no-such-tool-here", package="redis-server")


@pytest.mark.parametrize(
    ("ci", "outcome"),
    [("true", pytest.fail.Exception), ("", pytest.skip.Exception)],
)
def test_require_module_missing(
    monkeypatch: pytest.MonkeyPatch, ci: str, outcome: type[BaseException]
) -> None:
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="PyPI package 'no_such_module'"):
        require_module("no_such_module.sub")


def test_require_found() -> None:
    assert os.path.isabs(require_tool("sh"))
    assert require_module("json").__name__ == "json"


# --- redis-server ----------------------------------------------------------------------


def _refuses(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except ConnectionRefusedError:
        return True


@pytest.mark.redis
def test_redis_server_restart_and_stop(redis_server: RedisServer) -> None:
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert redis_server.ping()
    assert redis_server.proc is not None
    first_pid = redis_server.proc.pid

    redis_server.restart()
    assert redis_server.proc.pid != first_pid
    assert not process_alive(first_pid)
    assert redis_server.ping()

    redis_server.stop()
    redis_server.stop()
    assert not process_alive(redis_server.proc.pid)
    assert not redis_server.ping()
    assert _refuses(redis_server.port)

    redis_server.start()
    assert redis_server.ping()


@pytest.mark.redis
def test_redis_server_context_stops_it() -> None:
    with RedisServer() as server:
        assert server.proc is not None
        pid = server.proc.pid
        assert server.ping()
    assert not process_alive(pid)
    assert _refuses(server.port)


# --- gunicorn --------------------------------------------------------------------------

HELLO_APP = "tests.live_apps.hello:app"


@pytest.fixture(scope="module")
def hello_server() -> Iterator[GunicornServer]:
    """One gunicorn with two workers serving ``tests/live_apps/hello.py``."""
    with GunicornServer(HELLO_APP, workers=2, threads=2) as server:
        yield server


@pytest.mark.live
def test_gunicorn_serves_with_all_workers(hello_server: GunicornServer) -> None:
    assert hello_server.url == f"http://127.0.0.1:{hello_server.port}"
    workers = hello_server.worker_pids()
    assert len(workers) == 2
    status, headers, body = post(hello_server.url + "/pid", method="GET")
    assert status == 200
    assert int(body) in workers
    assert hello_server.log_text().count("Booting worker") >= 2


@pytest.mark.live
def test_post_helper(hello_server: GunicornServer) -> None:
    status, headers, body = post(hello_server.url + "/echo", json={"a": [1, "é"]})
    assert (status, headers["content-type"]) == (200, "application/json")
    assert body == b'{"a": [1, "\\u00e9"]}'
    assert post(hello_server.url + "/echo", body=b"{bad")[2] == b"{bad"
    assert post(hello_server.url + "/missing")[0] == 404


@pytest.mark.live
def test_raw_stream_against_gunicorn(hello_server: GunicornServer) -> None:
    with RawHTTPStream(hello_server.port, "/events?count=3") as raw:
        assert raw.chunked
        events = list(raw.events(timeout=5))
        assert [event.id for event in events] == ["0", "1", "2"]
        assert raw.comments == 3
        raw.request("GET", "/")
        assert raw.read_body(5) == b"hello"
    with RawHTTPStream(hello_server.port, "/events", http_version="HTTP/1.0") as raw:
        assert not raw.chunked
        stream = raw.events(timeout=5)
        assert [next(stream).id for _ in range(3)] == ["0", "1", "2"]


@pytest.mark.live
def test_gunicorn_stop_and_restart_on_the_same_port() -> None:
    with GunicornServer(HELLO_APP) as server:
        assert server.proc is not None
        master = server.proc.pid
        workers = server.worker_pids()
        with RawHTTPStream(server.port, "/events") as raw:
            assert next(raw.events(timeout=5)).id == "0"
            server.restart()
            # The old worker is gone, so the endless stream ends with it.
            with pytest.raises(ConnectionClosed):
                list(raw.events(timeout=5))
        assert server.proc.pid != master
        assert not any(process_alive(pid) for pid in [master, *workers])
        assert post(server.url + "/")[2] == b"hello"
        master, workers = server.proc.pid, server.worker_pids()
    assert server.proc.returncode is not None
    assert not any(process_alive(pid) for pid in [master, *workers])
    assert _refuses(server.port)
    server.stop()


@pytest.mark.live
def test_gunicorn_with_tls(tmp_path: Path) -> None:
    certfile, keyfile = make_self_signed_cert(tmp_path)
    with GunicornServer(HELLO_APP, certfile=certfile, keyfile=keyfile) as server:
        assert server.url.startswith("https://")
        assert post(server.url + "/")[2] == b"hello"
        with RawHTTPStream(server.port, "/events?count=2", tls=True) as raw:
            assert [event.id for event in raw.events(timeout=5)] == ["0", "1"]


@pytest.mark.live
def test_gunicorn_startup_failure_reports_the_log() -> None:
    server = GunicornServer("tests.live_apps.no_such_module:app", startup_timeout=20)
    with pytest.raises(RuntimeError, match="(?s)exited with status.*no_such_module"):
        with server:
            pass
    assert server.proc is not None
    assert server.proc.returncode is not None


@pytest.mark.live
def test_gunicorn_applies_a_config_file_and_its_hook(tmp_path: Path) -> None:
    config = tmp_path / "gunicorn.conf.py"
    config.write_text(
        "raw_env = ['HELLO_GREETING=hi']\n"
        "threads = 1\n"
        "def post_worker_init(worker):\n"
        "    worker.log.info('user hook ran in %s', worker.pid)\n"
    )
    with GunicornServer(HELLO_APP, workers=2, threads=3, config=config) as server:
        assert post(server.url + "/")[2] == b"hi"
        assert server.log_text().count("user hook ran in") == 2


def test_gunicorn_config_only_through_the_parameter() -> None:
    with pytest.raises(ValueError, match="config="):
        GunicornServer(HELLO_APP, extra_args=["--config=x.py"])


# --- Datastar client -------------------------------------------------------------------


def test_datastar_js_is_the_pinned_file(datastar_js_file: Path) -> None:
    content = datastar_js_file.read_bytes()
    assert (
        hashlib.sha256(content).hexdigest()
        == "31c8c9efb895beadeba5f73407c3ca60201dee321c5dea56c182817b475bde9f"
    )
    assert datastar_js() == datastar_js_file
    assert not datastar_js_file.is_relative_to(Path(__file__).resolve().parent.parent)
