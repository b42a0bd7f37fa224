"""Adversarial review of the direct-write engine and the stream life cycle.

Each test shows one problem that an independent review of the engine hardening found;
each failed before its fix. Live tests run a real gunicorn (gthread) with the routes of
:mod:`tests.live_apps.review_app`.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import struct
import time

import pytest

from flask_datastar.transport import SocketWatcher
from tests.helpers import (
    ConnectionClosed,
    GunicornServer,
    RawHTTPStream,
    get_json,
    post,
    wait_for,
)

APP = "tests.live_apps.review_app:app"


# -- hang: a handler that catches the error thrown at its yield spins forever ------------


@pytest.mark.live
def test_a_handler_that_swallows_the_error_at_its_yield_can_still_be_closed() -> None:
    """A resilient loop (``try: yield render() ... except Exception: log``) whose render
    returns something unsendable: _next_step throws the error in, the handler catches
    it and yields the same thing again, and _next_step throws again, forever, without
    ever looking at ``_closed``. close(), the client leaving and the SIGTERM drain
    cannot end the stream; its thread burns a core."""
    with GunicornServer(APP, threads=4, env={"FLASK_DATASTAR_HEARTBEAT": "30"}) as server:
        with RawHTTPStream(server.port, "/review/swallow") as stream:
            assert next(stream.events(timeout=10)).signals == {"up": True}
            status, _, _ = post(f"{server.url}/close-all")
            assert status == 204
            ended = wait_for(lambda: get_json(server, "/review/stats")["open"] == 0, 5.0)
            stats = get_json(server, "/review/stats")
        assert ended, (
            f"The stream never ended after close(): the handler was thrown into"
            f" {stats['swallowed']} times in one step."
        )


# -- wrong behaviour: StreamClosed from the handler's own stream escapes close() --------


@pytest.mark.live
def test_a_handler_sending_in_finally_after_a_clean_close_ends_cleanly() -> None:
    """``close()`` (no reconnect) must end the response with gunicorn's terminating
    chunk, so the Datastar client does not reconnect. A handler whose ``finally``
    sends on its own stream gets StreamClosed from ``handler_iter.close()``; it escapes
    ``Stream._run`` to gunicorn, which skips ``resp.close()`` (no terminating chunk)
    and logs "Socket error processing request" with a traceback."""
    with GunicornServer(APP, threads=4, env={"FLASK_DATASTAR_HEARTBEAT": "30"}) as server:
        with RawHTTPStream(server.port, "/review/finally-send") as stream:
            events = stream.events(timeout=10)
            assert next(events).signals == {"up": True}
            status, _, _ = post(f"{server.url}/close-all")
            assert status == 204
            try:
                rest = list(events)  # to the terminating chunk
            except ConnectionClosed as e:
                log = server.log_text()
                error = log[log.find("[ERROR]") :][:200] if "[ERROR]" in log else "nothing"
                pytest.fail(
                    f"A clean close() cut the response instead of ending it ({e});"
                    f" the server logged {error!r}, ending {log.strip().splitlines()[-1]!r}"
                )
        assert rest == []
        wait_for(lambda: get_json(server, "/review/stats")["open"] == 0)
        assert "Socket error processing request" not in server.log_text()


# -- wrong behaviour: a client reset during the final flush escapes _finish -------------


@pytest.mark.live
def test_a_client_that_resets_during_the_final_flush_is_not_a_server_error() -> None:
    """A stream that ends normally waits (``flush_blocking``) for a slow client to take
    its backlog. When the client resets meanwhile, the flush raises TransportClosed,
    which nothing catches in ``Stream._finish``: it leaves the response iterator, and
    gunicorn logs it as "Socket error processing request" with a traceback (an
    ECONNRESET of its own it would log at debug level only)."""
    env = {"TEST_SNDBUF": "4096", "FLASK_DATASTAR_HEARTBEAT": "30"}
    with GunicornServer(APP, threads=4, env=env) as server:
        stream = RawHTTPStream(server.port, "/big?size=300000&count=3", rcvbuf=4096)
        try:
            assert next(stream.events(timeout=10)).signals["fd"] > 0
            time.sleep(1.0)  # the handler has returned; its tail waits in the backlog
            assert get_json(server, "/review/stats")["open"] == 1
            # RST instead of FIN: SO_LINGER with a zero timeout.
            stream.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        finally:
            stream.close()
        assert wait_for(lambda: get_json(server, "/review/stats")["open"] == 0)
        # The stream leaves open_streams() before its iterator returns to gunicorn, which
        # logs after that: give it the moment it needs.
        wait_for(lambda: "Socket error processing request" in server.log_text(), 2.0)
        log = server.log_text()
        assert "Socket error processing request" not in log, log[-3000:]
        assert "TransportClosed" not in log


# -- data loss / reconnect storm: the queue path's bound -------------------------------


@pytest.mark.live
@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.0"], ids=["direct", "queue"])
def test_a_broadcast_larger_than_the_backlog_bound_reaches_a_reading_client(
    version: str,
) -> None:
    """A broadcast of 100 KB (a fat morph of a page region) to a client that reads at
    once. The direct path sends it (the bound applies to what waits); the queue path
    (HTTP/1.0, i.e. behind nginx's default ``proxy_http_version 1.0``, and TLS) refuses
    any event larger than DATASTAR_MAX_BACKLOG from another thread, and ends every
    such stream abruptly: each tab reconnects, gets the state, and is cut again by the
    next broadcast."""
    with GunicornServer(APP, threads=4, env={"FLASK_DATASTAR_HEARTBEAT": "30"}) as server:
        with RawHTTPStream(server.port, "/sse", http_version=version) as stream:
            events = stream.events(timeout=10)
            first = next(events).signals
            assert first["path"] == ("direct" if version == "HTTP/1.1" else "queue")
            assert wait_for(lambda: get_json(server, "/review/stats")["registered"] == 1)
            status, _, _ = post(f"{server.url}/review/big-broadcast")
            assert status == 204
            try:
                event = next(events)
            except (ConnectionClosed, StopIteration):
                reasons = get_json(server, "/review/stats")["disconnects"]
                pytest.fail(f"The stream was ended by the broadcast: {reasons}")
            assert len(event.signals["big"]) == 100_000


@pytest.mark.live
@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.0"], ids=["direct", "queue"])
def test_the_streams_own_large_event_does_not_make_the_next_broadcast_end_it(
    version: str,
) -> None:
    """The handler sends a 100 KB first render and keeps working in the same step. The
    direct path counts the stream's own bytes apart (``_allowance``); the queue path
    counts them against DATASTAR_MAX_BACKLOG, so a 100-byte broadcast arriving before
    the handler's next yield ends the stream."""
    with GunicornServer(APP, threads=4, env={"FLASK_DATASTAR_HEARTBEAT": "30"}) as server:
        with RawHTTPStream(server.port, "/review/big-then-work", http_version=version) as stream:
            events = stream.events(timeout=10)
            assert wait_for(lambda: get_json(server, "/review/stats")["registered"] == 1)
            status, _, _ = post(f"{server.url}/click")  # within the handler's 1 s of work
            assert status == 204
            try:
                received = [next(events).signals, next(events).signals]
            except (ConnectionClosed, StopIteration):
                reasons = get_json(server, "/review/stats")["disconnects"]
                pytest.fail(f"A small broadcast ended the stream: {reasons}")
            assert len(received[0]["pad"]) == 100_000
            assert "count" in received[1]


# -- leak: the SIGTERM drain runs once; a stream opened after it holds its worker --------


@pytest.mark.live
def test_a_stream_opened_while_the_worker_stops_is_drained_too() -> None:
    """flask_datastar.gunicorn's drain thread calls close_all_streams() once, when the
    worker stops being alive. gunicorn still serves requests on kept-alive connections
    for STOP_KEEPALIVE_LINGER (2 s) after that (and max-requests flips ``alive`` before
    the last request's view runs): such a stream was admitted after the drain, and held
    its thread and client until --graceful-timeout, then was cut without a retry
    delay. It is turned away now, in a way the client retries."""
    env = {"FLASK_DATASTAR_HEARTBEAT": "60"}
    args = ["--graceful-timeout", "20", "--keep-alive", "10"]
    with GunicornServer(
        APP, threads=8, env=env, config="gunicorn.conf.py", extra_args=args
    ) as server:
        with RawHTTPStream(server.port, "/review/stats") as conn:
            conn.read_body()
            assert conn.headers["Connection"].lower() == "keep-alive"
            [pid] = server.worker_pids()
            os.kill(pid, signal.SIGTERM)
            time.sleep(0.6)  # the drain thread (0.2 s poll) has run by now
            conn.request("GET", "/sse")
            assert conn.status == 200
            assert conn.headers["Connection"].lower() == "close"  # served by a stopping worker
            try:
                # Turned away before its handler runs: told when to retry, then cut, as
                # the drain does, so that the client reconnects (to another worker).
                assert list(conn.events(timeout=8)) == []
                pytest.fail("The stream asked of a stopping worker ended cleanly.")
            except ConnectionClosed:
                assert conn.parser.retry is not None and 1000 <= conn.parser.retry <= 4000
            except TimeoutError:
                pytest.fail(
                    "The stream opened after the drain stayed open (the worker waits for"
                    " --graceful-timeout before cutting it)."
                )


# -- race: a stale watcher event unwatches the next stream on the same socket -----------


class _IdleWatcher(SocketWatcher):
    """A watcher whose thread does nothing, so a test decides the order of events."""

    def _run(self) -> None:
        return


class _Owner:
    def __init__(self) -> None:
        self.gone: list[str] = []

    def _peer_gone(self, reason: str) -> None:
        self.gone.append(reason)

    def _socket_writable(self) -> bool:
        return False


def test_a_stale_fin_event_ends_the_current_stream_not_the_previous_one() -> None:
    """Keep-alive: a stream ends normally and the next request on the same connection
    (the same socket object) is a stream again. An EPOLLIN the watcher read for the
    first stream's entry, handled after the switch, finds the client gone (it sent FIN
    meanwhile), calls ``self.remove(sock)``, which matches by socket identity and so
    removes the *new* stream's entry, and then tells the *old* owner. The new stream is
    neither ended nor watched any more (no FIN detection, no EPOLLOUT flushing): it
    holds its thread until a write fails."""
    watcher = _IdleWatcher()
    a, b = socket.socketpair()
    try:
        old, new = _Owner(), _Owner()
        watcher.add(a, old)
        stale = watcher._watched[a.fileno()]
        watcher.remove(a)  # the first stream ended normally
        watcher.add(a, new)  # the next request on the connection is a stream
        b.shutdown(socket.SHUT_WR)  # the client leaves
        watcher._handle(a.fileno(), select.EPOLLIN | select.EPOLLRDHUP, stale)
        assert new.gone or a.fileno() in watcher._watched, (
            "The stale event unwatched the current stream and ended nobody:"
            f" old owner told {old.gone}, new owner told {new.gone}."
        )
    finally:
        a.close()
        b.close()
        watcher._epoll.close()
