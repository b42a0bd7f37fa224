"""The CSRF check in Chromium: the app's own page works, another site's page changes nothing.

The app (tests/browser/csrf_app.py) runs under gunicorn on ``127.0.0.1``; the
attacker's page is served by a second gunicorn and opened as ``localhost``, a
different site, so Chromium applies its cross-site rules (CORS, ``Origin``,
``Sec-Fetch-Site: cross-site``) to what that page sends.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from tests.browser.conftest import TIMEOUT, Tabs
from tests.helpers import GunicornServer

pytestmark = [pytest.mark.browser, pytest.mark.live]

APP = "tests.browser.csrf_app:app"


def state(server: GunicornServer) -> dict[str, int]:
    with urllib.request.urlopen(server.url + "/state", timeout=10) as rv:
        result: dict[str, int] = json.loads(rv.read())
    return result


def wait_for_state(
    server: GunicornServer, check: Callable[[dict[str, int]], bool]
) -> dict[str, int]:
    """Poll the app's state until *check* holds; fail after the deadline."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        current = state(server)
        if check(current):
            return current
        assert time.monotonic() < deadline, f"the app's state stayed {current}"
        time.sleep(0.05)


def test_the_own_page_posts_json_and_forms_and_another_site_changes_nothing(
    tabs: Tabs, serve: Callable[..., GunicornServer], expect: Any
) -> None:
    server = serve(APP)
    page = tabs.open(server.url + "/")

    # The app's own page: a JSON @post and a contentType: 'form' post both pass.
    page.click("#json")
    expect(page.locator("#count")).to_have_text("1")
    page.click("#submit")
    expect(page.locator("#count")).to_have_text("3")
    assert state(server) == {"count": 3, "refused": 0}

    with GunicornServer(
        "tests.browser.csrf_app:attacker", env={"FLASK_TARGET": server.url}
    ) as attacker:
        evil = tabs.new_context().new_page()
        evil.goto(f"http://localhost:{attacker.port}/")
        evil.evaluate("attack()")
        # Three forms (text/plain, urlencoded, multipart) and two no-cors fetches
        # (text/plain, urlencoded) reach the app, which refuses each one.
        after = wait_for_state(server, lambda s: s["refused"] >= 5)
        evil.wait_for_function("Object.keys(window.results).length === 4")
        results = evil.evaluate("window.results")

    assert results["text-plain"] == "sent:opaque"
    assert results["form-fetch"] == "sent:opaque"
    # A JSON body or the Datastar-Request header needs a preflight, which the app
    # does not answer with CORS headers: Chromium never sends the POST.
    assert results["json"].startswith("blocked:")
    assert results["header"].startswith("blocked:")
    assert after == {"count": 3, "refused": 5}
    page.reload()
    expect(page.locator("#count")).to_have_text("3")
    assert state(server) == {"count": 3, "refused": 5}
