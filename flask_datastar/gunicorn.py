"""Server hooks for ``gunicorn.conf.py``: end streams promptly when a worker stops.

gunicorn runs no hook in a worker on SIGTERM; it stops accepting and waits up
to ``--graceful-timeout`` for open connections, so every stream would hold
its worker for that long and then be cut at the same moment. With these
hooks the worker ends its streams as soon as it is told to stop, each client
with a random retry delay so they do not all come back at once::

    # gunicorn.conf.py
    from flask_datastar.gunicorn import post_worker_init, worker_exit
"""

from __future__ import annotations

import threading
from typing import Any

from .stream import close_all_streams

__all__ = ["DRAIN_SPREAD", "post_worker_init", "worker_exit"]

#: The longest random retry delay (seconds) given to clients of a stopping worker.
DRAIN_SPREAD = 5.0


def post_worker_init(worker: Any) -> None:
    """Watch ``worker.alive`` and end every stream when the worker starts to stop."""

    def watch() -> None:
        while worker.alive:
            stopping.wait(0.2)
        close_all_streams(reconnect=True, spread=DRAIN_SPREAD)

    stopping = threading.Event()
    threading.Thread(target=watch, name="flask_datastar-drain", daemon=True).start()


def worker_exit(server: Any, worker: Any) -> None:
    """End whatever stream is still open when the worker exits."""
    close_all_streams(reconnect=True)
