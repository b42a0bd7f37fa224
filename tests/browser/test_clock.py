"""examples/clock.py: a stream per tab that patches the time every second."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from tests.browser.conftest import Tabs, wait_for_change
from tests.helpers import GunicornServer

pytestmark = [pytest.mark.browser, pytest.mark.live]

TIME = re.compile(r"\d\d:\d\d:\d\d")


def test_the_clock_ticks_and_each_tab_has_its_own_stream(
    tabs: Tabs, serve: Callable[..., GunicornServer]
) -> None:
    server = serve("examples.clock:app")
    first = tabs.open(server.url + "/")
    shown = wait_for_change(first, "#clock", "--:--:--")
    assert TIME.fullmatch(shown)
    later = wait_for_change(first, "#clock", shown)
    assert TIME.fullmatch(later)
    first_ticks = int(wait_for_change(first, "#ticks", "1"))
    assert first_ticks >= 2

    # A new tab opens a stream of its own, which counts from the start.
    second = tabs.open(server.url + "/")
    assert wait_for_change(second, "#ticks", "0") == "1"
    assert int(str(first.text_content("#ticks"))) > 1
