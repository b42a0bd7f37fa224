"""In-process streams: hooks, heartbeats, cross-thread sends, order, endings, limits.

The responses are iterated chunk by chunk (never ``response.data`` on an endless
stream) and closed, as a WSGI server does.
"""

from __future__ import annotations

import threading
import traceback
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask, Response

from flask_datastar import (
    SSE,
    DatastarResponse,
    FlaskDatastar,
    Stream,
    StreamClosed,
    datastar_response,
    sse_response,
    sse_stream,
    with_sse,
)
from flask_datastar.testing import ServerSentEvent, SSEParser


class Reader:
    """Iterates a streaming response like a WSGI server, parsing what it gets."""

    def __init__(self, response: Response) -> None:
        self.response = response
        self.chunks: Iterator[bytes] = iter(response.response)
        self.parser = SSEParser()
        self.raw: list[bytes] = []

    def chunk(self) -> bytes:
        data = next(self.chunks)
        self.raw.append(data)
        return data

    def events(self, n: int) -> list[ServerSentEvent]:
        out: list[ServerSentEvent] = []
        while len(out) < n:
            out.extend(self.parser.feed(self.chunk()))
        return out

    def rest(self) -> list[ServerSentEvent]:
        out: list[ServerSentEvent] = []
        for data in self.chunks:
            out.extend(self.parser.feed(data))
        return out

    def close(self) -> None:
        self.response.close()


def open_stream(app: Flask, path: str = "/s") -> Reader:
    response = app.test_client().get(path, buffered=False)
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert "Connection" not in response.headers
    assert "Content-Length" not in response.headers
    return Reader(response)


def reconfigure(app: Flask, **config: Any) -> None:
    app.extensions.pop("datastar")
    app.config.update(config)
    FlaskDatastar(app)


def elements(events: list[ServerSentEvent]) -> list[str | None]:
    return [e.elements for e in events]


def test_hooks_run_exactly_once_around_the_events(app: Flask) -> None:
    log: list[str] = []
    streams: list[Stream] = []

    def connect(gen: Stream) -> None:
        log.append("connect")
        streams.append(gen)
        gen.patch_elements("<p id=hello>from on_connect</p>")

    @app.get("/s")
    @sse_stream(on_connect=connect, on_disconnect=lambda gen: log.append("disconnect"))
    def handler(gen: Stream) -> Iterator[Any]:
        log.append("handler")
        while True:
            gen.patch_elements(f"<p id=n>{len(log)}</p>")
            yield gen.sleep(0.01)

    reader = open_stream(app)
    first = reader.events(1)
    assert log == ["connect"]
    assert elements(first) == ["<p id=hello>from on_connect</p>"]
    assert elements(reader.events(2)) == ["<p id=n>2</p>", "<p id=n>2</p>"]
    assert streams[0].path == "queue"  # the test client is no gunicorn
    reader.close()
    assert log == ["connect", "handler", "disconnect"]
    assert streams[0].closed
    with pytest.raises(StreamClosed):
        streams[0].patch_elements("<p id=late></p>")
    reader.close()
    assert log.count("disconnect") == 1


def test_first_chunk_is_sent_before_the_handler_runs(app: Flask) -> None:
    started = threading.Event()

    @app.get("/s")
    @sse_stream
    def handler(gen: Stream) -> None:
        started.set()
        gen.patch_signals({"done": True})

    reader = open_stream(app)
    # The headers leave with the first chunk: a comment, since nothing was sent yet.
    assert reader.chunk() == b":\n\n"
    assert not started.is_set()
    assert [e.signals for e in reader.rest()] == [{"done": True}]
    assert started.is_set()


def test_one_shot_handler_ends_the_stream(app: Flask) -> None:
    ended = []

    @app.get("/s")
    @sse_stream(on_disconnect=lambda gen: ended.append(gen.close_reason))
    def handler(gen: Stream) -> None:
        gen.patch_elements("<div id=a>1</div>")
        gen.patch_signals({"b": 2})
        gen.execute_script("console.log(3)")

    events = open_stream(app).rest()
    assert [e.event for e in events] == [
        "datastar-patch-elements",
        "datastar-patch-signals",
        "datastar-patch-elements",
    ]
    assert ended == ["the handler returned"]


def test_heartbeat_while_idle(app: Flask) -> None:
    @app.get("/s")
    @sse_stream
    def handler(gen: Stream) -> Iterator[Any]:
        yield gen.sleep()  # until the stream ends

    reader = open_stream(app)
    assert reader.chunk() == b":\n\n"
    # DATASTAR_HEARTBEAT is 0.2 s in the test app: comments keep coming.
    for _ in range(3):
        assert reader.chunk() == b":\n\n"
    assert reader.parser.comments >= 3 or reader.raw.count(b":\n\n") == 4
    reader.close()


def test_event_from_another_thread_arrives_while_the_handler_sleeps(app: Flask) -> None:
    reconfigure(app, DATASTAR_HEARTBEAT=0)
    streams: list[Stream] = []

    @app.get("/s")
    @sse_stream(on_connect=streams.append)
    def handler(gen: Stream) -> Iterator[Any]:
        while True:
            yield gen.sleep(5)
            gen.patch_elements("<p id=tick>tick</p>")

    reader = open_stream(app)
    reader.chunk()
    sender = threading.Timer(0.05, lambda: streams[0].patch_signals({"from": "thread"}))
    sender.start()
    # Had the stream waited for its handler, the tick would come first.
    (event,) = reader.events(1)
    assert event.signals == {"from": "thread"}
    sender.join()
    reader.close()


def test_order_is_kept_across_threads(app: Flask) -> None:
    streams: list[Stream] = []
    n = 300

    @app.get("/s")
    @sse_stream(on_connect=streams.append)
    def handler(gen: Stream) -> Iterator[Any]:
        for i in range(n):
            gen.patch_signals({"owner": i})
            yield None
        yield gen.sleep()

    reader = open_stream(app)
    reader.chunk()

    def send(name: str) -> None:
        for i in range(n):
            streams[0].patch_signals({name: i})

    threads = [threading.Thread(target=send, args=(f"t{k}",)) for k in range(3)]
    for t in threads:
        t.start()
    events = reader.events(4 * n)
    for t in threads:
        t.join()
    reader.close()
    seen: dict[str, list[int]] = {}
    for e in events:
        ((name, value),) = e.signals.items()
        seen.setdefault(name, []).append(value)
    assert seen == {name: list(range(n)) for name in ["owner", "t0", "t1", "t2"]}


def test_close_from_another_thread_ends_cleanly(app: Flask) -> None:
    streams: list[Stream] = []
    ended = threading.Event()

    @app.get("/s")
    @sse_stream(on_connect=streams.append, on_disconnect=lambda gen: ended.set())
    def handler(gen: Stream) -> Iterator[Any]:
        yield gen.sleep()

    reader = open_stream(app)
    reader.chunk()
    threading.Timer(0.05, streams[0].close).start()
    assert reader.rest() == []
    assert ended.is_set()
    assert streams[0].wait_closed(1)
    assert streams[0].close_reason == "closed by the server"


def test_a_client_that_does_not_read_is_ended(app: Flask) -> None:
    reconfigure(app, DATASTAR_MAX_BACKLOG=4096, DATASTAR_HEARTBEAT=0)
    streams: list[Stream] = []

    @app.get("/s")
    @sse_stream(on_connect=streams.append)
    def handler(gen: Stream) -> Iterator[Any]:
        yield gen.sleep()

    reader = open_stream(app)
    reader.chunk()
    gen = streams[0]
    event = SSE.patch_elements("<p id=big>" + "x" * 1000 + "</p>")
    sent: list[int] = []
    errors: list[Exception] = []

    def broadcaster() -> None:
        # Not the stream's own thread: its sends are bounded.
        try:
            while len(sent) < 100:
                gen.send(event)
                sent.append(1)
        except StreamClosed as e:
            errors.append(e)

    thread = threading.Thread(target=broadcaster)
    thread.start()
    thread.join()
    # What fits in 4 KiB was queued; the next event ended the stream instead of growing it.
    assert len(sent) == 4096 // len(event.encode())
    assert len(errors) == 1 and "not reading" in str(errors[0])
    assert gen.closed and "not reading" in gen.close_reason
    reader.close()


def test_handler_exception_propagates_and_disconnects(app: Flask) -> None:
    ended = []

    @app.get("/s")
    @sse_stream(on_disconnect=lambda gen: ended.append(gen.close_reason))
    def handler(gen: Stream) -> Iterator[Any]:
        gen.patch_elements("<p id=a>1</p>")
        yield gen.sleep(0)
        raise LookupError("boom")

    reader = open_stream(app)
    with pytest.raises(LookupError, match="boom"):
        reader.rest()
    assert ended == ["the handler raised LookupError"]


def test_sleep_must_be_yielded(app: Flask) -> None:
    @app.get("/s")
    @sse_stream
    def handler(gen: Stream) -> Iterator[Any]:
        gen.sleep(1)
        gen.sleep(1)
        yield None

    with pytest.raises(RuntimeError, match="yield gen.sleep"):
        open_stream(app).rest()


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (42, "yielded int"),
        ("", "empty event"),
        (b"", "empty event"),
        ("event: x\ndata: y\n", "must end with a blank line"),
    ],
)
def test_yielding_what_cannot_be_sent_ends_the_stream_cleanly(
    app: Flask, caplog: pytest.LogCaptureFixture, bad: object, message: str
) -> None:
    """The mistake is thrown back at the handler's ``yield`` (so the traceback names the
    line) and logged; the stream then ends cleanly, so the client does not reconnect
    straight into the same mistake."""
    ended = []

    @app.get("/s")
    @sse_stream(on_disconnect=lambda gen: ended.append(gen.close_reason))
    def handler(gen: Stream) -> Iterator[Any]:
        gen.patch_signals({"n": 1})
        yield bad
        gen.patch_signals({"n": 2})  # never reached

    reader = open_stream(app)
    assert [e.signals for e in reader.rest()] == [{"n": 1}]  # ends without an exception
    assert len(ended) == 1 and message in ended[0]
    [record] = [r for r in caplog.records if r.name.startswith("flask_datastar")]
    assert record.levelname == "ERROR" and message in record.getMessage()
    assert record.exc_info is not None
    assert "yield bad" in "".join(traceback.format_tb(record.exc_info[2]))


def test_a_handler_may_catch_what_it_yielded_wrong(app: Flask) -> None:
    @app.get("/s")
    @sse_stream
    def handler(gen: Stream) -> Iterator[Any]:
        try:
            yield "not an event"
        except ValueError:
            yield SSE.patch_signals({"recovered": True})

    assert [e.signals for e in open_stream(app).rest()] == [{"recovered": True}]


def test_datastar_response_generator_views(app: Flask) -> None:
    log = []

    @app.get("/s")
    @datastar_response
    def view() -> Iterator[Any]:
        with with_sse(
            on_connect=lambda g: log.append("c"), on_disconnect=lambda g: log.append("d")
        ) as gen:
            yield SSE.patch_signals({"n": 1})
            gen.patch_signals({"n": 2})
            yield gen.sleep(0)
            yield SSE.patch_signals({"n": 3}).encode()

    events = open_stream(app).rest()
    assert [e.signals for e in events] == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert log == ["c", "d"]


@pytest.mark.parametrize(
    "rv",
    [
        SSE.patch_signals({"a": 1}),
        [SSE.patch_signals({"a": 1})],
        (SSE.patch_signals({"a": 1}).encode(),),
    ],
)
def test_datastar_response_short_responses(app: Flask, rv: Any) -> None:
    @app.get("/s")
    @datastar_response
    def view() -> Any:
        return rv

    response = app.test_client().get("/s")
    assert response.mimetype == "text/event-stream"
    assert response.data == b'event: datastar-patch-signals\ndata: signals {"a":1}\n\n'


def test_with_sse_outside_a_stream() -> None:
    with pytest.raises(RuntimeError, match="'with_sse' needs a running stream"):
        with with_sse():
            pass


def test_sse_response_and_extension_decorator(app: Flask) -> None:
    datastar: FlaskDatastar = app.extensions["datastar"].extension

    @app.get("/a")
    def a() -> DatastarResponse:
        return sse_response(lambda gen: gen.patch_signals({"a": 1}), headers={"X-Extra": "1"})

    @app.get("/b/<int:n>")
    @datastar.sse
    def b(gen: Stream, n: int) -> None:
        gen.patch_signals({"b": n})

    response = app.test_client().get("/a")
    assert response.headers["X-Extra"] == "1"
    assert b'data: signals {"a":1}' in response.data
    assert b'data: signals {"b":7}' in app.test_client().get("/b/7").data


def test_max_streams_gives_a_503(app: Flask) -> None:
    reconfigure(app, DATASTAR_MAX_STREAMS=1)

    @app.get("/s")
    @sse_stream
    def handler(gen: Stream) -> Iterator[Any]:
        yield gen.sleep()

    reader = open_stream(app)
    reader.chunk()
    second = app.test_client().get("/s")
    assert second.status_code == 503
    assert "DATASTAR_MAX_STREAMS" in second.get_data(as_text=True)
    reader.close()
    third = open_stream(app)
    third.chunk()
    third.close()


def test_last_event_id(app: Flask) -> None:
    @app.get("/s")
    @sse_stream
    def handler(gen: Stream) -> None:
        gen.patch_signals({"last": gen.last_event_id})

    response = app.test_client().get("/s", headers={"Last-Event-ID": "41"})
    assert b'{"last":"41"}' in response.data


def test_head_opens_no_stream(app: Flask) -> None:
    calls = []

    @app.get("/s")
    @sse_stream(on_connect=calls.append)
    def handler(gen: Stream) -> Iterator[Any]:
        yield gen.sleep()

    response = app.test_client().head("/s")
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    assert response.data == b"" and calls == []


def test_datastar_response_without_content_is_a_204(app: Flask) -> None:
    @app.get("/s")
    @datastar_response
    def view() -> None:
        return None

    response = app.test_client().get("/s")
    assert response.status_code == 204 and response.data == b""


def test_leaving_the_with_sse_block_ends_the_stream(app: Flask) -> None:
    """As datastar-cl's with-sse: the block is the stream's life."""
    log: list[str] = []

    @app.get("/s")
    @datastar_response
    def view() -> Iterator[Any]:
        with with_sse(on_disconnect=lambda g: log.append(f"d:{g.close_reason}")) as gen:
            gen.patch_signals({"n": 1})
            yield gen.sleep(0)
        log.append("after the block")
        yield SSE.patch_signals({"n": 2})  # the stream has ended: never sent

    reader = open_stream(app)
    events: list[ServerSentEvent] = []
    for _ in range(20):  # before, it stayed open: a heartbeat every 0.2 s, for ever
        try:
            events.extend(reader.parser.feed(reader.chunk()))
        except StopIteration:
            break
    else:
        pytest.fail("the stream outlived its with_sse block")
    assert [e.signals for e in events] == [{"n": 1}]
    assert log == ["after the block", "d:closed by the server"]


def test_a_session_change_in_with_sse_on_connect_is_an_error(app: Flask) -> None:
    """The headers have left when the with statement runs: the cookie cannot change."""
    from flask import session

    app.secret_key = "test"
    ended: list[str] = []

    @app.get("/s")
    @datastar_response
    def view() -> Iterator[Any]:
        with with_sse(
            on_connect=lambda g: session.update(seen=True),
            on_disconnect=lambda g: ended.append(g.close_reason),
        ) as gen:
            yield gen.sleep()

    reader = open_stream(app)
    with pytest.raises(RuntimeError, match="session cookie cannot change"):
        reader.rest()
    assert ended == ["the handler raised RuntimeError"]


def test_datastar_response_has_datastar_pys_default_headers(app: Flask) -> None:
    class Custom(DatastarResponse):
        default_headers = {**DatastarResponse.default_headers, "X-Frame-Options": "DENY"}

    assert DatastarResponse.default_headers["Cache-Control"] == "no-cache"
    with app.test_request_context():
        response = Custom(SSE.patch_signals({"a": 1}), headers={"X-Extra": "1"})
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["X-Extra"] == "1"
    assert response.headers["X-Accel-Buffering"] == "no"


def test_the_non_request_actions_are_jinja_globals(app: Flask) -> None:
    from flask import render_template_string

    with app.test_request_context():
        html = render_template_string(
            "{{ set_all('true', include='^todo') }}|{{ toggle_all() }}|{{ peek('$count') }}"
        )
    assert html.count("@") == 3 and "@setAll(" in html and "@toggleAll(" in html
