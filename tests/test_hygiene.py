"""Stream hygiene under a real gunicorn: a maximum lifetime, and a random retry per stream.

``DATASTAR_MAX_LIFETIME`` ends a stream after 80 to 100 % of it, abruptly, so that its
client reconnects (to whichever worker takes it: tabs spread again after a scale-out).
``DATASTAR_RETRY`` makes each stream tell its client a random reconnection delay first,
so the tabs of a worker that dies do not all come back in the same millisecond.
"""

from __future__ import annotations

import time

import pytest

from tests.helpers import ConnectionClosed, GunicornServer, RawHTTPStream

APP = "tests.live_apps.engine_app:app"
HEADERS = {"Datastar-Request": "true"}

pytestmark = pytest.mark.live


def test_streams_end_within_their_jittered_lifetime_so_that_clients_reconnect() -> None:
    env = {"FLASK_DATASTAR_MAX_LIFETIME": "2", "FLASK_DATASTAR_CLIENT_SHARE": "1"}
    with GunicornServer(APP, config="gunicorn.conf.py", threads=4, env=env) as server:
        streams = [
            RawHTTPStream(server.port, "/tick?interval=0.2", headers=HEADERS) for _ in range(6)
        ]
        opened = time.monotonic()
        lived = []
        try:
            for stream in streams:
                with pytest.raises(ConnectionClosed):  # abrupt: the client reconnects
                    for _ in stream.events(timeout=5):
                        pass
                lived.append(time.monotonic() - opened)
        finally:
            for stream in streams:
                stream.close()
        # Between 80 % and 100 % of 2 s (and the time to notice), not all at once.
        assert all(1.5 <= seconds <= 3.5 for seconds in lived), lived


def test_each_stream_tells_its_client_a_random_retry_delay_first() -> None:
    env = {"FLASK_DATASTAR_RETRY": "1000,5000", "FLASK_DATASTAR_CLIENT_SHARE": "1"}
    with GunicornServer(APP, config="gunicorn.conf.py", threads=4, env=env) as server:
        delays = []
        for _ in range(8):
            with RawHTTPStream(server.port, "/tick?count=1", headers=HEADERS) as stream:
                events = list(stream.events(timeout=5))
                assert events and events[0].signals["n"] == 1  # then the handler's events
                assert stream.parser.retry is not None
                delays.append(stream.parser.retry)
        assert all(1000 <= d <= 5000 for d in delays), delays
        assert len(set(delays)) > 1
