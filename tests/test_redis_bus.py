"""Broadcasts across processes through Redis: the bus alone, then real gunicorn workers.

Every test runs a real ``redis-server`` (``tests.helpers.RedisServer``); the live ones
also run ``gunicorn -k gthread -w 3`` with ``tests/live_apps/redis_app.py`` or the
example app. Waits are bounded polls, never timing assertions.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, current_app

from flask_datastar import SSE, FlaskDatastar, SSERegistry, Stream
from flask_datastar.bus import RedisBus, sentinel_supported
from flask_datastar.testing import ServerSentEvent
from tests.helpers import (
    REPO_ROOT,
    GunicornServer,
    RawHTTPStream,
    RedisServer,
    post,
    require_module,
)

pytestmark = pytest.mark.redis

LISTENER = "flask_datastar-redis-listener"


def wait_for(condition: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
    """Poll *condition* until it is true; fail the test after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"Timed out after {timeout} s waiting for {what or condition}.")
        time.sleep(0.02)


# --- the bus in this process, with stand-in streams ---------------------------------------


class FakeStream:
    """What a registry needs of a stream: it records what it is sent."""

    def __init__(self) -> None:
        self.key: Any = None
        self.closed = False
        self.reconnect: bool | None = None
        self.received: list[bytes] = []
        self._registries: weakref.WeakSet[SSERegistry] = weakref.WeakSet()

    def send(self, event: Any) -> None:
        self.received.append(event.encode() if isinstance(event, str) else event.data)

    def close(self, reconnect: bool = False) -> None:
        self.closed = True
        self.reconnect = reconnect


@pytest.fixture
def admin(redis_server: RedisServer) -> Iterator[Any]:
    """A plain redis-py client on the test's Redis, to act on the server."""
    redis = require_module("redis")
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest.fixture
def buses(redis_server: RedisServer) -> Iterator[Callable[..., RedisBus]]:
    """Make RedisBus instances on the test's Redis, each closed after the test."""
    made: list[RedisBus] = []

    def make(**options: Any) -> RedisBus:
        options.setdefault("backoff", (0.05, 0.5))
        bus = RedisBus(redis_server.url, **options)
        made.append(bus)
        return bus

    yield make
    for bus in made:
        bus.close()


def listener_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == LISTENER]


def test_broadcast_reaches_every_process_and_its_own_streams_once(
    buses: Callable[..., RedisBus],
) -> None:
    # Two buses stand for two processes: each has its own listener and connections.
    here = SSERegistry("room", bus=buses())
    there = SSERegistry("room", bus=buses())
    mine, theirs = here.register(FakeStream()), there.register(FakeStream())
    try:
        for number in range(3):
            here.broadcast(SSE.patch_signals({"n": number}))
        wait_for(lambda: len(theirs.received) == 3)
        wait_for(lambda: len(mine.received) == 3)
        here.flush()
        assert mine.received == theirs.received
        assert [json.loads(data.split(b"signals ")[1]) for data in mine.received] == [
            {"n": 0},
            {"n": 1},
            {"n": 2},
        ]
    finally:
        here.close()
        there.close()


@pytest.mark.parametrize(
    ("key", "other"),
    [("alice", "bob"), (7, 8), (("room", 1), ("room", 2))],
    ids=["str", "int", "tuple"],
)
def test_send_to_reaches_the_key_in_every_process(
    buses: Callable[..., RedisBus], key: Any, other: Any
) -> None:
    here = SSERegistry("keys", bus=buses())
    there = SSERegistry("keys", bus=buses())
    target, bystander = there.register(FakeStream(), key), there.register(FakeStream(), other)
    try:
        here.send_to(key, SSE.patch_signals({"to": "you"}))
        here.broadcast(SSE.patch_signals({"to": "all"}))
        wait_for(lambda: len(bystander.received) == 1)
        wait_for(lambda: len(target.received) == 2)
        assert b'"you"' in target.received[0] and b'"all"' in target.received[1]
        assert b'"all"' in bystander.received[0]
    finally:
        here.close()
        there.close()


def test_a_publishing_process_starts_no_listener(buses: Callable[..., RedisBus]) -> None:
    listening = SSERegistry("jobs", bus=buses())
    tab = listening.register(FakeStream())
    before = len(listener_threads())
    publisher = SSERegistry("jobs", bus=buses())
    try:
        publisher.broadcast(SSE.patch_signals({"job": "done"}))
        wait_for(lambda: tab.received)
        assert len(listener_threads()) == before == 1
        assert publisher.bus is not None and not publisher.bus.connected
    finally:
        listening.close()
        publisher.close()


def test_publish_while_redis_is_down_reaches_local_streams_then_resyncs(
    buses: Callable[..., RedisBus],
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    resynced: list[Any] = []
    registry = SSERegistry("outage", bus=buses(), on_resync=resynced.append)
    tab = registry.register(FakeStream())
    try:
        redis_server.stop()
        with caplog.at_level(logging.WARNING, logger="flask_datastar"):
            # Raises nothing into the command, and this process's stream still gets it.
            registry.broadcast(SSE.patch_signals({"during": "outage"}))
            registry.flush()
            assert len(tab.received) == 1 and b"outage" in tab.received[0]
            assert any("could not publish" in r.getMessage() for r in caplog.records)
            wait_for(lambda: any("lost the Redis" in r.getMessage() for r in caplog.records))
            assert resynced == []
            redis_server.start()
            wait_for(lambda: resynced == [tab], what="the resync after Redis came back")
            assert any("is back after" in r.getMessage() for r in caplog.records)
        registry.broadcast(SSE.patch_signals({"after": "outage"}))
        wait_for(lambda: len(tab.received) == 2)
        assert b"after" in tab.received[1]
    finally:
        registry.close()


def test_a_cut_subscription_ends_streams_so_they_reconnect(
    buses: Callable[..., RedisBus], admin: Any
) -> None:
    registry = SSERegistry("cut", bus=buses())
    tabs = [registry.register(FakeStream()) for _ in range(3)]
    try:
        assert admin.client_kill_filter(_type="pubsub") == 1
        # Without on_resync, every stream ends abruptly and its client reconnects, each
        # after its own delay so that they do not all come back at once.
        wait_for(lambda: all(tab.closed for tab in tabs))
        assert {tab.reconnect for tab in tabs} == {True}
        for tab in tabs:
            assert len(tab.received) == 1 and re.fullmatch(rb"retry: \d+\n\n", tab.received[0])
        other = registry.register(FakeStream())
        admin.publish("flask_datastar:cut", json.dumps({"e": "event: x\ndata: y\n\n"}))
        wait_for(lambda: other.received == [b"event: x\ndata: y\n\n"])
    finally:
        registry.close()


def test_a_silent_redis_is_noticed_by_the_health_check(
    buses: Callable[..., RedisBus], admin: Any
) -> None:
    gaps: list[str] = []
    bus = buses(health_check_interval=0.3, connect_timeout=0.5)
    bus.subscribe("quiet", lambda payload: None, lambda: gaps.append("gap"))
    # Redis keeps the connection open but answers nothing, as a frozen host would.
    admin.client_pause(2000, all=True)
    wait_for(lambda: gaps == ["gap"], what="a resync after the pause")


def test_fork_starts_a_listener_in_the_child(redis_server: RedisServer) -> None:
    script = textwrap.dedent(
        """
        import os, sys, threading, time
        from flask_datastar import SSE, SSERegistry
        from flask_datastar.bus import RedisBus

        class Tab:
            key = None
            closed = False
            def __init__(self):
                import weakref
                self._registries = weakref.WeakSet()
                self.received = []
            def send(self, chunk):
                self.received.append(chunk.data)

        bus = RedisBus(sys.argv[1])
        registry = SSERegistry("fork", bus=bus)
        registry.register(Tab())  # the parent subscribes before forking
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            tab = registry.register(Tab())
            names = [t.name for t in threading.enumerate()]
            print("child listeners", names.count("flask_datastar-redis-listener"), flush=True)
            os.write(ready_w, b"1")
            deadline = time.monotonic() + 10
            while not tab.received and time.monotonic() < deadline:
                time.sleep(0.02)
            os._exit(0 if tab.received else 1)
        os.read(ready_r, 1)
        registry.broadcast(SSE.patch_signals({"to": "child"}))
        _, status = os.waitpid(pid, 0)
        bus.close()
        sys.exit(os.waitstatus_to_exitcode(status))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, redis_server.url],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "child listeners 1" in result.stdout


def test_extension_joins_registries_to_the_redis_bus(redis_server: RedisServer, admin: Any) -> None:
    app = Flask("bus_app")
    datastar = FlaskDatastar(app, redis_url=redis_server.url)
    bus = datastar.bus(app)
    seen: list[str] = []
    try:
        assert isinstance(bus, RedisBus)
        registry = datastar.registry(
            app, "ext", on_resync=lambda gen: seen.append(current_app.name)
        )
        assert registry.bus is bus and datastar.registry(app, "ext") is registry
        assert not bus.connected  # nothing listens before the first stream
        registry.register(FakeStream())
        assert bus.connected
        admin.client_kill_filter(_type="pubsub")
        # The bus calls on_resync from its own thread, inside an app context.
        wait_for(lambda: seen == ["bus_app"])
    finally:
        assert bus is not None
        bus.close()


# --- real gunicorn workers ---------------------------------------------------------------


class Tab:
    """One open stream, read as a browser tab would."""

    def __init__(self, port: int, path: str = "/sse") -> None:
        self.stream = RawHTTPStream(port, path)
        assert self.stream.status == 200, self.stream.status
        self.port = self.stream.sock.getsockname()[1]
        self._events = self.stream.events(timeout=20)

    def next(self) -> ServerSentEvent:
        return next(self._events)

    def next_signals(self) -> Any:
        while True:
            event = self.next()
            if event.event == "datastar-patch-signals":
                return event.signals

    def close(self) -> None:
        self.stream.close()


def open_tabs(port: int, count: int, path: str = "/sse") -> list[Tab]:
    tabs: list[Tab] = []
    try:
        for _ in range(count):
            tabs.append(Tab(port, path))
    except BaseException:
        for tab in tabs:
            tab.close()
        raise
    return tabs


@pytest.fixture
def tabs_to_close() -> Iterator[list[Tab]]:
    tabs: list[Tab] = []
    yield tabs
    for tab in tabs:
        tab.close()


def redis_app(redis_server: RedisServer, **options: Any) -> GunicornServer:
    options.setdefault("workers", 3)
    # More threads than spread_tabs() opens tabs: gunicorn may hand most of them to one
    # worker, and a worker whose threads all hold streams answers nothing more.
    options.setdefault("threads", 48)
    return GunicornServer(
        "tests.live_apps.redis_app:app",
        env={"FLASK_DATASTAR_REDIS_URL": redis_server.url},
        **options,
    )


def spread_tabs(
    port: int, tabs: list[Tab], worker_of: Callable[[Tab], int], count: int = 12
) -> dict[int, list[Tab]]:
    """Open *count* tabs into *tabs*, and more (up to 40) until two workers hold some.

    :param worker_of: reads a new tab's first event and returns the pid holding it.
    :return: the tabs by worker pid.
    """
    by_pid: dict[int, list[Tab]] = {}
    while len(tabs) < count or len(by_pid) < 2:
        if len(tabs) >= 40:
            pytest.fail(f"{len(tabs)} streams all landed on worker {list(by_pid)}.")
        tab = Tab(port)
        tabs.append(tab)
        by_pid.setdefault(worker_of(tab), []).append(tab)
    return by_pid


def first_pid(tab: Tab) -> int:
    """The pid that redis_app sends in each stream's first event."""
    return int(tab.next_signals()["pid"])


@pytest.mark.live
def test_every_click_reaches_every_tab_on_every_worker(
    redis_server: RedisServer, tabs_to_close: list[Tab]
) -> None:
    # --preload: the bus is created in the master and must work in each forked worker.
    with redis_app(redis_server, extra_args=["--preload"]) as server:
        by_pid = spread_tabs(server.port, tabs_to_close, first_pid)
        assert set(by_pid) <= set(server.worker_pids()) and len(by_pid) >= 2
        every = len(tabs_to_close)
        for number in range(1, 4):
            status, _, body = post(server.url + "/click")
            assert status == 200 and json.loads(body)["clicks"] == number
            # Every tab, whichever worker holds it, gets this click exactly once, in order.
            assert [tab.next_signals() for tab in tabs_to_close] == [{"clicks": number}] * every

        # A separate process (a CLI command, a cron job) imports the app and publishes.
        script = textwrap.dedent(
            """
            import threading
            from flask_datastar import SSE
            from tests.live_apps.redis_app import app, clients, datastar
            clients.broadcast(SSE.patch_signals({"from": "cli"}))
            names = [t.name for t in threading.enumerate()]
            assert "flask_datastar-redis-listener" not in names, names
            datastar.bus(app).close()
            """
        )
        result = subprocess.run(
            [sys.executable, "-c", script],
            cwd=REPO_ROOT,
            env={**os.environ, "FLASK_DATASTAR_REDIS_URL": redis_server.url},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        assert [tab.next_signals() for tab in tabs_to_close] == [{"from": "cli"}] * every


@pytest.mark.live
def test_redis_restart_resyncs_every_tab_and_broadcasts_flow_again(
    redis_server: RedisServer, tabs_to_close: list[Tab]
) -> None:
    with redis_app(redis_server) as server:
        by_pid = spread_tabs(server.port, tabs_to_close, first_pid)
        assert len(by_pid) >= 2

        redis_server.stop()
        # A command while Redis is down: it succeeds, and reaches the tabs of its own
        # worker (nothing else can reach the others).
        status, _, body = post(server.url + "/say?text=alone")
        assert status == 200
        said_pid = json.loads(body)["pid"]
        redis_server.start()  # same port, no data

        for pid, tabs in by_pid.items():
            for tab in tabs:
                signals = tab.next_signals()
                if pid == said_pid:
                    assert signals == {"said": "alone"}
                    signals = tab.next_signals()
                # The workers resync every tab once their subscription is back.
                assert signals == {"resync": pid, "clicks": 0}

        status, _, body = post(server.url + "/click")
        assert status == 200 and json.loads(body)["clicks"] == 1

        def after_the_outage(tab: Tab) -> Any:
            # The worker whose publish failed tells the others to resync once it
            # publishes again (if the click landed there): a second, harmless resync.
            signals = tab.next_signals()
            while "resync" in signals:
                signals = tab.next_signals()
            return signals

        assert [after_the_outage(tab) for tab in tabs_to_close] == [{"clicks": 1}] * len(
            tabs_to_close
        )
        assert "lost the Redis subscription" in server.log_text()


def worker_stats(server: GunicornServer) -> dict[int, dict[str, Any]]:
    """Ask /stats until every worker has answered (each request is a new connection)."""
    stats: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + 20
    while len(stats) < server.workers:
        if time.monotonic() > deadline:
            pytest.fail(f"Only workers {sorted(stats)} answered /stats.")
        status, _, body = post(server.url + "/stats", method="GET")
        assert status == 200
        answer = json.loads(body)
        stats[answer["pid"]] = answer
    return stats


def bus_connections(admin: Any) -> dict[str, int]:
    """Count the connections of flask_datastar's buses to Redis, by client name."""
    names = [client["name"] for client in admin.client_list()]
    return {name: names.count(name) for name in set(names) if name.startswith("flask_datastar")}


def not_broadcasters(names: list[str]) -> list[str]:
    """The threads of own_threads() but the registries' broadcasters."""
    return [name for name in own_threads(names) if "broadcaster" not in name]


def own_threads(names: list[str]) -> list[str]:
    """The thread names that are not gunicorn's request pool (which only grows to --threads)."""
    return sorted(name for name in names if not name.startswith("ThreadPoolExecutor"))


@pytest.mark.live
def test_streams_coming_and_going_leak_no_thread_or_connection(
    redis_server: RedisServer, admin: Any
) -> None:
    threads = 12
    with redis_app(redis_server, threads=threads) as server:

        def cycle() -> set[int]:
            """Open 9 tabs, click once, close them; return the workers that held them."""
            tabs = open_tabs(server.port, 9)
            try:
                pids = {tab.next_signals()["pid"] for tab in tabs}
                post(server.url + "/click")
                for tab in tabs:
                    tab.next_signals()
            finally:
                for tab in tabs:
                    tab.close()
            wait_for(
                lambda: all(s["streams"] == 0 for s in worker_stats(server).values()),
                what="the workers to drop the closed streams",
            )
            return pids

        # Warm up until every worker has held streams (and so started its listener).
        held: set[int] = set()
        for _ in range(5):
            held |= cycle()
            if len(held) == server.workers:
                break
        assert len(held) == server.workers, f"streams never reached every worker: {held}"
        before = worker_stats(server)
        assert bus_connections(admin)["flask_datastar:listener"] == server.workers
        for _ in range(6):
            cycle()
        after = worker_stats(server)
        assert set(after) == set(before)
        for pid, stats in after.items():
            # Broadcaster threads come and go (one per registry at most, exiting when
            # idle); every other thread is the same as before.
            assert not_broadcasters(stats["threads"]) == not_broadcasters(before[pid]["threads"])
            assert len(own_threads(stats["threads"])) - len(not_broadcasters(stats["threads"])) <= 1
            assert len(stats["threads"]) - len(own_threads(stats["threads"])) <= threads
            # One listener per worker, whatever the number of streams it held.
            assert own_threads(stats["threads"]).count(LISTENER) == 1
        connections = bus_connections(admin)
        # One subscription per worker, never one per stream; one connection per worker
        # to publish (the clicks came one at a time), created when it first published.
        assert connections["flask_datastar:listener"] == server.workers
        assert connections["flask_datastar"] <= server.workers


# --- the example app ---------------------------------------------------------------------


def socket_owners(pids: list[int], server_port: int) -> dict[int, int]:
    """Map the client port of each connection to the server port to the worker holding it."""
    inodes: dict[str, int] = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        remote_port = int(fields[2].split(":")[1], 16)
        if local_port == server_port:
            inodes[fields[9]] = remote_port
    owners: dict[int, int] = {}
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            match = re.fullmatch(r"socket:\[(\d+)\]", target)
            if match and match.group(1) in inodes:
                owners[inodes[match.group(1)]] = pid
    return owners


CLICKS = re.compile(r"Button clicks: <strong>(\d+)</strong>")


@pytest.mark.live
def test_example_app_shares_the_counter_across_workers(
    redis_server: RedisServer, tabs_to_close: list[Tab]
) -> None:
    env = {"FLASK_DATASTAR_REDIS_URL": redis_server.url}
    with GunicornServer(
        "example_app:app", workers=3, threads=48, env=env, config="gunicorn.conf.py"
    ) as server:

        def worker_of(tab: Tab) -> int:
            tab.next()  # the stream is open: its socket is in a worker
            return socket_owners(server.worker_pids(), server.port)[tab.port]

        assert len(spread_tabs(server.port, tabs_to_close, worker_of, count=9)) >= 2
        for number in range(1, 4):
            status, _, _ = post(server.url + "/click")
            assert status == 204
            for tab in tabs_to_close:
                # The broadcast (it has a selector; the 1 s tick has none) with the
                # count that every worker read from Redis.
                while True:
                    event = tab.next()
                    if event.selector == "#content":
                        break
                match = CLICKS.search(event.elements or "")
                assert match is not None and int(match.group(1)) == number


# --- issue 8: dynamic registries, failed and retried publishes --------------------------


def broadcaster_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if "broadcaster" in t.name)


def test_dynamic_registries_cost_nothing_once_their_streams_are_gone(
    redis_server: RedisServer, admin: Any
) -> None:
    """200 rooms, each with its own registry: threads, channels and connections come back."""
    app = Flask("rooms")
    app.config["TESTING"] = True
    datastar = FlaskDatastar(app, redis_url=redis_server.url, heartbeat=0)

    def room(gen: Stream) -> SSERegistry:
        return datastar.registry(app, f"room:{gen.environ['PATH_INFO']}", linger=0.05)

    @app.get("/<number>")
    @datastar.sse(on_connect=lambda gen: room(gen).register(gen))
    def sse(gen: Stream, number: str) -> Iterator[Any]:
        gen.patch_signals({"joined": number})
        yield gen.sleep()

    client = app.test_client()

    def visit(number: object) -> None:
        """Open a stream in the room, get a broadcast through Redis, leave."""
        response = client.get(f"/{number}", buffered=False)
        body = iter(response.response)
        assert next(body) == b":\n\n"  # the headers are out
        assert b"joined" in next(body)
        datastar.registry(app, f"room:/{number}").broadcast(SSE.patch_signals({"n": number}))
        assert f'"n":{json.dumps(number)}'.encode() in next(body)
        response.close()

    def settled() -> tuple[Any, ...]:
        channels = sorted(admin.pubsub_channels())
        return broadcaster_threads(), channels, len(admin.client_list())

    bus = datastar.bus(app)
    assert bus is not None
    try:
        visit("warm-up")  # starts the bus's listener, which stays for the next rooms
        wait_for(lambda: broadcaster_threads() == [] and len(admin.pubsub_channels()) == 1)
        baseline_threads = sorted(t.name for t in threading.enumerate())
        baseline = settled()
        held = datastar.registry(app, "room:/7", linger=0.05)  # the application keeps it
        rooms = []
        for number in range(200):
            visit(number)
            rooms.append(weakref.ref(datastar.registry(app, f"room:/{number}")))
        wait_for(lambda: settled() == baseline, what=f"the baseline {baseline}")
        assert sorted(t.name for t in threading.enumerate()) == baseline_threads

        def collected() -> int:
            gc.collect()
            return sum(ref() is None for ref in rooms)

        # Every room nobody references is gone; the held one is still the one returned.
        wait_for(lambda: collected() == 199)
        assert datastar.registry(app, "room:/7") is held
    finally:
        bus.close()


def test_a_failed_publish_makes_the_other_processes_resync(
    buses: Callable[..., RedisBus], admin: Any, caplog: pytest.LogCaptureFixture
) -> None:
    resynced: list[Any] = []
    here = SSERegistry("flaky", bus=buses(connect_timeout=0.3))
    there = SSERegistry("flaky", bus=buses(), on_resync=resynced.append)
    mine, theirs = here.register(FakeStream()), there.register(FakeStream())
    try:
        here.broadcast(SSE.patch_signals({"n": 1}))
        wait_for(lambda: len(theirs.received) == 1 and len(mine.received) == 1)
        # Redis holds every PUBLISH back, while the subscriptions stay healthy.
        admin.client_pause(20_000, all=False)
        with caplog.at_level(logging.WARNING, logger="flask_datastar"):
            here.broadcast(SSE.patch_signals({"n": 2}))  # times out: lost for 'there'
            assert any("could not publish" in r.getMessage() for r in caplog.records)
        here.flush()
        assert len(mine.received) == 2 and b'"n":2' in mine.received[1]
        admin.client_unpause()
        assert there.bus is not None and there.bus.connected and resynced == []
        here.broadcast(SSE.patch_signals({"n": 3}))
        # The other process learns that it missed something and resyncs its streams;
        # this one got every event and is left alone.
        wait_for(lambda: resynced == [theirs], what="the other process's resync")
        wait_for(lambda: any(b'"n":3' in data for data in theirs.received))
        # (It comes back through Redis, like every other process's copy: wait for it.)
        wait_for(lambda: any(b'"n":3' in data for data in mine.received))
        here.flush()
        assert [data for data in mine.received if b'"n":' in data][-1].count(b'"n":3') == 1
        assert mine not in resynced
    finally:
        here.close()
        there.close()


# Holds Redis's event loop for ARGV[1] milliseconds, as a slow command or a stalled host does.
BUSY = """
local start = redis.call('TIME')
while true do
  local now = redis.call('TIME')
  if (now[1] - start[1]) * 1000 + (now[2] - start[2]) / 1000 > tonumber(ARGV[1]) then
    return 1
  end
end
"""


def test_a_publish_that_timed_out_and_was_retried_is_delivered_once(
    buses: Callable[..., RedisBus], admin: Any, redis_server: RedisServer
) -> None:
    # The publishing client waits 1 s for an answer; Redis is stalled for 1.5 s: the first
    # PUBLISH times out, and redis-py retries it on a new connection, whose answer comes
    # once Redis is back. Redis runs both.
    here = SSERegistry("retried", bus=buses(connect_timeout=1.0))
    there = SSERegistry("retried", bus=buses())
    tab = there.register(FakeStream())
    raw = admin.pubsub()
    raw.subscribe("flask_datastar:retried")
    try:
        here.broadcast(SSE.patch_signals({"warm": True}))  # the publishing connection exists
        wait_for(lambda: len(tab.received) == 1)
        stall = threading.Thread(target=admin.eval, args=(BUSY, 0, 1500))
        stall.start()
        wait_for(lambda: not redis_server.ping(timeout=0.05), what="Redis to stall")
        here.broadcast(SSE.patch_signals({"once": True}))
        stall.join()
        here.broadcast(SSE.patch_signals({"after": True}))
        wait_for(lambda: any(b"after" in data for data in tab.received))
        copies = []
        while (message := raw.get_message(timeout=1)) is not None:
            if message["type"] == "message":
                copies.append(message["data"])
        # Redis carried it twice where redis-py retries a timed-out command (recent
        # releases do; 5.0 does not, and then it went once: the test below makes the
        # repeat itself) ...
        assert sum(b"once" in data for data in copies) in (1, 2), copies
        # ... and the other process wrote it to its stream once.
        assert sum(b"once" in data for data in tab.received) == 1
    finally:
        raw.close()
        here.close()
        there.close()


def test_a_message_that_reaches_redis_twice_is_written_once(
    buses: Callable[..., RedisBus],
) -> None:
    """The same message (same id) published twice, as any retry of a PUBLISH that did
    reach Redis produces, is written to the streams once."""
    here = SSERegistry("twice", bus=buses())
    there = SSERegistry("twice", bus=buses())
    tab = there.register(FakeStream())
    bus = here.bus
    assert bus is not None
    try:
        payload = json.dumps(
            {"e": SSE.patch_signals({"n": 1}), "i": "feedface:1"}, separators=(",", ":")
        ).encode()
        bus.publish("flask_datastar:twice", payload)
        bus.publish("flask_datastar:twice", payload)
        here.broadcast(SSE.patch_signals({"after": True}))
        wait_for(lambda: any(b"after" in data for data in tab.received))
        assert sum(b'"n":1' in data for data in tab.received) == 1
    finally:
        here.close()
        there.close()


# --- the application's own client ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["client", "pool", "factory"])
def test_the_apps_own_client_pool_or_factory_carries_the_bus(
    redis_server: RedisServer, admin: Any, kind: str
) -> None:
    redis = require_module("redis")
    # decode_responses=True would hand the bus text; its listener reads bytes anyway.
    app_client = redis.Redis.from_url(
        redis_server.url, decode_responses=True, socket_timeout=2, client_name="the-app"
    )
    source: Any = {
        "client": app_client,
        "pool": app_client.connection_pool,
        "factory": lambda: app_client,
    }[kind]
    here, there = RedisBus(client=source), RedisBus(client=source)
    mine, theirs = FakeStream(), FakeStream()
    registries = [SSERegistry("own", bus=here), SSERegistry("own", bus=there)]
    registries[0].register(mine)
    registries[1].register(theirs)
    try:
        registries[0].broadcast(SSE.patch_signals({"é": "ü"}))
        wait_for(lambda: len(mine.received) == 1 and len(theirs.received) == 1)
        assert mine.received == theirs.received
        assert json.loads(mine.received[0].split(b"signals ")[1]) == {"é": "ü"}
        # Publishing goes through the app's connections; each listener has its own.
        names = [client["name"] for client in admin.client_list()]
        assert names.count("flask_datastar:listener") == 2
        assert "the-app" in names and "flask_datastar" not in names
        if kind != "pool":
            assert here.client is app_client
        # A listener made from the app's settings still notices a cut and resyncs.
        assert admin.client_kill_filter(_type="pubsub") == 2
        wait_for(lambda: mine.closed and theirs.closed, what="the streams to be resynced")
    finally:
        for registry in registries:
            registry.close()
        here.close()
        there.close()
    # The bus closes what it made, and leaves the app's client alone.
    assert app_client.ping()
    app_client.close()


def test_extension_takes_the_apps_client_from_the_config(
    redis_server: RedisServer, admin: Any
) -> None:
    redis = require_module("redis")
    app_client = redis.Redis.from_url(redis_server.url, socket_timeout=2)
    app = Flask("own_client_app")
    app.config["DATASTAR_REDIS"] = app_client
    datastar = FlaskDatastar(app)
    bus = datastar.bus(app)
    try:
        assert isinstance(bus, RedisBus) and bus.client is app_client
        registry = datastar.registry(app, "cfg")
        tab = registry.register(FakeStream())
        admin.publish("flask_datastar:cfg", json.dumps({"e": "event: x\ndata: y\n\n"}))
        wait_for(lambda: tab.received == [b"event: x\ndata: y\n\n"])
    finally:
        assert bus is not None
        bus.close()
        app_client.close()
    both = Flask("both")
    both.config.update(DATASTAR_REDIS=app_client, DATASTAR_REDIS_URL=redis_server.url)
    with pytest.raises(ValueError, match="not both"):
        FlaskDatastar(both)


def test_clients_and_urls_that_cannot_carry_the_bus_are_refused_with_a_reason(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    redis = require_module("redis")
    asyncio_redis = require_module("redis.asyncio")
    sentinel = redis.sentinel.Sentinel([("127.0.0.1", redis_server.port)])
    refused: list[tuple[Any, type[Exception], str]] = [
        (asyncio_redis.Redis(), TypeError, "asyncio client"),
        (sentinel, TypeError, "master_for"),
        (sentinel.slave_for("mymaster"), ValueError, "not 'slave_for'"),
        (
            redis.Redis.from_url(redis_server.url, single_connection_client=True),
            ValueError,
            "single_connection_client",
        ),
        ("nats://x", ValueError, "redis\\+sentinel://"),
        ("redis+sentinel://127.0.0.1:26379", ValueError, "must name the service"),
        ("redis+sentinel://127.0.0.1:x/m", ValueError, "'x'.*not a number"),
        ("redis+cluster://127.0.0.1:7000/3", ValueError, "database 0 only"),
        (object(), TypeError, "not object"),
    ]
    for source, error, message in refused:
        with pytest.raises(error, match=message):
            if isinstance(source, str):
                RedisBus(source)
            else:
                RedisBus(client=source)
    with pytest.raises(TypeError, match="not both"):
        RedisBus(redis_server.url, client=redis.Redis())
    with pytest.raises(TypeError, match="your own client"):
        RedisBus(client=redis.Redis(), socket_timeout=1)
    # A callable is called at the first use, and checked then.
    lazy = RedisBus(client=lambda: 6379)
    with pytest.raises(TypeError, match="not int"):
        lazy.publish("c", b"")
    # A client without socket_timeout works, with a warning: a publish could hang.
    with caplog.at_level(logging.WARNING, logger="flask_datastar"):
        RedisBus(client=redis.Redis.from_url(redis_server.url)).close()
    assert any("no socket_timeout" in record.getMessage() for record in caplog.records)
    # A URL's password stays out of logs and errors.
    if sentinel_supported():
        assert "secret" not in repr(RedisBus("redis+sentinel://:secret@127.0.0.1:1/m"))
    else:  # redis-py 5.0.0: refused at once, and the error does not quote the password
        with pytest.raises(RuntimeError, match="5.0.1") as refusal:
            RedisBus("redis+sentinel://:secret@127.0.0.1:1/m")
        assert "secret" not in str(refusal.value)
