"""Where stream handlers run: one timer heap and a small pool of threads per process.

A stream handler is a generator that pauses with ``yield gen.sleep(seconds)``:
between two steps it holds no thread. The scheduler keeps one heap of due
times and runs each due step on one of a few pool threads, so ten thousand
tabs ticking every second cost ten thousand short steps a second, not ten
thousand threads waking.

- A step must be short. One that runs longer than ``slow_step`` seconds (a
  slow query, a ``time.sleep``) is logged once, with the route, and while
  steps are that slow the pool grows (up to ``max_threads``) so the other
  tabs keep their pace. A route whose handler blocks by design opts out
  into its own thread (``@datastar.sse(own_thread=True)``).
- Steps of one job never run at the same time, and run in the order they
  were asked for; different jobs run in parallel on the pool.
- Periodic work for every tab (render once, broadcast to a registry) runs
  on the same pool: :meth:`Scheduler.every`.
- The steps due together run back to back on one thread; another joins
  while it is behind. No step starts while a registry writes a broadcast to
  its streams (:meth:`Scheduler.fan_out`): they would only fight for the GIL.

Nothing here knows Flask or streams: a :class:`Job` is a callable with a
name. The pool starts in the process that first uses it (so after
gunicorn's fork, in each worker).
"""

from __future__ import annotations

import heapq
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["RESOLUTION", "Job", "PeriodicJob", "Scheduler", "fan_out", "scheduler"]

log = logging.getLogger(__name__)

_IDLE, _QUEUED, _RUNNING = 0, 1, 2

#: The timer's resolution in seconds: a job runs at its due time rounded up to a
#: multiple of it, so that the jobs due in the same slot are handled together.
RESOLUTION = 0.01
# Jobs that waited this long while no thread started any: the threads at work are
# blocked (a step that waits), and one more is woken for them. Long enough that a
# thread that runs a slot's jobs back to back is not taken for blocked on a busy machine.
_STALLED = 5 * RESOLUTION


class Job:
    """Something the scheduler runs: ``fn()``, on a pool thread, never twice at once.

    :param fn: called with no argument on a pool thread.
    :param name: how logs and metrics name it (a stream's route, a periodic job).
    """

    __slots__ = ("fn", "name", "_state", "_again", "_generation", "_started")

    def __init__(self, fn: Callable[[], object], name: str = "") -> None:
        self.fn = fn
        self.name = name
        self._state = _IDLE
        self._again = False
        # Bumped by every schedule(): a timer entry of an older generation is stale.
        self._generation = 0
        self._started = 0.0

    def __repr__(self) -> str:
        return f"<Job {self.name!r}>"


class _Worker:
    __slots__ = ("thread", "job", "started", "reported")

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self.job: Job | None = None
        self.started = 0.0
        self.reported = False


class Scheduler:
    """One timer heap and a pool of threads running :class:`Job` objects.

    :param threads: the pool threads kept at all times.
    :param max_threads: the most threads the pool grows to while steps are slow.
    :param slow_step: seconds after which a running step counts as slow.
    """

    def __init__(self, threads: int = 2, max_threads: int = 32, slow_step: float = 0.5) -> None:
        if threads < 1 or max_threads < threads:
            raise ValueError("The scheduler needs 1 <= threads <= max_threads.")
        self.threads = threads
        self.max_threads = max_threads
        self.slow_step = slow_step
        lock = threading.Lock()
        self._cond = threading.Condition(lock)
        self._ready: deque[Job] = deque()
        # Slot number (due time / RESOLUTION, rounded up) -> (generation, job) pairs due
        # then; the heap holds the slot numbers.
        self._buckets: dict[int, list[tuple[int, Job]]] = {}
        self._slots: list[int] = []
        self._workers: list[_Worker] = []
        self._idle = 0
        # Fan-outs being written now, during which no step starts (see fan_out).
        self._held = 0
        # Jobs started so far: the timer tells a blocked pool from a busy one by it.
        self._starts = 0
        self._timer_wake = threading.Condition(lock)
        self._stopped = False
        self._pid = os.getpid()
        self._slow_hooks: list[Callable[[str, float], object]] = []
        self._timer = threading.Thread(
            target=self._run_timer, name="flask_datastar-scheduler", daemon=True
        )
        self._timer.start()
        with self._cond:
            for _ in range(threads):
                self._spawn_locked()

    # -- asking for work ----------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Run *job* as soon as a pool thread is free (again after its current run, if any)."""
        with self._cond:
            self._submit_locked(job)

    def schedule(self, job: Job, due: float) -> None:
        """Run *job* at the monotonic time *due*; replaces an earlier ``schedule`` of it.

        A :meth:`submit` in between runs it early, and leaves this time in place.
        """
        if due != due:
            # NaN at the top of the heap is never due, and hides every
            # entry below it: no timer of the process would fire again.
            raise ValueError("A job cannot be scheduled at NaN; give a monotonic time.")
        with self._cond:
            job._generation += 1
            if due == math.inf:
                return  # never: as cancel()
            # Due times are kept in slots of RESOLUTION seconds (rounded up): the timer
            # handles a slot's jobs together, and its heap holds slots, not every job.
            slot = math.ceil(due / RESOLUTION)
            bucket = self._buckets.get(slot)
            if bucket is None:
                bucket = self._buckets[slot] = []
                heapq.heappush(self._slots, slot)
                if self._slots[0] == slot:
                    self._timer_wake.notify()
            bucket.append((job._generation, job))

    def cancel(self, job: Job) -> None:
        """Forget the time *job* was scheduled at (a running or queued run still happens)."""
        with self._cond:
            job._generation += 1

    def every(
        self, seconds: float, fn: Callable[[], object], name: str = "", start: bool = True
    ) -> PeriodicJob:
        """Run ``fn()`` every *seconds* on the pool; see :class:`PeriodicJob`."""
        job = PeriodicJob(self, seconds, fn, name or getattr(fn, "__qualname__", "periodic"))
        if start:
            job.start()
        return job

    def on_slow_step(self, hook: Callable[[str, float], object]) -> None:
        """Call ``hook(name, seconds)`` for every step that ran longer than ``slow_step``."""
        self._slow_hooks.append(hook)

    @property
    def size(self) -> int:
        """The pool threads running now."""
        return len(self._workers)

    def pending(self) -> int:
        """The jobs waiting for a pool thread."""
        return len(self._ready)

    @contextmanager
    def fan_out(self) -> Iterator[None]:
        """Start no step while the caller writes one event to many streams.

        A broadcast's fan-out and the pool's steps both need the GIL, and
        every socket write hands it over: run side by side, each makes the
        other slower (at 1,000 tabs, with the demo's ticks among the writes, the
        broadcast's p99 was 1.56x the floor's, against 1.2x without them).
        Steps that come due meanwhile wait for the end of the fan-out. When
        some are already waiting as it starts, they are not held back: under
        back-to-back fan-outs a step waits at most for one of them.
        """
        with self._cond:
            hold = not self._ready
            if hold:
                self._held += 1
        try:
            yield
        finally:
            if hold:
                with self._cond:
                    self._held -= 1
                    if not self._held and self._ready and self._idle:
                        self._cond.notify()  # more join if it falls behind (_run_timer)

    def _submit_locked(self, job: Job) -> None:
        if job._state == _IDLE:
            job._state = _QUEUED
            self._ready.append(job)
            if self._idle and not self._held:
                self._cond.notify()
        elif job._state == _RUNNING:
            job._again = True

    # -- the timer thread ---------------------------------------------------------

    def _run_timer(self) -> None:
        next_check = time.monotonic()
        # When to look again at jobs left waiting, and the starts counted then.
        look_at, look_starts = math.inf, 0
        with self._cond:
            while not self._stopped:
                now = time.monotonic()
                slots = self._slots
                if (
                    now >= look_at
                    and self._ready
                    and self._starts == look_starts
                    and self._idle
                    and not self._held
                ):
                    # Jobs waited and no thread started one: those at work are blocked (a
                    # slow step), and no later slot may come to wake another (nor the
                    # end of a fan-out, which wakes one). One more joins.
                    self._cond.notify()
                # Jobs still waiting from earlier: the threads at work are behind.
                behind = len(self._ready)
                due = 0
                while slots and slots[0] * RESOLUTION <= now:
                    for generation, job in self._buckets.pop(heapq.heappop(slots)):
                        if generation == job._generation and job._state == _IDLE:
                            job._state = _QUEUED
                            self._ready.append(job)
                            due += 1
                        elif generation == job._generation:
                            self._submit_locked(job)  # running: it runs again after
                if due and self._idle and not self._held:
                    # One thread runs a slot's jobs, back to back: a second one woken
                    # for the same few jobs only fights the first for the GIL and the
                    # application's locks (twice the CPU per tick, measured). One more
                    # thread joins per slot while the ones at work are behind (a
                    # step that blocks, a slot with more work than a thread can do).
                    self._cond.notify(min(1 + behind, due, self._idle))
                if now >= next_check:
                    self._check_pool_locked(now)
                    next_check = now + min(0.25, self.slow_step / 2)
                if not self._ready or not self._idle:
                    look_at = math.inf  # nothing waits, or no thread to wake for it
                elif now >= look_at or self._starts != look_starts or look_at == math.inf:
                    look_at, look_starts = now + _STALLED, self._starts
                wait = min(next_check, look_at) - now
                if slots:
                    wait = min(wait, slots[0] * RESOLUTION - now)
                if wait > 0:
                    self._timer_wake.wait(wait)

    def _check_pool_locked(self, now: float) -> None:
        """Report slow steps, and grow the pool while they hold threads that others need."""
        slow = 0
        for worker in self._workers:
            job = worker.job
            if job is None or now - worker.started < self.slow_step:
                continue
            slow += 1
            if not worker.reported:
                worker.reported = True
                log.warning(
                    "flask_datastar: a step of %s has run for %.1f s and goes on: it holds one"
                    " of the scheduler's threads. Keep handler steps short (no blocking call"
                    " between two 'yield's), or give the route its own thread with"
                    " own_thread=True.",
                    job.name or "a job",
                    now - worker.started,
                )
        if slow and not self._idle and self._ready and len(self._workers) < self.max_threads:
            self._spawn_locked()

    # -- the pool -----------------------------------------------------------------

    def _spawn_locked(self) -> None:
        worker = _Worker()
        thread = threading.Thread(
            target=self._work,
            args=(worker,),
            name=f"flask_datastar-step-{len(self._workers) + 1}",
            daemon=True,
        )
        worker.thread = thread
        self._workers.append(worker)
        thread.start()

    def _work(self, worker: _Worker) -> None:
        cond = self._cond
        ready = self._ready
        while True:
            with cond:
                if worker.job is not None:
                    job = worker.job
                    worker.job = None
                    if job._again:
                        job._again = False
                        job._state = _QUEUED
                        ready.append(job)
                    else:
                        job._state = _IDLE
                    if worker.reported:
                        self._report_slow(job, time.monotonic() - worker.started)
                        worker.reported = False
                while not ready or self._held:
                    if self._stopped:
                        return
                    self._idle += 1
                    # An extra thread leaves after a quiet minute; the base pool stays.
                    got = cond.wait(60.0)
                    self._idle -= 1
                    if not got and not ready and len(self._workers) > self.threads:
                        self._workers.remove(worker)
                        return
                job = ready.popleft()
                self._starts += 1
                job._state = _RUNNING
                worker.job = job
                worker.started = time.monotonic()
            try:
                job.fn()
            except BaseException:  # a job must never take a pool thread down
                log.exception("flask_datastar: error in the scheduled job %s", job.name)

    def _report_slow(self, job: Job, seconds: float) -> None:
        # Under self._cond: the hooks only count (metrics), they must not block.
        for hook in self._slow_hooks:
            try:
                hook(job.name, seconds)
            except Exception:
                log.exception("flask_datastar: error in a slow-step hook")

    def stop(self) -> None:
        """Stop the timer and the pool threads once they are idle (for tests)."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()


class PeriodicJob:
    """A function run every *seconds* on the scheduler's pool, at a fixed rate.

    A run that comes due while the previous one still runs is skipped, not
    queued: a slow run never makes the next ones pile up. Made by
    :meth:`Scheduler.every` or :meth:`flask_datastar.FlaskDatastar.every`.
    """

    def __init__(self, scheduler: Scheduler, seconds: float, fn: Callable[[], object], name: str):
        if not seconds > 0:
            raise ValueError(f"A periodic job needs a period above 0 seconds, not {seconds!r}.")
        self.seconds = float(seconds)
        self.fn = fn
        self.runs = 0
        self._scheduler = scheduler
        self._job = Job(self._run, name)
        self._next = 0.0
        self._running = False
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self._job.name

    @property
    def running(self) -> bool:
        """Whether the job is started (and not stopped)."""
        return self._running

    def start(self) -> None:
        """Run it now, then every ``seconds``; does nothing if it runs already."""
        with self._lock:
            if self._running:
                return
            self._running = True
            self._next = time.monotonic()
        self._scheduler.submit(self._job)

    def stop(self) -> None:
        """Stop running it (a run under way finishes)."""
        with self._lock:
            self._running = False
        self._scheduler.cancel(self._job)

    def _run(self) -> None:
        if not self._running:
            return
        try:
            self.fn()
        except Exception:
            log.exception("flask_datastar: error in the periodic job %s", self.name)
        finally:
            self.runs += 1
            now = time.monotonic()
            # Fixed rate; missed beats are skipped rather than run back to back.
            self._next += self.seconds
            if self._next <= now:
                self._next = now + self.seconds - ((now - self._next) % self.seconds)
            with self._lock:
                if self._running:
                    self._scheduler.schedule(self._job, self._next)


_instance: list[Scheduler | None] = [None]
_instance_lock = threading.Lock()
#: (threads, max_threads, slow_step) for the scheduler made next: see :func:`configure`.
_settings: list[tuple[int, int, float]] = [(2, 32, 0.5)]


def configure(threads: int = 2, max_threads: int = 32, slow_step: float = 0.5) -> None:
    """Set the pool of the scheduler this process makes on first use.

    :param threads: the pool threads kept at all times.
    :param max_threads: the most threads while steps are slow.
    :param slow_step: seconds after which a step is slow (logged, and the pool grows).
    """
    if threads < 1 or max_threads < threads or slow_step <= 0:
        raise ValueError("The scheduler needs 1 <= threads <= max_threads and slow_step > 0.")
    _settings[0] = (threads, max_threads, slow_step)


def scheduler() -> Scheduler:
    """Return this process's scheduler, starting it on first use (and after a fork)."""
    current = _instance[0]
    if current is not None and current._pid == os.getpid():
        return current
    with _instance_lock:
        current = _instance[0]
        if current is None or current._pid != os.getpid():
            threads, max_threads, slow_step = _settings[0]
            current = Scheduler(threads, max_threads, slow_step)
            _instance[0] = current
        return current


@contextmanager
def fan_out() -> Iterator[None]:
    """This process's :meth:`Scheduler.fan_out`; nothing is held back where none runs yet."""
    current = _instance[0]
    if current is not None and current._pid == os.getpid():
        with current.fan_out():
            yield
    else:
        yield
