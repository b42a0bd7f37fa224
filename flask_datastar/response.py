"""Flask responses and view decorators that turn handlers into Datastar streams."""

from __future__ import annotations

import functools
import inspect
import logging
import random
import re
import socket
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Concatenate, ParamSpec, Protocol, overload

from flask import Response, current_app, has_request_context, request
from werkzeug.exceptions import Forbidden, ServiceUnavailable, Unauthorized

from . import compression, metrics, selfcheck
from .sse import SSE_HEADERS
from .stream import (
    ASYNC_HANDLER,
    Handler,
    Hook,
    Stream,
    StreamConfig,
    may_release,
    process_stream_limit,
    process_thread_limit,
    refuse_async,
)

__all__ = ["DatastarResponse", "datastar_response", "sse_response", "sse_stream"]

log = logging.getLogger(__name__)

P = ParamSpec("P")
# RFC 9110's token: what a header name is made of.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: A stream view: called with the stream first, then the view's URL arguments.
StreamView = Callable[Concatenate[Stream, P], Any]


class StreamDecorator(Protocol):
    """What ``sse_stream(on_connect=...)`` returns: a decorator for stream views."""

    def __call__(self, view: StreamView[P], /) -> Callable[P, DatastarResponse]: ...


Content = str | bytes | Iterable[Any] | None

#: A stream view's own check: called with the identity, in the view; false refuses.
Authorize = Callable[[Any], object]
#: A route's compression: ``None`` follows ``DATASTAR_COMPRESSION``, ``False`` turns it
#: off, ``True`` turns it on, a list names the encodings (see :mod:`~flask_datastar.compression`).
Compress = bool | Sequence[str] | None


def _identify(authorize: Authorize | None) -> Any:
    """Resolve who opens this stream and whether they may; raise 401/403 if not.

    Runs in the view, before any byte leaves, so the request context is the
    one of this very request: the identity is read once, here, never later.
    """
    state = current_app.extensions.get("datastar") if has_request_context() else None
    extension = None if state is None else state.extension
    identity = None if extension is None else extension._load_identity()
    allowed = True
    if extension is not None and extension._authorizer is not None:
        allowed = bool(extension._authorizer(identity, None))
    if allowed and authorize is not None:
        allowed = bool(authorize(identity))
    if not allowed:
        metrics.stream_refused("auth")  # metrics
        if identity is None:
            raise Unauthorized("Log in to open this stream.")
        raise Forbidden("You may not open this stream.")
    return identity


@dataclass(frozen=True)
class _Admission:
    """The limits a new stream is checked against (see :meth:`Stream._admit`)."""

    limit: int | None
    thread_limit: int | None
    client_share: float


def _settings() -> tuple[StreamConfig, _Admission]:
    state = current_app.extensions.get("datastar") if has_request_context() else None
    if state is None:
        return StreamConfig(), _Admission(process_stream_limit(), process_thread_limit(), 1.0)
    limit = state.config.max_streams
    return state.stream_config, _Admission(
        process_stream_limit() if limit is None else limit,
        process_thread_limit(),
        state.config.client_share,
    )


def _client_key(identity: Any) -> Any:
    """Who opens a stream, for the fair share: the identity, else the client address."""
    if identity is not None:
        return ("identity", identity)
    return ("address", request.remote_addr) if has_request_context() else None


#: The range (seconds) of the retry delay a refused client is given: random, so that
#: refused clients do not all come back at the same moment.
REFUSED_RETRY = (1.0, 4.0)

_REFUSALS = {
    "full": "this server process holds as many streams as it may (DATASTAR_MAX_STREAMS)",
    "threads": "every server thread that streams may hold is taken",
    "client": "this client holds its share of the streams (DATASTAR_CLIENT_SHARE)",
    "draining": "this server process is stopping",
}


#: The metrics' name of each reason a stream is turned away for.
_REFUSAL_METRIC = {"full": "limit", "threads": "threads", "client": "client_share"}


def _refusal_body(environ: Any, reason: str) -> tuple[Iterator[bytes], int] | None:
    """A stream that the Datastar client retries by itself, with a random delay.

    The client reopens a stream only after a network error or an abrupt
    end: it does not retry a 503. So a refused stream is a 200 that tells
    the client when to come back (``retry:``) and is then cut. ``None``
    where the connection cannot be cut (no client socket): a 503 then.

    :return: the body, and its length in bytes.
    """
    sock = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
    if not isinstance(sock, socket.socket):
        return None
    delay = int(random.uniform(*REFUSED_RETRY) * 1000)
    note = f": refused: {_REFUSALS.get(reason, reason)}; retry in {delay} ms\nretry: {delay}\n\n"
    data = note.encode()

    def body() -> Iterator[bytes]:
        yield data
        # The server's end of the response must fail: the client sees a cut stream.
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    return body(), len(data)


def _encoding(compress: Compress, headers: dict[str, str]) -> tuple[str | None, int, bool]:
    """Choose this response's ``Content-Encoding`` (compression; see :mod:`.compression`).

    :return: the encoding (``None``: identity), the window's bits, and whether the
        answer depends on ``Accept-Encoding`` (then the response says ``Vary``).
    """
    state = current_app.extensions.get("datastar") if has_request_context() else None
    config = None if state is None else state.config
    window_bits = compression.parse_window(compression.DEFAULT_WINDOW)
    if config is not None:
        window_bits = config.compression_window_bits
    if compress is None or compress is True:
        offered = compression.parse_compression(True) if config is None else config.compression
        if compress is True and not offered:
            offered = compression.parse_compression(True)  # on here, off for the app
    else:
        offered = compression.parse_compression(compress, "compress")
    if not offered or not has_request_context():
        return None, window_bits, False
    if any(name.lower() == "content-encoding" for name in headers):
        return None, window_bits, False  # the application encodes the body itself
    chosen = compression.negotiate(request.headers.get("Accept-Encoding"), offered)
    return chosen, window_bits, True


class DatastarResponse(Response):
    """A ``text/event-stream`` response with the Datastar headers.

    *content* may be one event (a string), a list of events, or a generator:
    a generator is driven as a stream (see :mod:`flask_datastar.stream`), so it
    may ``yield`` events as datastar-py users are used to, or use
    :func:`~flask_datastar.with_sse` and ``yield gen.sleep(seconds)``.

    :param content: the events.
    :param status: the HTTP status.
    :param headers: extra headers.
    :param handler: instead of *content*, run ``handler(gen)`` on a new
        stream (see :func:`sse_response`).
    :param on_connect: with *handler*, called with the stream when it opens.
    :param on_disconnect: with *handler*, called exactly once when it ends.
    :param authorize: with *handler* or a generator, called as
        ``authorize(identity)`` in the view before the stream opens; a false
        answer is a 401 (no identity) or 403, with no event.
    :param own_thread: run the handler on the server's thread for the
        stream's whole life instead of the scheduler's pool: for a handler
        that blocks between two yields (see :mod:`flask_datastar.scheduler`).
    :param compress: with *handler* or a generator, whether to compress the
        stream: ``None`` follows ``DATASTAR_COMPRESSION``, ``False`` turns
        it off for this response, ``True`` turns it on, a list names the
        encodings in order of preference. The encoding is negotiated from
        the request's ``Accept-Encoding``.
    """

    default_mimetype = "text/event-stream"
    #: The headers every instance starts from (datastar-py's name); a subclass may
    #: change them, and ``headers=`` adds to them.
    default_headers: ClassVar[dict[str, str]] = dict(SSE_HEADERS)

    def __init__(
        self,
        content: Content = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        *,
        handler: Handler | None = None,
        on_connect: Hook | None = None,
        on_disconnect: Hook | None = None,
        authorize: Authorize | None = None,
        own_thread: bool = False,
        compress: Compress = None,
        **kwargs: Any,
    ) -> None:
        self.datastar_stream: Stream | None = None
        # The Content-Length of a refusal that must look cut (see _refuse).
        self._refusal_length: int | None = None
        all_headers = dict(self.default_headers)
        if headers:
            for name in headers:
                if not isinstance(name, str) or not _TOKEN.fullmatch(name):
                    # Werkzeug checks values for line breaks, not names: a name with one
                    # would write a header of the caller's choosing (found by fuzzing).
                    raise ValueError(
                        f"{name!r} is not a valid HTTP header name: use letters, digits"
                        " and !#$%&'*+-.^_`|~ only."
                    )
            all_headers.update(headers)
        if inspect.iscoroutine(content) or inspect.isasyncgen(content):
            if inspect.iscoroutine(content):
                content.close()
            raise TypeError(f"DatastarResponse got {type(content).__name__}. {ASYNC_HANDLER}")
        if handler is not None:
            refuse_async(handler, "The stream handler")
            if content is not None:
                raise TypeError("Pass either 'content' or 'handler' to DatastarResponse, not both.")
            encoding, bits, vary = _encoding(compress, all_headers)
            body = self._open(
                handler, on_connect, on_disconnect, authorize, own_thread, encoding, bits
            )
            super().__init__(body, status, all_headers, **kwargs)
            self._set_encoding(encoding, vary)
            if self._refusal_length is not None:
                self.headers["Content-Length"] = str(self._refusal_length)
        elif content is None:
            # Nothing to send: 204, as datastar-py answers (the client does nothing).
            super().__init__(None, 204 if status is None else status, all_headers, **kwargs)
        elif isinstance(content, (str, bytes)):
            super().__init__(content, status, all_headers, **kwargs)
        elif isinstance(content, (list, tuple)):
            super().__init__(
                "".join(_text(event) for event in content), status, all_headers, **kwargs
            )
        else:
            events = content

            def handler(gen: Stream) -> Iterable[Any]:
                return events

            encoding, bits, vary = _encoding(compress, all_headers)
            body = self._open(handler, None, None, authorize, own_thread, encoding, bits)
            super().__init__(body, status, all_headers, **kwargs)
            self._set_encoding(encoding, vary)
            if self._refusal_length is not None:
                self.headers["Content-Length"] = str(self._refusal_length)

    def _set_encoding(self, encoding: str | None, vary: bool) -> None:
        if self.datastar_stream is None:
            return  # turned away (its few bytes are plain), or a HEAD request
        if encoding is not None:
            self.headers["Content-Encoding"] = encoding
            # The stream's own encoding: the self-check must not take it for a middleware's.
            if has_request_context():
                request.environ["flask_datastar.encoding"] = encoding
        if vary:
            # Caches must not hand one client's encoding to another.
            self.vary.add("Accept-Encoding")

    def _open(
        self,
        handler: Handler,
        on_connect: Hook | None,
        on_disconnect: Hook | None,
        authorize: Authorize | None = None,
        own_thread: bool = False,
        encoding: str | None = None,
        window_bits: int = 12,
    ) -> Any:
        # Before anything else, HEAD included: a refused client learns nothing more,
        # and takes no stream slot.
        identity = _identify(authorize)
        if has_request_context() and request.method == "HEAD":
            # The headers are the whole answer: no stream, no hooks, no thread held.
            return []
        config, admission = _settings()
        environ = request.environ if has_request_context() else {}
        stream = Stream(
            environ,
            config,
            on_connect=on_connect,
            on_disconnect=on_disconnect,
            own_thread=own_thread,
        )
        stream.identity = identity
        limit = admission.limit
        client_limit = None
        if limit is not None and admission.client_share < 1:
            client_limit = max(1, int(limit * admission.client_share))
        refused = stream._admit(
            limit,
            holds_thread=own_thread or not may_release(environ, config),
            thread_limit=admission.thread_limit,
            client=_client_key(identity),
            client_limit=client_limit,
        )
        if refused is not None:
            return self._refuse(environ, refused, limit)
        metrics.stream_opened(stream)  # metrics: counted until _disconnect() counts it closed
        if encoding is not None:
            # Compression: set before on_connect, whose events are the first compressed.
            stream._encoder = compression.make_encoder(encoding, window_bits)
            metrics.stream_compressed(stream, stream._encoder)
        try:
            stream._hold_request()
            if identity is not None:
                # Filed under its identity, so that a revocation reaches it in every
                # process whatever registries the application put it in.
                state = current_app.extensions["datastar"]
                state.extension._identity_registry(current_app).register(stream)
            # In the view, before any byte leaves: an error here gets Flask's own
            # error response instead of a connection cut before its status line.
            stream._connect()
        except BaseException:
            stream._abandon()
            raise
        self.datastar_stream = stream
        body = stream._run(handler)
        # A response that is dropped before the server runs it (an after_request
        # hook failed) still ends its stream, leaving its registries and its slot.
        weakref.finalize(body, stream._abandon)
        return body

    def _refuse(self, environ: Any, reason: str, limit: int | None) -> Any:
        """Turn a stream away so that its client comes back by itself, later."""
        metrics.stream_refused(_REFUSAL_METRIC.get(reason, reason))  # metrics
        log.info(
            "flask_datastar: refused a stream of %s: %s",
            environ.get("PATH_INFO", ""),
            _REFUSALS.get(reason, reason),
        )
        if limit == 0:
            raise ServiceUnavailable(
                "This server process takes no streams: gunicorn's sync worker serves one"
                " request at a time. Run gunicorn with '-k gthread'."
            )
        refusal = _refusal_body(environ, reason)
        if refusal is None:
            raise ServiceUnavailable(
                f"No stream now: {_REFUSALS.get(reason, reason)}; try again later."
            )
        body, length = refusal
        if environ.get("SERVER_PROTOCOL") != "HTTP/1.1":
            # without chunks (HTTP/1.0, and an HTTP/1.0 proxy in front), a
            # cut body ends as cleanly as any other: one byte more announced than sent
            # makes the cut an error the client retries.
            self._refusal_length = length + 1
        return body

    def __call__(self, environ: Any, start_response: Any) -> Any:
        if self.datastar_stream is not None:
            # The direct path checks gunicorn's own response object, which a
            # middleware wrapping start_response hides (and so turns it off).
            self.datastar_stream._server_response = getattr(start_response, "__self__", None)
            selfcheck.stream_served(self, environ, start_response)  # self-check: once per trap
        return super().__call__(environ, start_response)


def _text(event: Any) -> str:
    return event.decode("utf-8") if isinstance(event, bytes) else str(event)


def sse_response(
    handler: Handler,
    *,
    on_connect: Hook | None = None,
    on_disconnect: Hook | None = None,
    status: int | None = None,
    headers: dict[str, str] | None = None,
    authorize: Authorize | None = None,
    own_thread: bool = False,
    compress: Compress = None,
) -> DatastarResponse:
    """Return a streaming response that runs ``handler(gen)`` on a new stream.

    The handler may be a plain function that sends a few events and returns
    (the stream then ends), or a generator function that pauses with
    ``yield gen.sleep(seconds)`` and lives as long as it loops.

    :param handler: called with the :class:`~flask_datastar.stream.Stream`.
    :param on_connect: called with the stream when it opens, before any event
        reaches the client (register it in a registry here).
    :param on_disconnect: called exactly once when the stream ends.
    :param status: the HTTP status.
    :param headers: extra headers.
    :param authorize: called as ``authorize(identity)`` in the view, after
        the app's :meth:`~flask_datastar.FlaskDatastar.authorizer` and before
        ``on_connect``; a false answer is a 401 (no identity) or a 403, and
        no stream opens.
    :param own_thread: run the handler on the server's thread for the
        stream's whole life, not on the scheduler (for handlers that block).
    :param compress: ``False`` sends this stream uncompressed whatever
        ``DATASTAR_COMPRESSION`` says; ``True`` or a list of encodings turns
        compression on for it; ``None`` follows the app.
    """
    return DatastarResponse(
        None,
        status,
        headers,
        handler=handler,
        on_connect=on_connect,
        on_disconnect=on_disconnect,
        authorize=authorize,
        own_thread=own_thread,
        compress=compress,
    )


@overload
def sse_stream(view: StreamView[P]) -> Callable[P, DatastarResponse]: ...
@overload
def sse_stream(
    view: None = None,
    *,
    on_connect: Hook | None = None,
    on_disconnect: Hook | None = None,
    authorize: Authorize | None = None,
    own_thread: bool = False,
    compress: Compress = None,
) -> StreamDecorator: ...
def sse_stream(
    view: StreamView[Any] | None = None,
    *,
    on_connect: Hook | None = None,
    on_disconnect: Hook | None = None,
    authorize: Authorize | None = None,
    own_thread: bool = False,
    compress: Compress = None,
) -> Any:
    """Turn a view into a stream handler: it is called as ``view(gen, **view_args)``.

    ::

        @app.get("/sse")
        @sse_stream(on_connect=clients.register)
        def sse(gen):
            while True:
                gen.patch_elements(render_content())
                yield gen.sleep(1)

    :param view: the view, when used without arguments (``@sse_stream``).
    :param on_connect: called with the stream when it opens.
    :param on_disconnect: called exactly once when the stream ends.
    :param authorize: called as ``authorize(identity)`` before the stream
        opens; see :func:`sse_response`.
    :param own_thread: run the handler on the server's thread for the
        stream's whole life, not on the scheduler (for handlers that block).
    :param compress: this route's compression; see :func:`sse_response`.
    """
    decorate = _StreamDecorator(on_connect, on_disconnect, authorize, own_thread, compress)
    return decorate(view) if view is not None else decorate


class _StreamDecorator:
    def __init__(
        self,
        on_connect: Hook | None,
        on_disconnect: Hook | None,
        authorize: Authorize | None = None,
        own_thread: bool = False,
        compress: Compress = None,
    ) -> None:
        self.on_connect = on_connect
        self.on_disconnect = on_disconnect
        self.authorize = authorize
        self.own_thread = own_thread
        if compress is not None and not isinstance(compress, bool):
            compression.parse_compression(compress, "compress")  # a mistake fails here, once
        self.compress = compress

    def __call__(self, view: StreamView[P], /) -> Callable[P, DatastarResponse]:
        refuse_async(view, "The stream view")

        @functools.wraps(view)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> DatastarResponse:
            return sse_response(
                lambda gen: view(gen, *args, **kwargs),
                on_connect=self.on_connect,
                on_disconnect=self.on_disconnect,
                authorize=self.authorize,
                own_thread=self.own_thread,
                compress=self.compress,
            )

        return wrapper


def datastar_response(view: Callable[P, Any]) -> Callable[P, Response]:
    """Wrap what a view returns or yields in a :class:`DatastarResponse`, as datastar-py does.

    A generator view is a stream: it may ``yield`` events (``yield
    SSE.patch_elements(...)``) and use :func:`~flask_datastar.with_sse`. A view
    returning one event or a list of events gives a short response.

    :param view: the view function.
    :raises TypeError: *view* is ``async def`` (streams run on the server's threads).
    """
    refuse_async(view, "The view")

    @functools.wraps(view)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> Response:
        rv = view(*args, **kwargs)
        if isinstance(rv, Response):
            return rv
        return DatastarResponse(rv)

    return wrapper
