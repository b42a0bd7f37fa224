"""Redis beyond one node: Sentinel (with a failover) and Redis Cluster (sharded pub/sub).

Each test starts its own servers on free loopback ports (``redis-server`` as primary,
replica, sentinel or cluster node; ``redis-cli --cluster create``) and stops them,
then runs ``gunicorn -k gthread -w 2`` with a small app written to a temporary
directory, whose ``DATASTAR_REDIS_URL`` is a ``redis+sentinel://`` or
``redis+cluster://`` URL. Waits are bounded polls, never timing assertions.
"""

from __future__ import annotations

import subprocess
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from flask_datastar.bus import RedisBus, sentinel_supported
from tests.helpers import (
    GunicornServer,
    RawHTTPStream,
    free_port,
    post,
    require_module,
    require_tool,
)

pytestmark = [pytest.mark.redis, pytest.mark.live]


def wait_for(condition: Callable[[], object], timeout: float = 15.0, what: str = "") -> Any:
    """Poll *condition* until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = condition()
        except Exception:
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"Timed out after {timeout} s waiting for {what or condition}.")
        time.sleep(0.05)


# --- servers -------------------------------------------------------------------------------


class RedisProcess:
    """One ``redis-server`` (or sentinel) with extra config lines, in its own directory."""

    def __init__(self, workdir: Path, lines: list[str], sentinel: bool = False) -> None:
        self.port = free_port()
        self.dir = workdir / str(self.port)
        self.dir.mkdir()
        config = [
            f"port {self.port}",
            "bind 127.0.0.1",
            "daemonize no",
            f"dir {self.dir}",
            *([] if sentinel else ['save ""', "appendonly no"]),
            *lines,
        ]
        self.config = self.dir / "redis.conf"  # a sentinel rewrites it: it must be its own
        self.config.write_text("\n".join(config) + "\n")
        command = [require_tool("redis-server"), str(self.config)]
        if sentinel:
            command.append("--sentinel")
        self.log = self.dir / "redis.log"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        redis = require_module("redis")
        self.client = redis.Redis(port=self.port, socket_timeout=2, decode_responses=True)
        wait_for(self.ping, 10, f"redis-server on port {self.port}:\n{self.log_text()}")

    def ping(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"redis-server on port {self.port} exited:\n{self.log_text()}")
        try:
            return bool(self.client.ping())
        except Exception:
            return False

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.client.close()


@pytest.fixture
def processes() -> Iterator[Callable[..., RedisProcess]]:
    """Start redis-server processes; every one is stopped after the test."""
    started: list[RedisProcess] = []
    with tempfile.TemporaryDirectory(prefix="redis-topology-") as workdir:

        def start(lines: list[str], sentinel: bool = False) -> RedisProcess:
            started.append(RedisProcess(Path(workdir), lines, sentinel))
            return started[-1]

        try:
            yield start
        finally:
            for process in started:
                process.stop()


# --- the app and its tabs ----------------------------------------------------------------

APP = textwrap.dedent(
    """
    import os
    from flask import Flask, request
    from flask_datastar import SSE, FlaskDatastar

    app = Flask(__name__)
    app.config["DATASTAR_REDIS_URL"] = os.environ["TOPOLOGY_REDIS_URL"]
    app.config["DATASTAR_HEARTBEAT"] = 2.0
    datastar = FlaskDatastar(app)

    def resync(gen):
        gen.patch_signals({"resync": os.getpid()})

    def room():
        name = "room-" + request.args.get("room", "main")
        return datastar.registry(app, name, on_resync=resync)

    @app.get("/sse")
    @datastar.sse(on_connect=lambda gen: room().register(gen))
    def sse(gen):
        gen.patch_signals({"pid": os.getpid()})
        yield gen.sleep(None)

    @app.post("/say")
    def say():
        room().broadcast(SSE.patch_signals({"said": request.args["text"]}))
        return {"pid": os.getpid()}
    """
)


@pytest.fixture
def topology_app(tmp_path: Path) -> Callable[[str], GunicornServer]:
    """A gunicorn server (2 workers) running APP against the given Redis URL."""
    (tmp_path / "topology_app.py").write_text(APP)

    def make(url: str) -> GunicornServer:
        return GunicornServer(
            "topology_app:app",
            workers=2,
            threads=48,
            cwd=tmp_path,
            env={"TOPOLOGY_REDIS_URL": url},
        )

    return make


class Tab:
    """One open stream of a room; ``pid`` is the worker that holds it."""

    def __init__(self, port: int, room: str) -> None:
        self.room = room
        self.stream = RawHTTPStream(port, f"/sse?room={room}")
        assert self.stream.status == 200, self.stream.status
        self._events = self.stream.events(timeout=20)
        self.pid = int(self.next()["pid"])

    def next(self) -> Any:
        """The next signals, within 20 s (heartbeats alone would keep the stream alive)."""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            event = next(self._events)
            if event.event == "datastar-patch-signals":
                return event.signals
        pytest.fail(f"No signals for 20 s on a tab of worker {getattr(self, 'pid', '?')}.")

    def next_said(self) -> Any:
        """The next broadcast, past any resync."""
        signals = self.next()
        while "resync" in signals:
            signals = self.next()
        return signals


@pytest.fixture
def tabs() -> Iterator[list[Tab]]:
    opened: list[Tab] = []
    yield opened
    for tab in opened:
        tab.stream.close()


def open_tabs(port: int, rooms: list[str], tabs: list[Tab]) -> None:
    """Open tabs in every room until each room has tabs in both workers (at most 60)."""
    while True:
        workers = {room: {tab.pid for tab in tabs if tab.room == room} for room in rooms}
        short = [room for room in rooms if len(workers[room]) < 2]
        if not short:
            return
        if len(tabs) >= 60:
            pytest.fail(f"60 streams did not reach both workers in every room: {workers}")
        tabs.append(Tab(port, short[0]))


def say_to_every_room(url: str, tabs: list[Tab], rooms: list[str], text: str) -> None:
    """Broadcast *text* in each room; each tab of a room gets it, whatever its worker."""
    for room in rooms:
        status, _, _ = post(f"{url}/say?room={room}&text={text}-{room}")
        assert status == 200
    for tab in tabs:
        assert tab.next_said() == {"said": f"{text}-{tab.room}"}


# --- Sentinel -----------------------------------------------------------------------------


def test_sentinel_url_carries_broadcasts_across_workers_and_through_a_failover(
    processes: Callable[..., RedisProcess],
    topology_app: Callable[[str], GunicornServer],
    tabs: list[Tab],
) -> None:
    primary = processes([])
    if not sentinel_supported():
        # redis-py 5.0.0 (the lowest supported) cannot subscribe through Sentinel.
        with pytest.raises(RuntimeError, match="redis-py 5.0.1 or newer"):
            RedisBus(f"redis+sentinel://127.0.0.1:{primary.port}/mymaster")
        return
    replica = processes([f"replicaof 127.0.0.1 {primary.port}"])
    wait_for(
        lambda: replica.client.info("replication")["master_link_status"] == "up",
        what="the replica to sync",
    )
    sentinel = processes(
        [
            f"sentinel monitor mymaster 127.0.0.1 {primary.port} 1",
            "sentinel down-after-milliseconds mymaster 500",
            "sentinel failover-timeout mymaster 5000",
        ],
        sentinel=True,
    )
    wait_for(
        lambda: sentinel.client.sentinel_slaves("mymaster"),
        what="the sentinel to see the replica",
    )
    url = f"redis+sentinel://127.0.0.1:{sentinel.port}/mymaster/0"
    with topology_app(url) as server:
        open_tabs(server.port, ["main"], tabs)
        say_to_every_room(server.url, tabs, ["main"], "before")

        # The primary dies; the sentinel promotes the replica, and every worker's
        # listener and publisher find it by asking the sentinel again.
        primary.stop()
        wait_for(
            lambda: (
                int(sentinel.client.sentinel_get_master_addr_by_name("mymaster")[1]) == replica.port
            ),
            timeout=20,
            what="the sentinel to promote the replica",
        )
        # Every tab is resynced once its worker subscribes on the new primary.
        for tab in tabs:
            assert tab.next() == {"resync": tab.pid}
        assert replica.client.pubsub_numsub("flask_datastar:room-main") == [
            ("flask_datastar:room-main", 2)
        ]
        say_to_every_room(server.url, tabs, ["main"], "after")
        assert "lost the Redis subscription" in server.log_text()


def test_an_apps_sentinel_client_carries_the_bus(
    processes: Callable[..., RedisProcess],
) -> None:
    redis = require_module("redis")
    primary = processes([])
    if not sentinel_supported():
        client = redis.sentinel.Sentinel([("127.0.0.1", 1)]).master_for("mymaster")
        with pytest.raises(RuntimeError, match="redis-py 5.0.1 or newer"):
            RedisBus(client=client)
        return
    sentinel = processes([f"sentinel monitor mymaster 127.0.0.1 {primary.port} 1"], sentinel=True)
    wait_for(lambda: sentinel.client.sentinel_masters(), what="the sentinel to start")
    app_client = redis.sentinel.Sentinel([("127.0.0.1", sentinel.port)]).master_for(
        "mymaster", socket_timeout=2, decode_responses=True
    )
    here, there = RedisBus(client=app_client), RedisBus(client=app_client)
    try:
        received: list[bytes] = []
        there.subscribe("flask_datastar:s", received.append, lambda: None)
        here.publish("flask_datastar:s", b'{"e":"x"}')
        wait_for(lambda: received == [b'{"e":"x"}'], what="the message")
        assert here.client is app_client
        # The listener has a connection of its own (the sentinel holds another).
        names = [c["name"] for c in primary.client.client_list(_type="pubsub")]
        assert [name for name in names if "sentinel" not in name] == ["flask_datastar:listener"]
    finally:
        here.close()
        there.close()
        app_client.close()


# --- Redis Cluster ------------------------------------------------------------------------


def start_cluster(
    processes: Callable[..., RedisProcess], nodes: int = 3, replicas: int = 0
) -> list[RedisProcess]:
    """Start *nodes* cluster nodes and join them with ``redis-cli --cluster create``.

    :param replicas: replicas per primary (``--cluster-replicas``).
    """
    started = [
        processes(
            ["cluster-enabled yes", f"cluster-port {free_port()}", "cluster-node-timeout 2000"]
        )
        for _ in range(nodes)
    ]
    result = subprocess.run(
        [
            require_tool("redis-cli", "redis-tools"),
            "--cluster",
            "create",
            *(f"127.0.0.1:{node.port}" for node in started),
            *(["--cluster-replicas", str(replicas)] if replicas else []),
            "--cluster-yes",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for node in started:
        wait_for(
            lambda node=node: "cluster_state:ok" in node.client.execute_command("CLUSTER", "INFO"),
            what=f"the cluster state on {node.port}",
        )
    return started


@pytest.fixture
def cluster(processes: Callable[..., RedisProcess]) -> list[RedisProcess]:
    """Three primaries, no replica, slots split evenly by ``redis-cli --cluster create``."""
    return start_cluster(processes)


def rooms_on_every_shard(nodes: list[RedisProcess]) -> dict[str, RedisProcess]:
    """A room whose channel hashes to each node's slots, by name."""
    redis = require_module("redis")
    by_port = {node.port: node for node in nodes}
    slots = nodes[0].client.execute_command("CLUSTER", "SLOTS")
    owners: dict[str, RedisProcess] = {}
    for index in range(1000):
        room = f"r{index}"
        slot = redis.crc.key_slot(f"flask_datastar:room-{room}".encode())
        node = next(by_port[int(s[2][1])] for s in slots if s[0] <= slot <= s[1])
        if node not in owners.values():
            owners[room] = node
        if len(owners) == len(nodes):
            return owners
    pytest.fail("No room name found for every shard.")


def test_cluster_url_spreads_registries_over_shards_with_sharded_pubsub(
    cluster: list[RedisProcess],
    topology_app: Callable[[str], GunicornServer],
    tabs: list[Tab],
) -> None:
    owners = rooms_on_every_shard(cluster)
    rooms = list(owners)
    url = "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in cluster[:2])
    with topology_app(url) as server:
        open_tabs(server.port, rooms, tabs)
        say_to_every_room(server.url, tabs, rooms, "hello")

        # Each room's channel is a shard channel of the node that owns its slot, where
        # both workers subscribed (SSUBSCRIBE); nothing used cluster-wide SUBSCRIBE.
        for room, node in owners.items():
            channel = f"flask_datastar:room-{room}"
            assert node.client.execute_command("PUBSUB", "SHARDNUMSUB", channel) == [channel, 2]
            assert node.client.pubsub_numsub(channel) == [(channel, 0)]

        # One shard's subscriptions are cut: that shard's listeners reconnect and its
        # tabs are resynced; broadcasts go on reaching every tab.
        cut_room, cut_node = rooms[0], owners[rooms[0]]
        assert cut_node.client.client_kill_filter(_type="pubsub") == 2
        for tab in tabs:
            if tab.room == cut_room:
                assert tab.next() == {"resync": tab.pid}
        say_to_every_room(server.url, tabs, rooms, "again")


def test_a_tab_resumes_on_another_worker_through_a_cluster(cluster: list[RedisProcess]) -> None:
    # The replay log on a Redis Cluster: the capped stream lives in the slot of the
    # registry's channel, and the script that appends an event publishes it there with
    # SPUBLISH, which every worker's sharded listener hears. The scenario (a tab
    # away for 5 s during 50 appends, back on another of three workers) ends with exactly
    # the 50 lines. Before, a registry with a replay log refused a cluster bus.
    from tests.test_resume import cut_for_5_s_during_50_appends

    redis = require_module("redis")
    url = "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in cluster[:2])
    with GunicornServer(
        "tests.live_apps.resume_app:app",
        workers=3,
        threads=8,
        env={"FLASK_DATASTAR_REDIS_URL": url},
    ) as server:
        cut_for_5_s_during_50_appends(server)
        channel = "flask_datastar:resume-big"
        slot = redis.crc.key_slot(channel.encode())
        slots = cluster[0].client.execute_command("CLUSTER", "SLOTS")
        port = next(int(s[2][1]) for s in slots if s[0] <= slot <= s[1])
        [owner] = [node for node in cluster if node.port == port]
        assert owner.client.xlen("{" + channel + "}:replay") == 51  # 50 lines and "after"
        # Heard through sharded subscriptions (the workers that have a tab of the room),
        # nothing cluster-wide.
        assert owner.client.execute_command("PUBSUB", "SHARDNUMSUB", channel)[1] >= 1
        assert owner.client.pubsub_numsub(channel) == [(channel, 0)]


def test_an_apps_cluster_client_carries_the_bus(cluster: list[RedisProcess]) -> None:
    redis = require_module("redis")
    app_client = redis.cluster.RedisCluster(
        host="127.0.0.1", port=cluster[0].port, socket_timeout=2
    )
    # Two buses stand for two processes; one gets the client from a function.
    here, there = RedisBus(client=app_client), RedisBus(client=lambda: app_client)
    try:
        owners = rooms_on_every_shard(cluster)
        channels = [f"flask_datastar:room-{room}" for room in owners]
        received: list[bytes] = []
        for channel in channels:
            there.subscribe(channel, received.append, lambda: None)
        for channel in channels:
            here.publish(channel, channel.encode())
        wait_for(lambda: sorted(received) == sorted(c.encode() for c in channels))
        assert here.sharded and here.client is app_client and there.client is app_client
        # One listener per shard, each with the shard's channel and nothing cluster-wide.
        for channel, node in zip(channels, owners.values(), strict=True):
            assert node.client.execute_command("PUBSUB", "SHARDCHANNELS") == [channel]
    finally:
        here.close()
        there.close()
        app_client.close()


def test_a_registry_with_a_replay_log_outlives_an_unreachable_cluster(
    cluster: list[RedisProcess],
) -> None:
    # When no node of the cluster answers, redis-py raises RedisClusterException, which
    # is neither a RedisError nor an OSError. A broadcast must still reach this
    # process's streams (the others are told to resync later), and a tab coming back
    # with a Last-Event-ID must get the full state: neither may raise (a 500, and the
    # tab's reconnections a 500 loop). The same for a process whose first use of the
    # bus falls in the outage (a gunicorn worker recycled meanwhile).
    from flask_datastar import SSERegistry
    from flask_datastar.replay import ReplayLog
    from tests.test_resume import FakeStream

    event = SSE_LINE % "before"
    url = "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in cluster)
    up, fresh = RedisBus(url, connect_timeout=0.5), RedisBus(url, connect_timeout=0.5)
    try:
        registry = SSERegistry("outage", bus=up, replay=ReplayLog())
        watcher = FakeStream(None)
        registry.register(watcher)
        registry.broadcast(event)
        wait_for(lambda: watcher.received, what="the event before the outage")
        last_id = watcher.received[0].split(b"\n")[0].removeprefix(b"id: ").decode()

        for node in cluster:
            node.stop()

        registry.broadcast(SSE_LINE % "during")
        wait_for(lambda: b"during" in watcher.received[-1], what="the local delivery")
        back = FakeStream(last_id)
        registry.register(back)
        assert back.resumed is False and back.received == []

        late = SSERegistry("outage", bus=fresh, replay=ReplayLog())
        late.broadcast(SSE_LINE % "first use")
    finally:
        up.close()
        fresh.close()


def test_a_registry_whose_log_a_cluster_cannot_hold_says_so_at_its_broadcasts_only(
    cluster: list[RedisProcess],
) -> None:
    # A channel with braces cannot share a slot with the log's key. The broadcast (the
    # developer's command) says to rename the registry; a tab coming back with a
    # Last-Event-ID (any client may send one) gets the full state, not a 500 on each of
    # its reconnections.
    from flask_datastar import SSERegistry
    from flask_datastar.replay import ReplayLog
    from tests.test_resume import FakeStream

    url = "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in cluster)
    bus = RedisBus(url)
    try:
        registry = SSERegistry("room}1", bus=bus, replay=ReplayLog())
        back = FakeStream("1700000000000-0")
        registry.register(back)
        assert back.resumed is False and back.received == []
        with pytest.raises(ValueError, match="rename the registry"):
            registry.broadcast(SSE_LINE % "refused")
    finally:
        bus.close()


def test_a_tab_resumes_from_the_primary_when_the_app_reads_from_replicas(
    processes: Callable[..., RedisProcess],
) -> None:
    # An app's cluster client may send reads to replicas (redis-py's
    # load_balancing_strategy / read_from_replicas). A replica behind its primary
    # lacks the newest events: a tab resuming from it would get some of what it missed
    # and then the live events, with the rest silently lost (they were broadcast before
    # it registered). Here the owning shard's replica holds back replication (CLIENT
    # PAUSE WRITE) while two events are broadcast: the tab must get both.
    from flask_datastar import SSERegistry
    from flask_datastar.replay import ReplayLog
    from tests.test_resume import FakeStream

    redis = require_module("redis")
    nodes = start_cluster(processes, nodes=6, replicas=1)
    by_port = {node.port: node for node in nodes}
    channel = "flask_datastar:replicas"
    slot = redis.crc.key_slot(channel.encode())

    def replica() -> RedisProcess | None:
        for node in nodes:
            if "cluster_state:ok" not in node.client.execute_command("CLUSTER", "INFO"):
                return None
        for first, last, _, *replicas in nodes[0].client.execute_command("CLUSTER", "SLOTS"):
            if first <= slot <= last and replicas:
                found = by_port[int(replicas[0][1])]
                up = found.client.info("replication")["master_link_status"] == "up"
                return found if up else None
        return None

    lagging = wait_for(replica, what="the cluster with its replicas")
    try:
        from redis.cluster import LoadBalancingStrategy

        reads: dict[str, Any] = {
            "load_balancing_strategy": LoadBalancingStrategy.ROUND_ROBIN_REPLICAS
        }
    except ImportError:  # redis-py < 5.1
        reads = {"read_from_replicas": True}
    app_client = redis.cluster.RedisCluster(
        host="127.0.0.1", port=nodes[0].port, socket_timeout=2, **reads
    )
    bus = RedisBus(client=app_client)
    try:
        registry = SSERegistry("replicas", bus=bus, replay=ReplayLog())
        watcher = FakeStream(None)
        registry.register(watcher)
        registry.broadcast(SSE_LINE % "seen")
        wait_for(lambda: watcher.received, what="the first event")
        last_id = watcher.received[0].split(b"\n")[0].removeprefix(b"id: ").decode()
        reader = redis.Redis(port=lagging.port, single_connection_client=True)
        reader.execute_command("READONLY")  # (a cluster replica serves no read without it)
        try:
            wait_for(lambda: reader.xlen("{" + channel + "}:replay") == 1, what="replication")
        finally:
            reader.close()

        lagging.client.execute_command("CLIENT", "PAUSE", 20000, "WRITE")
        try:
            registry.broadcast(SSE_LINE % "missed 1")
            registry.broadcast(SSE_LINE % "missed 2")
            wait_for(lambda: len(watcher.received) == 3, what="the two events, live")
            back = FakeStream(last_id)
            registry.register(back)
        finally:
            lagging.client.execute_command("CLIENT", "UNPAUSE")
        if back.resumed:
            assert [b"missed 1" in e for e in back.received] == [True, False]
            assert b"missed 2" in back.received[1]
        else:
            assert back.received == []  # the full state, sent by the handler
    finally:
        bus.close()
        app_client.close()


SSE_LINE = "event: datastar-patch-elements\ndata: elements <p>%s</p>\n\n"
