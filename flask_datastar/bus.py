"""Carrying broadcasts between processes.

A registry without a bus reaches the streams of its own process only. With a
bus, :meth:`SSERegistry.broadcast` publishes the rendered event once, and the
bus hands it to the registry of the same name in every subscribed process
(the publisher's own included, exactly once), which writes it to its local
streams.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

__all__ = ["Bus", "LocalBus"]

OnMessage = Callable[[bytes], None]
OnGap = Callable[[], None]


class Bus(Protocol):
    """What a registry needs of a message bus."""

    def publish(self, channel: str, payload: bytes) -> None:
        """Send *payload* to every subscriber of *channel*, in every process."""

    def subscribe(self, channel: str, on_message: OnMessage, on_gap: OnGap) -> None:
        """Call ``on_message(payload)`` for each message on *channel*, and ``on_gap()``
        after any interruption during which messages may have been lost."""

    def unsubscribe(self, channel: str, on_message: OnMessage) -> None:
        """Stop calling *on_message*."""


class LocalBus:
    """A bus within one process: messages are delivered in the publisher's thread.

    It behaves as a real bus does (every payload is encoded and decoded), which
    makes it useful to test an application's bus plumbing without a server.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: dict[str, list[OnMessage]] = {}

    def publish(self, channel: str, payload: bytes) -> None:
        with self._lock:
            callbacks = list(self._subscribers.get(channel, ()))
        for callback in callbacks:
            callback(payload)

    def subscribe(self, channel: str, on_message: OnMessage, on_gap: OnGap) -> None:
        with self._lock:
            self._subscribers.setdefault(channel, []).append(on_message)

    def unsubscribe(self, channel: str, on_message: OnMessage) -> None:
        with self._lock:
            callbacks = self._subscribers.get(channel, [])
            if on_message in callbacks:
                callbacks.remove(on_message)
