"""example_app.py with its counter in Redis, under gunicorn, while Redis stalls.

A stalled Redis (paused with SIGSTOP: its port still accepts connections, nothing
answers) must not stall the demo: every tab's clock keeps ticking, every click
answers at once (a 503 while the counter is out of reach), the count a tab shows
never goes back, and clicks count again once Redis is back.
"""

from __future__ import annotations

import re
import signal
import threading
import time

import pytest

from tests.helpers import (
    ConnectionClosed,
    GunicornServer,
    RawHTTPStream,
    RedisServer,
    post,
)

pytestmark = [pytest.mark.live, pytest.mark.redis]

CLICKS = re.compile(r"Button clicks: <strong>(\d+)</strong>")
TIME = re.compile(r"Time: <strong>(\d\d:\d\d:\d\d)</strong>")
#: How long Redis stays paused, by the test's clock.
PAUSE = 6.0
#: Distinct clock values each tab must show while Redis is paused (a tick a second
#: gives about PAUSE; a stalled worker gave 0 to 2 in 20 s).
MIN_TICKS = 3
#: A click that takes this long hangs: far above the example's 0.5 s Redis timeout.
CLICK_TIMEOUT = 10.0


class Tab:
    """A tab's stream of ``/sse``, read by a thread that notes each patch of #content.

    :param port: the server's port.
    """

    def __init__(self, port: int) -> None:
        self.stream = RawHTTPStream(port, "/sse")
        assert self.stream.status == 200
        #: ``(time received, clicks, clock)`` of every content patch, in order.
        self.seen: list[tuple[float, int, str]] = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            # A long timeout: a stalled server must show up in the assertions, not here.
            for event in self.stream.events(timeout=60):
                html = event.elements or ""
                clicks, clock = CLICKS.search(html), TIME.search(html)
                if clicks and clock:
                    self.seen.append((time.monotonic(), int(clicks[1]), clock[1]))
        except (ConnectionClosed, OSError):
            pass  # closed by the test
        except BaseException as e:
            self.error = e

    def wait_for_count(self, count: int, timeout: float = 10.0) -> None:
        """Wait until a patch shows at least ``count`` clicks."""
        deadline = time.monotonic() + timeout
        while not any(clicks >= count for _, clicks, _ in self.seen):
            assert self.error is None, self.error
            assert time.monotonic() < deadline, f"no patch showed {count} clicks: {self.seen}"
            time.sleep(0.05)

    def close(self) -> None:
        self.stream.close()
        self._thread.join(10)


def click(url: str) -> int | str:
    """POST /click; return its status, or ``"hung"`` if it did not answer in time."""
    try:
        status, _, body = post(url + "/click", timeout=CLICK_TIMEOUT)
    except TimeoutError:
        return "hung"
    if status == 503:
        assert b"Redis" in body and b"try again" in body, body
    return status


def test_the_demo_stays_live_while_redis_stalls(redis_server: RedisServer) -> None:
    env = {"FLASK_DATASTAR_REDIS_URL": redis_server.url}
    with GunicornServer(
        "example_app:app", threads=10, env=env, config="gunicorn.conf.py"
    ) as server:
        tabs = [Tab(server.port), Tab(server.port)]
        redis_proc = redis_server.proc
        assert redis_proc is not None
        try:
            assert click(server.url) == 204
            for tab in tabs:
                tab.wait_for_count(1)

            redis_proc.send_signal(signal.SIGSTOP)
            paused_at = time.monotonic()
            during = []
            try:
                while time.monotonic() - paused_at < PAUSE:
                    during.append(click(server.url))
                    time.sleep(0.2)
            finally:
                resumed_at = time.monotonic()
                redis_proc.send_signal(signal.SIGCONT)
            # Every click answered instead of hanging (204 only if it beat the pause).
            assert during and set(during) <= {204, 503}, during
            for tab in tabs:
                clocks = {clock for at, _, clock in tab.seen if paused_at <= at <= resumed_at}
                assert len(clocks) >= MIN_TICKS, (clocks, tab.seen)

            # Redis is back: clicks count again, and reach every tab.
            deadline = time.monotonic() + 20
            while (status := click(server.url)) != 204:
                assert status == 503 and time.monotonic() < deadline, status
                time.sleep(0.2)
            # (A 503 click may still have counted: Redis runs the INCR it had received
            # once it resumes. At least the clicks answered 204 did.)
            expected = 2 + during.count(204)
            for tab in tabs:
                tab.wait_for_count(expected)
        finally:
            redis_proc.send_signal(signal.SIGCONT)
            for tab in tabs:
                tab.close()
        for tab in tabs:
            assert tab.error is None, tab.error
            shown = [clicks for _, clicks, _ in tab.seen]
            assert shown == sorted(shown), f"the count went back: {shown}"
