"""An opt-in, lock-guarded registry of open streams, for the CQRS pattern.

Every tab holds one GET stream (the query side) and registers it here; short
POST commands change state and broadcast the new HTML to every registered
stream. As datastar-cl's ``registry``: the registry is thread-safe, prunes
streams whose sends fail, and never calls a stream under its lock.

Two ways to reach the streams:

- :meth:`SSERegistry.notify_subscribers` calls a function with every stream,
  in the caller's thread, as datastar-cl does;
- :meth:`SSERegistry.broadcast` and :meth:`SSERegistry.send_to` take an event
  that is already rendered, frame it once and hand it to the registry's
  broadcaster thread, so the command returns at once. Through a bus
  (:mod:`flask_datastar.bus`) they reach the streams of every process.
"""

from __future__ import annotations

import json
import logging
import operator
import os
import random
import threading
from collections import deque
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

from .stream import StreamClosed, check_event
from .transport import Chunk

if TYPE_CHECKING:
    from .bus import Bus
    from .stream import Stream

__all__ = ["SSERegistry"]

log = logging.getLogger("flask_datastar")

#: Without ``on_resync``, streams ended after a bus outage get a random retry delay
#: of up to this many seconds more, so the tabs do not all reconnect at once.
RESYNC_SPREAD = 2.0


class _Item:
    __slots__ = ("key", "chunk", "coalesce", "superseded", "to_key")

    def __init__(self, to_key: bool, key: Any, chunk: Chunk, coalesce: Hashable | None) -> None:
        self.to_key = to_key
        self.key = key
        self.chunk = chunk
        self.coalesce = coalesce
        self.superseded = False


class SSERegistry:
    """A named set of open streams that broadcasts and unicasts reach.

    :param name: the topic; with a bus, registries of the same name in every
        process form one audience.
    :param bus: carries :meth:`broadcast` and :meth:`send_to` to every
        process; ``None`` keeps them in this process.
    :param on_resync: called with every local stream after the bus lost
        messages (a Redis outage); it should send the full current state.
        It runs in the bus's listener thread. Without it such streams are
        ended abruptly, each with a random retry delay, so that their clients
        reconnect and get the full state from the stream handler.
    """

    def __init__(
        self,
        name: str = "default",
        *,
        bus: Bus | None = None,
        on_resync: Callable[[Stream], object] | None = None,
    ) -> None:
        self.name = name
        self.on_resync = on_resync
        self._lock = threading.Lock()
        self._streams: dict[Stream, Any] = {}
        self._by_key: dict[Any, dict[Stream, None]] = {}
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[_Item] = deque()
        self._latest: dict[Hashable, _Item] = {}
        self._busy = False
        self._thread: threading.Thread | None = None
        self._thread_pid = 0
        self._stopping = False
        self._bus: Bus | None = None
        # The process whose streams the bus feeds: subscribing is per process, and a
        # registry copied into a forked worker must subscribe again there.
        self._subscribed_pid: int | None = None
        self._subscribe_lock = threading.Lock()
        self._bus_down = False
        if bus is not None:
            self.attach_bus(bus)

    def __repr__(self) -> str:
        return f"<SSERegistry {self.name!r} streams={len(self)}>"

    # -- membership ---------------------------------------------------------------

    def register(self, gen: Stream, key: Any = None) -> Stream:
        """Add *gen*; with *key*, :meth:`send_to` and :meth:`notify_subscriber` can reach it.

        Call it in ``on_connect``, before the stream sends its initial state,
        so that no broadcast falls between the two. Registering a stream again
        only updates its key. A stream that ends is unregistered by itself.

        :param gen: the stream.
        :param key: any hashable (a user id, a tab id); a string, a number or
            a tuple of them when a bus carries unicasts between processes.
        """
        if self._bus is not None and self._subscribed_pid != os.getpid():
            self._subscribe()
        with self._lock:
            old = self._streams.get(gen)
            if gen in self._streams and old is not None:
                self._by_key.get(old, {}).pop(gen, None)
                if not self._by_key.get(old, True):
                    del self._by_key[old]
            self._streams[gen] = key
            if key is not None:
                self._by_key.setdefault(key, {})[gen] = None
        gen.key = key
        gen._registries.add(self)
        if gen.closed:
            # It ended before its registration was seen: do not keep it.
            self.unregister(gen)
        return gen

    def unregister(self, gen: Stream) -> bool:
        """Remove *gen*; return whether it was registered.

        :param gen: the stream.
        """
        with self._lock:
            if gen not in self._streams:
                return False
            key = self._streams.pop(gen)
            if key is not None:
                streams = self._by_key.get(key)
                if streams is not None:
                    streams.pop(gen, None)
                    if not streams:
                        del self._by_key[key]
        return True

    def snapshot(self, key: Any = None) -> list[Stream]:
        """Return the registered streams (those under *key* when given), in registration order.

        :param key: only the streams registered with this key.
        """
        with self._lock:
            if key is None:
                return list(self._streams)
            return list(self._by_key.get(key, ()))

    def keys(self) -> list[Any]:
        """Return the keys that have at least one stream registered."""
        with self._lock:
            return list(self._by_key)

    def __len__(self) -> int:
        return len(self._streams)

    def __contains__(self, gen: object) -> bool:
        return gen in self._streams

    @property
    def count(self) -> int:
        """The number of registered streams."""
        return len(self._streams)

    # -- calling every stream, in the caller's thread -------------------------------

    def notify_subscribers(self, fn: Callable[[Stream], object]) -> list[Stream]:
        """Call ``fn(gen)`` for every registered stream of this process; return the failed ones.

        The streams are read from a snapshot taken under the lock and called
        outside it. A stream for which *fn* raises is unregistered and
        returned; the others still get their call.

        :param fn: typically ``lambda gen: gen.patch_elements(html)``.
        """
        return self._call_each(self.snapshot(), fn)

    def notify_subscriber(self, key: Any, fn: Callable[[Stream], object]) -> int:
        """Call ``fn(gen)`` for the streams of this process registered under *key*.

        :param key: the key given to :meth:`register`.
        :param fn: the function to call.
        :return: the number of streams that were reached without error.
        """
        streams = self.snapshot(key)
        return len(streams) - len(self._call_each(streams, fn))

    def _call_each(self, streams: list[Stream], fn: Callable[[Stream], object]) -> list[Stream]:
        failed = []
        for gen in streams:
            try:
                fn(gen)
            except Exception as e:
                if not isinstance(e, StreamClosed):
                    log.warning("flask_datastar: dropping %r from %r: %r", gen, self, e)
                self.unregister(gen)
                failed.append(gen)
        return failed

    # -- rendered events, through the broadcaster thread -----------------------------

    def broadcast(self, event: str | bytes, *, coalesce: Hashable | None = None) -> None:
        """Send *event* to every registered stream (of every process, with a bus); return at once.

        The event is encoded and framed once, then written to each stream by
        the registry's broadcaster thread, in the order of the calls.

        :param event: a complete event, as built by :class:`~flask_datastar.SSE`.
        :param coalesce: an optional label for events where the newest
            supersedes the older ones (a "fat morph" of a whole region): an
            event still waiting when a newer one with the same label arrives
            is dropped, and the newer one takes its turn at the end of the
            queue. Leave it ``None`` for events that must all arrive.
        :raises ValueError: *event* is empty or does not end with a blank line.
        """
        self._publish(False, None, event, coalesce)

    def send_to(self, key: Any, event: str | bytes, *, coalesce: Hashable | None = None) -> None:
        """Send *event* to the streams registered under *key*, as :meth:`broadcast` does.

        :param key: the key given to :meth:`register`.
        :param event: a complete event.
        :param coalesce: as for :meth:`broadcast`.
        """
        if key is None:
            raise ValueError("'send_to' needs a key; use 'broadcast' to reach every stream.")
        self._publish(True, key, event, coalesce)

    def flush(self, timeout: float | None = 5.0) -> bool:
        """Wait until the broadcaster has written everything queued; return whether it has.

        :param timeout: seconds to wait at most.
        """
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)

    def close(self) -> None:
        """Stop the broadcaster thread and leave the bus (registered streams stay open)."""
        if self._bus is not None:
            if self._subscribed_pid == os.getpid():
                self._bus.unsubscribe(self._channel, self._on_bus_message)
            self._subscribed_pid = None
            self._bus = None
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)
        with self._cond:
            self._thread = None
            self._stopping = False

    def attach_bus(self, bus: Bus) -> None:
        """Send broadcasts and unicasts through *bus* from now on.

        The registry subscribes to the bus at its first :meth:`register` in
        each process, not here: a process that only publishes (a CLI
        command, a cron job, a task queue worker) never listens.

        :param bus: the bus shared by every process.
        """
        if self._bus is bus:
            return
        if self._bus is not None:
            raise RuntimeError(f"{self!r} already has a bus; create the registry once per name.")
        self._bus = bus
        if self._streams:
            self._subscribe()

    @property
    def bus(self) -> Bus | None:
        """The bus that carries broadcasts and unicasts, if any."""
        return self._bus

    @property
    def _channel(self) -> str:
        return f"flask_datastar:{self.name}"

    def _subscribe(self) -> None:
        # Streams that register while the first subscription is being confirmed wait
        # for it too, so none of them renders its first state before it can hear.
        with self._subscribe_lock:
            pid = os.getpid()
            bus = self._bus
            if bus is None or self._subscribed_pid == pid:
                return
            bus.subscribe(self._channel, self._on_bus_message, self._on_bus_gap)
            self._subscribed_pid = pid

    def _publish(
        self, to_key: bool, key: Any, event: str | bytes, coalesce: Hashable | None
    ) -> None:
        # Refused here, in the command that sent it, rather than on every stream.
        check_event(event)
        if isinstance(event, bytes):
            event = event.decode("utf-8")
        bus = self._bus
        if bus is None:
            self._enqueue(_Item(to_key, key, Chunk(event), coalesce))
            return
        message: dict[str, Any] = {"e": event}
        if to_key:
            message["k"] = key
        if coalesce is not None:
            message["c"] = coalesce
        try:
            payload = json.dumps(message, separators=(",", ":")).encode("utf-8")
        except TypeError:
            raise TypeError(
                "With a bus, keys and coalesce labels cross processes as JSON: use strings,"
                " numbers, or tuples of them."
            ) from None
        try:
            # Our own streams get it back through the bus, like every other process.
            bus.publish(self._channel, payload)
        except OSError as e:
            # The command goes on, and this process's streams still get the event;
            # the other processes resync when their subscriptions are back.
            if not self._bus_down:
                self._bus_down = True
                log.warning(
                    "flask_datastar: %r could not publish (%s); until the bus is back,"
                    " broadcasts reach this process's streams only.",
                    self,
                    e,
                )
            if self._streams:
                self._on_bus_message(payload)
            return
        if self._bus_down:
            self._bus_down = False
            log.warning("flask_datastar: %r publishes through the bus again.", self)

    def _on_bus_message(self, payload: bytes) -> None:
        message = json.loads(payload)
        self._enqueue(
            _Item(
                "k" in message,
                _hashable(message.get("k")),
                Chunk(message["e"]),
                _hashable(message.get("c")),
            )
        )

    def _on_bus_gap(self) -> None:
        """The bus lost messages: give every local stream the full state again."""
        # What arrived before the gap is written first, so it cannot overwrite the
        # fresh state.
        self.flush(5.0)
        for gen in self.snapshot():
            try:
                if self.on_resync is not None:
                    self.on_resync(gen)
                else:
                    # Every tab of every worker comes back after an outage: spread them.
                    delay = int(1000 + random.random() * RESYNC_SPREAD * 1000)
                    gen.send(f"retry: {delay}\n\n")
                    gen.close(reconnect=True)
            except Exception as e:
                if not isinstance(e, StreamClosed):
                    log.warning("flask_datastar: resync of %r failed: %r", gen, e)
                gen.close(reconnect=True)

    def _enqueue(self, item: _Item) -> None:
        with self._cond:
            if item.coalesce is not None:
                older = self._latest.get(item.coalesce)
                if older is not None:
                    older.superseded = True
                self._latest[item.coalesce] = item
            self._queue.append(item)
            # A worker forked after this registry broadcast has the thread object, not the thread.
            if self._thread is None or self._thread_pid != os.getpid():
                self._thread_pid = os.getpid()
                self._thread = threading.Thread(
                    target=self._run, name=f"flask_datastar-broadcaster-{self.name}", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._queue:
                    return
                item = self._queue.popleft()
                if item.coalesce is not None and self._latest.get(item.coalesce) is item:
                    del self._latest[item.coalesce]
                if item.superseded:
                    continue
                self._busy = True
            streams = self.snapshot(item.key) if item.to_key else self.snapshot()
            self._call_each(streams, operator.methodcaller("send", item.chunk))


def _hashable(value: Any) -> Any:
    """Turn the lists that JSON made of tuples back into tuples, so they work as keys."""
    if isinstance(value, list):
        return tuple(_hashable(item) for item in value)
    return value
