"""examples/ticker.py: one render per second, broadcast to every tab by a periodic job."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from tests.browser.conftest import Tabs, wait_for_change
from tests.helpers import GunicornServer

pytestmark = [pytest.mark.browser, pytest.mark.live]

TIME = re.compile(r"\d\d:\d\d:\d\d")


def test_every_tab_shows_the_same_tick(tabs: Tabs, serve: Callable[..., GunicornServer]) -> None:
    server = serve("examples.ticker:app")
    first = tabs.open(server.url + "/")
    second = tabs.open(server.url + "/")
    shown = [wait_for_change(page, "#time", "") for page in (first, second)]
    assert all(TIME.fullmatch(value) for value in shown)
    # Both tabs are counted, and each tick reaches both: one broadcast, the same HTML.
    for page in (first, second):
        page.wait_for_function("document.querySelector('#tabs')?.textContent === '2'")
    later = wait_for_change(first, "#time", str(first.text_content("#time")))
    second.wait_for_function("(t) => document.querySelector('#time').textContent >= t", arg=later)
    assert TIME.fullmatch(later)
