"""examples/unicast.py: a keyed registry reaches one tab; broadcasts reach all."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.browser.conftest import Tabs, screenshot_side_by_side
from tests.helpers import GunicornServer

pytestmark = [pytest.mark.browser, pytest.mark.live]

PONG = re.compile(r"pong at \d\d:\d\d:\d\d")


def test_messages_reach_only_the_tab_they_are_sent_to(
    tabs: Tabs, serve: Callable[..., GunicornServer], expect: Any, screenshot_dir: Path
) -> None:
    server = serve("examples.unicast:app")
    first, second = tabs.open(server.url + "/"), tabs.open(server.url + "/")
    first_id, second_id = str(first.text_content("#me")), str(second.text_content("#me"))
    assert first_id != second_id
    # The list of open tabs is broadcast to all of them whenever a stream opens or ends.
    for page in (first, second):
        expect(page.locator("#tabs button.tab")).to_have_text(sorted([first_id, second_id]))

    first.click("#ping")
    expect(first.locator("#inbox li")).to_have_text([PONG])
    second.click("#ping")
    expect(second.locator("#inbox li")).to_have_text([PONG])
    # Unicasts leave the registry in order: had the first pong reached the second tab,
    # it would be there before the second tab's own.
    expect(first.locator("#inbox li")).to_have_count(1)

    # Address the second tab from the first by clicking its id in the list.
    first.click(f"#tabs button[data-tab='{second_id}']")
    expect(first.locator("#to")).to_have_value(second_id)
    expect(first.locator(f"#tabs button[data-tab='{first_id}']")).to_be_disabled()
    first.fill("#message", "Hello, <b>second</b> tab")
    first.click("#send")
    expect(first.locator("#status")).to_have_text(f"Sent to {second_id}.")
    expect(first.locator("#message")).to_have_value("")
    expect(second.locator("#inbox li")).to_have_text(
        [PONG, f"from {first_id}: Hello, <b>second</b> tab"]
    )
    expect(second.locator("#inbox b")).to_have_count(0)
    expect(first.locator("#inbox li")).to_have_count(1)
    screenshot_side_by_side([first, second], screenshot_dir / "unicast.png", height=380)

    first.fill("#to", "nobody")
    first.click("#send")
    expect(first.locator("#status")).to_have_text("No open tab is called 'nobody'.")

    second.close()
    expect(first.locator("#tabs button.tab")).to_have_text([first_id])
