"""Resume after reconnect: a registry's replay log, Last-Event-ID, and the full state on a gap.

The logs' bounds are checked directly (the in-process log, and the Redis Stream on a real
``redis-server``); the registry's hand-over from the log to the live events under
concurrent broadcasts with stand-in streams; and the whole story live, under real
gunicorn with ``tests/live_apps/resume_app.py``: one worker (the log in the process) and
three workers sharing a real Redis (the log in a Redis Stream).
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from flask_datastar import SSE, SSERegistry
from flask_datastar.replay import MemoryLog, RedisLog, ReplayLog, parse_event_id
from tests.helpers import GunicornServer, RawHTTPStream, RedisServer, post, require_module

BAD_IDS = ["garbage", "", "1-2-3", "-1-0", "12345678901234567890123-1", "0-0", "1\u00e9-2"]


@pytest.fixture(scope="module")
def redis_module() -> Iterator[RedisServer]:
    """One real ``redis-server`` for the module's Redis tests, stopped after them."""
    with RedisServer() as server:
        yield server


# --- the logs ---------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def filled(log: MemoryLog[str], count: int) -> list[str]:
    ids = []
    for index in range(count):
        event_id, position = log.next_id()
        log.append(position, f"event {index}")
        ids.append(event_id)
    return ids


def test_memory_log_keeps_the_newest_events_by_count() -> None:
    log: MemoryLog[str] = MemoryLog(max_events=3, max_age=60)
    ids = filled(log, 6)
    assert len(log) == 3
    # Events 3, 4, 5 are kept: a client that saw event 2 missed nothing that is gone.
    assert log.since(ids[2]) == ["event 3", "event 4", "event 5"]
    assert log.since(ids[4]) == ["event 5"]
    assert log.since(ids[5]) == []
    # One that saw event 1 missed event 2, which is gone: a gap.
    assert log.since(ids[1]) is None
    assert log.since(ids[0]) is None


def test_memory_log_drops_events_older_than_max_age() -> None:
    clock = Clock()
    log: MemoryLog[str] = MemoryLog(max_events=100, max_age=10, clock=clock)
    ids = filled(log, 2)
    clock.now += 6
    ids += filled(log, 2)
    assert log.since(ids[0]) == ["event 1", "event 0", "event 1"]
    clock.now += 5  # the first two are 11 s old now, even with nothing appended since
    assert log.since(ids[0]) is None
    assert log.since(ids[1]) == ["event 0", "event 1"]
    assert len(log) == 2


def test_memory_log_knows_only_its_own_ids() -> None:
    log: MemoryLog[str] = MemoryLog(max_events=10, max_age=60)
    other: MemoryLog[str] = MemoryLog(max_events=10, max_age=60)
    ids = filled(log, 3)
    foreign = filled(other, 3)
    for bad in [*BAD_IDS, foreign[0], None]:
        assert log.since(bad) is None, bad
    epoch, n = parse_event_id(ids[-1]) or (0, 0)
    assert log.since(f"{epoch}-{n + 1}") is None  # from the future
    log.reset()  # after a bus gap: nobody resumes across the hole
    assert log.since(ids[-1]) is None
    assert log.since(filled(log, 1)[0]) == []


def test_replay_log_settings_are_checked() -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_events"):
            ReplayLog(max_events=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_age"):
        ReplayLog(max_age=0)
    log = ReplayLog()
    SSERegistry("one", replay=log)
    with pytest.raises(RuntimeError, match="its own ReplayLog"):
        SSERegistry("two", replay=log)


@pytest.mark.redis
def test_a_cluster_log_refuses_a_channel_whose_slot_it_cannot_share() -> None:
    # A Redis Cluster hashes only the first {...} of a name: no key can be put in the
    # slot of a channel with braces, where the log's script must publish.
    require_module("redis")
    with pytest.raises(ValueError, match=r"must have no '\{' or '\}': rename the registry"):
        RedisLog(None, "room{1}", max_events=10, max_age=60, sharded=True)
    with pytest.raises(ValueError, match="rename the registry"):
        RedisLog(None, "a}b", max_events=10, max_age=60, sharded=True)


def test_redis_log_bounds_by_count_and_age(redis_module: RedisServer) -> None:
    redis = require_module("redis")
    client = redis.Redis.from_url(redis_module.url)
    try:
        log = RedisLog(client, "bounds", max_events=10, max_age=60)
        first = log.append_and_publish(json.dumps({"i": "x:0", "e": "a\n\n"}))
        for index in range(1, 400):
            log.append_and_publish(json.dumps({"i": f"x:{index}", "e": "a\n\n"}))
        # MAXLEN ~ 10: about ten kept (Redis trims whole nodes), never all 400.
        assert 10 <= client.xlen(log.key) < 400
        assert log.since(first) is None
        newest = client.xrevrange(log.key, count=2)
        assert [entry_id for entry_id, _ in log.since(newest[1][0].decode()) or []] == [
            newest[0][0].decode()
        ]
        assert 0 < client.pttl(log.key) <= 60_000  # an idle log expires

        aged = RedisLog(client, "aged", max_events=1000, max_age=0.3)
        old = aged.append_and_publish(json.dumps({"i": "y:0", "e": "a\n\n"}))
        kept = aged.append_and_publish(json.dumps({"i": "y:1", "e": "b\n\n"}))
        assert [m["e"] for _, m in aged.since(old) or []] == ["b\n\n"]
        time.sleep(0.4)  # the scenario: the entries grow older than max_age
        aged.append_and_publish(json.dumps({"i": "y:2", "e": "c\n\n"}))
        assert client.xlen(aged.key) == 1
        assert aged.since(old) is None and aged.since(kept) is None

        for bad in [*BAD_IDS, None, "1-0", "99999999999999-0"]:
            assert log.since(bad) is None, bad
    finally:
        client.close()


# --- the registry's hand-over from the log to the live events ---------------------------------


class FakeStream:
    """What a registry needs of a stream: it records the ids of what it is sent."""

    def __init__(self, last_event_id: str | None) -> None:
        self.key: Any = None
        self.identity: Any = None
        self.closed = False
        self.last_event_id = last_event_id
        self.resumed: bool | None = None
        self.received: list[bytes] = []
        self._registries: set[SSERegistry] = set()

    def send(self, event: Any) -> None:
        self.received.append(event.encode() if isinstance(event, str) else event.data)

    def close(self, reconnect: bool = False) -> None:
        self.closed = True

    def ids(self) -> list[int]:
        return [
            int(m.group(1)) for m in (re.match(rb"id: \d+-(\d+)\n", e) for e in self.received) if m
        ]


def test_streams_resuming_during_broadcasts_get_every_event_once_in_order() -> None:
    registry = SSERegistry("race", replay=ReplayLog(max_events=10_000, max_age=60))
    watcher = FakeStream(None)
    registry.register(watcher)
    assert watcher.resumed is False
    total = 3000
    done = threading.Event()

    def broadcast() -> None:
        for index in range(total):
            registry.broadcast(SSE.patch_signals({"n": index}))
        done.set()

    thread = threading.Thread(target=broadcast)
    # Threads switch every microsecond: the broadcaster runs inside each hand-over.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    thread.start()
    tabs = []
    try:
        # Tabs come back while events keep coming, each from the last id it saw.
        while not done.is_set() or len(tabs) < 5:
            registry.flush(0.001)
            seen = watcher.received[-1:] if watcher.received else []
            if not seen:
                continue
            last_id = re.match(rb"id: (\d+-\d+)\n", seen[0])
            assert last_id is not None
            tab = FakeStream(last_id.group(1).decode())
            tab.received.append(seen[0])
            registry.register(tab)
            tabs.append(tab)
    finally:
        thread.join()
        sys.setswitchinterval(interval)
    assert registry.flush(10)
    assert watcher.ids() == list(range(1, total + 1))
    assert len(tabs) >= 5
    for tab in tabs:
        assert tab.resumed is True
        ids = tab.ids()
        assert ids == list(range(ids[0], total + 1)), "lost, repeated or out of order"


def test_targeted_events_are_replayed_only_to_their_streams_and_fat_morphs_coalesce() -> None:
    registry = SSERegistry("targets", replay=ReplayLog())
    first = FakeStream(None)
    registry.register(first, "k1")
    registry.broadcast(SSE.patch_signals({"start": 1}))
    assert registry.flush()
    last_id = re.match(rb"id: (\S+)\n", first.received[-1])
    assert last_id is not None
    registry.unregister(first)
    registry.send_to("k1", SSE.patch_signals({"for": "k1"}))
    registry.send_to("k2", SSE.patch_signals({"for": "k2"}))
    registry.broadcast(SSE.patch_elements('<div id="board">1</div>'), coalesce="board")
    registry.publish("news", SSE.patch_signals({"topic": "news"}))
    registry.broadcast(SSE.patch_elements('<div id="board">2</div>'), coalesce="board")
    registry.publish("sport", SSE.patch_signals({"topic": "sport"}))
    assert registry.flush()
    tab = FakeStream(last_id.group(1).decode())
    registry.register(tab, "k1", topics=["news"])
    text = b"".join(tab.received).decode()
    assert tab.resumed is True
    assert '"for":"k1"' in text and '"for":"k2"' not in text
    assert '"topic":"news"' in text and "sport" not in text
    # The older fat morph of the board is superseded by the newer one.
    assert 'board">2' in text and 'board">1' not in text


def test_a_registry_with_a_log_refuses_events_with_their_own_id() -> None:
    registry = SSERegistry("ids", replay=ReplayLog())
    with pytest.raises(ValueError, match="without 'event_id='"):
        registry.broadcast(SSE.patch_signals({"a": 1}, event_id="mine"))
    SSERegistry("plain").broadcast(SSE.patch_signals({"a": 1}, event_id="mine"))


# --- live: real gunicorn, one worker, and three workers through Redis -------------------------

LI = re.compile(r"<li>(.*?)</li>")


class Tab:
    """A tab of the resume app, as the Datastar client would see its page: the list of lines.

    It applies the events in order: an ``append`` adds its line, any other patch of
    ``#lines`` replaces the list (the full state); the signals say whether the stream
    resumed, and on which worker.

    :param last_event_id: sent as ``Last-Event-ID``, as the client does on a reconnect.
    :param lines: the page's lines before the reconnect.
    """

    def __init__(
        self,
        server: GunicornServer,
        room: str,
        last_event_id: str | None = None,
        lines: list[str] | None = None,
    ) -> None:
        headers = {} if last_event_id is None else {"Last-Event-ID": last_event_id}
        self.stream = RawHTTPStream(server.port, f"/sse?room={room}", headers=headers)
        assert self.stream.status == 200, self.stream.status
        self._events = self.stream.events(timeout=10)
        self.lines = list(lines or [])
        self.full_states = 0
        self.resumed: bool | None = None
        self.pid: int | None = None

    @property
    def last_event_id(self) -> str | None:
        return self.stream.parser.last_event_id

    def read_until(self, condition: Any, what: str, timeout: float = 15.0) -> None:
        """Apply events until *condition()* holds; fail after *timeout* seconds."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                pytest.fail(f"Timed out waiting for {what}; the tab has {self.lines}.")
            event = next(self._events)
            if event.event == "datastar-patch-elements":
                found = LI.findall(event.elements or "")
                if event.datavalue("mode") == "append":
                    self.lines += found
                else:
                    self.lines = found
                    self.full_states += 1
            elif event.event == "datastar-patch-signals":
                signals = json.loads(event.datavalue("signals") or "{}")
                self.resumed, self.pid = signals["resumed"], signals["pid"]

    def opened(self) -> Tab:
        """Read the stream's first events: up to the signals that say if it resumed."""
        self.read_until(lambda: self.resumed is not None, "the stream's first events")
        return self

    def close(self) -> None:
        self.stream.close()


def append(server: GunicornServer, room: str, text: str) -> None:
    status, _, body = post(f"{server.url}/append?room={room}&text={text}")
    assert status == 200, body


@pytest.fixture(scope="module", params=["one worker", "three workers via Redis"])
def server(request: pytest.FixtureRequest) -> Iterator[GunicornServer]:
    """The resume app under real gunicorn: its logs in the process, or in a real Redis."""
    env = {}
    workers = 1
    if request.param != "one worker":
        env["FLASK_DATASTAR_REDIS_URL"] = request.getfixturevalue("redis_module").url
        workers = 3
    with GunicornServer(
        "tests.live_apps.resume_app:app", workers=workers, threads=8, env=env
    ) as running:
        yield running


@pytest.mark.live
def test_a_tab_cut_for_5_s_during_50_appends_ends_with_exactly_the_50_lines(
    server: GunicornServer,
) -> None:
    cut_for_5_s_during_50_appends(server)


def cut_for_5_s_during_50_appends(server: GunicornServer) -> None:
    """The issue's scenario: a tab away for 5 s while 50 lines are appended gets them all.

    With several workers, the tab comes back on another worker than before.
    """
    room = "big"
    expected = [f"line-{n:02d}" for n in range(1, 51)]
    tab = Tab(server, room)
    tab.read_until(lambda: tab.resumed is False, "the first state")
    assert tab.lines == [] and tab.full_states == 1
    for text in expected[:10]:
        append(server, room, text)
    tab.read_until(lambda: len(tab.lines) == 10, "the first ten lines")
    last_event_id, first_pid = tab.last_event_id, tab.pid
    assert parse_event_id(last_event_id) is not None
    tab.close()  # the network blip

    # The other 40 lines come during the 5 s cut, the last ones while the tab reconnects.
    def poster() -> None:
        for text in expected[10:]:
            append(server, room, text)
            time.sleep(5.3 / 40)

    thread = threading.Thread(target=poster)
    thread.start()
    try:
        time.sleep(5.0)  # the scenario: the tab is away for 5 s
        # With three workers, reconnect until the tab lands on another worker than
        # before: the ids and the log it resumes from are then another process's too.
        for _ in range(20):
            back = Tab(server, room, last_event_id, tab.lines).opened()
            if server.workers == 1 or back.pid != first_pid:
                break
            back.close()
    finally:
        thread.join()
    try:
        assert back.resumed is True and back.full_states == 0
        if server.workers > 1:
            assert back.pid != first_pid, "every reconnection landed on the same worker"
        back.read_until(lambda: len(back.lines) >= 50, "the 50 lines")
        assert back.lines == expected
        # Nothing more arrives (no repeat): a fresh tab agrees with it.
        fresh = Tab(server, room)
        fresh.read_until(lambda: fresh.resumed is False, "a fresh tab")
        fresh.close()
        assert fresh.lines == expected
        append(server, room, "after")
        back.read_until(lambda: len(back.lines) > 50, "the next line")
        assert back.lines == [*expected, "after"]
    finally:
        back.close()


@pytest.mark.live
def test_a_gap_older_than_the_log_gets_the_full_state(server: GunicornServer) -> None:
    room = "small"  # ReplayLog(max_events=5, max_age=1)
    tab = Tab(server, room)
    tab.read_until(lambda: tab.resumed is False, "the first state")
    before = list(tab.lines)
    append(server, room, "seen")
    tab.read_until(lambda: tab.lines == [*before, "seen"], "the first line")
    last_event_id = tab.last_event_id
    tab.close()
    time.sleep(1.2)  # the scenario: away for longer than the log keeps events
    missed = [f"missed-{n}" for n in range(6)]
    for text in missed:
        append(server, room, text)
    back = Tab(server, room, last_event_id, tab.lines)
    try:
        back.read_until(lambda: back.resumed is not None, "the stream")
        assert back.resumed is False and back.full_states == 1
        assert back.lines == [*before, "seen", *missed]
    finally:
        back.close()


@pytest.mark.live
@pytest.mark.parametrize("last_event_id", ["garbage", "0-0", "99999999999999999999-1", "1-2-3"])
def test_an_unknown_or_malformed_last_event_id_gets_the_full_state(
    server: GunicornServer, last_event_id: str
) -> None:
    fresh = Tab(server, "big")
    fresh.read_until(lambda: fresh.resumed is False, "a fresh tab")
    fresh.close()
    tab = Tab(server, "big", last_event_id, ["stale"])
    try:
        tab.read_until(lambda: tab.resumed is not None, "the stream")
        assert tab.resumed is False and tab.full_states == 1
        assert tab.lines == fresh.lines
    finally:
        tab.close()
