"""The thread-free engine under a real gunicorn: steps on the scheduler, released threads.

A stream's handler runs on the server's thread up to its first pause, then on
the scheduler's pool; on the direct path the stream gives its gunicorn thread
back there. These tests hold more streams than the worker has threads, and
check what gunicorn still does around them: keep-alive after a short stream,
the access log, ``--max-requests``, SIGHUP, the worker timeout; and how
streams are turned away when a worker is full.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    ConnectionClosed,
    GunicornServer,
    RawHTTPStream,
    get_json,
    post,
    process_alive,
    wait_for,
)

APP = "tests.live_apps.engine_app:app"
#: The repository's gunicorn settings, with the hooks of flask_datastar.gunicorn.
HOOKS = "gunicorn.conf.py"
HEADERS = {"Datastar-Request": "true"}


def signals(stream: RawHTTPStream, timeout: float = 10.0) -> Iterator[dict[str, Any]]:
    """Yield the signal patches of *stream* as dicts."""
    for event in stream.events(timeout=timeout):
        if event.event == "datastar-patch-signals":
            yield event.signals


def first(stream: RawHTTPStream, key: str, timeout: float = 10.0) -> dict[str, Any]:
    """Return the next signal patch of *stream* that has *key*."""
    for patch in signals(stream, timeout):
        if key in patch:
            return patch
    raise AssertionError(f"the stream ended before a patch with {key!r}")


def open_stream(server: GunicornServer, path: str, **headers: str) -> RawHTTPStream:
    stream = RawHTTPStream(server.port, path, headers={**HEADERS, **headers})
    assert stream.status == 200, stream.status
    return stream


@pytest.fixture(scope="module")
def server() -> Iterator[GunicornServer]:
    """One worker with 4 threads; streams are capped by files, not threads."""
    with GunicornServer(
        APP,
        config=HOOKS,
        threads=4,
        env={"FLASK_DATASTAR_HEARTBEAT": "1", "FLASK_DATASTAR_CLIENT_SHARE": "1"},
        extra_args=["--access-logfile", "-"],
    ) as server:
        yield server


def test_a_worker_with_4_threads_holds_40_streams(server: GunicornServer) -> None:
    streams = [open_stream(server, f"/tick?interval=0.3&x={i}") for i in range(40)]
    try:
        for i, stream in enumerate(streams):
            assert first(stream, "n")["x"] == str(i)
        # The threads are free: a command is answered, and reaches every stream.
        status, _, _ = post(server.url + "/broadcast?v=hello")
        assert status == 204
        for stream in streams:
            assert first(stream, "b")["b"] == "hello"
        # And the ticks go on, run by the scheduler's pool, not by a thread per stream.
        for stream in streams:
            later = first(stream, "n")
            assert later["n"] >= 2
            assert later["thread"].startswith("flask_datastar-step")
        stats = get_json(server, "/stats")
        assert stats["open"] >= 40
        assert stats["threads"] < 20, stats  # gunicorn's 4, the scheduler, watcher...
    finally:
        for stream in streams:
            stream.close()
    assert wait_for(lambda: get_json(server, "/stats")["open"] == 0)


def test_a_released_stream_ends_with_the_end_of_the_response(server: GunicornServer) -> None:
    with open_stream(server, "/tick?interval=0.05&count=3") as stream:
        patches = list(signals(stream))
        # The strict decoder read the terminating chunk: a clean end, no reconnect.
        assert [p["n"] for p in patches] == [1, 2, 3]
        assert patches[-1]["thread"].startswith("flask_datastar-step")
        # A released stream's connection is the stream's: it closes with it.
        stream.sock.settimeout(5)
        assert stream.sock.recv(1) == b""


def test_a_short_stream_keeps_its_connection_alive(server: GunicornServer) -> None:
    with open_stream(server, "/once") as stream:
        assert [p for p in signals(stream)] == [{"once": True}]
        stream.request("GET", "/once", HEADERS)
        assert stream.status == 200
        assert [p for p in signals(stream)] == [{"once": True}]


def test_gunicorn_logs_the_stream(server: GunicornServer) -> None:
    with open_stream(server, "/tick?interval=5&x=logged") as stream:
        first(stream, "n")
        # Logged when the stream gave its thread back, with its status.
        assert wait_for(lambda: '"GET /tick?interval=5&x=logged HTTP/1.1" 200' in server.log_text())


def test_steps_run_in_the_request_context_torn_down_at_the_end(server: GunicornServer) -> None:
    with open_stream(server, "/tick?interval=0.05&count=4&x=7&marker=m1") as stream:
        patches = list(signals(stream))
    assert {p["x"] for p in patches} == {"7"}
    assert {p["marker"] for p in patches} == {"m1"}  # g, from before_request
    assert any(p["thread"].startswith("flask_datastar-step") for p in patches)
    # The view's own context, then the stream's copy when it ended.
    assert wait_for(lambda: get_json(server, "/stats")["teardowns"].count("m1") == 2)

    with open_stream(server, "/tick?interval=0.05&marker=m2") as stream:
        for _ in range(3):
            first(stream, "n")
        assert get_json(server, "/stats")["teardowns"].count("m2") == 1
    assert wait_for(lambda: get_json(server, "/stats")["teardowns"].count("m2") == 2)


def test_an_error_in_a_scheduled_step_cuts_the_stream_and_is_logged(
    server: GunicornServer,
) -> None:
    with open_stream(server, "/boom") as stream:
        assert first(stream, "before") == {"before": True}
        with pytest.raises(ConnectionClosed):
            list(stream.events(timeout=5))  # no terminating chunk: the client reconnects
    assert wait_for(lambda: "LookupError: boom in a scheduled step" in server.log_text())


def test_a_blocking_step_does_not_stall_the_other_tabs(server: GunicornServer) -> None:
    with open_stream(server, "/tick?interval=0.1&x=steady") as steady:
        first(steady, "n")
        # More blocking steps than the pool has threads (2).
        slow = [open_stream(server, "/slow?seconds=2") for _ in range(3)]
        try:
            started = time.time() + 0.5  # each /slow stream's step blocks from here on
            for stream in slow:
                assert first(stream, "slept")["slept"] == 2
            done = time.time()
            meanwhile = 0
            for patch in signals(steady):
                if "t" in patch and patch["t"] > done:
                    break
                if "t" in patch and patch["t"] >= started:
                    meanwhile += 1
            # The pool grew for the blocked steps; the steady tab kept ticking (~15 times).
            assert meanwhile >= 5
        finally:
            for stream in slow:
                stream.close()
    log = server.log_text()
    assert "a step of /slow has run for" in log
    assert "own_thread=True" in log


def test_a_route_can_keep_its_own_thread(server: GunicornServer) -> None:
    with open_stream(server, "/owned") as stream:
        names = {first(stream, "thread")["thread"] for _ in range(2)}
    assert names and not any(n.startswith("flask_datastar-step") for n in names)


def test_a_periodic_job_runs_with_the_app_context(server: GunicornServer) -> None:
    with open_stream(server, "/beats") as stream:
        beats = [first(stream, "beat") for _ in range(3)]
    assert {b["app"] for b in beats} == {"tests.live_apps.engine_app"}
    assert get_json(server, "/stats")["beat_runs"] >= 3


# -- admission ----------------------------------------------------------------------


def refused(stream: RawHTTPStream) -> int:
    """Return the retry delay of a refused stream, checking that it was cut."""
    assert stream.status == 200
    with pytest.raises(ConnectionClosed):
        assert list(stream.events(timeout=5)) == []  # a comment and a retry only
    retry = stream.parser.retry
    assert retry is not None
    stream.close()
    return int(retry)


def test_a_full_worker_turns_streams_away_so_that_clients_retry() -> None:
    env = {"FLASK_DATASTAR_MAX_STREAMS": "2", "FLASK_DATASTAR_CLIENT_SHARE": "1"}
    with GunicornServer(APP, config=HOOKS, threads=4, env=env) as server:
        a = open_stream(server, "/tick?interval=1")
        b = open_stream(server, "/tick?interval=1")
        first(a, "n")
        first(b, "n")
        delays = [refused(RawHTTPStream(server.port, "/tick", headers=HEADERS)) for _ in range(5)]
        # Random, within the documented range: the refused do not all come back at once.
        assert all(1000 <= d <= 4000 for d in delays), delays
        assert len(set(delays)) > 1
        a.close()
        assert wait_for(lambda: get_json(server, "/stats")["open"] == 1)
        with open_stream(server, "/tick?interval=1") as c:
            assert first(c, "n")["n"] == 1
        b.close()


def test_one_client_cannot_take_every_slot() -> None:
    env = {"FLASK_DATASTAR_MAX_STREAMS": "4", "FLASK_DATASTAR_CLIENT_SHARE": "0.5"}
    with GunicornServer(APP, config=HOOKS, threads=4, env=env) as server:
        mine = [open_stream(server, "/tick?interval=1", **{"X-User": "greedy"}) for _ in range(2)]
        for stream in mine:
            first(stream, "n")
        extra = RawHTTPStream(server.port, "/tick", headers={**HEADERS, "X-User": "greedy"})
        refused(extra)
        # Another visitor still gets a stream.
        with open_stream(server, "/tick?interval=1", **{"X-User": "polite"}) as other:
            assert first(other, "n")["n"] == 1
        for stream in mine:
            stream.close()


# -- gunicorn's own life cycle ---------------------------------------------------------


def test_the_worker_timeout_does_not_cut_released_streams() -> None:
    with GunicornServer(APP, config=HOOKS, threads=2, extra_args=["--timeout", "2"]) as server:
        pid = server.worker_pids()[0]
        with open_stream(server, "/tick?interval=0.5") as stream:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                first(stream, "n")
        assert server.worker_pids() == [pid]


def ended_abruptly(stream: RawHTTPStream, timeout: float) -> bool:
    try:
        for _ in stream.events(timeout=timeout):
            pass
    except ConnectionClosed:
        return True
    return False


def test_max_requests_moves_the_streams_to_the_next_worker() -> None:
    with GunicornServer(
        APP,
        config=HOOKS,
        threads=4,
        extra_args=["--max-requests", "4"],
        env={"FLASK_DATASTAR_HEARTBEAT": "1"},
    ) as server:
        old = server.worker_pids()[0]
        streams = [open_stream(server, "/tick?interval=1") for _ in range(3)]
        for stream in streams:
            assert first(stream, "n")["pid"] == old
        post(server.url + "/broadcast?v=last")  # the 4th request: the worker stops
        for stream in streams:
            assert ended_abruptly(stream, timeout=6)
            assert stream.parser.retry is not None and 1000 <= int(stream.parser.retry) <= 3000
            stream.close()
        assert wait_for(lambda: not process_alive(old), timeout=10)
        assert wait_for(lambda: server.worker_pids() and server.worker_pids() != [old], timeout=10)
        with open_stream(server, "/tick?interval=1") as stream:
            assert first(stream, "n")["pid"] != old


def test_sighup_moves_every_tab_to_the_new_worker_within_4_seconds() -> None:
    with GunicornServer(
        APP, config=HOOKS, threads=4, env={"FLASK_DATASTAR_CLIENT_SHARE": "1"}
    ) as server:
        old = server.worker_pids()[0]
        streams = [open_stream(server, "/tick?interval=0.5") for _ in range(20)]
        for stream in streams:
            first(stream, "n")
        assert server.proc is not None
        hup = time.monotonic()
        os.kill(server.proc.pid, signal.SIGHUP)
        for stream in streams:
            assert ended_abruptly(stream, timeout=4)
            retry = stream.parser.retry
            assert retry is not None and int(retry) <= 3000  # back within 3 s
            stream.close()
        assert wait_for(lambda: not process_alive(old), timeout=4)
        assert time.monotonic() - hup < 4.5
        new = wait_for(lambda: [p for p in server.worker_pids() if p != old], timeout=10)
        assert new
        with open_stream(server, "/tick?interval=1") as stream:
            assert first(stream, "n")["pid"] in new


def test_a_stopping_worker_waits_for_slow_on_disconnect_hooks(tmp_path: Path) -> None:
    # A hook that takes longer than the 3 s the exit used to wait still ends: the worker
    # waits as long as gunicorn lets it (--graceful-timeout, --timeout), no longer.
    marker = tmp_path / "bye"
    with GunicornServer(
        APP, config=HOOKS, threads=4, extra_args=["--graceful-timeout", "10"]
    ) as server:
        old = server.worker_pids()[0]
        stream = open_stream(server, f"/goodbye?seconds=4.5&file={marker}")
        first(stream, "hello")
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGHUP)
        assert ended_abruptly(stream, timeout=6)
        stream.close()
        assert wait_for(lambda: not process_alive(old), timeout=15)
        assert marker.exists(), "the worker exited before the stream's on_disconnect hook ended"


@pytest.mark.parametrize(
    ("graceful", "timeout", "wait"),
    [
        (30, 30, 29.0),  # gunicorn's defaults: up to a second before the kill
        (10, 30, 9.0),
        (30, 5, 4.0),  # --timeout kills a worker that stopped reporting (SIGHUP's old ones)
        (2, 30, 3.0),  # never less than EXIT_WAIT
        (30, 0, 29.0),  # --timeout 0: no timeout
    ],
)
def test_a_stopping_worker_waits_as_long_as_gunicorn_lets_it(
    graceful: float, timeout: float, wait: float
) -> None:
    from types import SimpleNamespace

    from flask_datastar.gunicorn import exit_deadline

    cfg = SimpleNamespace(graceful_timeout=graceful, timeout=timeout)
    assert exit_deadline(cfg, since=100.0) == 100.0 + wait
