"""examples/chat.py: one command, one fat morph of the messages to every tab."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.browser.conftest import Tabs, screenshot_side_by_side
from tests.helpers import GunicornServer

pytestmark = [pytest.mark.browser, pytest.mark.live]


def test_a_message_reaches_every_tab_as_text(
    tabs: Tabs, serve: Callable[..., GunicornServer], expect: Any, screenshot_dir: Path
) -> None:
    server = serve("examples.chat:app")
    first, second = tabs.open(server.url + "/"), tabs.open(server.url + "/")
    for page in (first, second):
        expect(page.locator("#messages li")).to_have_text(["No messages yet."])

    markup = "Hello, <b>world</b> & <img src=x onerror=alert(1)>"
    first.fill("#author", "Ada")
    first.fill("#text", markup)
    first.press("#text", "Enter")
    for page in (first, second):
        expect(page.locator("#messages li b")).to_have_text(["Ada"])
        expect(page.locator("#messages .text")).to_have_text([markup])
        expect(page.locator("#messages img")).to_have_count(0)
    # The sender's input was emptied by a signal patch; the name stays.
    expect(first.locator("#text")).to_have_value("")
    expect(first.locator("#author")).to_have_value("Ada")

    second.fill("#author", "Grace")
    second.fill("#text", "Hi Ada")
    second.click("#send")
    for page in (first, second):
        expect(page.locator("#messages li b")).to_have_text(["Ada", "Grace"])
        expect(page.locator("#messages .text")).to_have_text([markup, "Hi Ada"])
    screenshot_side_by_side([first, second], screenshot_dir / "chat.png", height=300)

    # An invalid message is answered to its sender only.
    second.click("#send")
    expect(second.locator("#error")).to_have_text("Write between 1 and 500 characters.")
    expect(first.locator("#error")).to_have_text("")

    # A tab that arrives later gets the whole conversation from its stream.
    third = tabs.open(server.url + "/")
    expect(third.locator("#messages .text")).to_have_text([markup, "Hi Ada"])
    assert tabs.dialogs == []


def test_half_an_emoji_is_refused_and_the_chat_goes_on(
    tabs: Tabs, serve: Callable[..., GunicornServer], expect: Any
) -> None:
    # A browser string can hold half of a UTF-16 pair (here an emoji cut in two by
    # slice()), and JSON.stringify sends it as the escape "\ud83d". Before the fix the
    # chat stored it: every later message failed with a 500, and every tab that
    # connected got no messages at all.
    server = serve("examples.chat:app")
    first, second = tabs.open(server.url + "/"), tabs.open(server.url + "/")
    first.fill("#author", "Eve")
    first.evaluate(
        """() => {
            const input = document.querySelector('#text')
            input.value = 'cut ' + '\\u{1F600}'.slice(0, 1)
            input.dispatchEvent(new Event('input', {bubbles: true}))
        }"""
    )
    with first.expect_response(lambda response: response.url.endswith("/say")) as refused:
        first.press("#text", "Enter")
    # (Its message is checked in tests/test_signals.py: the browser keeps no body of it.)
    assert refused.value.status == 400

    second.fill("#author", "Ada")
    second.fill("#text", "Still here 😀")
    second.press("#text", "Enter")
    for page in (first, second):
        expect(page.locator("#messages .text")).to_have_text(["Still here 😀"])
    third = tabs.open(server.url + "/")
    expect(third.locator("#messages .text")).to_have_text(["Still here 😀"])
