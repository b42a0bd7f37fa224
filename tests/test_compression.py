"""Compressed streams: negotiation, the encoders, and live streams decoded as they arrive.

The live tests run this module's ``app`` under a real gunicorn, on the direct path and
on the queue path (``DATASTAR_DIRECT_WRITES`` off), and read the stream with the strict
raw client of ``tests.helpers``, feeding each HTTP chunk to the real decompressor
(zlib, brotli, zstandard) as it arrives: every event must be readable from the chunk
that carries it, before the test asks for the next one.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask

from flask_datastar import SSE, FlaskDatastar, Stream, sse_response
from flask_datastar.compression import (
    DEFAULT_ORDER,
    make_encoder,
    negotiate,
    parse_accept_encoding,
    parse_compression,
    parse_window,
)
from flask_datastar.testing import ServerSentEvent, SSEParser
from tests.helpers import GunicornServer, RawHTTPStream, post, require_module

# -- the app the live tests serve -------------------------------------------------------

app = Flask(__name__)
app.config.from_prefixed_env()
datastar = FlaskDatastar(app)
clients = datastar.registry(app, "compression")


@app.get("/sse")
@datastar.sse(on_connect=clients.register)
def sse(gen: Stream) -> Iterator[object]:
    # Sent once the first chunk is out, when the stream knows its path.
    gen.patch_signals({"path": gen.path})
    yield gen.sleep()


@app.get("/plain")
@datastar.sse(on_connect=clients.register, compress=False)
def plain(gen: Stream) -> Iterator[object]:
    gen.patch_signals({"path": gen.path})
    yield gen.sleep()


@app.post("/send/<int:n>")
def send(n: int) -> tuple[str, int]:
    clients.broadcast(SSE.patch_signals({"n": n, "filler": "abc" * 50}))
    return "", 204


@app.post("/end")
def end() -> tuple[str, int]:
    for gen in clients.snapshot():
        gen.close()  # a clean end: the compressed body must end properly
    return "", 204


APP = f"{__name__}:app"

# -- decoding ---------------------------------------------------------------------------


class Decoder:
    """The real decompressor of one ``Content-Encoding``, fed chunk by chunk."""

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        if encoding == "gzip":
            self._zlib = zlib.decompressobj(wbits=31)
        elif encoding == "br":
            self._brotli = require_module("brotli").Decompressor()
        elif encoding == "zstd":
            self._zstd = require_module("zstandard").ZstdDecompressor().decompressobj()
        else:
            raise ValueError(encoding)

    def feed(self, data: bytes) -> bytes:
        if self.encoding == "gzip":
            return self._zlib.decompress(data)
        if self.encoding == "br":
            out: bytes = self._brotli.process(data)
            return out
        out = self._zstd.decompress(data)
        return out

    @property
    def finished(self) -> bool:
        """Whether the compressed body ended properly (trailer, end of frame)."""
        if self.encoding == "gzip":
            return self._zlib.eof
        if self.encoding == "br":
            return bool(self._brotli.is_finished())
        return bool(self._zstd.eof)


def read_events(stream: RawHTTPStream, decoder: Decoder, parser: SSEParser) -> list[Any]:
    """Read chunks until one carries an event; each chunk must decode to whole events."""
    while True:
        chunk = stream.read_chunk(timeout=10)
        assert chunk is not None, "the stream ended"
        events = parser.feed(decoder.feed(chunk))
        # Flushed per event: nothing of it waits in the compressor for the next one.
        assert not parser.has_pending, "a chunk held part of an event"
        if events:
            return events


# -- negotiation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "chosen"),
    [
        (None, None),
        ("", None),
        ("identity", None),
        ("gzip", "gzip"),
        ("gzip, deflate, br, zstd", "zstd"),  # Chromium over HTTPS: our order decides
        ("gzip, deflate", "gzip"),  # Chromium over plain HTTP
        ("br", "br"),
        ("zstd;q=0, gzip", "gzip"),  # q=0: never
        ("gzip;q=0", None),
        ("GZIP;Q=0.5", "gzip"),  # case does not matter
        ("x-gzip", "gzip"),
        ("compress, deflate, exotic", None),  # nothing we speak
        ("br;q=1.0, gzip;q=0.8, zstd;q=0.5", "br"),  # the client's qualities first
        ("gzip;q=0.5, zstd;q=0.5", "zstd"),  # a tie: our order
        ("*", "zstd"),
        ("*;q=0.1, gzip;q=0.2", "gzip"),
        ("*, zstd;q=0", "gzip"),  # named q=0 beats the wildcard
        ("gzip;q=abc, br", "br"),  # a malformed q drops that element only
        ("gzip;q=nan", None),
        ("gzip;q=7", "gzip"),  # clamped to 1
        (",, ;q=1, gzip", "gzip"),
    ],
)
def test_negotiation(header: str | None, chosen: str | None) -> None:
    assert negotiate(header, ("zstd", "gzip", "br")) == chosen


def test_negotiation_follows_the_configured_order() -> None:
    assert negotiate("gzip, br, zstd", ("gzip", "zstd")) == "gzip"
    assert negotiate("br", ("gzip", "zstd")) is None
    assert negotiate("gzip", ()) is None


def test_accept_encoding_keeps_the_first_mention() -> None:
    assert parse_accept_encoding("gzip;q=0.3, gzip;q=1, br") == {"gzip": 0.3, "br": 1.0}


def test_configuration_values() -> None:
    assert parse_compression(True) == DEFAULT_ORDER  # both extras are test dependencies
    assert parse_compression(False) == parse_compression(None) == parse_compression([]) == ()
    assert parse_compression("off") == ()
    assert parse_compression("gzip, x-gzip ,zstd") == ("gzip", "zstd")
    assert parse_compression(["BR"]) == ("br",)
    assert parse_window(4096) == 12
    assert parse_window("32768") == 15


@pytest.mark.parametrize(
    ("value", "message"),
    [(["gzip", "deflate"], "'deflate'"), (3, "must be True, False or a list")],
)
def test_configuration_errors_say_what_to_write(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_compression(value)


@pytest.mark.parametrize("value", [0, 1000, 4097, 65536, "big", None])
def test_window_must_be_a_power_of_two_in_range(value: object) -> None:
    with pytest.raises(ValueError, match="power of two from 1024 to 32768"):
        parse_window(value)


def test_init_app_refuses_an_unknown_encoding() -> None:
    bad = Flask(__name__)
    bad.config["DATASTAR_COMPRESSION"] = ["gzip", "lzma"]
    with pytest.raises(ValueError, match="DATASTAR_COMPRESSION names 'lzma'"):
        FlaskDatastar(bad)


# -- the encoders -----------------------------------------------------------------------

EVENTS = [
    SSE.patch_elements(f'<div id="content"><p>Count: <b>{n}</b></p>{"<i>x</i>" * 40}</div>')
    for n in range(30)
]


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
def test_each_event_decodes_alone_and_the_context_is_kept(encoding: str) -> None:
    encoder = make_encoder(encoding)
    decoder = Decoder(encoding)
    sizes = []
    for event in EVENTS:
        data = event.encode()
        out = encoder.compress(data)
        assert out, "an empty chunk would end the HTTP response"
        assert decoder.feed(out) == data  # the whole event, at once
        sizes.append(len(out))
    assert not decoder.finished
    decoder.feed(encoder.finish())
    assert decoder.finished
    # The second event compresses against the first: a fraction of its own size.
    assert max(sizes[1:]) * 5 < len(EVENTS[1])
    assert encoder.raw_bytes == sum(len(e.encode()) for e in EVENTS)
    assert encoder.name == encoding


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
def test_an_event_larger_than_the_compressors_buffers_decodes_whole_at_once(encoding: str) -> None:
    # Incompressible events several times the window (and zstd's 1 KiB output buffer,
    # which its flush fills more than once), between small ones: each comes out whole,
    # and the byte counts are exactly what went in and came out.
    encoder = make_encoder(encoding)
    decoder = Decoder(encoding)
    noise = random.Random(7)
    events = [
        b"data: small\n\n",
        b"data: " + noise.randbytes(10_000).hex().encode()[:10_000] + b"\n\n",
        b"data: " + bytes(noise.getrandbits(8) for _ in range(3000)) + b"\n\n",
        b"data: small again\n\n",
    ]
    wire = 0
    for data in events:
        out = encoder.compress(data)
        assert decoder.feed(out) == data
        wire += len(out)
    tail = encoder.finish()
    decoder.feed(tail)
    assert decoder.finished
    assert encoder.raw_bytes == sum(map(len, events))
    assert encoder.wire_bytes == wire + len(tail)


# -- the response, in process -----------------------------------------------------------


def make_app(**config: Any) -> Flask:
    flask_app = Flask(__name__)
    flask_app.config.update(TESTING=True, **config)
    FlaskDatastar(flask_app)

    def handler(gen: Stream) -> None:
        gen.patch_signals({"a": 1})

    @flask_app.get("/sse")
    def stream() -> Any:
        return sse_response(handler)

    @flask_app.get("/off")
    def off() -> Any:
        return sse_response(handler, compress=False)

    @flask_app.get("/gzip-only")
    def gzip_only() -> Any:
        return sse_response(handler, compress=["gzip"])

    @flask_app.get("/own")
    def own() -> Any:
        return sse_response(handler, headers={"Content-Encoding": "gzip"})

    return flask_app


def body(response: Any) -> bytes:
    data = b"".join(response.response)
    response.close()
    return data


def test_the_response_says_its_encoding_and_varies_on_accept_encoding() -> None:
    client = make_app().test_client()
    response = client.get("/sse", headers={"Accept-Encoding": "gzip, zstd"})
    assert response.headers["Content-Encoding"] == "zstd"
    assert response.headers["Vary"] == "Accept-Encoding"
    decoder = Decoder("zstd")
    events = SSEParser().feed(decoder.feed(body(response)))
    assert [e.signals for e in events] == [{"a": 1}]
    assert decoder.finished  # the handler returned: a clean end, a whole body

    identity = client.get("/sse")
    assert "Content-Encoding" not in identity.headers
    assert identity.headers["Vary"] == "Accept-Encoding"  # another client would differ
    assert SSEParser().feed(body(identity))[0].signals == {"a": 1}


def test_compression_off_per_route_per_app_and_when_the_app_encodes() -> None:
    client = make_app().test_client()
    for path in ("/off", "/own"):
        response = client.get(path, headers={"Accept-Encoding": "gzip"})
        if path == "/off":
            assert "Content-Encoding" not in response.headers
            assert "Vary" not in response.headers
        else:
            assert response.headers.getlist("Content-Encoding") == ["gzip"]  # its own, once
        body(response)
    only = client.get("/gzip-only", headers={"Accept-Encoding": "zstd, br"})
    assert "Content-Encoding" not in only.headers
    body(only)

    off = make_app(DATASTAR_COMPRESSION=False).test_client()
    response = off.get("/sse", headers={"Accept-Encoding": "gzip"})
    assert "Content-Encoding" not in response.headers
    assert "Vary" not in response.headers
    body(response)

    gzip_first = make_app(DATASTAR_COMPRESSION="gzip,zstd").test_client()
    response = gzip_first.get("/sse", headers={"Accept-Encoding": "zstd, gzip"})
    assert response.headers["Content-Encoding"] == "gzip"
    body(response)


def test_a_route_decorator_refuses_an_unknown_encoding_at_once() -> None:
    with pytest.raises(ValueError, match="compress names 'lz4'"):
        datastar.sse(compress=["lz4"])


# -- live, under gunicorn ---------------------------------------------------------------


@pytest.fixture(scope="module", params=["direct", "queue"])
def server(request: pytest.FixtureRequest) -> Iterator[GunicornServer]:
    env = {"FLASK_DATASTAR_HEARTBEAT": "0.3"}
    if request.param == "queue":
        env["FLASK_DATASTAR_DIRECT_WRITES"] = "false"
    with GunicornServer(APP, threads=6, env=env) as started:
        started.path = request.param  # type: ignore[attr-defined]
        yield started


def open_stream(server: GunicornServer, accept: str, path: str = "/sse") -> RawHTTPStream:
    return RawHTTPStream(
        server.port, path, headers={"Accept-Encoding": accept, "Datastar-Request": "true"}
    )


@pytest.mark.live
@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
def test_a_live_stream_decodes_event_by_event(server: GunicornServer, encoding: str) -> None:
    with open_stream(server, f"{encoding}, identity;q=0.1") as stream:
        assert stream.headers["Content-Encoding"] == encoding
        assert stream.headers["Vary"] == "Accept-Encoding"
        decoder, parser = Decoder(encoding), SSEParser()
        (first,) = read_events(stream, decoder, parser)
        # The stream's own encoding does not turn the direct path off.
        assert first.signals == {"path": server.path}  # type: ignore[attr-defined]
        for n in range(8):
            # Sent only once the previous event was read: each one arrives on its own.
            assert post(f"{server.url}/send/{n}")[0] == 204
            (event,) = read_events(stream, decoder, parser)
            assert event.signals["n"] == n
        # Silence: heartbeats come through the compressor too.
        comments = parser.comments
        while parser.comments < comments + 2:
            chunk = stream.read_chunk(timeout=5)
            assert chunk is not None
            assert parser.feed(decoder.feed(chunk)) == []
        assert not decoder.finished
        assert post(f"{server.url}/end")[0] == 204
        rest = stream.read_body(timeout=10)  # up to the terminating chunk: a clean end
        assert parser.feed(decoder.feed(rest)) == []
        assert decoder.finished, "a clean end must end the compressed body"


@pytest.mark.live
def test_live_negotiation_and_a_route_without_compression(server: GunicornServer) -> None:
    def first_event(stream: RawHTTPStream) -> ServerSentEvent:
        return next(stream.events(timeout=10))  # read as is: not compressed

    for accept in ("gzip;q=0, zstd;q=0, br;q=0", "compress, exotic"):
        with open_stream(server, accept) as stream:
            assert "Content-Encoding" not in stream.headers
            assert stream.headers["Vary"] == "Accept-Encoding"
            assert first_event(stream).signals == {"path": server.path}  # type: ignore[attr-defined]
    with open_stream(server, "gzip, br, zstd", path="/plain") as stream:
        assert "Content-Encoding" not in stream.headers
        assert "Vary" not in stream.headers
        assert first_event(stream).signals == {"path": server.path}  # type: ignore[attr-defined]
