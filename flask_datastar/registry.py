"""An opt-in, lock-guarded registry of open streams, for the CQRS pattern.

Every tab holds one GET stream (the query side) and registers it here; short
POST commands change state and broadcast the new HTML to every registered
stream. As datastar-cl's ``registry``: the registry is thread-safe, prunes
streams whose sends fail, and never calls a stream under its lock.

Two ways to reach the streams:

- :meth:`SSERegistry.notify_subscribers` calls a function with every stream,
  in the caller's thread, as datastar-cl does;
- :meth:`SSERegistry.broadcast` (every stream), :meth:`SSERegistry.send_to`
  (one tab's key), :meth:`SSERegistry.send_to_identity` (every tab of one
  user) and :meth:`SSERegistry.publish` (the streams that joined a topic)
  take an event that is already rendered, frame it once and hand it to the
  registry's broadcaster thread, so the command returns at once. Through a
  bus (:mod:`flask_datastar.bus`) they reach the streams of every process.

:meth:`SSERegistry.revoke` ends the streams of an identity, a topic or a key
in every process, in order with the events sent before it.

A registry opened with a :class:`~flask_datastar.ReplayLog` gives each
event it delivers an id and keeps it for a while: a stream that registers with
a ``Last-Event-ID`` gets the events its client missed (see
:meth:`SSERegistry.register`).

A registry that nobody uses costs nothing: its broadcaster thread and its bus
subscription go away after ``linger`` idle seconds and come back when needed.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import re
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterable
from typing import TYPE_CHECKING, Any

from werkzeug.exceptions import Forbidden, Unauthorized

from . import metrics
from .replay import MemoryLog, Position, RedisLog, ReplayLog, parse_event_id
from .scheduler import fan_out
from .stream import StreamClosed, check_event, write_each
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


# Who an event is for; the letters are the fields of a bus message that name the target.
_ALL = ""
_KEY = "k"
_IDENTITY = "u"
_TOPIC = "t"
_TARGETS = (_KEY, _IDENTITY, _TOPIC)

# What a revocation does to the streams it reaches (the "x" field of a bus message).
_DELIVER = 0
_END_CLEANLY = 1
_END_ABRUPTLY = 2


# An ``id`` field in an event's own text (``event_id=``): a replay log gives ids itself.
_ID_FIELD = re.compile(r"(?:\A|[\r\n])id(?:[:\r\n]|\Z)")


class _Item:
    __slots__ = ("kind", "target", "chunk", "slot", "superseded", "end", "position")

    def __init__(
        self,
        kind: str,
        target: Any,
        chunk: Chunk | None,
        coalesce: Hashable | None,
        end: int = _DELIVER,
    ) -> None:
        self.kind = kind
        self.target = target
        self.chunk = chunk
        self.end = end
        # An event supersedes only those that would reach the same recipients: a unicast
        # never drops a broadcast, nor another key's unicast. A revocation never does.
        self.slot: Hashable | None = None if coalesce is None or end else (kind, target, coalesce)
        self.superseded = False
        #: Its place in the replay log (its chunk then starts with its ``id:``), if any.
        self.position: Position | None = None


class _Resume:
    """A stream being resumed: what the broadcaster holds back until the log is written."""

    __slots__ = ("lock", "done", "buffer", "floor")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        #: The missed events are written: live events go straight to the stream again.
        self.done = False
        #: Live events with an id that came while the log was being read.
        self.buffer: list[_Item] = []
        #: The newest position written from the log: live events up to it are repeats.
        self.floor: Position | None = None


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
    :param authorize: decides whether a stream may join a topic
        (:meth:`register` with ``topics=``, :meth:`join`): called as
        ``authorize(gen.identity, topic)``; a false answer refuses the join
        with :class:`~werkzeug.exceptions.Unauthorized` (401) for a stream
        without identity, :class:`~werkzeug.exceptions.Forbidden` (403)
        otherwise. ``None`` lets every stream join every topic. The
        extension's registries ask :meth:`FlaskDatastar.authorizer
        <flask_datastar.FlaskDatastar.authorizer>`.
    :param replay: keep the events delivered lately, so that a stream that
        registers with a ``Last-Event-ID`` resumes (see :meth:`register`
        and :meth:`attach_replay`).
    """

    def __init__(
        self,
        name: str = "default",
        *,
        bus: Bus | None = None,
        on_resync: Callable[[Stream], object] | None = None,
        linger: float = LINGER,
        authorize: Callable[[Any, str], object] | None = None,
        replay: ReplayLog | None = None,
    ) -> None:
        if not linger >= 0:
            raise ValueError(f"'linger' must be a number of seconds, 0 or more, not {linger!r}.")
        self.name = name
        self.on_resync = on_resync
        self.linger = linger
        self.authorize = authorize
        self._lock = threading.Lock()
        self._streams: dict[Stream, Any] = {}
        self._by_key: dict[Any, dict[Stream, None]] = {}
        # The identity each stream had when it registered, and the topics it joined.
        self._identity_of: dict[Stream, Any] = {}
        self._by_identity: dict[Any, dict[Stream, None]] = {}
        self._topics_of: dict[Stream, set[str]] = {}
        self._by_topic: dict[str, dict[Stream, None]] = {}
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
        # Resume: the log's settings, its storage (opened once the bus is known), and
        # the streams whose missed events are being written.
        self._replay: ReplayLog | None = None
        self._log: MemoryLog[_Item] | RedisLog | None = None
        self._log_lock = threading.Lock()
        self._resuming: dict[Stream, _Resume] = {}
        if bus is not None:
            self.attach_bus(bus)
        if replay is not None:
            self.attach_replay(replay)

    def __repr__(self) -> str:
        return f"<SSERegistry {self.name!r} streams={len(self)}>"

    # -- membership ---------------------------------------------------------------

    def register(self, gen: Stream, key: Any = None, *, topics: Iterable[str] = ()) -> Stream:
        """Add *gen*; with *key*, :meth:`send_to` and :meth:`notify_subscriber` can reach it.

        Call it in ``on_connect``, before the stream sends its initial state,
        so that no broadcast falls between the two. Registering a stream again
        updates its key and adds *topics*. A stream that ends is unregistered
        by itself. With a bus, the first stream of this process (or the first
        after the registry left the bus for want of streams) waits until the
        bus confirms the subscription.

        The stream's :attr:`~flask_datastar.Stream.identity` (resolved once,
        when it opened) is read here: :meth:`send_to_identity` and
        :meth:`revoke` reach it by that identity.

        With a replay log (:meth:`attach_replay`), a stream whose client
        sent a ``Last-Event-ID`` resumes here: it is written exactly the
        events it missed that were meant for it (by its key, identity and
        *topics*), in order, then the live ones, without a repeat or a gap
        between the two; ``gen.resumed`` is then ``True``. If some of the
        missed events are gone from the log (the tab was away too long), or
        the id is not one of the log's (malformed, from another process, from
        before a restart), nothing is written and ``gen.resumed`` is
        ``False``: the handler sends the full state, as for a new tab. Only a
        stream's first registration resumes.

        :param gen: the stream.
        :param key: any hashable (a tab id); a string, a number or a tuple of
            them when a bus carries unicasts between processes.
        :param topics: topics the stream joins, as with :meth:`join`: each is
            checked by *authorize* first, and a refusal registers nothing.
        :raises werkzeug.exceptions.Forbidden: *authorize* refused a topic
            (:class:`~werkzeug.exceptions.Unauthorized` for a stream without
            identity); in ``on_connect`` it is the response: a 403 (401) with
            no event.
        """
        return self._register(gen, key, self._authorized(gen, topics))

    def _register(self, gen: Stream, key: Any, topics: tuple[str, ...]) -> Stream:
        identity = getattr(gen, "identity", None)
        resume: _Resume | None = None
        with self._lock:
            first = gen not in self._streams
            if first and self._replay is not None:
                # Held back from now on: the live events that the log may also hold.
                resume = self._resuming[gen] = _Resume()
            if gen in self._streams:
                old = self._streams[gen]
                if old is not None:
                    _index_remove(self._by_key, old, gen)
                _index_remove(self._by_identity, self._identity_of.pop(gen, None), gen)
            self._streams[gen] = key
            if key is not None:
                self._by_key.setdefault(key, {})[gen] = None
            if identity is not None:
                self._identity_of[gen] = identity
                self._by_identity.setdefault(identity, {})[gen] = None
            self._add_topics_locked(gen, topics)
            self._empty_since = None
            # Read under the lock that the lingering unsubscribe takes to give it up:
            # either it sees this stream and stays, or this sees it gone and subscribes.
            subscribed = self._subscribed_pid == os.getpid()
        gen.key = key
        gen._registries.add(self)
        if self._bus is not None and not subscribed:
            self._subscribe()
        if resume is not None:
            # After the subscription: whatever the log lacks now reaches us live.
            self._resume(gen, resume)
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
            gen._registries.discard(self)
            if key is not None:
                _index_remove(self._by_key, key, gen)
            _index_remove(self._by_identity, self._identity_of.pop(gen, None), gen)
            self._resuming.pop(gen, None)
            for topic in self._topics_of.pop(gen, ()):
                _index_remove(self._by_topic, topic, gen)
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

    def join(self, gen: Stream, *topics: str) -> Stream:
        """Add *gen* to *topics*, registering it first if needed: :meth:`publish` reaches it there.

        Each topic is checked by *authorize* (see :class:`SSERegistry`)
        before the stream joins any; a refusal raises, and the stream joins
        none of them. Called in ``on_connect``, the refusal is the response
        (a 403, or a 401 without identity, with no event); called later, from
        the handler, it ends the stream abruptly, and its reconnection is
        checked again.

        :param gen: the stream.
        :param topics: topic names (strings).
        :raises werkzeug.exceptions.Forbidden: a topic was refused.
        """
        topics = self._authorized(gen, topics)
        with self._lock:
            if gen in self._streams:
                self._add_topics_locked(gen, topics)
                return gen
        return self._register(gen, None, topics)

    def leave(self, gen: Stream, *topics: str) -> None:
        """Take *gen* out of *topics* (it stays registered).

        :param gen: the stream.
        :param topics: topic names.
        """
        with self._lock:
            joined = self._topics_of.get(gen)
            if joined is None:
                return
            for topic in topics:
                if topic in joined:
                    joined.discard(topic)
                    _index_remove(self._by_topic, topic, gen)

    def _authorized(self, gen: Stream, topics: Iterable[str]) -> tuple[str, ...]:
        """Check every topic with *authorize*; raise 401/403 at the first refusal."""
        topics = (topics,) if isinstance(topics, str) else tuple(topics)
        for topic in topics:
            if not isinstance(topic, str):
                raise TypeError(f"A topic is a string, not {type(topic).__name__}: {topic!r}.")
        if self.authorize is None:
            return topics
        identity = getattr(gen, "identity", None)
        for topic in topics:
            if not self.authorize(identity, topic):
                if identity is None:
                    raise Unauthorized(f"Log in to follow {topic!r}.")
                raise Forbidden(f"You may not follow {topic!r}.")
        return topics

    def _add_topics_locked(self, gen: Stream, topics: tuple[str, ...]) -> None:
        if not topics:
            return
        joined = self._topics_of.setdefault(gen, set())
        for topic in topics:
            joined.add(topic)
            self._by_topic.setdefault(topic, {})[gen] = None

    def snapshot(
        self, key: Any = None, *, identity: Any = None, topic: str | None = None
    ) -> list[Stream]:
        """Return this process's registered streams, in registration order.

        With one of the arguments, only the streams that it names.

        :param key: only the streams registered with this key.
        :param identity: only the streams of this identity.
        :param topic: only the streams that joined this topic.
        """
        with self._lock:
            if key is not None:
                return list(self._by_key.get(key, ()))
            if identity is not None:
                return list(self._by_identity.get(identity, ()))
            if topic is not None:
                return list(self._by_topic.get(topic, ()))
            return list(self._streams)

    def keys(self) -> list[Any]:
        """Return the keys that have at least one stream registered."""
        with self._lock:
            return list(self._by_key)

    def identities(self) -> list[Any]:
        """Return the identities that have at least one stream registered in this process."""
        with self._lock:
            return list(self._by_identity)

    def topics(self, gen: Stream | None = None) -> list[str]:
        """Return the topics that have a stream in this process, or those *gen* joined.

        :param gen: a registered stream.
        """
        with self._lock:
            if gen is not None:
                return sorted(self._topics_of.get(gen, ()))
            return list(self._by_topic)

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
            except Exception as e:
                self._unreached(gen, e)
                failed.append(gen)
        return failed

    def _send_each(self, streams: list[Stream], chunk: Chunk) -> list[Stream]:
        """As ``_call_each(streams, methodcaller("send", chunk))``, in the fan-out's own loop."""
        with fan_out():  # no handler step fights these writes for the GIL
            failed = write_each(streams, chunk)
        for gen, error in failed:
            self._unreached(gen, error)
        return [gen for gen, _ in failed]

    def _unreached(self, gen: Stream, error: Exception) -> None:
        """Drop *gen*, which *error* kept from being reached; end it unless it has ended."""
        self.unregister(gen)
        if not isinstance(error, StreamClosed):
            log.error(
                "flask_datastar: ending %r, which %r could not reach; its client"
                " reconnects and gets the full state.",
                gen,
                self,
                exc_info=error,
            )
            gen.close(reconnect=True)

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
        self._publish(_ALL, None, event, coalesce)

    def send_to(self, key: Any, event: str | bytes, *, coalesce: Hashable | None = None) -> None:
        """Send *event* to the streams registered under *key*, as :meth:`broadcast` does.

        :param key: the key given to :meth:`register`.
        :param event: a complete event.
        :param coalesce: as for :meth:`broadcast`: it supersedes only unicasts
            to the same key with the same label.
        """
        if key is None:
            raise ValueError("'send_to' needs a key; use 'broadcast' to reach every stream.")
        self._publish(_KEY, key, event, coalesce)

    def send_to_identity(
        self, identity: Any, event: str | bytes, *, coalesce: Hashable | None = None
    ) -> None:
        """Send *event* to every stream of *identity* (all of one user's tabs).

        A stream's identity is what the extension's identity loader returned
        when it opened (:attr:`Stream.identity <flask_datastar.Stream.identity>`).
        Through a bus it reaches that identity's streams in every process, and
        no other stream.

        :param identity: a user id, as the identity loader returns it.
        :param event: a complete event.
        :param coalesce: as for :meth:`broadcast`: it supersedes only events
            for the same identity with the same label.
        """
        if identity is None:
            raise ValueError(
                "'send_to_identity' needs an identity; anonymous streams have none:"
                " use 'broadcast' or a topic to reach them."
            )
        self._publish(_IDENTITY, identity, event, coalesce)

    def publish(self, topic: str, event: str | bytes, *, coalesce: Hashable | None = None) -> None:
        """Send *event* to the streams that joined *topic* (:meth:`join`).

        :param topic: the topic's name.
        :param event: a complete event.
        :param coalesce: as for :meth:`broadcast`: it supersedes only events
            for the same topic with the same label.
        """
        if not isinstance(topic, str):
            raise TypeError(f"A topic is a string, not {type(topic).__name__}: {topic!r}.")
        self._publish(_TOPIC, topic, event, coalesce)

    def revoke(
        self,
        *,
        identity: Any = None,
        topic: str | None = None,
        key: Any = None,
        event: str | bytes | None = None,
        reconnect: bool = True,
    ) -> None:
        """End the streams of *identity*, *topic* or *key* in every process (logout, lost access).

        Give exactly one of them. With a bus, one message reaches every
        process, whose broadcaster ends the matching streams after writing
        the events queued before it (and *event*, if given: a notice such as
        "your session has ended" patched into the page). Without a bus, only
        this process's streams.

        With *reconnect* (the default) each stream ends abruptly: its tab
        reconnects, and the new stream is checked again as it opens (identity,
        authorisation): a refusal is a 401/403, which the Datastar client does
        not retry, so the tab stops; a client that may still listen gets a
        fresh stream with only what it may see now. Change the state first
        (log out, withdraw the permission), then revoke. Without
        *reconnect*, the streams end cleanly and the tabs stay as they are,
        without a stream.

        :param identity: end every stream of this identity.
        :param topic: end every stream that joined this topic.
        :param key: end every stream registered under this key.
        :param event: an event to send to those streams before they end.
        :param reconnect: end abruptly (the tab reconnects and is checked
            again) or cleanly (the tab stays, not live).
        :raises ValueError: not exactly one of *identity*, *topic*, *key*.
        :raises flask_datastar.BusError: the bus did not take the message:
            this process's streams were ended, the other processes' were not.
        """
        given = [
            (kind, value)
            for kind, value in ((_IDENTITY, identity), (_TOPIC, topic), (_KEY, key))
            if value is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "'revoke' ends the streams of one identity, one topic or one key: pass"
                " exactly one of 'identity=', 'topic=' or 'key='."
            )
        kind, target = given[0]
        self._publish(
            kind,
            target,
            event,
            None,
            end=_END_ABRUPTLY if reconnect else _END_CLEANLY,
        )

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
        with self._log_lock:
            self._log = None  # opened again at first use: in Redis, if the bus has it
        if self._streams:
            self._subscribe()

    @property
    def bus(self) -> Bus | None:
        """The bus that carries broadcasts and unicasts, if any."""
        return self._bus

    # -- resume after reconnect --------------------------------------------------

    def attach_replay(self, replay: ReplayLog) -> None:
        """Keep the events this registry delivers in *replay*, so that tabs can resume.

        From now on every event of :meth:`broadcast`, :meth:`send_to`,
        :meth:`send_to_identity` and :meth:`publish` gets an SSE ``id`` from
        the log (build them without ``event_id=``), and a stream that
        registers with a ``Last-Event-ID`` is written what it missed (see
        :meth:`register`). With a :class:`~flask_datastar.bus.RedisBus` the
        log is a Redis Stream shared by every process; otherwise it is this
        process's. Keep the registry itself (a module-level name): a log in
        this process lives as long as its registry.

        :param replay: the log's bounds; one log per registry.
        """
        if self._replay is replay:
            return
        if self._replay is not None:
            raise RuntimeError(f"{self!r} already has a replay log; attach one once.")
        replay._claim(self.name)
        self._replay = replay

    @property
    def replay(self) -> ReplayLog | None:
        """The replay log's settings, if the registry keeps one."""
        return self._replay

    def _replay_log(self) -> MemoryLog[_Item] | RedisLog | None:
        """The log's storage, opened at first use, when the bus is known."""
        log = self._log
        if log is None and self._replay is not None:
            with self._log_lock:
                if self._log is None:
                    self._log = self._replay.open(self.name, self._bus, self._channel)
                log = self._log
        return log

    def _resume(self, gen: Stream, resume: _Resume) -> None:
        """Write *gen* the events its client missed, then let the live ones through.

        The stream was registered (and held back) before the log is read: a
        live event is either in what is read, and dropped as a repeat, or
        newer, and written after it. Sets ``gen.resumed``.
        """
        last_event_id = getattr(gen, "last_event_id", None)
        found: list[_Item] | None = None
        floor: Position | None = None
        store: MemoryLog[_Item] | RedisLog | None = None
        if last_event_id is not None:
            try:
                # Opened here at the latest: a cluster that no node of answers, or that
                # cannot hold this log, is the full state too, never an error.
                store = self._replay_log()
                if isinstance(store, RedisLog):
                    entries = store.since(last_event_id)
                    if entries is not None:
                        found = [
                            self._item_from(message, entry_id) for entry_id, message in entries
                        ]
                elif store is not None:
                    found = store.since(last_event_id)
            except (OSError, ValueError) as e:
                # Redis is down, or holds what this version cannot read: the full state.
                log.warning("flask_datastar: %r sends the full state to %r: %s", self, gen, e)
                found = None
            if found is not None and store is not None:
                floor = found[-1].position if found else store.position_of(last_event_id)
        with self._lock:
            missed = [item for item in found or () if self._reaches_locked(gen, item)]
        with resume.lock:
            held = [item for item in resume.buffer if _after(item.position, floor)]
            batch = _coalesced(missed + held)
            try:
                for item in batch:
                    assert item.chunk is not None
                    gen.send(item.chunk)
            except StreamClosed:
                pass  # it ended meanwhile: its unregistration drops the rest
            for item in held:
                if item.position is not None and _after(item.position, floor):
                    floor = item.position
            resume.floor = floor
            resume.buffer = []
            resume.done = True
        _set_resumed(gen, found is not None)
        if last_event_id is not None and found is None:
            log.debug(
                "flask_datastar: %r could not resume from %r: full state", self, last_event_id
            )

    def _reaches_locked(self, gen: Stream, item: _Item) -> bool:
        """Whether a live event like *item* would have reached *gen* (call it under ``_lock``)."""
        if item.end or item.chunk is None:
            return False
        if item.kind == _KEY:
            return bool(self._streams.get(gen) == item.target)
        if item.kind == _IDENTITY:
            return bool(self._identity_of.get(gen) == item.target)
        if item.kind == _TOPIC:
            return item.target in self._topics_of.get(gen, ())
        return True

    def _hold_for_resume(self, streams: list[Stream], item: _Item) -> list[Stream]:
        """Take out of *streams* those that are resuming (held) or had *item* from the log."""
        kept: list[Stream] = []
        caught_up: list[Stream] = []
        for gen in streams:
            resume = self._resuming.get(gen)
            if resume is None:
                kept.append(gen)
                continue
            with resume.lock:
                if not resume.done:
                    resume.buffer.append(item)
                    continue
                floor = resume.floor
            if not _after(item.position, floor):
                continue  # written from the log already
            # Ids only grow: every later event is newer than the log's part too.
            caught_up.append(gen)
            kept.append(gen)
        if caught_up:
            with self._lock:
                for gen in caught_up:
                    self._resuming.pop(gen, None)
        return kept

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
        self,
        kind: str,
        target: Any,
        event: str | bytes | None,
        coalesce: Hashable | None,
        end: int = _DELIVER,
    ) -> None:
        if event is not None:
            # Refused here, in the command that sent it, rather than on every stream.
            check_event(event)
            if isinstance(event, bytes):
                try:
                    event = event.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"An event must be UTF-8 text: {e}.") from None
            if self._replay is not None and not end and _ID_FIELD.search(event):
                raise ValueError(
                    f"{self!r} keeps a replay log, which gives every event its id: build"
                    " the event without 'event_id=' (the client would send that id back"
                    " when it reconnects, and the log would not know it)."
                )
        bus = self._bus
        if bus is None:
            chunk = None if event is None else Chunk(event)
            self._enqueue(_Item(kind, target, chunk, coalesce, end))
            return
        # The id lets every subscriber drop a repeat of this message: redis-py retries
        # a PUBLISH that timed out, and the first one may have reached Redis.
        message: dict[str, Any] = {"i": self._message_id()}
        if event is not None:
            message["e"] = event
        if kind:
            message[kind] = target
        if coalesce is not None:
            message["c"] = coalesce
        if end:
            message["x"] = end
        metrics.bus_stamp(message)  # metrics: the publish time, for the bus lag
        try:
            payload = json.dumps(message, separators=(",", ":")).encode("utf-8")
        except TypeError:
            raise TypeError(
                "With a bus, keys, identities and coalesce labels cross processes as JSON:"
                " use strings, numbers, or tuples of them."
            ) from None
        try:
            if self._resync_owed:
                self._tell_others_to_resync(bus)
            # Our own streams get it back through the bus, like every other process.
            store = self._replay_log() if event is not None and not end else None
            if isinstance(store, RedisLog):
                # Into the shared log and onto the channel in one step, with its id.
                store.append_and_publish(payload.decode("utf-8"))
            else:
                bus.publish(self._channel, payload)
        except OSError as e:
            metrics.bus_publish_failed()  # metrics
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
            if end:
                # A revocation must not pass for done: the caller learns that the
                # other processes' streams are still open.
                raise
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
        metrics.bus_received(message)  # metrics: messages and bus lag
        message_id = message.get("i")
        if isinstance(message_id, str):
            if "r" in message and message_id.partition(":")[0] == self._own_origin():
                return  # our own resync marker: this process's streams missed nothing
            if not self._first_sight(message_id):
                return
        if "r" in message:
            self._on_bus_gap()
            return
        entry_id = message.get("s")
        self._enqueue(self._item_from(message, entry_id if isinstance(entry_id, str) else None))

    def _item_from(self, message: dict[str, Any], entry_id: str | None = None) -> _Item:
        """Make the queue item of a bus message (or a Redis log entry, with its *entry_id*)."""
        kind, target = _ALL, None
        for field_name in _TARGETS:
            if field_name in message:
                kind, target = field_name, _hashable(message[field_name])
                break
        event = message.get("e")
        end = int(message.get("x", _DELIVER))
        position = None if end or event is None else parse_event_id(entry_id)
        if position is not None:
            event = f"id: {entry_id}\n{event}"
        item = _Item(
            kind,
            target,
            None if event is None else Chunk(event),
            _hashable(message.get("c")),
            end,
        )
        item.position = position
        return item

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
        store = self._replay_log()
        if isinstance(store, MemoryLog):
            # This process's log has a hole now: no tab may resume across it.
            store.reset()
        for gen in self.snapshot():
            try:
                if self.on_resync is not None:
                    if store is not None:
                        # An empty id: the client forgets its last one, which the full
                        # state makes stale, and reconnects without Last-Event-ID.
                        gen.send("id:\n\n")
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
            if item.position is None and item.chunk is not None and not item.end:
                store = self._replay_log()
                if isinstance(store, MemoryLog):
                    # Numbered under the queue's lock: the order of the ids is the
                    # order in which the streams get the events.
                    event_id, item.position = store.next_id()
                    item.chunk = Chunk(b"id: %s\n%s" % (event_id.encode(), item.chunk.data))
                    store.append(item.position, item)
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
                        metrics.events_coalesced()  # metrics
                        continue
                    self._busy = True
            if unsubscribe:
                self._unsubscribe_if_unused()
                continue
            streams = self._recipients(item.kind, item.target)
            if item.position is not None and self._resuming:
                streams = self._hold_for_resume(streams, item)
            if item.chunk is not None:
                failed = self._send_each(streams, item.chunk)
                if failed:
                    gone = set(failed)
                    streams = [gen for gen in streams if gen not in gone]
            if item.end:
                self._end_streams(streams, item.end == _END_ABRUPTLY)
            idle_since = time.monotonic()

    def _recipients(self, kind: str, target: Any) -> list[Stream]:
        if kind == _KEY:
            return self.snapshot(target)
        if kind == _IDENTITY:
            return self.snapshot(identity=target)
        if kind == _TOPIC:
            return self.snapshot(topic=target)
        return self.snapshot()

    def _end_streams(self, streams: list[Stream], reconnect: bool) -> None:
        """End revoked streams: out of the registry first, so nothing more reaches them."""
        for gen in streams:
            self.unregister(gen)
        for gen in streams:
            try:
                gen.close(reconnect=reconnect)
            except Exception:
                log.exception("flask_datastar: %r could not end the revoked %r", self, gen)
        if streams:
            log.info("flask_datastar: %r revoked %d stream(s).", self, len(streams))


def _index_remove(index: dict[Any, dict[Stream, None]], value: Any, gen: Stream) -> None:
    """Take *gen* out of ``index[value]``, dropping the entry once it is empty."""
    if value is None:
        return
    streams = index.get(value)
    if streams is not None:
        streams.pop(gen, None)
        if not streams:
            del index[value]


def _after(position: Position | None, floor: Position | None) -> bool:
    """Whether an event at *position* is newer than *floor* (no floor: every event is)."""
    return floor is None or (position is not None and position > floor)


def _coalesced(items: list[_Item]) -> list[_Item]:
    """Drop each event that a later one in *items* supersedes (same coalesce slot)."""
    last = {item.slot: index for index, item in enumerate(items) if item.slot is not None}
    return [
        item for index, item in enumerate(items) if item.slot is None or last[item.slot] == index
    ]


def _set_resumed(gen: Stream, resumed: bool) -> None:
    """Tell the stream's handler whether its missed events were written (``gen.resumed``)."""
    try:
        gen.resumed = resumed
    except AttributeError:
        pass  # a stand-in stream without the attribute


def _hashable(value: Any) -> Any:
    """Turn the lists that JSON made of tuples back into tuples, so they work as keys."""
    if isinstance(value, list):
        return tuple(_hashable(item) for item in value)
    return value
