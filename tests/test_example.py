"""example_app.py as a user runs it: under gunicorn with gunicorn.conf.py, and on
Flask's development server with ``python example_app.py``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest

from tests.helpers import (
    REPO_ROOT,
    ConnectionClosed,
    GunicornServer,
    RawHTTPStream,
    free_port,
    post,
)

pytestmark = pytest.mark.live

CLICKS = re.compile(r"Button clicks: <strong>(\d+)</strong>")
TIME = re.compile(r"Time: <strong>(\d\d:\d\d:\d\d)</strong>")


def content_events(stream: RawHTTPStream) -> Iterator[tuple[str | None, int, str]]:
    """Yield (selector, clicks, time) of every patch of #content."""
    for event in stream.events(timeout=10):
        html = event.elements or ""
        if 'id="content"' in html:
            clicks, now = CLICKS.search(html), TIME.search(html)
            assert clicks and now, html
            yield event.selector, int(clicks.group(1)), now.group(1)


def check_two_tabs(port: int, url: str) -> None:
    with urllib.request.urlopen(url + "/", timeout=10) as rv:
        page = rv.read().decode()
    assert '<script type="module" src="https://cdn.jsdelivr.net/gh/starfederation/' in page
    assert 'data-init="@get(&#39;/sse&#39;)"' in page
    assert 'data-on:click="@post(&#39;/click&#39;)"' in page
    assert 'data-ignore-morph="true"' in page
    start = int(CLICKS.search(page).group(1))  # type: ignore[union-attr]
    tabs = [RawHTTPStream(port, "/sse"), RawHTTPStream(port, "/sse")]
    try:
        for tab in tabs:
            # The full content on connect, without a selector (matched by its id).
            selector, clicks, _ = next(content_events(tab))
            assert (selector, clicks) == (None, start)
        status, _, _ = post(url + "/click", json={})
        assert status == 204
        for tab in tabs:
            seen = []
            for _selector, clicks, now in content_events(tab):
                seen.append(now)
                if clicks == start + 1:
                    break
            # The broadcast arrives before the next ticks bring it anyway.
            assert len(seen) <= 2
        # The clock ticks on each tab's own stream.
        events = content_events(tabs[0])
        times = {next(events)[2] for _ in range(3)}
        assert len(times) >= 2
    finally:
        for tab in tabs:
            tab.close()


def test_under_gunicorn_with_its_config() -> None:
    with GunicornServer("example_app:app", threads=10, config="gunicorn.conf.py") as server:
        check_two_tabs(server.port, server.url)


def test_admission_and_drain_hooks() -> None:
    # 4 threads hold 10 tabs: a stream gives its thread back at its first pause.
    env = {"FLASK_DATASTAR_MAX_STREAMS": "10", "FLASK_DATASTAR_CLIENT_SHARE": "1"}
    with GunicornServer("example_app:app", threads=4, config="gunicorn.conf.py", env=env) as server:
        tabs = [RawHTTPStream(server.port, "/sse") for _ in range(10)]
        try:
            for tab in tabs:
                assert tab.status == 200
                next(tab.events(timeout=10))
            with RawHTTPStream(server.port, "/sse") as eleventh:
                # Over the cap: told when to come back, then cut, so the client retries.
                assert eleventh.status == 200
                with pytest.raises(ConnectionClosed):
                    assert list(eleventh.events(timeout=10)) == []
                assert eleventh.parser.retry is not None
                assert 1000 <= eleventh.parser.retry <= 4000
            status, _, _ = post(server.url + "/click")
            assert status == 204  # commands still get a thread
            server.proc.send_signal(15)  # type: ignore[union-attr]
            for tab in tabs:
                # Each tab gets a random retry delay, then an abrupt end that makes the
                # Datastar client reconnect (a clean end would not).
                with pytest.raises(ConnectionClosed):
                    for _ in tab.events(timeout=10):
                        pass
                assert tab.parser.retry is not None and 1000 <= tab.parser.retry <= 3000
        finally:
            for tab in tabs:
                tab.close()


def test_on_flask_development_server() -> None:
    port = free_port()
    env = {**os.environ, "PORT": str(port), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "example_app.py"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).close()
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()  # type: ignore[union-attr]
                assert time.monotonic() < deadline, "the development server did not start"
                time.sleep(0.1)
        check_two_tabs(port, f"http://127.0.0.1:{port}")
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()  # type: ignore[union-attr]
