"""The thread-free engine at its edges, under a real gunicorn: bugs found by attacking it.

Each test here failed on the engine as first written (see the commit that fixed
it). One worker with one thread, so a later request runs on the very thread that
opened a stream and ran its handler's first steps.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest

from flask_datastar.scheduler import Job, scheduler
from flask_datastar.stream import Sleep, Stream
from tests.helpers import (
    ConnectionClosed,
    GunicornServer,
    RawHTTPStream,
    get_json,
    post,
    wait_for,
)

APP = "tests.live_apps.engine_attack_app:app"
HEADERS = {"Datastar-Request": "true"}


@pytest.fixture(scope="module")
def server() -> Iterator[GunicornServer]:
    with GunicornServer(
        APP,
        threads=1,
        env={
            "FLASK_DATASTAR_HEARTBEAT": "20",
            "FLASK_DATASTAR_MAX_BACKLOG": "65536",
            "FLASK_DATASTAR_SEND_TIMEOUT": "2",
        },
    ) as server:
        yield server


def open_idle(server: GunicornServer, rcvbuf: int | None = None) -> RawHTTPStream:
    stream = RawHTTPStream(server.port, "/idle", headers=HEADERS, rcvbuf=rcvbuf)
    assert stream.status == 200
    for event in stream.events(timeout=5):
        if event.event == "datastar-patch-signals":
            assert event.signals == {"idle": True}
            break
    return stream


def stats(server: GunicornServer) -> Any:
    return get_json(server, "/stats")


def test_wait_closed_from_a_later_request_on_the_thread_that_opened_the_stream(
    server: GunicornServer,
) -> None:
    # The stream gave its thread back; the same thread now serves a command that
    # ends the stream and waits for it: that is not "the stream's own thread".
    with open_idle(server):
        status, _, body = post(server.url + "/close-and-wait")
        assert status == 200, body
        assert body == b"[true]\n"
    assert wait_for(lambda: stats(server)["open"] == 0)


def test_a_later_request_on_the_same_thread_is_bounded_like_any_other_sender(
    server: GunicornServer,
) -> None:
    # Events sent to a client that stopped reading, from a request that happens to
    # run on the thread that opened its stream, are bounded by max_backlog: the
    # stream is ended, rather than buffering them all (13 MB here).
    with open_idle(server, rcvbuf=4096):
        status, _, body = post(server.url + "/poke?size=65536&n=200", timeout=20)
        assert status == 200, body
        assert body == b'{"refused":1}\n'
        assert wait_for(lambda: any("not reading" in r for r in stats(server)["ended"]))


def test_a_handler_that_sends_before_its_first_pause_waits_for_a_slow_client(
    server: GunicornServer,
) -> None:
    # 400 events of 64 KiB (26 MB) before the first pause, to a client that reads
    # nothing: the handler waits at max_backlog, and the stream ends after
    # send_timeout, instead of buffering every event.
    before = len(stats(server)["ended"])
    with RawHTTPStream(server.port, "/burst?n=400&size=65536", headers=HEADERS, rcvbuf=4096):
        # Ended by send_timeout (the wait, or TCP_USER_TIMEOUT: whichever comes first).
        assert wait_for(lambda: len(stats(server)["ended"]) > before)
        assert stats(server)["progress"]["burst"] < 400


def test_a_handler_closed_before_its_first_pause_runs_its_finally_in_the_request(
    server: GunicornServer,
) -> None:
    with RawHTTPStream(server.port, "/doomed?x=kept", headers=HEADERS) as stream:
        assert [e.signals for e in stream.events(timeout=5)] == [{"doomed": True}]
    assert wait_for(lambda: "kept" in stats(server)["finals"])


def test_a_refusal_over_http_1_0_is_cut_so_that_the_client_retries() -> None:
    # HTTP/1.0 has no chunks (nor has an HTTP/1.0 proxy, nginx's default upstream):
    # a body cut after the retry line would end as cleanly as any other, and the
    # Datastar client does not reopen a stream that ended cleanly.
    env = {"FLASK_DATASTAR_MAX_STREAMS": "1", "FLASK_DATASTAR_CLIENT_SHARE": "1"}
    with GunicornServer(APP, threads=2, env=env) as server, open_idle(server):
        stream = RawHTTPStream(server.port, "/idle", headers=HEADERS, http_version="HTTP/1.0")
        with stream:
            assert stream.status == 200
            with pytest.raises(ConnectionClosed):
                stream.read_body(timeout=5)


def test_on_the_portable_path_steps_wait_for_a_slow_client() -> None:
    # HTTP/1.0: the queue path, where the server's thread writes what the steps queue.
    # The steps run on the scheduler; their events must wait for that thread to take
    # the queue, not pile up in it (26 MB here) for a client that reads nothing.
    env = {"FLASK_DATASTAR_MAX_BACKLOG": "65536", "FLASK_DATASTAR_SEND_TIMEOUT": "2"}
    with GunicornServer(APP, threads=4, env=env) as server:
        with RawHTTPStream(
            server.port,
            "/burst?n=400&size=65536&pause=1",
            headers=HEADERS,
            http_version="HTTP/1.0",
            rcvbuf=4096,
        ):
            assert wait_for(lambda: stats(server)["ended"])
            assert stats(server)["progress"]["burst"] < 400
        # A client that reads gets every event: the handler goes on as the queue empties.
        with RawHTTPStream(
            server.port, "/burst?n=60&size=65536&pause=1", headers=HEADERS, http_version="HTTP/1.0"
        ) as stream:
            events = (e for e in stream.events(timeout=5) if e.event)
            assert len(list(itertools.islice(events, 60))) == 60


def test_a_sleep_of_nan_seconds_does_not_stop_every_other_stream(
    server: GunicornServer,
) -> None:
    # float("nan") from a query string is a float like any other; as a due time it
    # sat at the top of the scheduler's heap, never due, and no timer fired again.
    with RawHTTPStream(server.port, "/steady", headers=HEADERS) as steady:
        ticks = (e.signals["n"] for e in steady.events(timeout=5) if e.event)
        next(ticks)
        with RawHTTPStream(server.port, "/nap?seconds=nan", headers=HEADERS) as nap:
            assert nap.status == 200
            # The steady stream keeps ticking.
            for _ in range(5):
                next(ticks)


def test_nan_is_refused_where_a_pause_or_a_due_time_is_made() -> None:
    nan = float("nan")
    with pytest.raises(ValueError, match="a pause is 0 or more"):
        Stream({}).sleep(nan)
    with pytest.raises(ValueError, match="a pause is 0 or more"):
        Sleep(nan)
    with pytest.raises(ValueError, match="NaN"):
        scheduler().schedule(Job(lambda: None, "nan"), nan)


def test_a_pause_given_as_a_decimal_goes_on_ticking(server: GunicornServer) -> None:
    # time.sleep() takes any real number. In a scheduled step, the due time failed
    # (float + Decimal) outside the handler: the stream was left open, silent, for good.
    with RawHTTPStream(server.port, "/decimal", headers=HEADERS) as stream:
        ticks = (e.signals["n"] for e in stream.events(timeout=5) if e.event)
        assert list(itertools.islice(ticks, 3)) == [1, 2, 3]


def test_streams_that_keep_their_thread_after_all_leave_threads_for_commands() -> None:
    # A middleware that wraps start_response hides gunicorn's response: no stream can
    # give its thread back, though admission expected it. With 4 threads (2 for
    # streams that keep one), 4 such streams must not take every thread.
    with GunicornServer(
        "tests.live_apps.engine_attack_app:wrapped", config="gunicorn.conf.py", threads=4
    ) as server:
        streams = [RawHTTPStream(server.port, "/idle", headers=HEADERS) for _ in range(4)]
        try:
            status, _, _ = post(server.url + "/poke?size=10", timeout=5)
            assert status == 200
            # Two keep a thread; the others were turned away so that they retry.
            assert wait_for(lambda: stats(server)["open"] == 2)
            retries = []
            for stream in streams:
                try:
                    for _ in stream.events(timeout=1.5):
                        pass
                except ConnectionClosed:  # cut: the client reconnects
                    retries.append(int(stream.parser.retry or 0))
                except TimeoutError:
                    pass  # open, on its thread
            assert len(retries) == 2 and all(1000 <= r <= 4000 for r in retries), retries
        finally:
            for stream in streams:
                stream.close()


@pytest.mark.parametrize("http_version", ["HTTP/1.1", "HTTP/1.0"], ids=["released", "queue"])
def test_wait_closed_in_an_on_disconnect_hook_is_refused_at_once(
    server: GunicornServer, http_version: str
) -> None:
    # The hook runs as part of the stream's end: waiting there for that end cannot end.
    before = stats(server)["finals"].count("wait refused")
    with RawHTTPStream(
        server.port, "/wait-in-hook", headers=HEADERS, http_version=http_version
    ) as stream:
        assert stream.status == 200
        assert wait_for(lambda: stats(server)["finals"].count("wait refused") > before, 3)


def test_a_socket_kept_from_before_the_release_stays_a_tcp_socket(
    server: GunicornServer,
) -> None:
    # gunicorn's socket object, as the view or the handler's first step saw it, was
    # pointed at a dead AF_UNIX socket pair: TCP options on it failed (EOPNOTSUPP)
    # until gunicorn closed it. Now it looks like a closed TCP connection.
    for _ in range(20):
        with RawHTTPStream(server.port, "/kept-socket", headers=HEADERS) as stream:
            patches = [e.signals for e in stream.events(timeout=5) if e.event]
            assert len(patches) == 1 and "error" not in patches[0], patches
