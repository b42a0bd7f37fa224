"""The deployment self-check: each trap gives its warning, once; a clean setup gives none."""

from __future__ import annotations

import base64
import hashlib
import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from werkzeug.middleware.profiler import ProfilerMiddleware
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.test import EnvironBuilder

from flask_datastar import FlaskDatastar, selfcheck
from flask_datastar.client import STATIC_FILENAME
from flask_datastar.testing import open_stream
from tests.helpers import GunicornServer, RawHTTPStream, wait_for

LOGGER = "flask_datastar.selfcheck"


@pytest.fixture(autouse=True)
def fresh_process_state() -> Iterator[None]:
    """Every test starts as a process that has warned about nothing."""
    selfcheck.reset()
    yield
    selfcheck.reset()


def make_app(tmp_path: Path | None = None, **config: Any) -> Flask:
    app = Flask(__name__, static_folder=None if tmp_path is None else str(tmp_path / "static"))
    app.config.update({"TESTING": True, "DATASTAR_HEARTBEAT": 15, **config})
    FlaskDatastar(app)
    return app


def environ(**overrides: Any) -> dict[str, Any]:
    env: dict[str, Any] = EnvironBuilder(path="/sse").get_environ()
    env.update(overrides)
    return env


def gunicorn_environ(**overrides: Any) -> dict[str, Any]:
    return environ(SERVER_SOFTWARE="gunicorn/27.0.1", **{"wsgi.multithread": True, **overrides})


def names(findings: list[selfcheck.Finding]) -> list[str]:
    return sorted(finding.name for finding in findings)


def test_a_clean_setup_finds_nothing(tmp_path: Path) -> None:
    selfcheck.note_gunicorn_worker("ThreadWorker", 100, 1000)
    app = make_app(tmp_path, DATASTAR_MAX_STREAMS=90)
    with socket.socket() as sock:
        env = gunicorn_environ(**{"gunicorn.socket": sock})
        assert selfcheck.check(app, env, headers={"Content-Type": "text/event-stream"}) == []


def test_the_sync_worker() -> None:
    app = make_app()
    # Seen from the request alone (no hooks): gunicorn, one thread.
    found = selfcheck.check(app, gunicorn_environ(**{"wsgi.multithread": False}))
    assert names(found) == ["sync_worker"]
    assert "-k gthread" in found[0].message
    selfcheck.note_gunicorn_worker("SyncWorker", 1, 1000)
    assert names(selfcheck.check(app, gunicorn_environ())) == ["sync_worker"]


@pytest.mark.parametrize(
    ("threads", "max_streams", "expected"),
    [
        (1, None, ["threads"]),  # gthread's default --threads 1: the one thread streams
        # Streams that give their thread back are capped by files, not threads: a stream
        # cap above the threads leaves the threads that streams may keep as they were.
        (50, 100, []),
        (50, 50, []),
        (100, 90, []),
        (2, 1, []),
    ],
)
def test_too_few_threads_for_the_stream_cap(
    threads: int, max_streams: int | None, expected: list[str]
) -> None:
    from flask_datastar.gunicorn import stream_limits
    from flask_datastar.stream import (
        process_stream_limit,
        process_thread_limit,
        set_process_stream_limit,
    )

    selfcheck.note_gunicorn_worker("ThreadWorker", threads, 1000)
    previous = process_stream_limit(), process_thread_limit()
    # As the hooks do, for a worker that may open 65,536 files.
    set_process_stream_limit(*stream_limits("ThreadWorker", threads, 1000, 65536))
    try:
        app = make_app(DATASTAR_MAX_STREAMS=max_streams)
        found = selfcheck.check(app, gunicorn_environ())
    finally:
        set_process_stream_limit(*previous)
    assert names(found) == expected
    if expected:
        assert "--threads" in found[0].message


def test_no_stream_cap_under_gthread_without_the_hooks() -> None:
    with socket.socket() as sock:  # a plain socket: threads, not greenlets
        found = selfcheck.check(make_app(), gunicorn_environ(**{"gunicorn.socket": sock}))
    assert names(found) == ["threads"]
    assert "post_worker_init" in found[0].message


@pytest.mark.parametrize(("heartbeat", "warned"), [(0, True), (90, True), (55, True), (15, False)])
def test_heartbeats_off_or_longer_than_proxy_timeouts(heartbeat: float, warned: bool) -> None:
    found = selfcheck.check(make_app(DATASTAR_HEARTBEAT=heartbeat), environ())
    assert names(found) == (["heartbeat"] if warned else [])


class GzipMiddleware:
    def __init__(self, app: Any) -> None:
        self.app = app

    def __call__(self, environ: Any, start_response: Any) -> Any:
        def compressing_start_response(*args: Any) -> Any:
            return start_response(*args)

        return self.app(environ, compressing_start_response)


def test_middleware_that_buffers_or_compresses() -> None:
    app = make_app()
    app.wsgi_app = ProxyFix(app.wsgi_app)  # type: ignore[method-assign]
    assert selfcheck.check(app, environ()) == []  # harmless
    app.wsgi_app = ProfilerMiddleware(GzipMiddleware(app.wsgi_app))  # type: ignore[method-assign]
    found = selfcheck.check(app, environ())
    assert names(found) == ["middleware", "middleware"]
    assert "ProfilerMiddleware" in found[0].message and "GzipMiddleware" in found[1].message
    # Also when it wraps the app from outside, seen by the start_response it passes.
    wrapped = GzipMiddleware(None)
    start_response: Any = None

    def capture(environ: Any, sr: Any) -> None:
        nonlocal start_response
        start_response = sr

    wrapped.app = capture
    wrapped({}, lambda *args: None)
    found = selfcheck.check(make_app(), environ(), start_response)
    assert names(found) == ["middleware"]
    assert "compressing_start_response" in found[0].message


def test_a_wrapped_start_response_turns_the_direct_path_off() -> None:
    selfcheck.note_gunicorn_worker("ThreadWorker", 100, 1000)
    app = make_app(DATASTAR_MAX_STREAMS=90)

    def timed_start_response(*args: Any) -> None: ...

    with socket.socket() as sock:
        env = gunicorn_environ(**{"gunicorn.socket": sock})
        found = selfcheck.check(app, env, timed_start_response)
        assert names(found) == ["wrapped_start_response"]
        # Chosen knowingly: no warning.
        quiet = make_app(DATASTAR_MAX_STREAMS=90, DATASTAR_DIRECT_WRITES=False)
        assert selfcheck.check(quiet, env, timed_start_response) == []


def test_a_compressed_or_measured_event_stream() -> None:
    app = make_app()
    found = selfcheck.check(app, environ(), headers={"Content-Encoding": "gzip"})
    assert names(found) == ["middleware"] and "Flask-Compress" in found[0].message
    # flask_datastar's own compression names the coding it applied.
    own = environ(**{selfcheck.OWN_ENCODING_KEY: "gzip"})
    assert selfcheck.check(app, own, headers={"Content-Encoding": "gzip"}) == []
    found = selfcheck.check(app, environ(), headers={"Content-Length": "12"})
    assert names(found) == ["middleware"] and "Content-Length" in found[0].message


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"SERVER_PROTOCOL": "HTTP/1.0"}, ["http10"]),
        (
            {
                "SERVER_PROTOCOL": "HTTP/2.0",
                "SERVER_SOFTWARE": "gunicorn/27",
                "wsgi.multithread": True,
            },
            ["http2"],
        ),
        ({"HTTP_X_FORWARDED_PROTO": "http"}, ["plain_http"]),
        ({"HTTP_FORWARDED": "for=192.0.2.1;proto=http"}, ["plain_http"]),
        ({"HTTP_X_FORWARDED_PROTO": "https"}, []),
        ({"SERVER_PROTOCOL": "HTTP/1.1"}, []),
    ],
)
def test_the_protocol_in_front(overrides: dict[str, Any], expected: list[str]) -> None:
    assert names(selfcheck.check(make_app(), environ(**overrides))) == expected


def sri(data: bytes) -> str:
    return "sha384-" + base64.b64encode(hashlib.sha384(data).digest()).decode()


def test_the_client_url_the_page_cannot_load(tmp_path: Path) -> None:
    app = make_app(tmp_path, DATASTAR_JS_URL="/static/js/datastar.js")
    found = selfcheck.check(app, environ())
    assert names(found) == ["client_url"] and "flask datastar fetch" in found[0].message
    script = tmp_path / "static" / "js" / "datastar.js"
    script.parent.mkdir(parents=True)
    script.write_bytes(b"export {}")
    assert selfcheck.check(app, environ()) == []
    app.config["DATASTAR_JS_INTEGRITY"] = sri(b"something else")
    assert names(selfcheck.check(app, environ())) == ["client_url"]
    app.config["DATASTAR_JS_INTEGRITY"] = sri(b"export {}")
    assert selfcheck.check(app, environ()) == []
    # Under a prefix (SCRIPT_NAME) the same file.
    app.config["DATASTAR_JS_URL"] = "/app/static/js/datastar.js"
    assert selfcheck.check(app, environ(SCRIPT_NAME="/app")) == []
    # A page over HTTPS cannot load a script over plain HTTP.
    app.config["DATASTAR_JS_URL"] = "http://cdn.example/datastar.js"
    app.config["DATASTAR_JS_INTEGRITY"] = None
    found = selfcheck.check(app, environ(HTTP_X_FORWARDED_PROTO="https"))
    assert names(found) == ["client_url"] and "https://" in found[0].message


def test_the_apps_own_copy_of_the_client_must_match_its_hash(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    copy = tmp_path / "static" / STATIC_FILENAME
    copy.parent.mkdir(parents=True)
    copy.write_bytes(b"not the release")
    found = selfcheck.check(app, environ())
    assert names(found) == ["client_url"] and "does not match" in found[0].message
    app.config["DATASTAR_JS_INTEGRITY"] = sri(b"not the release")
    assert selfcheck.check(app, environ()) == []


def test_unknown_names_to_ignore_are_refused() -> None:
    with pytest.raises(ValueError, match="heartbeat"):
        make_app(DATASTAR_SELF_CHECK_IGNORE=["heartbeats"])


def stream_app(**config: Any) -> Flask:
    app = make_app(**config)
    datastar = app.extensions["datastar"].extension

    @app.get("/sse")
    @datastar.sse
    def sse(gen: Any) -> Any:
        gen.patch_signals({"hello": 1})
        yield gen.sleep(None)

    return app


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_each_trap_is_logged_once_per_process(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    client = stream_app(DATASTAR_HEARTBEAT=0).test_client()
    for _ in range(2):
        with open_stream(client, "/sse", headers={"X-Forwarded-Proto": "http"}) as stream:
            stream.next_event()
    logged = warnings(caplog)
    assert len(logged) == 2, logged
    assert "(heartbeat)" in logged[0] and "(plain_http)" in logged[1]
    assert "DATASTAR_SELF_CHECK_IGNORE = ['heartbeat']" in logged[0]


def test_turned_off_or_ignored_nothing_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    off = stream_app(DATASTAR_HEARTBEAT=0, DATASTAR_SELF_CHECK=False).test_client()
    with open_stream(off, "/sse") as stream:
        stream.next_event()
    ignored = stream_app(DATASTAR_HEARTBEAT=0, DATASTAR_SELF_CHECK_IGNORE="heartbeat")
    with open_stream(ignored.test_client(), "/sse") as stream:
        stream.next_event()
    assert warnings(caplog) == []


def test_a_hook_that_reads_the_stream_before_the_server(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    app = make_app(TESTING=False)
    datastar = app.extensions["datastar"].extension

    @app.get("/once")
    @datastar.sse
    def once(gen: Any) -> None:
        gen.patch_signals({"hello": 1})  # and ends, so that get_data() below returns

    @app.after_request
    def minify(response: Any) -> Any:
        response.get_data()  # what many compressors and minifiers do
        return response

    assert app.test_client().get("/once", headers={"Datastar-Request": "true"}).status_code == 200
    logged = warnings(caplog)
    assert len(logged) == 1 and "get_data()" in logged[0] and "'/once'" in logged[0]


# -- live, under gunicorn ----------------------------------------------------------------

HOOKS = "from flask_datastar.gunicorn import post_worker_init, worker_exit\n"


def selfcheck_lines(server: GunicornServer) -> list[str]:
    return [line for line in server.log_text().splitlines() if "self-check (" in line]


def test_live_traps_each_warn_once_and_a_clean_server_warns_nothing(tmp_path: Path) -> None:
    app = "tests.live_apps.selfcheck_app:app"
    # Traps: no hooks (no stream cap), and SELFCHECK_TRAPS (heartbeat, client URL, two
    # middlewares); the requests add HTTP/1.0 and a proxy saying the browser used http.
    with GunicornServer(app, threads=8, env={"SELFCHECK_TRAPS": "1"}) as server:
        headers = {"X-Forwarded-Proto": "http"}
        with RawHTTPStream(server.port, "/sse", http_version="HTTP/1.0", headers=headers) as old:
            assert next(old.events(timeout=5)).signals is not None
        for _ in range(2):
            with RawHTTPStream(server.port, "/sse") as stream:
                assert next(stream.events(timeout=5)).signals is not None
        expected = {
            "threads",
            "heartbeat",
            "middleware",
            "client_url",
            "http10",
            "plain_http",
            "wrapped_start_response",
        }
        found = wait_for(lambda: len(selfcheck_lines(server)) >= len(expected), timeout=5)
        lines = selfcheck_lines(server)
        assert found, server.log_text()
        assert sorted(line.split("self-check (")[1].split(")")[0] for line in lines) == sorted(
            expected
        ), "\n".join(lines)
        assert any("GzipMiddleware" in line for line in lines)
        assert any("timed_start_response" in line for line in lines)

    config = tmp_path / "gunicorn.conf.py"
    config.write_text(HOOKS)
    with GunicornServer(app, threads=12, config=str(config)) as clean:
        for _ in range(2):
            with RawHTTPStream(clean.port, "/sse") as stream:
                assert next(stream.events(timeout=5)).signals is not None
        assert "application loaded" in clean.log_text()
        assert selfcheck_lines(clean) == [], clean.log_text()


def test_live_sync_worker_warns() -> None:
    # '-k sync' after the helper's own '-k gthread' wins; one thread keeps it sync.
    extra = ["-k", "sync"]
    with GunicornServer("tests.live_apps.selfcheck_app:app", threads=1, extra_args=extra) as server:
        with RawHTTPStream(server.port, "/sse") as stream:
            assert next(stream.events(timeout=5)).signals is not None
        assert wait_for(lambda: selfcheck_lines(server), timeout=5), server.log_text()
        lines = selfcheck_lines(server)
        assert len(lines) == 1 and "(sync_worker)" in lines[0], "\n".join(lines)
