"""examples/scripts.py: remove_elements, execute_script, console_log and redirect."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.browser.conftest import Tabs
from tests.helpers import GunicornServer

pytestmark = [pytest.mark.browser, pytest.mark.live]


def test_browser_commands_do_what_they_say(
    tabs: Tabs, serve: Callable[..., GunicornServer], expect: Any
) -> None:
    server = serve("examples.scripts:app")
    page = tabs.open(server.url + "/")

    page.click("#dismiss-2")
    expect(page.locator("#notes li")).to_have_count(2)
    expect(page.locator("#note-2")).to_have_count(0)
    expect(page.locator("#note-1")).to_be_visible()
    expect(page.locator("#note-3")).to_be_visible()

    # The text is user input: js_string() keeps it a string, whatever it holds.
    secret = "'); window.__pwned = 1; ('\" </script><script>window.__pwned = 2</script>"
    page.fill("#secret", secret)
    page.click("#reveal")
    expect(page.locator("#revealed")).to_have_text(secret)
    assert page.evaluate("window.__pwned") is None
    # The script element removed itself after running.
    expect(page.locator("body script")).to_have_count(0)

    with page.expect_console_message(lambda message: message.type == "log") as logged:
        page.click("#log")
    assert logged.value.text == "Hello from the server!"

    with page.expect_navigation():
        page.click("#leave")
    assert page.url == server.url + "/elsewhere?from=scripts"
    expect(page.locator("#elsewhere")).to_have_text("You were redirected here (from=scripts).")
    assert tabs.dialogs == []
