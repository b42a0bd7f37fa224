"""The connection registry: membership, broadcasts, unicast, coalescing, a stress test."""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from flask_datastar import SSE, SSERegistry, Stream, StreamClosed, sse_stream
from flask_datastar.bus import LocalBus
from flask_datastar.testing import parse_events
from tests.helpers import ConnectionClosed, GunicornServer, RawHTTPStream, post


def new_stream() -> Stream:
    """A stream that is not served: what it is sent waits in its queue."""
    return Stream({})


def sent(gen: Stream) -> list[Any]:
    data = gen._transport.take()  # type: ignore[union-attr]
    return [e.signals for e in parse_events(data)]


@pytest.fixture
def registry() -> Iterator[SSERegistry]:
    reg = SSERegistry("test")
    yield reg
    reg.close()


def test_membership(registry: SSERegistry) -> None:
    a, b, c = new_stream(), new_stream(), new_stream()
    assert registry.register(a) is a
    registry.register(b, key="user-1")
    registry.register(c, key="user-1")
    assert len(registry) == registry.count == 3
    assert registry.snapshot() == [a, b, c]
    assert registry.snapshot("user-1") == [b, c]
    assert registry.keys() == ["user-1"]
    assert b in registry and b.key == "user-1"
    # Registering again only changes the key.
    registry.register(b, key="user-2")
    assert len(registry) == 3
    assert registry.snapshot("user-1") == [c] and registry.snapshot("user-2") == [b]
    assert registry.unregister(b) is True
    assert registry.unregister(b) is False
    assert registry.keys() == ["user-1"]
    registry.unregister(a)
    registry.unregister(c)
    assert len(registry) == 0 and registry.keys() == []


def test_notify_subscribers_drops_only_the_failed(registry: SSERegistry) -> None:
    good, gone, good2 = new_stream(), new_stream(), new_stream()
    for gen in (good, gone, good2):
        registry.register(gen)
    gone.close()
    failed = registry.notify_subscribers(lambda gen: gen.patch_signals({"n": 1}))
    assert failed == [gone]
    assert registry.snapshot() == [good, good2]
    assert sent(good) == [{"n": 1}] and sent(good2) == [{"n": 1}]


def test_notify_subscriber_by_key(registry: SSERegistry) -> None:
    a, b = new_stream(), new_stream()
    registry.register(a, key=1)
    registry.register(b, key=2)
    assert registry.notify_subscriber(2, lambda gen: gen.patch_signals({"to": 2})) == 1
    assert registry.notify_subscriber(3, lambda gen: gen.patch_signals({"to": 3})) == 0
    assert sent(a) == [] and sent(b) == [{"to": 2}]


def test_broadcast_and_send_to_are_delivered_in_order(registry: SSERegistry) -> None:
    streams = [new_stream() for _ in range(5)]
    for i, gen in enumerate(streams):
        registry.register(gen, key=i % 2)
    for n in range(50):
        registry.broadcast(SSE.patch_signals({"n": n}))
    registry.send_to(1, SSE.patch_signals({"odd": True}))
    assert registry.flush(5)
    for i, gen in enumerate(streams):
        expected: list[Any] = [{"n": n} for n in range(50)]
        if i % 2:
            expected.append({"odd": True})
        assert sent(gen) == expected
    with pytest.raises(ValueError, match="needs a key"):
        registry.send_to(None, "x")


def test_broadcast_prunes_ended_streams(registry: SSERegistry) -> None:
    alive, ended = new_stream(), new_stream()
    registry.register(alive)
    registry.register(ended)
    ended.close()
    registry.broadcast(SSE.patch_signals({"a": 1}))
    assert registry.flush(5)
    assert registry.snapshot() == [alive]


class SlowStream:
    """Stands in for a stream whose writes block, to hold the broadcaster busy."""

    def __init__(self) -> None:
        self.key = None
        self.closed = False
        self._registries: set[SSERegistry] = set()
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.received: list[bytes] = []

    def send(self, chunk: Any) -> None:
        self.entered.set()
        self.gate.wait(5)
        self.received.append(chunk.data)


def test_coalesced_broadcasts_keep_only_the_newest_waiting(registry: SSERegistry) -> None:
    slow = SlowStream()
    registry.register(slow)  # type: ignore[arg-type]
    registry.broadcast("first\n\n", coalesce="content")
    assert slow.entered.wait(5)  # the broadcaster is now stuck writing "first"
    for n in range(10):
        registry.broadcast(f"content {n}\n\n", coalesce="content")
        registry.broadcast(f"log {n}\n\n")  # not coalesced: every one arrives
    slow.gate.set()
    assert registry.flush(5)
    # The newest content takes the place of the older ones, at its own turn.
    logs = [f"log {n}\n\n".encode() for n in range(10)]
    assert slow.received == [b"first\n\n", *logs[:9], b"content 9\n\n", logs[9]]


def test_an_ended_stream_leaves_its_registries(app: Flask) -> None:
    registry = SSERegistry("self-cleaning")

    @app.get("/s")
    @sse_stream(on_connect=registry.register)  # no on_disconnect on purpose
    def handler(gen: Stream) -> Iterator[Any]:
        yield gen.sleep()

    response = app.test_client().get("/s", buffered=False)
    next(iter(response.response))
    assert len(registry) == 1
    response.close()
    assert len(registry) == 0
    registry.close()


def test_stress_many_threads(registry: SSERegistry) -> None:
    """Threads register, unregister and broadcast for two seconds: nothing lost or doubled."""
    stop = time.monotonic() + 2.0
    errors: list[BaseException] = []
    owned: list[list[Stream]] = [[] for _ in range(8)]

    def churn(mine: list[Stream], seed: int) -> None:
        rnd = random.Random(seed)
        try:
            while time.monotonic() < stop:
                if mine and rnd.random() < 0.45:
                    gen = mine.pop(rnd.randrange(len(mine)))
                    assert registry.unregister(gen) is True
                else:
                    gen = registry.register(new_stream(), key=rnd.randrange(4) or None)
                    mine.append(gen)
                if rnd.random() < 0.2:
                    registry.notify_subscribers(lambda g: g.patch_signals({"sync": 1}))
                if rnd.random() < 0.2:
                    registry.broadcast(SSE.patch_signals({"async": 1}))
                if rnd.random() < 0.1:
                    registry.send_to(rnd.randrange(1, 4), SSE.patch_signals({"key": 1}))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=churn, args=(owned[i], i)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    everyone = [gen for mine in owned for gen in mine]
    # Exactly the streams still owned are registered, each once.
    assert sorted(map(id, registry.snapshot())) == sorted(map(id, everyone))
    for key in registry.keys():
        assert all(gen.key == key for gen in registry.snapshot(key))
    for gen in everyone:
        registry.unregister(gen)
    assert registry.flush(10)
    assert len(registry) == 0 and registry.keys() == []
    # Queued events were only ever written to streams, never raised to the callers.
    assert not any(isinstance(e, StreamClosed) for e in errors)


# --- issue 8: coalescing per recipient, failing callbacks, the broadcaster's life -------


class Recorder(SlowStream):
    """A stand-in stream that records what it is sent, without blocking."""

    def __init__(self) -> None:
        super().__init__()
        self.gate.set()
        self.reconnect: bool | None = None

    def close(self, reconnect: bool = False) -> None:
        self.closed = True
        self.reconnect = reconnect


def texts(stream: SlowStream) -> list[str]:
    return [data.decode() for data in stream.received]


def coalescing_scenario(publisher: SSERegistry, receiver: SSERegistry) -> dict[str, list[str]]:
    """Queue coalesced broadcasts and unicasts behind a blocked stream; return what arrived."""
    blocker, alice, bob = SlowStream(), Recorder(), Recorder()
    receiver.register(blocker, key="blocker")  # type: ignore[arg-type]
    receiver.register(alice, key="alice")  # type: ignore[arg-type]
    receiver.register(bob, key="bob")  # type: ignore[arg-type]
    publisher.send_to("blocker", "hold\n\n")
    assert blocker.entered.wait(5)  # the broadcaster is stuck: what follows waits in the queue
    publisher.broadcast("board for all\n\n", coalesce="board")
    publisher.send_to("bob", "board for bob\n\n", coalesce="board")
    publisher.send_to("alice", "alice 1\n\n", coalesce="board")
    publisher.send_to("alice", "alice 2\n\n", coalesce="board")
    blocker.gate.set()
    assert receiver.flush(5)
    return {"blocker": texts(blocker), "alice": texts(alice), "bob": texts(bob)}


EXPECTED_PER_RECIPIENT = {
    # Each recipient's newest event survives and arrives last; a unicast never drops a
    # broadcast, nor another key's unicast; alice's second unicast supersedes her first.
    "blocker": ["hold\n\n", "board for all\n\n"],
    "alice": ["board for all\n\n", "alice 2\n\n"],
    "bob": ["board for all\n\n", "board for bob\n\n"],
}


def test_coalescing_keeps_the_newest_event_for_each_recipient(registry: SSERegistry) -> None:
    assert coalescing_scenario(registry, registry) == EXPECTED_PER_RECIPIENT


def test_coalescing_keeps_the_newest_event_for_each_recipient_across_a_bus() -> None:
    bus = LocalBus()
    here, there = SSERegistry("coalesce", bus=bus), SSERegistry("coalesce", bus=bus)
    here.register(Recorder())  # type: ignore[arg-type]  # so that both listen
    try:
        assert coalescing_scenario(here, there) == EXPECTED_PER_RECIPIENT
    finally:
        here.close()
        there.close()


def render_failing_for_bad(gen: Stream) -> None:
    if gen.key == "bad":
        raise ValueError("a template bug")
    gen.patch_signals({"rendered": True})


@pytest.mark.parametrize("call", ["notify_subscribers", "notify_subscriber"])
def test_a_stream_whose_callback_raised_is_ended_so_that_it_reconnects(
    registry: SSERegistry, call: str, caplog: pytest.LogCaptureFixture
) -> None:
    good = registry.register(new_stream(), key="good")
    bad = registry.register(new_stream(), key="bad")
    with caplog.at_level(logging.WARNING, logger="flask_datastar"):
        if call == "notify_subscribers":
            assert registry.notify_subscribers(render_failing_for_bad) == [bad]
        else:
            assert registry.notify_subscriber("bad", render_failing_for_bad) == 0
    # Not left open and deaf to every later broadcast: ended, so that its client reconnects
    # and gets the full state from the stream handler.
    assert bad.closed and bad not in registry
    assert registry.snapshot() == [good] and not good.closed
    # The application's bug is logged with its traceback.
    assert "Traceback" in caplog.text and "ValueError: a template bug" in caplog.text


def test_a_stream_whose_send_raised_in_the_broadcaster_is_ended(
    registry: SSERegistry, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(Recorder):
        def send(self, chunk: Any) -> None:
            raise UnicodeError("a broken stream")

    broken, fine = Broken(), Recorder()
    registry.register(broken)  # type: ignore[arg-type]
    registry.register(fine)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="flask_datastar"):
        registry.broadcast("x\n\n")
        assert registry.flush(5)
    assert broken.closed and broken.reconnect is True
    assert registry.snapshot() == [fine] and texts(fine) == ["x\n\n"]
    assert "Traceback" in caplog.text and "a broken stream" in caplog.text


FAILING_APP = """
from flask import Flask
from flask_datastar import FlaskDatastar

app = Flask(__name__)
datastar = FlaskDatastar(app)
clients = datastar.registry(app, "failing")


@app.get("/sse")
@datastar.sse(on_connect=lambda gen: clients.register(gen, key=gen.environ["QUERY_STRING"]))
def sse(gen):
    gen.patch_signals({"who": gen.key})
    yield gen.sleep()


@app.post("/render")
def render():
    def each(gen):
        if gen.key == "bad":
            raise ValueError("a template bug")
        gen.patch_signals({"rendered": True})

    return {"failed": len(clients.notify_subscribers(each))}
"""


@pytest.mark.live
def test_a_tab_whose_render_raised_sees_an_abrupt_end_and_reconnects(tmp_path: Path) -> None:
    (tmp_path / "failing_app.py").write_text(FAILING_APP)
    with GunicornServer("failing_app:app", env={"PYTHONPATH": str(tmp_path)}) as server:
        with RawHTTPStream(server.port, "/sse?good") as good:
            with RawHTTPStream(server.port, "/sse?bad") as bad:
                good_events, bad_events = good.events(timeout=10), bad.events(timeout=10)
                assert next(good_events).signals == {"who": "good"}
                assert next(bad_events).signals == {"who": "bad"}
                status, _, body = post(server.url + "/render")
                assert status == 200 and json.loads(body) == {"failed": 1}
                assert next(good_events).signals == {"rendered": True}
                # The connection is cut without the terminating chunk: Datastar reconnects.
                with pytest.raises(ConnectionClosed):
                    next(bad_events)
        assert "ValueError: a template bug" in server.log_text()


def broadcasters(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"flask_datastar-broadcaster-{name}"]


def test_close_after_its_timeout_never_leaves_two_broadcasters() -> None:
    registry = SSERegistry("stuck")
    slow = SlowStream()
    registry.register(slow)  # type: ignore[arg-type]
    registry.broadcast("1\n\n")
    assert slow.entered.wait(5)  # the broadcaster is stuck in a send
    registry.close(timeout=0.05)  # gives up waiting for it
    registry.broadcast("2\n\n")
    registry.broadcast("3\n\n")
    # The stuck thread still owns the queue: no second one was started beside it.
    assert len(broadcasters("stuck")) == 1
    slow.gate.set()
    assert registry.flush(5)
    assert texts(slow) == ["1\n\n", "2\n\n", "3\n\n"]
    assert len(broadcasters("stuck")) <= 1
    registry.close()
    assert broadcasters("stuck") == []


def test_an_idle_broadcaster_exits_and_comes_back_on_the_next_event() -> None:
    registry = SSERegistry("idle", linger=0.05)
    tab = Recorder()
    registry.register(tab)  # type: ignore[arg-type]
    for round_ in range(3):
        registry.broadcast(f"{round_}\n\n")
        assert registry.flush(5)
        assert len(broadcasters("idle")) <= 1
        wait_for(lambda: broadcasters("idle") == [], what="the idle broadcaster to exit")
    assert texts(tab) == ["0\n\n", "1\n\n", "2\n\n"]


def wait_for(condition: Any, timeout: float = 10.0, what: str = "") -> None:
    """Poll *condition* until it is true; fail the test after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"Timed out after {timeout} s waiting for {what or condition}.")
        time.sleep(0.02)
