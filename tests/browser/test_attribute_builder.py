"""The ``data`` attribute builder and the non-request actions, in a real browser.

The page is :mod:`tests.browser.attributes_app`, written with the Jinja global ``data``
(datastar-py's builder) and :func:`~flask_datastar.set_all`, ``toggle_all`` and
``peek``. The control page writes the same signals with datastar-py's own builder and
must fail, so the test of the fix cannot pass by accident.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.browser.attributes_app import AT_TEXT
from tests.browser.conftest import Tabs
from tests.helpers import GunicornServer

pytestmark = [pytest.mark.browser, pytest.mark.live]


@pytest.fixture(scope="module")
def server(serve: Callable[..., GunicornServer]) -> Iterator[GunicornServer]:
    yield serve("tests.browser.attributes_app:app")


def test_the_attribute_builder_and_actions_work_in_the_client(
    tabs: Tabs, server: GunicornServer, expect: Any
) -> None:
    page = tabs.open(server.url + "/")
    # data.signals: a string holding "@name(" arrives as text.
    expect(page.locator("#msg")).to_have_text(AT_TEXT)
    expect(page.locator("#counts")).to_have_text("3,4,5")
    expect(page.locator("#peeked")).to_have_text(":3")

    page.click("#reset")  # @setAll(0, {include: /^todo\./})
    expect(page.locator("#counts")).to_have_text("0,0,5")
    # @peek: the text does not follow $todo.a ...
    assert page.text_content("#peeked") == ":3"

    page.click("#toggle")  # @toggleAll({include: /^open\./})
    expect(page.locator("#flags")).to_have_text("false,true,true")

    page.click("#bump")
    expect(page.locator("#counts")).to_have_text("1,0,5")
    assert page.text_content("#peeked") == ":3"

    # ... but reads its current value when $typed (data.bind) makes it run again.
    page.fill("#typed", "hi")
    expect(page.locator("#typed-out")).to_have_text("hi")
    expect(page.locator("#peeked")).to_have_text("hi:1")
    expect(page.locator("#ticks")).to_be_visible()  # data.on_interval(...).duration(...)


def test_control_datastar_pys_own_builder_loses_the_signals(
    tabs: Tabs, server: GunicornServer
) -> None:
    # Opened by hand: the failing expression stops the client before it is ready.
    page = tabs.new_context().new_page()
    with page.expect_event("pageerror") as error:
        page.goto(server.url + "/raw")
    # The client rewrote "@get(" inside the string into an action call.
    assert "GenerateExpression" in str(error.value)
    assert '__action(\\"get\\"' in str(error.value)
    assert page.text_content("#msg") == ""
