"""A hostile string through every helper renders as text and runs nothing.

The app is :mod:`tests.browser.hostile_app`. Execution is detected three ways:
``window.__pwned`` (set by every script payload), JavaScript dialogs (``alert``) and
requests to ``/pwned`` (a Datastar expression payload). The control test sends the
string unescaped and must trip the detectors, so a silent detector cannot pass the
real test.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qsl

import pytest

from flask_datastar import js_literal
from tests.browser.conftest import Tabs
from tests.browser.hostile_app import HOSTILE, HOSTILE_URL_PART
from tests.helpers import GunicornServer, post

pytestmark = [pytest.mark.browser, pytest.mark.live]

APP = "tests.browser.hostile_app:app"


@pytest.fixture(scope="module")
def server(serve: Callable[..., GunicornServer]) -> Iterator[GunicornServer]:
    yield serve(APP)


def pwned_requests(server: GunicornServer) -> int:
    status, _, body = post(server.url + "/pwned", method="GET")
    assert status == 200
    return int(body)


def test_hostile_strings_render_as_text_and_run_nothing(
    tabs: Tabs, server: GunicornServer, expect: Any
) -> None:
    page = tabs.open(server.url + "/")

    page.click("#text")  # patch_elements of escaped text
    page.wait_for_function("document.getElementById('out').textContent !== ''")
    assert page.text_content("#out") == HOSTILE

    page.click("#signal")  # patch_signals, shown by data-text and data-bind
    page.wait_for_function("document.getElementById('signal-out').textContent !== ''")
    assert page.text_content("#signal-out") == HOSTILE
    # An <input> drops line breaks from its value by definition.
    assert page.input_value("#signal-in") == HOSTILE.replace("\n", "")

    with page.expect_console_message(lambda message: message.type == "log") as logged:
        page.click("#console")  # console_log
    assert logged.value.text == HOSTILE

    assert page.evaluate("window.__pwned") is None
    assert tabs.dialogs == []
    assert page.locator("#out *, #signal-out *").count() == 0

    with page.expect_navigation():
        page.click("#redirect")  # redirect to a URL holding the string
    assert page.text_content("#landed") == HOSTILE_URL_PART
    assert page.evaluate("window.__pwned") is None
    assert tabs.dialogs == []
    assert pwned_requests(server) == 0


# The Datastar client (1.0.x) compiles each data-* expression by rewriting every
# "@name(" into "__action("name",evt," with a regular expression that does not skip
# string literals, so an "@" in a URL or an option changes the request. A string
# literal that spells "@" as "\x40" is safe from it: js_literal() does.
def test_hostile_strings_in_action_urls_and_options_arrive_unchanged(
    tabs: Tabs, server: GunicornServer, expect: Any
) -> None:
    assert "@" not in js_literal("@post(")
    page = tabs.open(server.url + "/")
    page.click("#url")  # sse_post with the string in its URL
    echoed = page.locator("#echo")
    expect(echoed).not_to_have_text("")
    expected = [list(pair) for pair in parse_qsl(HOSTILE_URL_PART, keep_blank_values=True)]
    assert json.loads(str(echoed.text_content())) == expected

    page.evaluate("document.getElementById('echo').textContent = ''")
    page.click("#payload")  # sse_post with the string in an option (keys and values)
    expect(page.locator("#payload-ok")).to_have_text("True")
    assert page.text_content("#echo") == HOSTILE

    assert page.evaluate("window.__pwned") is None
    assert tabs.dialogs == []
    assert page.locator("#echo *").count() == 0
    assert pwned_requests(server) == 0


def test_control_the_detectors_catch_the_string_sent_unescaped(
    tabs: Tabs, server: GunicornServer
) -> None:
    page = tabs.open(server.url + "/")
    page.click("#raw")
    page.wait_for_function("window.__pwned !== undefined")
    assert tabs.dialogs != []
