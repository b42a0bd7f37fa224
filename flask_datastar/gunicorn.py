"""Server hooks for ``gunicorn.conf.py``: admission control, and a prompt drain on stop.

Under gthread every open stream holds one of the worker's ``--threads`` for
its whole life; when all of them are taken, POST commands queue behind the
streams forever. :func:`post_worker_init` therefore caps the streams of each
worker at ``--threads`` less a reserve (a tenth, at least two), unless
``DATASTAR_MAX_STREAMS`` says otherwise; a stream over the cap gets a 503.

gunicorn runs no hook in a worker on SIGTERM; it stops accepting and waits up
to ``--graceful-timeout`` for open connections, so every stream would hold
its worker for that long and then be cut at the same moment. With these
hooks the worker ends its streams as soon as it is told to stop, each client
with a random retry delay so they do not all come back at once::

    # gunicorn.conf.py
    from flask_datastar.gunicorn import child_exit, post_worker_init, worker_exit

:func:`child_exit` (in the master) drops an exited worker's gauges from
``PROMETHEUS_MULTIPROC_DIR``, see :mod:`flask_datastar.metrics`.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from . import metrics, selfcheck
from .stream import close_all_streams, drain_streams, set_process_stream_limit

__all__ = [
    "DRAIN_SPREAD",
    "child_exit",
    "post_worker_init",
    "reserved_threads",
    "stream_limit",
    "worker_exit",
]

log = logging.getLogger(__name__)

#: The longest random retry delay (seconds) given to clients of a stopping worker.
DRAIN_SPREAD = 5.0


def reserved_threads(threads: int) -> int:
    """Return how many of a worker's *threads* are kept for requests other than streams."""
    return min(threads - 1, max(2, threads // 10)) if threads > 1 else 0


def stream_limit(worker_class: str, threads: int, connections: int) -> int | None:
    """Return how many streams a worker of *worker_class* may hold, or ``None`` for no cap.

    - gthread (``ThreadWorker``): ``--threads`` less :func:`reserved_threads`,
      since every stream holds a thread;
    - gevent, eventlet and other workers with ``--worker-connections``
      (greenlets, not threads): that many connections less a tenth (at least
      two) for other requests;
    - the sync worker serves one request at a time: a stream would hold the
      whole worker, so none is allowed (every stream gets a 503).

    :param worker_class: the class name of the gunicorn worker.
    :param threads: its ``--threads``.
    :param connections: its ``--worker-connections``.
    """
    if worker_class == "ThreadWorker":
        return max(1, threads - reserved_threads(threads))
    if worker_class == "SyncWorker":
        return 0
    return max(1, connections - max(2, connections // 10)) if connections > 1 else 1


def post_worker_init(worker: Any) -> None:
    """Cap the worker's streams, and end them all as soon as the worker starts to stop."""
    worker_class = type(worker).__name__
    threads = int(getattr(worker.cfg, "threads", 1) or 1)
    connections = int(getattr(worker.cfg, "worker_connections", 1000) or 1000)
    limit = stream_limit(worker_class, threads, connections)
    selfcheck.note_gunicorn_worker(worker_class, threads, connections)
    if limit == 0:
        log.warning(
            "flask_datastar: gunicorn's sync worker serves one request at a time, and a"
            " stream would hold it for good: every stream gets a 503. Run gunicorn with"
            " '-k gthread --threads 100' (or more)."
        )
    set_process_stream_limit(limit)

    def watch() -> None:
        while worker.alive:
            stopping.wait(0.2)
        # Also every stream opened from now on: gunicorn still answers requests on
        # kept-alive connections for a moment while it stops.
        drain_streams(spread=DRAIN_SPREAD)

    stopping = threading.Event()
    threading.Thread(target=watch, name="flask_datastar-drain", daemon=True).start()


def worker_exit(server: Any, worker: Any) -> None:
    """End whatever stream is still open when the worker exits."""
    close_all_streams(reconnect=True)
    metrics.flush()  # what the worker counted since its last write, before it is gone


def child_exit(server: Any, worker: Any) -> None:
    """Drop the exited *worker*'s gauges from ``PROMETHEUS_MULTIPROC_DIR`` (in the master).

    Its open streams stop counting as open; its counters stay. Does nothing
    without that directory or without ``prometheus_client``.
    """
    metrics.mark_process_dead(worker.pid)
