"""examples/redis_cqrs.py: two gunicorn workers, state and broadcasts through Redis.

The tick is turned off (an hour), so a tab can only learn of a click handled by
another worker through the Redis bus.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.browser.conftest import Tabs, example_server, screenshot_side_by_side
from tests.helpers import RedisServer

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = [pytest.mark.browser, pytest.mark.live, pytest.mark.redis]

# Which worker accepts a connection is the kernel's choice: open tabs until both
# workers hold at least one stream.
MAX_TABS = 12


def test_a_click_on_any_worker_reaches_the_tabs_of_every_worker(
    tabs: Tabs,
    redis_server: RedisServer,
    datastar_js_file: Path,
    expect: Any,
    screenshot_dir: Path,
) -> None:
    env = {"FLASK_DATASTAR_REDIS_URL": redis_server.url, "FLASK_TICK_SECONDS": "3600"}
    with example_server("examples.redis_cqrs:app", datastar_js_file, workers=2, env=env) as server:
        workers = {str(pid) for pid in server.worker_pids()}
        assert len(workers) == 2
        holders: dict[str, int] = {}
        pages: list[Page] = []
        while len(holders) < 2 and len(pages) < MAX_TABS:
            # Each tab has a context of its own: its own connections to the server.
            page = tabs.open(server.url + "/")
            expect(page.locator("#worker")).not_to_have_text("?")
            worker = str(page.text_content("#worker"))
            assert worker in workers
            holders[worker] = holders.get(worker, 0) + 1
            pages.append(page)
        assert len(holders) == 2, f"every stream went to one worker: {holders}"

        for clicks, page in enumerate([pages[0], pages[-1], pages[0]], 1):
            page.click("#click")
            for each in pages:
                expect(each.locator("#clicks")).to_have_text(str(clicks))
            clicked_by = str(pages[0].text_content("#clicked-by"))
            assert clicked_by in workers
            for each in pages:
                # Every tab shows the patch rendered by the worker that took the click,
                # also the tabs whose stream another worker holds.
                expect(each.locator("#rendered-by")).to_have_text(clicked_by)

        # One tab on each worker.
        shown = {str(page.text_content("#worker")): page for page in pages}
        screenshot_side_by_side(
            list(shown.values()), screenshot_dir / "redis-workers.png", height=300
        )
