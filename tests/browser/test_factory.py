"""examples/factory: an app factory whose blueprints share a registry through a handle."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.browser.conftest import Tabs, screenshot_side_by_side
from tests.helpers import GunicornServer

pytestmark = [pytest.mark.browser, pytest.mark.live]


def counts(expect: Any, page: Any, flask: str, django: str, fastapi: str, total: str) -> None:
    """Wait until *page* shows these results."""
    expect(page.locator("#results li .count")).to_have_text([flask, django, fastapi])
    expect(page.locator("#total")).to_have_text(total)


def test_a_command_of_either_blueprint_updates_every_tab(
    tabs: Tabs, serve: Callable[..., GunicornServer], expect: Any, screenshot_dir: Path
) -> None:
    # The factory's app, as servers that want a module-level app get it.
    server = serve("examples.factory.wsgi:app")
    first, second = tabs.open(server.url + "/"), tabs.open(server.url + "/")
    for page in (first, second):
        counts(expect, page, "0", "0", "0", "0 votes")

    # A vote in one tab (the "poll" blueprint) reaches both through the handle.
    first.click("button.vote[data-option='Flask']")
    for page in (first, second):
        counts(expect, page, "1", "0", "0", "1 vote")
    second.click("button.vote[data-option='Django']")
    second.click("button.vote[data-option='Flask']")
    for page in (first, second):
        counts(expect, page, "2", "1", "0", "3 votes")
    screenshot_side_by_side([first, second], screenshot_dir / "factory.png", height=330)

    # A command of the other blueprint ("admin") reaches the same tabs.
    second.click("#reset")
    for page in (first, second):
        counts(expect, page, "0", "0", "0", "0 votes")

    # A tab that comes later gets the current state from its stream.
    first.click("button.vote[data-option='FastAPI']")
    third = tabs.open(server.url + "/")
    for page in (first, second, third):
        counts(expect, page, "0", "0", "1", "1 vote")
