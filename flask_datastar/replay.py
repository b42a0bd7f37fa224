"""The replay log: what a registry broadcast lately, so that a reconnecting tab can resume.

A registry opened with a :class:`~flask_datastar.ReplayLog` gives every event it delivers an
SSE ``id`` and keeps those events for a while, bounded by count and by age.
The Datastar client remembers the last ``id:`` it saw and sends it back as
``Last-Event-ID`` when it reconnects; the registry then writes exactly the
events that tab missed, in order, before anything new (see
:meth:`SSERegistry.register <flask_datastar.SSERegistry.register>`).

Where the log lives depends on the registry's bus:

- without a bus, or with a bus that has no Redis client (such as
  :class:`~flask_datastar.bus.LocalBus`): in this process, a counter and a
  deque (:class:`MemoryLog`); the ids are those of this process only, and a
  tab that reconnects to another process gets the full state;
- with a :class:`~flask_datastar.bus.RedisBus`: in a capped Redis Stream beside
  the pub/sub channel (:class:`RedisLog`). One Lua script appends the event
  with ``XADD ... MAXLEN ~ N`` and publishes it with its entry id, so the ids
  are the same in every process and the order of the channel is the order of
  the ids; a reconnecting tab's missed events are read with ``XRANGE``. On a
  Redis Cluster the stream's key is in its channel's slot, and the script
  publishes with ``SPUBLISH``.
"""

from __future__ import annotations

import json
import os
import random
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from .bus import Bus

__all__ = ["MemoryLog", "RedisLog", "ReplayLog", "parse_event_id"]

T = TypeVar("T")

#: The form of every id a replay log gives: two decimal numbers, as Redis Stream ids.
_ID = re.compile(r"\A([0-9]{1,20})-([0-9]{1,20})\Z")

#: A position in a log: ids compare by it (the id's two numbers).
Position = tuple[int, int]


def parse_event_id(value: str | None) -> Position | None:
    """Return the two numbers of a replay id such as ``"1712345678901-3"``, or ``None``.

    Anything else (a missing header, an id some other code gave, garbage sent
    by a client) is ``None``: the stream gets the full state.

    :param value: the ``Last-Event-ID`` the client sent.
    """
    if value is None:
        return None
    match = _ID.match(value.strip())
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2))


class ReplayLog:
    """How many events a registry keeps for tabs that reconnect, and for how long.

    Give it to a registry: ``SSERegistry("chat", replay=ReplayLog())`` or
    ``registry.attach_replay(ReplayLog(max_events=1000, max_age=300))``. One
    log serves one registry. The registry picks the storage from its bus
    when it first needs it (see :mod:`flask_datastar.replay`).

    :param max_events: the most events kept (with Redis, ``MAXLEN ~``: about
        that many, never fewer).
    :param max_age: seconds an event is kept; a tab away for longer gets the
        full state instead of the events it missed.
    """

    def __init__(self, max_events: int = 1000, max_age: float = 300.0) -> None:
        if not isinstance(max_events, int) or isinstance(max_events, bool) or max_events < 1:
            raise ValueError(f"'max_events' must be a whole number, 1 or more, not {max_events!r}.")
        if not max_age > 0:
            raise ValueError(f"'max_age' must be a number of seconds above 0, not {max_age!r}.")
        self.max_events = max_events
        self.max_age = float(max_age)
        self._owner: str | None = None

    def __repr__(self) -> str:
        return f"<ReplayLog max_events={self.max_events} max_age={self.max_age:g}>"

    def _claim(self, name: str) -> None:
        """Bind the log to the registry called *name*; a second registry is refused."""
        if self._owner is not None and self._owner != name:
            raise RuntimeError(
                f"{self!r} already serves the registry {self._owner!r}; give each registry"
                " its own ReplayLog."
            )
        self._owner = name

    def open(
        self, name: str, bus: Bus | None, channel: str | None = None
    ) -> MemoryLog[Any] | RedisLog:
        """Return the storage for the registry *name* with *bus*: Redis if the bus has it.

        :param name: the registry's name.
        :param bus: the registry's bus, or ``None``.
        :param channel: the registry's bus channel (``flask_datastar:<name>`` by
            default), on which the log publishes each event with its id.
        :raises ValueError: on a Redis Cluster, a channel whose name has ``{`` or
            ``}``: the log's key cannot be put in the channel's slot.
        """
        client = redis_client(bus)
        if client is None:
            return MemoryLog(self.max_events, self.max_age)
        return RedisLog(
            client,
            name,
            self.max_events,
            self.max_age,
            channel=channel,
            sharded=bool(getattr(bus, "sharded", False)),
        )


def redis_client(bus: Bus | None) -> Any:
    """The redis-py client of *bus* (a :class:`~flask_datastar.bus.RedisBus`), or ``None``.

    The one place that reaches into the bus: whatever client the bus already
    publishes with serves the log too.
    """
    client = getattr(bus, "client", None)
    return client if client is not None and hasattr(client, "xrange") else None


class MemoryLog(Generic[T]):
    """The log of one process: numbered items in a deque, bounded by count and age.

    Ids are ``"<epoch>-<n>"``: *epoch* is random per process (and per
    :meth:`reset`), so an id from another process, from before a restart or
    from before a reset is unknown here; *n* counts on across resets, so
    positions keep their order.

    :param max_events: the most items kept.
    :param max_age: seconds an item is kept.
    :param clock: the time source, for tests.
    """

    shared = False

    def __init__(
        self, max_events: int, max_age: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_events = max_events
        self.max_age = max_age
        self._clock = clock
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._epoch = _new_epoch()
        self._next = 1
        self._items: deque[tuple[int, float, T]] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def next_id(self) -> tuple[str, Position]:
        """Take the next id; :meth:`append` must follow with the item, under the same lock.

        The registry calls both under its queue's lock, so the order of the
        ids is the order of the queue.
        """
        with self._lock:
            self._check_process()
            n = self._next
            self._next += 1
            return f"{self._epoch}-{n}", (0, n)

    def append(self, position: Position, item: T) -> None:
        """Keep *item* under *position* (from :meth:`next_id`); drop what is too old or too many."""
        with self._lock:
            now = self._clock()
            self._items.append((position[1], now, item))
            while len(self._items) > self.max_events:
                self._items.popleft()
            self._trim_locked(now)

    def since(self, event_id: str | None) -> list[T] | None:
        """Return the items after *event_id*, oldest first, or ``None`` if some are gone.

        ``None`` also for an id this log never gave (malformed, from another
        process or another epoch, from the future).

        :param event_id: the client's ``Last-Event-ID``.
        """
        parsed = parse_event_id(event_id)
        if parsed is None:
            return None
        epoch, n = parsed
        with self._lock:
            self._check_process()
            if epoch != self._epoch:
                return None
            self._trim_locked(self._clock())
            first = self._items[0][0] if self._items else self._next
            # Every number after n must still be here: numbers are consecutive.
            if not first - 1 <= n < self._next:
                return None
            return [item for number, _, item in self._items if number > n]

    def position_of(self, event_id: str) -> Position | None:
        """The position of one of this log's ids (``None`` for any other)."""
        parsed = parse_event_id(event_id)
        return None if parsed is None else (0, parsed[1])

    def reset(self) -> None:
        """Forget everything (this process missed events): older ids become unknown."""
        with self._lock:
            self._items.clear()
            self._epoch = _new_epoch()

    def _trim_locked(self, now: float) -> None:
        oldest = now - self.max_age
        while self._items and self._items[0][1] < oldest:
            self._items.popleft()

    def _check_process(self) -> None:
        if self._pid != os.getpid():
            # A forked worker shares nothing with its parent: its own ids from now on.
            self._pid = os.getpid()
            self._items.clear()
            self._epoch = _new_epoch()


def _new_epoch() -> int:
    return random.randrange(10**11, 10**12)


# Appends the message (JSON object text) to the stream, trims it by count (MAXLEN ~) and
# age (MINID, from the new entry's own clock), lets an idle log expire, and publishes the
# message with its entry id. One script: the channel's order is the order of the ids.
_APPEND = """
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'm', ARGV[3])
local ms = tonumber(string.match(id, '^(%d+)-'))
local oldest = ms - tonumber(ARGV[2])
if oldest > 0 then
    redis.call('XTRIM', KEYS[1], 'MINID', string.format('%d', oldest))
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call(ARGV[5], ARGV[4], '{"s":"' .. id .. '",' .. string.sub(ARGV[3], 2))
return id
"""


# Reads the entries from ARGV[1] on: a script, because redis-py sends EVALSHA to the key's
# primary, where a plain XRANGE may go to a replica (an app's cluster client reading from
# replicas), which can lack the newest entries: the tab would lose them silently.
_SINCE = """
return redis.call('XRANGE', KEYS[1], ARGV[1], '+')
"""


class RedisLog:
    """The log of every process: a capped Redis Stream, ``{flask_datastar:<name>}:replay``.

    The key's hash tag is the registry's channel, so that on a Redis Cluster
    the stream and the channel live in the same slot, on the same shard: the
    script that appends an event there can publish it with ``SPUBLISH``,
    which sharded subscribers hear.

    :param client: a redis-py client (the bus's): ``redis.Redis`` or
        ``redis.cluster.RedisCluster``.
    :param name: the registry's name.
    :param max_events: ``MAXLEN ~`` of every ``XADD``.
    :param max_age: seconds: every append drops the entries older than this
        (``XTRIM MINID``), and a log nothing was added to for this long expires.
    :param channel: the registry's bus channel, ``flask_datastar:<name>`` by default.
    :param sharded: publish with ``SPUBLISH`` (a bus over a Redis Cluster).
    :raises ValueError: *sharded*, and a channel with ``{`` or ``}`` in its name.
    """

    shared = True

    def __init__(
        self,
        client: Any,
        name: str,
        max_events: int,
        max_age: float,
        *,
        channel: str | None = None,
        sharded: bool = False,
    ) -> None:
        import redis

        self.client = client
        self.channel = f"flask_datastar:{name}" if channel is None else channel
        if sharded and ("{" in self.channel or "}" in self.channel):
            # A Redis Cluster hashes only what is inside a key's first {...}: no key can
            # share the slot of such a channel, and the script could not publish on it.
            raise ValueError(
                f"The registry {name!r} has a replay log on a Redis Cluster, where its"
                f" channel {self.channel!r} must have no '{{' or '}}': rename the registry."
            )
        self.key = f"{{{self.channel}}}:replay"
        self.sharded = sharded
        self.max_events = max_events
        self.max_age_ms = max(1, int(max_age * 1000))
        # RedisClusterException: no node of the cluster answers (not a RedisError).
        self._errors: tuple[type[BaseException], ...] = (
            redis.RedisError,
            OSError,
            redis.exceptions.RedisClusterException,
        )
        self._script = client.register_script(_APPEND)
        self._since = client.register_script(_SINCE)

    def append_and_publish(self, message: str) -> str:
        """Append *message* (a JSON object) and publish it on the channel with ``"s"``: its id.

        The channel is the log's own (its ``channel``): on a Redis Cluster no
        other is in the slot of its key.

        :raises flask_datastar.BusError: Redis could not be reached or refused it.
        """
        from .bus import BusError

        try:
            entry_id = self._script(
                keys=[self.key],
                args=[
                    self.max_events,
                    self.max_age_ms,
                    message,
                    self.channel,
                    "SPUBLISH" if self.sharded else "PUBLISH",
                ],
            )
        except self._errors as e:
            raise BusError(f"Could not add to the replay log {self.key!r} in Redis: {e}") from e
        return _text(entry_id)

    def position_of(self, event_id: str) -> Position | None:
        """The position of an entry id (``None`` for anything else)."""
        return parse_event_id(event_id)

    def since(self, event_id: str | None) -> list[tuple[str, dict[str, Any]]] | None:
        """Return ``(id, message)`` for each entry after *event_id*, or ``None`` if some are gone.

        The read starts at *event_id* itself (``XRANGE`` is inclusive): only if
        that entry is still there is nothing missing in between. It is made on
        the primary, never on a replica that may lag. A repeated message (a
        script that redis-py ran again after a timeout) is skipped.

        :param event_id: the client's ``Last-Event-ID``.
        :raises flask_datastar.BusError: Redis could not be reached.
        """
        from .bus import BusError

        if parse_event_id(event_id) is None:
            return None
        assert event_id is not None
        event_id = event_id.strip()
        try:
            entries = self._since(keys=[self.key], args=[event_id])
        except self._errors as e:
            raise BusError(f"Could not read the replay log {self.key!r} in Redis: {e}") from e
        if not entries or _text(entries[0][0]) != event_id:
            return None
        out: list[tuple[str, dict[str, Any]]] = []
        seen: set[str] = set()
        for raw_id, pairs in entries[1:]:
            # (From a script, an entry's fields come as a flat list: name, value, ...)
            fields = {
                _text(name): value for name, value in zip(pairs[::2], pairs[1::2], strict=False)
            }
            payload = fields.get("m")
            if payload is None:
                continue
            message = json.loads(payload)
            message_id = message.get("i")
            if isinstance(message_id, str):
                if message_id in seen:
                    continue
                seen.add(message_id)
            out.append((_text(raw_id), message))
        return out


def _text(value: bytes | str) -> str:
    return value.decode("ascii") if isinstance(value, bytes) else str(value)
