"""Resume after reconnect in Chromium, with the real Datastar client (issue 11, item 2).

The app (tests/browser/resume_app.py) runs under one gunicorn worker; its rooms are
registries with a replay log. A tab shows some lines; the server cuts its stream
abruptly (``revoke(reconnect=True)``), and while the tab waits out its retry delay
(2 s, the stream's ``retry:``) the test appends more lines, checking in the server that
the tab's stream really was gone. The client then reconnects by itself with the
``Last-Event-ID`` it saw last:

- the log covers the gap: the tab ends with exactly every line, in order, once, and
  the server says the stream resumed (it got the missed events, not the full state);
- the gap is older than the log (a log of two events, three missed): the stream did
  not resume, the tab got the full state, and still shows every line once.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

from tests.browser.conftest import TIMEOUT, Tabs
from tests.helpers import GunicornServer, post

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = [pytest.mark.browser, pytest.mark.live]

APP = "tests.browser.resume_app:app"


def state(server: GunicornServer, room: str) -> dict[str, Any]:
    """The room's open streams and connections, as the server sees them."""
    with urllib.request.urlopen(f"{server.url}/state?room={room}", timeout=10) as rv:
        result: dict[str, Any] = json.loads(rv.read())
    return result


def wait_for_state(
    server: GunicornServer, room: str, check: Callable[[dict[str, Any]], bool], what: str
) -> dict[str, Any]:
    """Poll the room's state until *check* holds; fail after the deadline."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        current = state(server, room)
        if check(current):
            return current
        if time.monotonic() > deadline:
            pytest.fail(f"Timed out waiting for {what}; the server says {current}.")
        time.sleep(0.05)


def connected(current: dict[str, Any], count: int) -> bool:
    """Whether the room has one stream, and *count* handlers have run (registration comes first)."""
    return current["open"] == 1 and len(current["connections"]) == count


def append(server: GunicornServer, room: str, text: str) -> int:
    """Append a line to the room; return how many streams it had then."""
    status, _, body = post(f"{server.url}/append?room={room}&text={text}")
    assert status == 200, body
    open_streams: int = json.loads(body)["open"]
    return open_streams


def open_tab(tabs: Tabs, server: GunicornServer, room: str, expect: Any) -> Page:
    """Open the room's page and wait until its stream is registered and has the full state."""
    page = tabs.open(f"{server.url}/?room={room}")
    first = wait_for_state(server, room, lambda s: connected(s, 1), "the tab's stream")
    assert first["connections"] == [{"last_event_id": None, "resumed": False, "full_state": True}]
    expect(page.locator("#lines li")).to_have_count(0)
    # Marks this document: still there at the end, so the client reconnected, not a reload.
    page.evaluate("window.__sameDocument = true")
    return page


def cut(server: GunicornServer, room: str) -> None:
    """End the room's streams abruptly and wait until the server has none left."""
    status, _, body = post(f"{server.url}/cut?room={room}")
    assert status == 204, body
    wait_for_state(server, room, lambda s: s["open"] == 0, "the stream to end")


def test_a_tab_cut_off_resumes_with_exactly_the_lines_it_missed(
    tabs: Tabs, serve: Callable[..., GunicornServer], expect: Any
) -> None:
    server = serve(APP, workers=1)
    room = "big"  # ReplayLog(max_events=1000, max_age=300): covers the gap
    page = open_tab(tabs, server, room, expect)
    lines = page.locator("#lines li")

    seen = [f"seen-{n}" for n in range(1, 4)]
    for text in seen:
        assert append(server, room, text) == 1
    expect(lines).to_have_text(seen)

    cut(server, room)
    missed = [f"missed-{n}" for n in range(1, 6)]
    for text in missed:
        # Posted while the tab had no stream: only the log can bring it these.
        assert append(server, room, text) == 0, "the tab reconnected before the gap"

    # The client comes back after its retry delay, with the last id it saw.
    expect(lines).to_have_text(seen + missed)
    back = wait_for_state(server, room, lambda s: connected(s, 2), "the reconnection")
    assert len(back["connections"]) == 2
    resumed = back["connections"][1]
    assert resumed["last_event_id"] is not None, "the client sent no Last-Event-ID"
    assert resumed["resumed"] is True and resumed["full_state"] is False

    # Live again, and nothing was repeated: the next line follows the others once.
    assert append(server, room, "after") == 1
    expect(lines).to_have_text([*seen, *missed, "after"])
    assert page.evaluate("window.__sameDocument") is True
    assert len(state(server, room)["connections"]) == 2


def test_a_gap_older_than_the_log_gets_the_full_state(
    tabs: Tabs, serve: Callable[..., GunicornServer], expect: Any
) -> None:
    server = serve(APP, workers=1)
    room = "small"  # ReplayLog(max_events=2): three missed lines are a gap
    page = open_tab(tabs, server, room, expect)
    lines = page.locator("#lines li")

    seen = ["seen-1", "seen-2"]
    for text in seen:
        assert append(server, room, text) == 1
    expect(lines).to_have_text(seen)

    cut(server, room)
    missed = ["missed-1", "missed-2", "missed-3"]
    for text in missed:
        assert append(server, room, text) == 0, "the tab reconnected before the gap"

    expect(lines).to_have_text(seen + missed)
    back = wait_for_state(server, room, lambda s: connected(s, 2), "the reconnection")
    assert len(back["connections"]) == 2
    full = back["connections"][1]
    assert full["last_event_id"] is not None, "the client sent no Last-Event-ID"
    assert full["resumed"] is False and full["full_state"] is True

    assert append(server, room, "after") == 1
    expect(lines).to_have_text([*seen, *missed, "after"])
    assert page.evaluate("window.__sameDocument") is True
