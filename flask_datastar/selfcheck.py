"""A deployment self-check: warn once about each setup that breaks long-lived streams.

At the first stream a process serves, the checks of its server and app run;
the checks of the request (its protocol, its proxy headers, what wraps
``start_response``, the response's headers) run at every stream until each
has warned. Each trap found is logged once per process, as a warning of the
``flask_datastar.selfcheck`` logger that says what to do:

========================== ==============================================================
``sync_worker``            gunicorn's sync worker: one request at a time, a stream holds it
``threads``                no stream cap, or a cap that leaves no thread for commands
``heartbeat``              heartbeats off, or longer than proxies wait for an idle upstream
``middleware``             something buffers or compresses the ``text/event-stream`` body
``wrapped_start_response`` a WSGI middleware hides gunicorn, so the direct path is off
``http10``                 the request came as HTTP/1.0 (nginx's default ``proxy_http_version``)
``http2``                  gunicorn speaks HTTP/2 itself, which serialises a connection's streams
``plain_http``             browsers reach the site over plain HTTP: 6 connections per origin
``client_url``             the page cannot load the Datastar client it points at
========================== ==============================================================

``DATASTAR_SELF_CHECK = False`` turns the check off; ``DATASTAR_SELF_CHECK_IGNORE``
lists the names of traps not to warn about. :func:`check` runs every check
at once and returns what it finds, for a test or a start-up script.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from flask import Flask
    from werkzeug.datastructures import Headers

    from .response import DatastarResponse
    from .stream import Stream

__all__ = [
    "CHECKS",
    "Finding",
    "check",
    "note_gunicorn_worker",
    "reset",
    "stream_served",
    "stream_started",
]

log = logging.getLogger(__name__)

#: The name of every trap the self-check knows.
CHECKS = (
    "sync_worker",
    "threads",
    "heartbeat",
    "middleware",
    "wrapped_start_response",
    "http10",
    "http2",
    "plain_http",
    "client_url",
)

#: Common proxies close an upstream that sent nothing for this many seconds:
#: nginx's ``proxy_read_timeout`` and AWS load balancers 60 s, Cloudflare 100 s.
PROXY_IDLE_TIMEOUT = 60.0
#: Heartbeats longer than this leave too little margin under :data:`PROXY_IDLE_TIMEOUT`.
MAX_HEARTBEAT = 50.0

#: The environ key where flask_datastar's own compression names the content coding
#: it applied, so that this check does not take it for a middleware.
OWN_ENCODING_KEY = "flask_datastar.encoding"
# Set when the response is handed to the server (DatastarResponse.__call__).
_SERVED_KEY = "flask_datastar.selfcheck.served"

# Words in a middleware's module or class name that say it rewrites the body.
_SUSPECT_WORDS = ("gzip", "compress", "brotli", "zstd", "deflate", "minif", "buffer")
# Middleware known to collect the whole body before passing it on.
_KNOWN_BUFFERING = {
    "werkzeug.middleware.profiler.ProfilerMiddleware": "collects the whole response to profile it",
}


class _Headers(Protocol):
    def get(self, name: str) -> str | None: ...


@dataclass(frozen=True)
class Finding:
    """One trap found: its name (as in :data:`CHECKS`) and what to do about it."""

    name: str
    message: str

    def __str__(self) -> str:
        return (
            f"flask_datastar self-check ({self.name}): {self.message} [Silence this warning"
            f" with DATASTAR_SELF_CHECK_IGNORE = [{self.name!r}].]"
        )


@dataclass(frozen=True)
class _Worker:
    worker_class: str
    threads: int
    connections: int


_lock = threading.Lock()
_state: dict[str, Any] = {"pid": 0, "warned": set(), "apps": set(), "worker": None}


def _process_state() -> dict[str, Any]:
    """This process's state (a forked worker starts with none of its parent's warnings)."""
    pid = os.getpid()
    if _state["pid"] != pid:
        with _lock:
            if _state["pid"] != pid:
                _state.update(pid=pid, warned=set(), apps=set())
    return _state


def reset() -> None:
    """Forget which traps this process has warned about, which apps it has checked, and
    what :func:`note_gunicorn_worker` said (for tests)."""
    with _lock:
        _state.update(pid=os.getpid(), warned=set(), apps=set(), worker=None)


def note_gunicorn_worker(worker_class: str, threads: int, connections: int) -> None:
    """Record what the gunicorn hooks know of this worker (its class and its threads).

    :func:`flask_datastar.gunicorn.post_worker_init` calls it.

    :param worker_class: the worker's class name, such as ``"ThreadWorker"``.
    :param threads: its ``--threads``.
    :param connections: its ``--worker-connections``.
    """
    _state["worker"] = _Worker(worker_class, threads, connections)


# -- the checks ---------------------------------------------------------------------


def _is_gunicorn(environ: Mapping[str, Any]) -> bool:
    return "gunicorn.socket" in environ or str(environ.get("SERVER_SOFTWARE", "")).startswith(
        "gunicorn"
    )


def _server_findings(
    environ: Mapping[str, Any], heartbeat: float, max_streams: int | None
) -> list[Finding]:
    """The checks of the server process and of the app's stream settings."""
    from .gunicorn import reserved_threads
    from .stream import process_stream_limit, process_thread_limit

    found = []
    worker: _Worker | None = _state["worker"]
    if _is_gunicorn(environ):
        if worker is not None:
            sync = worker.worker_class == "SyncWorker"
            threaded = worker.worker_class == "ThreadWorker"
        else:
            sync = environ.get("wsgi.multithread") is False
            # gevent and eventlet hand out their own socket types: greenlets, not threads.
            threaded = not sync and type(environ.get("gunicorn.socket")) in (
                socket.socket,
                ssl.SSLSocket,
            )
        if sync:
            found.append(
                Finding(
                    "sync_worker",
                    "gunicorn runs the sync worker, which serves one request at a time:"
                    " each stream holds a whole worker, and every other request waits"
                    " (its --timeout also cuts streams after 30 s). Run gunicorn with"
                    " '-k gthread --threads 32' (or more).",
                )
            )
        elif threaded:
            # Released streams hold no thread; the ones that keep theirs (own_thread, the
            # portable path) are capped by the hooks at --threads less a reserve.
            cap = process_thread_limit()
            threads = None if worker is None else worker.threads
            if cap is None and max_streams is None and process_stream_limit() is None:
                found.append(
                    Finding(
                        "threads",
                        "streams are not capped in this gunicorn worker: when the ones that"
                        " keep a thread (own_thread=True, or the portable path behind TLS or"
                        " HTTP/1.0) hold all of its --threads, commands (POSTs) queue behind"
                        " them and are never answered. Use the hooks ('from"
                        " flask_datastar.gunicorn import post_worker_init, worker_exit' in"
                        " gunicorn.conf.py), or set DATASTAR_MAX_STREAMS.",
                    )
                )
            elif (
                cap is not None
                and threads is not None
                and threads - cap < max(1, reserved_threads(threads))
            ):
                found.append(
                    Finding(
                        "threads",
                        f"this gunicorn worker has {threads} thread(s) and lets streams hold"
                        f" {cap} of them, which leaves {max(0, threads - cap)} for commands"
                        " (POSTs) and pages: they queue behind the streams. Run gunicorn"
                        f" with more --threads (at least {cap + max(2, cap // 10)}).",
                    )
                )
    if heartbeat <= 0:
        found.append(
            Finding(
                "heartbeat",
                "heartbeats are off (DATASTAR_HEARTBEAT = 0): proxies close a quiet stream"
                f" after {PROXY_IDLE_TIMEOUT:.0f} to 100 s, and a client that vanished is"
                " noticed only at the next event. Set DATASTAR_HEARTBEAT to 15 (seconds).",
            )
        )
    elif heartbeat > MAX_HEARTBEAT:
        found.append(
            Finding(
                "heartbeat",
                f"DATASTAR_HEARTBEAT is {heartbeat:g} s: proxies close an upstream that"
                " sent nothing for 60 s (nginx's proxy_read_timeout, AWS load balancers)"
                " or 100 s (Cloudflare), cutting quiet streams. Set it to 15 to 30 s.",
            )
        )
    return found


def _describe(fn: object) -> str:
    """The dotted name of a callable or of its class, for messages and name checks."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    target = fn if callable(fn) and hasattr(fn, "__qualname__") else type(fn)
    module = getattr(target, "__module__", "") or ""
    return f"{module}.{getattr(target, '__qualname__', type(fn).__name__)}"


def _suspect(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in _SUSPECT_WORDS)


def _chain_findings(app: Flask) -> list[Finding]:
    """Middleware wrapped around ``app.wsgi_app`` that buffers or compresses bodies."""
    found = []
    current: Any = app.wsgi_app
    for _ in range(32):  # a chain is a few links long; a loop would go on forever
        if getattr(current, "__self__", None) is app:
            break  # Flask's own wsgi_app: the end of the chain
        name = _describe(current)
        why = _KNOWN_BUFFERING.get(name)
        if why is None and _suspect(name):
            why = "seems, by its name, to compress or buffer response bodies"
        if why is not None:
            found.append(
                Finding(
                    "middleware",
                    f"the WSGI middleware {name} around app.wsgi_app {why}: events of a"
                    " text/event-stream response would reach the browser late or never."
                    " Leave the stream routes out of it (or remove it), and use"
                    " flask_datastar's own compression.",
                )
            )
        inner = None
        for attribute in ("app", "wsgi_app", "application", "_app"):
            candidate = getattr(current, attribute, None)
            if callable(candidate) and candidate is not current:
                inner = candidate
                break
        if inner is None:
            break
        current = inner
    return found


def _client_findings(app: Flask, environ: Mapping[str, Any]) -> list[Finding]:
    """The page must be able to load the Datastar client from the configured address."""
    from .client import DATASTAR_INTEGRITY, _local_client_path, integrity_matches

    url = app.config.get("DATASTAR_JS_URL") or None
    integrity = app.config.get("DATASTAR_JS_INTEGRITY") or None
    found = []
    if url is None:
        local = _local_client_path(app)
        if local is not None and local.is_file():
            expected = str(integrity or DATASTAR_INTEGRITY)
            if not _matches(local, expected, integrity_matches):
                found.append(
                    Finding(
                        "client_url",
                        f"{local} does not match the integrity hash {expected}, so browsers"
                        " refuse to run it and the pages never go live. Run 'flask datastar"
                        " fetch' to replace it (or fix DATASTAR_JS_INTEGRITY).",
                    )
                )
        return found
    parts = urlsplit(str(url))
    if parts.scheme or parts.netloc or not parts.path.startswith("/"):
        return found
    path = parts.path
    script_name = str(environ.get("SCRIPT_NAME", "")).rstrip("/")
    if script_name and path.startswith(script_name + "/"):
        path = path[len(script_name) :]
    prefix = f"{app.static_url_path}/"
    if not app.static_folder or not path.startswith(prefix):
        return found
    file = Path(app.static_folder) / path[len(prefix) :]
    if not file.is_file():
        found.append(
            Finding(
                "client_url",
                f"DATASTAR_JS_URL is {url!r}, but there is no {file}: pages cannot load the"
                " Datastar client and never go live. Run 'flask datastar fetch' and unset"
                " DATASTAR_JS_URL (pages then load the app's own copy), or put the file there.",
            )
        )
    elif integrity and not _matches(file, str(integrity), integrity_matches):
        found.append(
            Finding(
                "client_url",
                f"{file} (DATASTAR_JS_URL) does not match DATASTAR_JS_INTEGRITY, so browsers"
                " refuse to run it and the pages never go live. Fix the file or the hash.",
            )
        )
    return found


def _matches(path: Path, integrity: str, matches: Callable[[bytes, str], bool]) -> bool:
    try:
        return matches(path.read_bytes(), integrity)
    except (OSError, ValueError):
        return False


def _forwarded_proto(environ: Mapping[str, Any]) -> str | None:
    value = environ.get("HTTP_X_FORWARDED_PROTO")
    if value:
        return str(value).split(",")[0].strip().lower()
    forwarded = environ.get("HTTP_FORWARDED")
    if forwarded:
        for pair in str(forwarded).split(",")[0].split(";"):
            name, _, proto = pair.strip().partition("=")
            if name.lower() == "proto":
                return proto.strip('"').lower()
    return None


def _request_findings(
    app: Flask | None,
    environ: Mapping[str, Any],
    start_response: object,
    headers: _Headers | None,
    direct_writes: bool,
) -> list[Finding]:
    """The checks of one stream's request, of what wraps it, and of its response."""
    found = []
    protocol = str(environ.get("SERVER_PROTOCOL", ""))
    if protocol == "HTTP/1.0":
        found.append(
            Finding(
                "http10",
                "the stream's request came as HTTP/1.0, as nginx sends it by default: the"
                " response cannot be chunked, the connection is not reused, and direct"
                " writes are off. In nginx's location for the app, set 'proxy_http_version"
                " 1.1;', 'proxy_set_header Connection \"\";' and 'proxy_buffering off;'.",
            )
        )
    elif protocol.startswith("HTTP/2") and _is_gunicorn(environ):
        found.append(
            Finding(
                "http2",
                "gunicorn serves this stream over its own HTTP/2, which handles one"
                " connection's requests one after another: an open stream blocks the"
                " commands of its browser. Terminate HTTP/2 at a proxy (nginx, a load"
                " balancer) and speak HTTP/1.1 to gunicorn.",
            )
        )
    if _forwarded_proto(environ) == "http":
        found.append(
            Finding(
                "plain_http",
                "browsers reach this site over plain HTTP (X-Forwarded-Proto: http), where"
                " they speak HTTP/1.1 and open at most 6 connections per origin: each tab"
                " holds one stream, so a 7th tab hangs. Serve HTTPS with HTTP/2 at the"
                " proxy.",
            )
        )
    if start_response is not None:
        name = _describe(start_response)
        if _suspect(name) or name.rpartition(".")[0] in (
            "werkzeug.middleware.profiler.ProfilerMiddleware.__call__.<locals>",
        ):
            found.append(
                Finding(
                    "middleware",
                    f"start_response is wrapped by {name}, which by its name buffers or"
                    " compresses response bodies: events would reach the browser late or"
                    " never. Leave the stream routes out of it, and use flask_datastar's"
                    " own compression.",
                )
            )
        elif direct_writes and _direct_path_expected(environ, start_response):
            found.append(
                Finding(
                    "wrapped_start_response",
                    f"a WSGI middleware wraps start_response ({name}), which hides"
                    " gunicorn's response: the direct socket path is off, and every event"
                    " wakes its stream's thread (fan-out to many tabs becomes far slower)."
                    " Wrap only the routes that need it, or set DATASTAR_DIRECT_WRITES ="
                    " False to choose the slower path knowingly.",
                )
            )
    if headers is not None:
        coding = headers.get("Content-Encoding")
        if coding and coding != environ.get(OWN_ENCODING_KEY):
            found.append(
                Finding(
                    "middleware",
                    f"something set 'Content-Encoding: {coding}' on a text/event-stream"
                    " response (an after_request compressor such as Flask-Compress):"
                    " a compressor that does not flush after every event holds events back."
                    " Leave text/event-stream out of its mimetypes, and use flask_datastar's"
                    " own compression.",
                )
            )
        if headers.get("Content-Length") is not None:
            found.append(
                Finding(
                    "middleware",
                    "something set Content-Length on a text/event-stream response: a body"
                    " with a length is a buffered one, and an endless stream has none."
                    " Leave stream responses out of the hook or middleware that sets it.",
                )
            )
    if app is not None:
        url = app.config.get("DATASTAR_JS_URL") or ""
        page_https = environ.get("wsgi.url_scheme") == "https" or (
            _forwarded_proto(environ) == "https"
        )
        if page_https and str(url).startswith("http://"):
            found.append(
                Finding(
                    "client_url",
                    f"pages are served over HTTPS but DATASTAR_JS_URL is {url!r}: browsers"
                    " block a script loaded over plain HTTP, and the pages never go live."
                    " Use an https:// address.",
                )
            )
    return found


def _direct_path_expected(environ: Mapping[str, Any], start_response: object) -> bool:
    """Whether gunicorn would have allowed direct writes but for a wrapped start_response."""
    if type(environ.get("gunicorn.socket")) is not socket.socket:
        return False
    if environ.get("SERVER_PROTOCOL") != "HTTP/1.1" or environ.get("REQUEST_METHOD") == "HEAD":
        return False
    try:
        from gunicorn.http.wsgi import Response as GunicornResponse  # type: ignore[import-untyped]
    except ImportError:  # pragma: no cover - "gunicorn.socket" implies gunicorn
        return False
    return not isinstance(getattr(start_response, "__self__", None), GunicornResponse)


def check(
    app: Flask,
    environ: Mapping[str, Any] | None = None,
    start_response: object = None,
    headers: Mapping[str, str] | Headers | None = None,
) -> list[Finding]:
    """Run every check for *app* (and a stream's request, when given) and return what it finds.

    Nothing is logged. The process's server is known from *environ* and from
    the gunicorn hooks (:func:`note_gunicorn_worker`); without *environ* only
    the app's own settings and middleware are checked.

    :param app: an app with the extension registered.
    :param environ: the WSGI environ of a stream's request.
    :param start_response: the ``start_response`` the server gave for it.
    :param headers: the response's headers.
    """
    from .extension import FlaskDatastar

    config = FlaskDatastar._state(app).config
    environ = environ or {}
    found = _server_findings(environ, config.heartbeat, config.max_streams)
    found += _chain_findings(app)
    found += _client_findings(app, environ)
    found += _request_findings(app, environ, start_response, headers, config.direct_writes)
    return found


def _report(findings: list[Finding], ignore: frozenset[str]) -> None:
    warned: set[str] = _process_state()["warned"]
    for finding in findings:
        if finding.name in ignore:
            continue
        with _lock:
            if finding.message in warned:
                continue
            warned.add(finding.message)
        log.warning("%s", finding)


# -- the hooks the engine calls -------------------------------------------------------


def stream_served(
    response: DatastarResponse, environ: Mapping[str, Any], start_response: object
) -> None:
    """Check a stream that is being handed to the server (``DatastarResponse.__call__``).

    The first stream of each app in this process runs every check; later
    ones run the checks of their request only. Each finding is logged once.
    """
    from flask import current_app, has_app_context

    if isinstance(environ, dict):
        environ[_SERVED_KEY] = True
    if not has_app_context():
        return
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    state = app.extensions.get("datastar")
    if state is None or not state.config.self_check:
        return
    config = state.config
    process = _process_state()
    findings = []
    if id(app) not in process["apps"]:
        process["apps"].add(id(app))
        findings += _server_findings(environ, config.heartbeat, config.max_streams)
        findings += _chain_findings(app)
        findings += _client_findings(app, environ)
    findings += _request_findings(
        app, environ, start_response, response.headers, config.direct_writes
    )
    if findings:
        _report(findings, config.self_check_ignore)


def stream_started(stream: Stream) -> None:
    """Warn when a stream's body is read before the server got the response.

    That is an ``after_request`` hook calling ``response.get_data()`` (a
    compressor, a minifier): it waits for the end of an endless stream, and
    the request hangs. Not checked in testing mode, where tests read bodies
    directly.
    """
    if stream.environ.get(_SERVED_KEY) or not stream.environ:
        return
    from flask import current_app, has_app_context

    if not has_app_context() or current_app.testing:
        return
    state = current_app.extensions.get("datastar")
    if state is None or not state.config.self_check:
        return
    _report(
        [
            Finding(
                "middleware",
                "the body of the stream at"
                f" {stream.environ.get('PATH_INFO', '')!r} is being read before the server"
                " got the response: an after_request hook (a compressor or a minifier"
                " calling response.get_data()) waits for the end of an endless stream, and"
                " the request hangs. Make the hook skip text/event-stream responses"
                " (response.is_streamed or response.mimetype).",
            )
        ],
        state.config.self_check_ignore,
    )
