"""The fat-morph CQRS demo (``example_app.py``) in two real browser tabs.

Both tabs hold a stream of ``/sse``; a click in either POSTs ``/click``, and the
broadcast must reach both. The server runs with the repository's
``gunicorn.conf.py``, whose hooks end every stream abruptly when a worker stops, so
that the Datastar client retries: after a restart the tabs must come back by
themselves and show the new server's state.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.browser.conftest import Tabs, screenshot_side_by_side, wait_for_change
from tests.helpers import GunicornServer

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = [pytest.mark.browser, pytest.mark.live]

TIME = "#content p:nth-of-type(1) strong"
CLICKS = "#content p:nth-of-type(2) strong"
BUTTON = "#content button"
EDITABLE = "[data-ignore-morph] p[contenteditable]"
# After a restart the client's first retry waits the random delay the stopping worker
# sent (up to flask_datastar.gunicorn.DRAIN_SPREAD + 1 s), and if the new server is
# not up yet, twice that: allow for both.
COMEBACK_TIMEOUT = 30.0


@pytest.fixture(scope="module")
def server(serve: Callable[..., GunicornServer]) -> Iterator[GunicornServer]:
    yield serve("example_app:app")


def open_two(tabs: Tabs, server: GunicornServer) -> tuple[Page, Page]:
    first, second = tabs.open(server.url + "/"), tabs.open(server.url + "/")
    for page in (first, second):
        # The stream is open once the first tick has replaced the rendered time.
        wait_for_change(page, TIME, str(page.text_content(TIME)))
    return first, second


def clicks(page: Page) -> int:
    return int(str(page.text_content(CLICKS)))


def test_click_in_one_tab_shows_in_both_and_the_clock_ticks_in_both(
    tabs: Tabs, server: GunicornServer, expect: Any, screenshot_dir: Path
) -> None:
    first, second = open_two(tabs, server)
    start = clicks(first)
    assert clicks(second) == start

    first.click(BUTTON)
    for page in (first, second):
        expect(page.locator(CLICKS)).to_have_text(str(start + 1))
    second.click(BUTTON)
    second.click(BUTTON)
    for page in (first, second):
        expect(page.locator(CLICKS)).to_have_text(str(start + 3))

    # Both tabs tick at once, each on its own stream.
    seen = [[str(page.text_content(TIME))] for page in (first, second)]
    for _ in range(2):
        for page, times in zip((first, second), seen, strict=True):
            times.append(wait_for_change(page, TIME, times[-1]))
    for times in seen:
        assert len(set(times)) == 3
        assert all(len(value) == 8 and value.count(":") == 2 for value in times)

    first.locator(EDITABLE).fill("Typed in tab 1: the morphs leave this alone.")
    path = screenshot_side_by_side([first, second], screenshot_dir / "two-tabs.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert tabs.dialogs == []


def test_text_in_the_ignore_morph_paragraph_survives_the_morphs(
    tabs: Tabs, server: GunicornServer, expect: Any
) -> None:
    first, second = open_two(tabs, server)
    typed = "Typed by the test: <b>not markup</b> & still here"
    editable = first.locator(EDITABLE)
    editable.fill(typed)
    start = clicks(first)

    # Morphs from both sources: the stream's own tick and a broadcast of a click.
    time_before = str(first.text_content(TIME))
    wait_for_change(first, TIME, wait_for_change(first, TIME, time_before))
    second.click(BUTTON)
    expect(first.locator(CLICKS)).to_have_text(str(start + 1))
    wait_for_change(first, TIME, str(first.text_content(TIME)))

    expect(editable).to_have_text(typed)
    # The other tab's paragraph was never edited and keeps the text the server rendered.
    expect(second.locator(EDITABLE)).to_contain_text("Edit me")


def test_tabs_come_back_after_a_server_restart_and_show_the_new_state(
    tabs: Tabs, server: GunicornServer, expect: Any
) -> None:
    first, second = open_two(tabs, server)
    before = clicks(first) + 1
    first.click(BUTTON)
    for page in (first, second):
        expect(page.locator(CLICKS)).to_have_text(str(before))
    for page in (first, second):
        page.evaluate("window.__sameDocument = true")

    restarted = time.monotonic()
    server.restart()
    # The new process counts from zero: seeing 0 proves the tabs are reading it.
    for page in (first, second):
        expect(page.locator(CLICKS)).to_have_text("0", timeout=COMEBACK_TIMEOUT * 1000)
    print(f"tabs back {time.monotonic() - restarted:.1f} s after the restart began")
    for page in (first, second):
        wait_for_change(page, TIME, wait_for_change(page, TIME, str(page.text_content(TIME))))

    second.click(BUTTON)
    for page in (first, second):
        expect(page.locator(CLICKS)).to_have_text("1")
        # Nobody reloaded the page: the client reconnected its stream by itself.
        assert page.evaluate("window.__sameDocument") is True
