"""examples/fat_vs_fine.py: both update styles reach every tab; fine-grained sends less."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.browser.conftest import Tabs, screenshot_side_by_side
from tests.helpers import GunicornServer

pytestmark = [pytest.mark.browser, pytest.mark.live]

UPDATE = re.compile(r"Last update: a (fat morph|fine-grained patch) .*, (\d+) bytes\.")


def last_update(text: str) -> tuple[str, int]:
    match = UPDATE.fullmatch(text)
    assert match is not None, text
    return match.group(1), int(match.group(2))


def test_fat_morph_and_fine_grained_patches_reach_every_tab(
    tabs: Tabs, serve: Callable[..., GunicornServer], expect: Any, screenshot_dir: Path
) -> None:
    server = serve("examples.fat_vs_fine:app")
    first, second = tabs.open(server.url + "/"), tabs.open(server.url + "/")
    pages = (first, second)
    for page in pages:
        expect(page.locator("#votes-1")).to_have_text("0")
        # A mark on an element that the fat morph re-renders but does not change.
        page.evaluate("document.getElementById('item-3').__mark = true")

    first.click("#vote-1")
    for page in pages:
        expect(page.locator("#votes-1")).to_have_text("1")
        expect(page.locator("#total")).to_have_text("1")
        expect(page.locator("#last-update")).to_contain_text("fat morph of #board")
        # Morphing updates the page in place: untouched elements are the same objects.
        assert page.evaluate("document.getElementById('item-3').__mark") is True
    style, fat_bytes = last_update(str(first.text_content("#last-update")))
    assert style == "fat morph"

    second.check("input[value=fine]")
    second.click("#vote-2")
    second.click("#vote-2")
    for page in pages:
        expect(page.locator("#votes-2")).to_have_text("2")
        expect(page.locator("#total")).to_have_text("3")
        expect(page.locator("#last-update")).to_contain_text("fine-grained patch of #votes-2")
    style, fine_bytes = last_update(str(first.text_content("#last-update")))
    assert style == "fine-grained patch"
    assert fine_bytes * 5 < fat_bytes
    # The mode is per tab: the first one still sends fat morphs.
    expect(first.locator("input[value=fat]")).to_be_checked()
    screenshot_side_by_side([first, second], screenshot_dir / "fat-vs-fine.png", height=410)
