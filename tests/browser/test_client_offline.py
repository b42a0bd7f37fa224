"""The client from the app's own static files, its hash checked by Chromium, no CDN.

``flask datastar fetch`` downloads the test copy of the client (the one the other
browser tests use, :func:`tests.helpers.datastar_js`) from a mirror on 127.0.0.1,
checks it against ``DATASTAR_JS_INTEGRITY`` and writes it into the app's static
folder. The page, using ``{{ datastar_script() }}``, then goes live under gunicorn
without a single request leaving the server's origin; and once the file is tampered
with, Chromium refuses it because of its ``integrity`` attribute and the page stays
dead, with the reason in the console.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from flask_datastar import DATASTAR_VERSION
from tests.browser.conftest import TIMEOUT, Tabs
from tests.helpers import GunicornServer
from tests.live_apps.client_app import make_app
from tests.test_client import FileServer

if TYPE_CHECKING:
    from playwright.sync_api import ConsoleMessage

pytestmark = [pytest.mark.browser, pytest.mark.live]

LOCAL_URL = f"/static/datastar/datastar-{DATASTAR_VERSION}.js"


def sri384(data: bytes) -> str:
    return "sha384-" + base64.b64encode(hashlib.sha384(data).digest()).decode()


@pytest.fixture
def fetched(tmp_path: Path, datastar_js_file: Path) -> Iterator[tuple[Path, str]]:
    """The static folder after ``flask datastar fetch`` from a mirror, and the hash."""
    body = datastar_js_file.read_bytes()
    integrity = sri384(body)
    static = tmp_path / "static"
    with FileServer() as mirror:
        mirror.files["/gh/datastar.js"] = body
        app = make_app(str(static), integrity)
        result = app.test_cli_runner().invoke(
            args=["datastar", "fetch", "--url", mirror.url + "/gh/datastar.js"]
        )
    assert result.exit_code == 0, result.output
    assert (static / "datastar" / f"datastar-{DATASTAR_VERSION}.js").read_bytes() == body
    yield static, integrity


@pytest.fixture
def server(fetched: tuple[Path, str]) -> Iterator[GunicornServer]:
    static, integrity = fetched
    with GunicornServer(
        f"tests.live_apps.client_app:make_app({str(static)!r}, {integrity!r})",
        threads=8,
        config="gunicorn.conf.py",
    ) as started:
        yield started


def test_the_page_goes_live_from_the_apps_own_static_files(
    tabs: Tabs, server: GunicornServer, fetched: tuple[Path, str], expect: Any
) -> None:
    _, integrity = fetched
    context = tabs.new_context()
    requested: list[str] = []
    context.on("request", lambda request: requested.append(request.url))
    page = tabs.open(server.url + "/", context)
    expect(page.locator("#status")).to_have_text("live")

    script = page.locator("script[type=module]")
    assert script.get_attribute("src") == LOCAL_URL
    assert script.get_attribute("integrity") == integrity
    assert script.get_attribute("crossorigin") == "anonymous"
    assert server.url + LOCAL_URL in requested
    # Nothing left the app's origin: no CDN was needed, or asked.
    assert [url for url in requested if not url.startswith(server.url + "/")] == []


def test_a_tampered_copy_is_refused_by_the_browser(
    tabs: Tabs, server: GunicornServer, fetched: tuple[Path, str]
) -> None:
    static, _ = fetched
    copy = static / "datastar" / f"datastar-{DATASTAR_VERSION}.js"
    copy.write_bytes(copy.read_bytes() + b"\nconsole.log('tampered');\n")

    page = tabs.new_context().new_page()

    def integrity_error(message: ConsoleMessage) -> bool:
        return message.type == "error" and "integrity" in message.text

    with page.expect_console_message(integrity_error, timeout=TIMEOUT * 1000) as reported:
        page.goto(server.url + "/")
    text = reported.value.text
    assert LOCAL_URL in text
    assert "blocked" in text
    # The script never ran: Datastar did not start, and the page never went live.
    assert page.evaluate("window.__datastarReady === true") is False
    assert page.text_content("#status") == "offline"
