"""examples/signals.py: bound inputs reach read_signals(), patch_signals updates the page."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.browser.conftest import Tabs, screenshot, wait_for_change
from tests.helpers import GunicornServer

pytestmark = [pytest.mark.browser, pytest.mark.live]


def test_signals_round_trip(
    tabs: Tabs, serve: Callable[..., GunicornServer], expect: Any, screenshot_dir: Path
) -> None:
    server = serve("examples.signals:app")
    page = tabs.open(server.url + "/")
    page.fill("#name", "Ada Lovelace")
    # Computed in the page from the bound signal, without a request.
    expect(page.locator("#length")).to_have_text("12 characters")

    page.click("#greet")
    expect(page.locator("#greeting")).to_have_text("Hello, Ada Lovelace!")
    received = json.loads(wait_for_change(page, "#received", "nothing yet"))
    # What read_signals() returned: the bound values, and no underscore signal.
    assert received == {"greeting": "", "name": "Ada Lovelace", "shout": False}

    page.check("#shout")
    before = str(page.text_content("#received"))
    page.click("#greet")
    expect(page.locator("#greeting")).to_have_text("HELLO, ADA LOVELACE!")
    assert json.loads(wait_for_change(page, "#received", before))["shout"] is True
    screenshot(page, screenshot_dir / "signals.png", height=360)

    # A patch_signals from the server flows back into the bound inputs.
    page.click("#reset")
    expect(page.locator("#name")).to_have_value("")
    expect(page.locator("#shout")).not_to_be_checked()
    expect(page.locator("#greeting")).to_have_text("")
    expect(page.locator("#length")).to_have_text("0 characters")
