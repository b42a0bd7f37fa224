"""The connection registry: membership, broadcasts, unicast, coalescing, a stress test."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask

from flask_datastar import SSE, SSERegistry, Stream, StreamClosed, sse_stream
from flask_datastar.testing import parse_events


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
