"""A full worker in a real browser: the refused tab gets in by itself once a slot frees.

The server holds one stream (``DATASTAR_MAX_STREAMS=1``). The second tab's stream
is turned away with a ``retry:`` and a cut connection, which the Datastar client
treats as a network error: it retries, on its own, after the delay the server
gave. When the first tab goes away, the second one's next retry gets the slot,
and its clock starts ticking, with no reload.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.browser.conftest import Tabs, wait_for_change
from tests.helpers import GunicornServer

pytestmark = [pytest.mark.browser, pytest.mark.live]

TIME = "#content p:nth-of-type(1) strong"


def test_a_refused_tab_gets_in_when_a_slot_frees(
    tabs: Tabs, serve: Callable[..., GunicornServer]
) -> None:
    server = serve(
        "example_app:app",
        env={"FLASK_DATASTAR_MAX_STREAMS": "1", "FLASK_DATASTAR_CLIENT_SHARE": "1"},
    )
    first = tabs.open(server.url + "/")
    wait_for_change(first, TIME, str(first.text_content(TIME)))  # the first tab streams

    second = tabs.open(server.url + "/")
    frozen = str(second.text_content(TIME))
    # Refused: its clock stays as the page rendered it while the first tab holds the slot
    # (the clock ticks every second; give it three).
    second.wait_for_timeout(3000)
    assert second.text_content(TIME) == frozen

    first.close()  # the slot frees; the second tab's next retry (1 to 4 s) gets it
    ticked = wait_for_change(second, TIME, frozen, timeout=15)
    assert ticked != frozen
    wait_for_change(second, TIME, ticked)  # and it keeps ticking: a live stream
