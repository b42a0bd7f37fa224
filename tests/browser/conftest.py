"""Fixtures for the browser tests: one headless Chromium per session, tabs, served examples.

Chromium is Debian's (``/usr/bin/chromium``), driven by Playwright from PyPI; Playwright
never downloads a browser of its own. Each example runs under a real gunicorn gthread
server (:class:`tests.helpers.GunicornServer`) with the repository's ``gunicorn.conf.py``
(whose hooks end streams so that tabs reconnect), wrapped by :mod:`tests.browser.served`
so the page loads the Datastar client from the same origin (the test machines reach no
CDN).

Screenshots go to a fresh temporary directory, unless ``DATASTAR_SCREENSHOT_DIR`` names
one: ``DATASTAR_SCREENSHOT_DIR=docs/_static/screenshots pytest -m browser`` refreshes
the documentation's pictures. The default keeps CI runs and everyday runs from
rewriting files that are under version control, while still taking (and checking) the
screenshots on every run.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pytest

from tests.browser import served
from tests.helpers import REPO_ROOT, GunicornServer, require_module, require_tool

if TYPE_CHECKING:
    from playwright.sync_api import (
        Browser,
        BrowserContext,
        ConsoleMessage,
        Dialog,
        Page,
        ViewportSize,
    )

#: Flags for Debian's Chromium in a container: no sandbox (root), no GPU, and no
#: background traffic to Google services (the machines reach no such host).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

#: Seconds Playwright waits for a page state before a test fails.
TIMEOUT = 10.0

# Installed in every page before its own scripts: Datastar dispatches "datastar-ready"
# once it has scanned the document, possibly before a test could listen for it.
_READY_SCRIPT = (
    "document.addEventListener('datastar-ready', () => { window.__datastarReady = true })"
)


@pytest.fixture(scope="session")
def playwright_api() -> ModuleType:
    """``playwright.sync_api``; a missing install skips (fails on CI) the browser tests."""
    return require_module("playwright.sync_api")


@pytest.fixture(scope="session")
def browser(playwright_api: ModuleType) -> Iterator[Browser]:
    """One headless Chromium for the whole session (starting it costs about a second)."""
    executable = require_tool("chromium")
    manager = playwright_api.sync_playwright().start()
    try:
        chromium = manager.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()
    finally:
        manager.stop()


@pytest.fixture(scope="session")
def expect(playwright_api: ModuleType) -> Any:
    """Playwright's retrying assertions (``expect(locator).to_have_text(...)``)."""
    api_expect = playwright_api.expect
    api_expect.set_options(timeout=TIMEOUT * 1000)
    return api_expect


class Tabs:
    """Browser tabs of one test, with what they reported.

    Each tab gets a browser context of its own, as if each were a window of its
    own: Chromium throttles the animation frames of a background tab in a shared
    window, and Playwright's actionability checks wait for those frames (a click
    in the other tab then takes one to two seconds). Separate contexts also have
    separate connection pools (Chromium opens at most six HTTP/1.1 connections per
    host and context, and each open stream holds one).

    :param browser: the session's browser.
    :param viewport: the size of every tab.
    """

    def __init__(self, browser: Browser, viewport: ViewportSize) -> None:
        self.browser = browser
        self.viewport = viewport
        self.contexts: list[BrowserContext] = []
        self.pages: list[Page] = []
        #: Messages of the JavaScript dialogs (``alert`` and friends) any tab opened.
        self.dialogs: list[str] = []
        #: Uncaught JavaScript errors of any tab.
        self.errors: list[str] = []
        #: ``(type, text)`` of every console message of any tab.
        self.console: list[tuple[str, str]] = []

    def new_context(self) -> BrowserContext:
        """Return a new browser context: its own cookies and its own connection pool."""
        context = self.browser.new_context(viewport=self.viewport)
        context.set_default_timeout(TIMEOUT * 1000)
        context.add_init_script(_READY_SCRIPT)
        self.contexts.append(context)
        return context

    def open(self, url: str, context: BrowserContext | None = None) -> Page:
        """Open *url* in a new tab and wait until Datastar has scanned the page.

        :param url: the address.
        :param context: the browser context; a new one by default.
        """
        page = (context or self.new_context()).new_page()
        page.on("dialog", self._on_dialog)
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on("console", self._on_console)
        page.goto(url)
        page.wait_for_function("window.__datastarReady === true")
        self.pages.append(page)
        return page

    def _on_dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def _on_console(self, message: ConsoleMessage) -> None:
        self.console.append((message.type, message.text))

    def close(self) -> None:
        """Close every tab and context."""
        for context in self.contexts:
            context.close()
        self.contexts.clear()


@pytest.fixture
def tabs(browser: Browser) -> Iterator[Tabs]:
    """Tabs for one test, 900x600 each; uncaught JavaScript errors fail the test."""
    opened = Tabs(browser, {"width": 900, "height": 600})
    try:
        yield opened
    finally:
        opened.close()
    assert opened.errors == [], f"JavaScript errors in the tabs: {opened.errors}"


def example_server(
    app_spec: str, js_file: Path, *, env: dict[str, str] | None = None, **options: Any
) -> GunicornServer:
    """Return (not started) a gunicorn gthread server for an example, with the client.

    It runs with the repository's ``gunicorn.conf.py`` (its hooks end streams so that
    tabs reconnect on a restart), 16 threads (room for a few tabs' streams and their
    commands) and ``DATASTAR_JS_URL`` pointing at the client served next to the app.

    :param app_spec: the example's app, such as ``"examples.clock:app"``.
    :param js_file: the Datastar client (the ``datastar_js_file`` fixture).
    :param env: more environment variables for the server.
    :param options: more :class:`~tests.helpers.GunicornServer` options.
    """
    options.setdefault("threads", 16)
    options.setdefault("config", "gunicorn.conf.py")
    return GunicornServer(
        f"tests.browser.served:make({app_spec!r})",
        env={
            "FLASK_DATASTAR_JS_URL": served.JS_URL,
            served.JS_FILE_ENV: str(js_file),
            **(env or {}),
        },
        **options,
    )


@pytest.fixture(scope="module")
def serve(datastar_js_file: Path) -> Iterator[Callable[..., GunicornServer]]:
    """Start example servers for the module's tests; all are stopped after the module.

    ``server = serve("examples.clock:app")`` returns a started server; the arguments
    are those of :func:`example_server`.
    """
    started: list[GunicornServer] = []

    def start(app_spec: str, **options: Any) -> GunicornServer:
        server = example_server(app_spec, datastar_js_file, **options)
        started.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in started:
            server.close()


@pytest.fixture(scope="session")
def screenshot_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots go: ``$DATASTAR_SCREENSHOT_DIR`` if set, else a temporary directory.

    A relative ``DATASTAR_SCREENSHOT_DIR`` is taken from the repository root.
    """
    configured = os.environ.get("DATASTAR_SCREENSHOT_DIR")
    if not configured:
        return tmp_path_factory.mktemp("screenshots")
    path = Path(configured)
    if not path.is_absolute():
        path = REPO_ROOT / path
    path.mkdir(parents=True, exist_ok=True)
    return path


def wait_for_change(page: Page, selector: str, old: str, timeout: float = TIMEOUT) -> str:
    """Wait until the text of *selector* differs from *old*; return the new text.

    :param page: the tab.
    :param selector: a CSS selector.
    :param old: the text to move away from.
    :param timeout: seconds to wait.
    """
    page.wait_for_function(
        "([selector, old]) => {"
        " const el = document.querySelector(selector);"
        " return el !== null && el.textContent !== old }",
        arg=[selector, old],
        timeout=timeout * 1000,
    )
    return str(page.text_content(selector))


def screenshot_side_by_side(pages: list[Page], path: Path, height: int = 430) -> Path:
    """Write one PNG, 900 pixels wide, showing *pages* side by side as a person sees them.

    Each tab is narrowed to its share of the width and captured, and the pictures
    are laid out in a page of their own, so no imaging library is needed. The tabs
    keep their new size.

    :param pages: the tabs, captioned "Tab 1", "Tab 2", ... from left to right.
    :param path: the PNG file to write.
    :param height: the height of each tab, in pixels.
    """
    gap, width = 12, 900
    tab_width = (width - gap * (len(pages) + 1)) // len(pages)
    figures = []
    for number, page in enumerate(pages, 1):
        page.set_viewport_size({"width": tab_width, "height": height})
        shot = base64.b64encode(page.screenshot(type="png")).decode("ascii")
        figures.append(
            f"<figure><figcaption>Tab {number}</figcaption>"
            f'<img src="data:image/png;base64,{shot}"></figure>'
        )
    context = pages[0].context.browser.new_context(  # type: ignore[union-attr]
        viewport={"width": width, "height": height + 2 * gap + 22}
    )
    try:
        board = context.new_page()
        board.set_content(
            "<style>"
            f"body {{ margin: 0; display: flex; gap: {gap}px; padding: {gap}px;"
            " background: #e8e8e8; font: 14px sans-serif }"
            "figure { margin: 0 } figcaption { padding: 0 0 6px }"
            f"img {{ display: block; width: {tab_width - 2}px; border: 1px solid #999 }}"
            "</style>" + "".join(figures)
        )
        board.screenshot(path=str(path), type="png")
    finally:
        context.close()
    return path


def screenshot(page: Page, path: Path, height: int = 450) -> Path:
    """Write a PNG of the top of *page*, 900 pixels wide.

    :param page: the tab.
    :param path: the PNG file to write.
    :param height: the height of the picture, in pixels.
    """
    page.set_viewport_size({"width": 900, "height": height})
    page.screenshot(path=str(path), type="png")
    return path
