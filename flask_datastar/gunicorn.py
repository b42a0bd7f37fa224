"""Server hooks for ``gunicorn.conf.py``: admission control, and a prompt drain on stop.

Under gthread a stream on the direct path gives its pool thread back once its
handler first pauses (see :mod:`flask_datastar.stream`): what bounds
a worker is then its file descriptors, one per open stream. A stream that
keeps a thread (``own_thread=True``, or the portable path behind TLS or an
HTTP/1.0 proxy) still holds one of ``--threads`` for its whole life, and when
all of them are taken, POST commands queue behind the streams forever.
:func:`post_worker_init` therefore:

- raises the worker's open-file limit to its hard limit, and caps its streams
  at that less a reserve (``DATASTAR_MAX_STREAMS`` overrides it);
- caps the streams that hold a thread at ``--threads`` less a reserve (a
  tenth, at least two), keeping threads for other requests;
- ends every stream as soon as the worker is told to stop (SIGTERM, SIGHUP's
  reload, ``--max-requests``), each client with a random retry delay of up to
  :data:`DRAIN_SPREAD` seconds, and turns new streams away the same way, so
  that the tabs land on the new workers at once instead of when
  ``--graceful-timeout`` runs out.

A stream over a cap is turned away so that the Datastar client retries it by
itself, a few seconds later (a 200 that says ``retry:`` and is then cut)::

    # gunicorn.conf.py
    from flask_datastar.gunicorn import child_exit, post_worker_init, worker_exit

:func:`child_exit` (in the master) drops an exited worker's gauges from
``PROMETHEUS_MULTIPROC_DIR``, see :mod:`flask_datastar.metrics`.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from . import metrics, selfcheck
from .stream import close_all_streams, drain_streams, open_streams, set_process_stream_limit

__all__ = [
    "DRAIN_SPREAD",
    "EXIT_MARGIN",
    "EXIT_WAIT",
    "child_exit",
    "exit_deadline",
    "post_worker_init",
    "raise_open_file_limit",
    "reserved_files",
    "reserved_threads",
    "stream_limit",
    "stream_limits",
    "worker_exit",
]

log = logging.getLogger(__name__)

#: The longest random retry delay (seconds) given to clients of a stopping worker, on
#: top of one second: every tab is back on another worker within 1 + DRAIN_SPREAD s.
DRAIN_SPREAD = 2.0

#: How long a stopping worker waits at least for its streams' ends (their last bytes,
#: their ``on_disconnect`` hooks) before it exits; longer while they are still ending, as
#: long as gunicorn lets it (see :func:`worker_exit`).
EXIT_WAIT = 3.0
#: What a stopping worker keeps of gunicorn's time for itself: it exits this many
#: seconds before gunicorn would kill it.
EXIT_MARGIN = 1.0

# When this worker began to stop (time.monotonic()), seen by post_worker_init's watcher.
_stopping_since: list[float | None] = [None]


def reserved_threads(threads: int) -> int:
    """Return how many of a worker's *threads* are kept for requests other than streams."""
    return min(threads - 1, max(2, threads // 10)) if threads > 1 else 0


def reserved_files(files: int) -> int:
    """Return how many of a worker's *files* (open-file limit) are kept for other uses.

    Listening sockets, connections of ordinary requests, log files, Redis and
    database connections: a tenth, at least 64.
    """
    return min(files - 1, max(64, files // 10)) if files > 1 else 0


def stream_limit(worker_class: str, threads: int, connections: int) -> int | None:
    """Return how many streams that hold a thread a worker of *worker_class* may hold.

    - gthread (``ThreadWorker``): ``--threads`` less :func:`reserved_threads`;
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


def stream_limits(
    worker_class: str, threads: int, connections: int, files: int
) -> tuple[int | None, int | None]:
    """Return ``(streams, streams that hold a thread)`` a worker may have open.

    Under gthread, streams that gave their thread back are bounded by the
    open-file limit *files* (less :func:`reserved_files`), the others by
    :func:`stream_limit`. Other workers: :func:`stream_limit` for both.

    :param worker_class: the class name of the gunicorn worker.
    :param threads: its ``--threads``.
    :param connections: its ``--worker-connections``.
    :param files: its open-file limit.
    """
    held = stream_limit(worker_class, threads, connections)
    if worker_class != "ThreadWorker":
        return held, held
    assert held is not None
    return max(held, files - reserved_files(files)), held


def raise_open_file_limit() -> int:
    """Raise this process's open-file limit (soft) to its hard limit; return the new limit.

    A worker whose streams hold no thread holds one file descriptor per tab:
    the common soft limit of 1024 would cap it there.
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows, where gunicorn does not run
        return 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return int(soft)


def post_worker_init(worker: Any) -> None:
    """Cap the worker's streams, and end them all as soon as the worker starts to stop."""
    worker_class = type(worker).__name__
    threads = int(getattr(worker.cfg, "threads", 1) or 1)
    connections = int(getattr(worker.cfg, "worker_connections", 1000) or 1000)
    files = raise_open_file_limit()
    limit, held = stream_limits(worker_class, threads, connections, files)
    selfcheck.note_gunicorn_worker(worker_class, threads, connections)
    if limit == 0:
        log.warning(
            "flask_datastar: gunicorn's sync worker serves one request at a time, and a"
            " stream would hold it for good: every stream gets a 503. Run gunicorn with"
            " '-k gthread --threads 32' (or more)."
        )
    set_process_stream_limit(limit, held)

    def watch() -> None:
        while worker.alive:
            stopping.wait(0.2)
        _stopping_since[0] = time.monotonic()
        # New streams are turned away from now on: gunicorn still answers requests on
        # kept-alive connections for a moment while it stops.
        drain_streams(spread=DRAIN_SPREAD)

    stopping = threading.Event()
    threading.Thread(target=watch, name="flask_datastar-drain", daemon=True).start()


def worker_exit(server: Any, worker: Any) -> None:
    """End whatever stream is still open when the worker exits, and wait for their ends.

    Streams that gave their thread back are not requests gunicorn waits for:
    without this wait the process could exit before their last bytes and
    their ``on_disconnect`` hooks. The wait ends as soon as every stream has
    ended, and at the latest :data:`EXIT_MARGIN` seconds before gunicorn
    would kill the worker (``--graceful-timeout`` or ``--timeout`` after it
    began to stop, whichever is shorter), but not before :data:`EXIT_WAIT`.
    """
    drain_streams(spread=DRAIN_SPREAD)
    close_all_streams(reconnect=True)
    deadline = exit_deadline(worker.cfg, _stopping_since[0])
    while open_streams() and time.monotonic() < deadline:
        time.sleep(0.02)
    metrics.flush()  # what the worker counted since its last write, before it is gone


def exit_deadline(cfg: Any, since: float | None = None) -> float:
    """Return when (``time.monotonic()``) a stopping worker stops waiting for its streams.

    :param cfg: the worker's gunicorn settings (``graceful_timeout``, ``timeout``).
    :param since: when it began to stop; now if ``None``.
    """
    start = time.monotonic() if since is None else since
    # A --timeout of 0 means none.
    limits = [float(value) for value in (cfg.graceful_timeout, cfg.timeout) if value > 0]
    allowed = min(limits) if limits else EXIT_WAIT
    return start + max(EXIT_WAIT, allowed - EXIT_MARGIN)


def child_exit(server: Any, worker: Any) -> None:
    """Drop the exited *worker*'s gauges from ``PROMETHEUS_MULTIPROC_DIR`` (in the master).

    Its open streams stop counting as open; its counters stay. Does nothing
    without that directory or without ``prometheus_client``.
    """
    metrics.mark_process_dead(worker.pid)
