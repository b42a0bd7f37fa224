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

A registry that nobody uses costs nothing: its broadcaster thread and its bus
subscription go away after ``linger`` idle seconds and come back when needed.
"""

from __future__ import annotations

import itertools
import json
import logging
import operator
import os
import random
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

from .stream import StreamClosed, check_event
from .transport import Chunk

if TYPE_CHECKING:
    from .bus import Bus
    from .stream import Stream

__all__ = ["SSERegistry"]

log = logging.getLogger(__name__)

#: Without ``on_resync``, streams ended after a bus outage get a random retry delay
#: of up to this many seconds more, so the tabs do not all reconnect at once.
RESYNC_SPREAD = 2.0

#: How many bus message ids a registry remembers to drop a repeated message (a publish
#: that redis-py retried after a timeout may reach Redis twice).
SEEN_MESSAGES = 4096

#: The default of :class:`SSERegistry`'s ``linger``.
LINGER = 5.0


class _Item:
    __slots__ = ("key", "chunk", "slot", "superseded", "to_key")

    def __init__(self, to_key: bool, key: Any, chunk: Chunk, coalesce: Hashable | None) -> None:
        self.to_key = to_key
        self.key = key
        self.chunk = chunk
        # An event supersedes only those that would reach the same recipients: a unicast
        # never drops a broadcast, nor another key's unicast.
        self.slot: Hashable | None = None if coalesce is None else (to_key, key, coalesce)
        self.superseded = False


class SSERegistry:
    """A named set of open streams that broadcasts and unicasts reach.

    An unused registry costs nothing: its broadcaster thread exits after
    *linger* seconds without work (the next event starts it again), and
    with a bus it leaves the bus's channel once it has had no stream for
    *linger* seconds (the next :meth:`register` joins it again). So one
    registry per chat room or per user is fine: get it with
    :meth:`FlaskDatastar.registry() <flask_datastar.FlaskDatastar.registry>`
    whenever it is needed.

    :param name: the topic; with a bus, registries of the same name in every
        process form one audience.
    :param bus: carries :meth:`broadcast` and :meth:`send_to` to every
        process; ``None`` keeps them in this process.
    :param on_resync: called with every local stream after the bus lost
        messages (a Redis outage, or a publish from another process that
        failed); it should send the full current state. It runs in the bus's
        listener thread. Without it such streams are ended abruptly, each
        with a random retry delay, so that their clients reconnect and get
        the full state from the stream handler.
    :param linger: seconds an idle broadcaster thread waits for more events
        before it exits, and seconds a registry without streams keeps its
        bus subscription (so that a tab reloading does not unsubscribe and
        subscribe again).
    """

    def __init__(
        self,
        name: str = "default",
        *,
        bus: Bus | None = None,
        on_resync: Callable[[Stream], object] | None = None,
        linger: float = LINGER,
    ) -> None:
        if not linger >= 0:
            raise ValueError(f"'linger' must be a number of seconds, 0 or more, not {linger!r}.")
        self.name = name
        self.on_resync = on_resync
        self.linger = linger
        self._lock = threading.Lock()
        self._streams: dict[Stream, Any] = {}
        self._by_key: dict[Any, dict[Stream, None]] = {}
        #: When the last stream left (``None`` while there are streams).
        self._empty_since: float | None = None
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[_Item] = deque()
        self._latest: dict[Hashable, _Item] = {}
        self._busy = False
        # The broadcaster: the last thread started, and whether it still takes work. A
        # thread clears _running under _cond when it decides to exit, so at most one
        # ever takes items from the queue.
        self._thread: threading.Thread | None = None
        self._thread_pid = 0
        self._running = False
        self._stopping = False
        self._bus: Bus | None = None
        # The process whose streams the bus feeds: subscribing is per process, and a
        # registry copied into a forked worker must subscribe again there.
        self._subscribed_pid: int | None = None
        self._subscribe_lock = threading.Lock()
        self._bus_down = False
        # Bus message ids: this registry's origin in this process, and a sequence.
        self._origin = ""
        self._origin_pid = 0
        self._sequence = itertools.count()
        self._seen: OrderedDict[str, None] = OrderedDict()
        # A publish failed: the other processes missed an event and must be told.
        self._resync_owed = False
        self._resync_lock = threading.Lock()
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
        With a bus, the first stream of this process (or the first after the
        registry left the bus for want of streams) waits until the bus
        confirms the subscription.

        :param gen: the stream.
        :param key: any hashable (a user id, a tab id); a string, a number or
            a tuple of them when a bus carries unicasts between processes.
        """
        with self._lock:
            old = self._streams.get(gen)
            if gen in self._streams and old is not None:
                self._by_key.get(old, {}).pop(gen, None)
                if not self._by_key.get(old, True):
                    del self._by_key[old]
            self._streams[gen] = key
            if key is not None:
                self._by_key.setdefault(key, {})[gen] = None
            self._empty_since = None
            # Read under the lock that the lingering unsubscribe takes to give it up:
            # either it sees this stream and stays, or this sees it gone and subscribes.
            subscribed = self._subscribed_pid == os.getpid()
        gen.key = key
        gen._registries.add(self)
        if self._bus is not None and not subscribed:
            self._subscribe()
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
            lingering = False
            if not self._streams:
                self._empty_since = time.monotonic()
                lingering = self._subscribed_pid == os.getpid()
        if lingering:
            # The broadcaster thread gives the bus subscription up after the linger.
            with self._cond:
                self._start_broadcaster_locked()
                self._cond.notify_all()
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
        returned; the others still get their call. Unless it had ended
        already (:class:`~flask_datastar.StreamClosed`), the error is logged
        with its traceback and the stream is ended with
        ``gen.close(reconnect=True)``: its client reconnects and gets the full
        state from the stream handler, instead of staying open and missing
        every later broadcast.

        :param fn: typically ``lambda gen: gen.patch_elements(html)``.
        """
        return self._call_each(self.snapshot(), fn)

    def notify_subscriber(self, key: Any, fn: Callable[[Stream], object]) -> int:
        """Call ``fn(gen)`` for the streams of this process registered under *key*.

        A stream for which *fn* raises is handled as by :meth:`notify_subscribers`.

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
            except StreamClosed:
                self.unregister(gen)
                failed.append(gen)
            except Exception:
                log.exception(
                    "flask_datastar: ending %r, which %r could not reach; its client"
                    " reconnects and gets the full state.",
                    gen,
                    self,
                )
                self.unregister(gen)
                failed.append(gen)
                gen.close(reconnect=True)
        return failed

    # -- rendered events, through the broadcaster thread -----------------------------

    def broadcast(self, event: str | bytes, *, coalesce: Hashable | None = None) -> None:
        """Send *event* to every registered stream (of every process, with a bus); return at once.

        The event is encoded and framed once, then written to each stream by
        the registry's broadcaster thread, in the order of the calls.

        :param event: a complete event, as built by :class:`~flask_datastar.SSE`.
        :param coalesce: an optional label for events where the newest
            supersedes the older ones (a "fat morph" of a whole region): an
            event still waiting when a newer one with the same label and the
            same recipients arrives is dropped, and the newer one takes its
            turn at the end of the queue. A broadcast supersedes only
            broadcasts, and a :meth:`send_to` only unicasts to the same key,
            so every stream still gets the newest event meant for it. Leave
            it ``None`` for events that must all arrive.
        :raises ValueError: *event* is empty or does not end with a blank line.
        """
        self._publish(False, None, event, coalesce)

    def send_to(self, key: Any, event: str | bytes, *, coalesce: Hashable | None = None) -> None:
        """Send *event* to the streams registered under *key*, as :meth:`broadcast` does.

        :param key: the key given to :meth:`register`.
        :param event: a complete event.
        :param coalesce: as for :meth:`broadcast`: it supersedes only unicasts
            to the same key with the same label.
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

    def close(self, timeout: float | None = 5.0) -> bool:
        """Leave the bus and stop the broadcaster thread once it has written what is queued.

        Registered streams stay open. The registry can still be used: the
        next event starts a broadcaster again, and never a second one beside
        a broadcaster that is still busy.

        :param timeout: seconds to wait for the broadcaster to finish.
        :return: whether it has finished; if not (a send blocked), it goes
            on with the queue, in order, and exits when it is done.
        """
        bus = self._bus
        if bus is not None:
            with self._subscribe_lock:
                if self._subscribed_pid == os.getpid():
                    bus.unsubscribe(self._channel, self._on_bus_message)
                self._subscribed_pid = None
                self._bus = None
        with self._cond:
            thread = self._thread if self._thread_pid == os.getpid() else None
            if thread is None:
                return True
            if self._running:
                self._stopping = True
                self._cond.notify_all()
        if thread is threading.current_thread():
            return False  # (called from a stream's send: it stops when this returns)
        thread.join(timeout)
        return not thread.is_alive()

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
            with self._lock:
                self._subscribed_pid = pid

    def _unsubscribe_if_unused(self) -> None:
        """Leave the bus if the registry has had no stream for *linger* seconds."""
        with self._subscribe_lock:
            with self._lock:
                bus = self._bus
                if (
                    bus is None
                    or self._streams
                    or self._subscribed_pid != os.getpid()
                    or self._empty_since is None
                    or time.monotonic() < self._empty_since + self.linger
                ):
                    return
                self._subscribed_pid = None
            try:
                bus.unsubscribe(self._channel, self._on_bus_message)
            except Exception:
                log.exception("flask_datastar: %r could not leave its bus channel", self)

    def _unsubscribe_due(self) -> float | None:
        """When the lingering bus subscription may be given up, if there is one."""
        if self._bus is None or self._subscribed_pid != os.getpid():
            return None
        empty_since = self._empty_since
        return None if empty_since is None else empty_since + self.linger

    def _message_id(self) -> str:
        """A new id for a bus message: this registry in this process, and a sequence."""
        return f"{self._own_origin()}:{next(self._sequence)}"

    def _own_origin(self) -> str:
        pid = os.getpid()
        if self._origin_pid != pid:
            # A forked worker is another publisher than its parent.
            self._origin = uuid.uuid4().hex[:16]
            self._origin_pid = pid
        return self._origin

    def _publish(
        self, to_key: bool, key: Any, event: str | bytes, coalesce: Hashable | None
    ) -> None:
        # Refused here, in the command that sent it, rather than on every stream.
        check_event(event)
        if isinstance(event, bytes):
            try:
                event = event.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"An event must be UTF-8 text: {e}.") from None
        bus = self._bus
        if bus is None:
            self._enqueue(_Item(to_key, key, Chunk(event), coalesce))
            return
        # The id lets every subscriber drop a repeat of this message: redis-py retries
        # a PUBLISH that timed out, and the first one may have reached Redis.
        message: dict[str, Any] = {"e": event, "i": self._message_id()}
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
            if self._resync_owed:
                self._tell_others_to_resync(bus)
            # Our own streams get it back through the bus, like every other process.
            bus.publish(self._channel, payload)
        except OSError as e:
            # The command goes on, and this process's streams still get the event; the
            # other processes are told to resync by the next publish that works.
            self._resync_owed = True
            if not self._bus_down:
                self._bus_down = True
                log.warning(
                    "flask_datastar: %r could not publish (%s); until the bus is back,"
                    " broadcasts reach this process's streams only, and the other"
                    " processes will be told to resync.",
                    self,
                    e,
                )
            if self._streams:
                self._on_bus_message(payload)
            return
        if self._bus_down:
            self._bus_down = False
            log.warning("flask_datastar: %r publishes through the bus again.", self)

    def _tell_others_to_resync(self, bus: Bus) -> None:
        """Publish a resync marker: every other process resyncs its streams of this registry."""
        with self._resync_lock:
            if not self._resync_owed:
                return
            marker = json.dumps({"r": 1, "i": self._message_id()}, separators=(",", ":"))
            bus.publish(self._channel, marker.encode("utf-8"))
            self._resync_owed = False
        log.warning(
            "flask_datastar: %r told the other processes to resync after its failed publish.",
            self,
        )

    def _on_bus_message(self, payload: bytes) -> None:
        message = json.loads(payload)
        message_id = message.get("i")
        if isinstance(message_id, str):
            if "r" in message and message_id.partition(":")[0] == self._own_origin():
                return  # our own resync marker: this process's streams missed nothing
            if not self._first_sight(message_id):
                return
        if "r" in message:
            self._on_bus_gap()
            return
        self._enqueue(
            _Item(
                "k" in message,
                _hashable(message.get("k")),
                Chunk(message["e"]),
                _hashable(message.get("c")),
            )
        )

    def _first_sight(self, message_id: str) -> bool:
        """Remember *message_id*; return whether it is new (bounded memory)."""
        with self._cond:
            if message_id in self._seen:
                return False
            self._seen[message_id] = None
            if len(self._seen) > SEEN_MESSAGES:
                self._seen.popitem(last=False)
            return True

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
            if item.slot is not None:
                older = self._latest.get(item.slot)
                if older is not None:
                    older.superseded = True
                self._latest[item.slot] = item
            self._queue.append(item)
            self._start_broadcaster_locked()
            self._cond.notify_all()

    def _start_broadcaster_locked(self) -> None:
        """Start the broadcaster thread unless one is taking work (call it under ``_cond``)."""
        pid = os.getpid()
        # A worker forked after this registry broadcast has the thread object, not the thread.
        if self._running and self._thread_pid == pid:
            return
        self._running = True
        self._stopping = False
        self._thread_pid = pid
        self._thread = threading.Thread(
            target=self._run, name=f"flask_datastar-broadcaster-{self.name}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        """The broadcaster: write the queue in order; exit after *linger* seconds idle."""
        idle_since = time.monotonic()
        while True:
            unsubscribe = False
            with self._cond:
                self._busy = False
                self._cond.notify_all()
                while not self._queue:
                    now = time.monotonic()
                    due = self._unsubscribe_due()
                    if self._stopping or (due is None and now - idle_since >= self.linger):
                        # Decided under the lock that _enqueue takes: the next event
                        # starts a new thread, and this one takes no more work.
                        self._running = False
                        self._stopping = False
                        return
                    if due is not None and due <= now:
                        unsubscribe = True
                        break
                    self._cond.wait((idle_since + self.linger if due is None else due) - now)
                if not unsubscribe:
                    item = self._queue.popleft()
                    if item.slot is not None and self._latest.get(item.slot) is item:
                        del self._latest[item.slot]
                    if item.superseded:
                        continue
                    self._busy = True
            if unsubscribe:
                self._unsubscribe_if_unused()
                continue
            streams = self.snapshot(item.key) if item.to_key else self.snapshot()
            self._call_each(streams, operator.methodcaller("send", item.chunk))
            idle_since = time.monotonic()


def _hashable(value: Any) -> Any:
    """Turn the lists that JSON made of tuples back into tuples, so they work as keys."""
    if isinstance(value, list):
        return tuple(_hashable(item) for item in value)
    return value
