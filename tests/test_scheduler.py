"""The scheduler on its own: due times, cancellation, one run at a time, slow steps."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from flask_datastar.scheduler import RESOLUTION, Job, Scheduler


@pytest.fixture
def pool() -> Iterator[Scheduler]:
    scheduler = Scheduler(threads=2, max_threads=4, slow_step=0.2)
    yield scheduler
    scheduler.stop()


def test_jobs_run_at_their_due_times_in_order(pool: Scheduler) -> None:
    ran: list[str] = []
    done = threading.Event()
    start = time.monotonic()
    for name, delay in [("c", 0.15), ("a", 0.05), ("b", 0.1)]:
        job = Job(lambda name=name: (ran.append(name), len(ran) == 3 and done.set()), name)
        pool.schedule(job, start + delay)
    assert done.wait(5)
    assert ran == ["a", "b", "c"]


def test_a_later_schedule_replaces_an_earlier_one_and_cancel_forgets_it(pool: Scheduler) -> None:
    runs: list[float] = []
    job = Job(lambda: runs.append(time.monotonic()), "moved")
    start = time.monotonic()
    pool.schedule(job, start + 0.05)
    pool.schedule(job, start + 0.2)  # the first time no longer counts
    other = Job(lambda: runs.append(-1.0), "cancelled")
    pool.schedule(other, start + 0.05)
    pool.cancel(other)
    deadline = time.monotonic() + 5
    while not runs and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)  # a run of the cancelled job would have come by now
    assert len(runs) == 1 and runs[0] >= start + 0.2 - RESOLUTION


def test_a_job_never_runs_twice_at_once_and_a_submit_while_running_runs_it_again(
    pool: Scheduler,
) -> None:
    running = threading.Lock()
    overlaps: list[int] = []
    runs: list[int] = []
    release = threading.Event()

    def step() -> None:
        if not running.acquire(blocking=False):
            overlaps.append(1)
            return
        try:
            runs.append(1)
            if len(runs) == 1:
                release.wait(5)
        finally:
            running.release()

    job = Job(step, "once")
    pool.submit(job)
    while not runs:
        time.sleep(0.01)
    for _ in range(5):
        pool.submit(job)  # while it runs: it runs once more afterwards, not five times
    release.set()
    deadline = time.monotonic() + 5
    while len(runs) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert overlaps == [] and len(runs) == 2


def test_slow_steps_are_reported_and_the_pool_grows_for_the_others(pool: Scheduler) -> None:
    reported: list[tuple[str, float]] = []
    pool.on_slow_step(lambda name, seconds: reported.append((name, seconds)))
    release = threading.Event()
    blockers = [Job(lambda: release.wait(5), f"blocker-{i}") for i in range(2)]
    for job in blockers:
        pool.submit(job)  # both base threads are taken
    quick = threading.Event()
    time.sleep(0.4)  # longer than slow_step: the timer sees them
    pool.submit(Job(quick.set, "quick"))
    assert quick.wait(5), "the pool did not grow for a job waiting behind slow steps"
    assert pool.size > 2
    release.set()
    deadline = time.monotonic() + 5
    while len(reported) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(name for name, _ in reported) == ["blocker-0", "blocker-1"]
    assert all(seconds >= 0.2 for _, seconds in reported)


def test_a_nan_due_time_is_refused(pool: Scheduler) -> None:
    with pytest.raises(ValueError, match="NaN"):
        pool.schedule(Job(lambda: None), float("nan"))


def test_a_periodic_job_runs_until_it_is_stopped(pool: Scheduler) -> None:
    times: list[float] = []
    periodic = pool.every(0.05, lambda: times.append(time.monotonic()), name="beat")
    deadline = time.monotonic() + 5
    while len(times) < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    periodic.stop()
    assert len(times) >= 6 and periodic.runs >= 6
    stopped_at = len(times)
    time.sleep(0.2)
    assert len(times) <= stopped_at + 1  # stopped (a run under way may finish)


def test_one_thread_runs_a_slots_jobs_and_a_second_joins_when_it_falls_behind(
    pool: Scheduler,
) -> None:
    # Quick jobs due together run back to back on one thread: a second thread woken
    # for them only fights the first for the GIL.
    threads: list[int] = []
    done = threading.Event()

    def step() -> None:
        threads.append(threading.get_ident())
        time.sleep(0.001)  # a socket write: the GIL is free meanwhile
        if len(threads) == 40:
            done.set()

    due = time.monotonic() + 0.05
    for _n in range(40):
        pool.schedule(Job(step), due)
    assert done.wait(5)
    assert len(set(threads)) == 1
    # A step that blocks holds its thread: later slots' jobs still run, on another one.
    gate = threading.Event()
    blocked = Job(lambda: gate.wait(5), "blocked")
    pool.submit(blocked)
    ran = threading.Event()
    pool.schedule(Job(ran.set, "later"), time.monotonic() + 0.05)
    try:
        assert ran.wait(5)
    finally:
        gate.set()


def test_no_step_starts_during_a_fan_out_and_waiting_ones_are_not_held_back(
    pool: Scheduler,
) -> None:
    ran = threading.Event()
    with pool.fan_out():
        pool.submit(Job(ran.set, "held"))
        pool.schedule(Job(ran.set, "held too"), time.monotonic() + 0.02)
        time.sleep(0.2)  # the timer and the pool had every chance to run them
        assert not ran.is_set()
    assert ran.wait(5)  # and they run as soon as it ends

    # Under back-to-back fan-outs a step waits for one at most: one that is already
    # waiting when the next fan-out starts runs alongside that one.
    waited = threading.Event()
    inside, leave = threading.Event(), threading.Event()

    def next_fan_out() -> None:
        with pool.fan_out():
            inside.set()
            leave.wait(5)

    writer = threading.Thread(target=next_fan_out)
    try:
        with pool.fan_out():
            pool.submit(Job(waited.set, "waiting"))
            writer.start()
            assert inside.wait(5)  # the next fan-out started while the step waited
            time.sleep(0.05)
            assert not waited.is_set()
        assert waited.wait(5)  # runs while the next fan-out still writes
        assert not leave.is_set()
    finally:
        leave.set()
        writer.join(5)


def test_jobs_due_with_a_step_that_blocks_run_on_an_idle_thread(pool: Scheduler) -> None:
    # One thread is woken for a slot's jobs; when the first of them blocks (a slow
    # query), the others must not wait for it while the pool's other thread sleeps,
    # even when no later slot comes due to wake another.
    gate = threading.Event()
    ran = threading.Event()
    due = time.monotonic() + 0.05
    pool.schedule(Job(lambda: gate.wait(10), "blocks"), due)
    pool.schedule(Job(ran.set, "same slot"), due)
    try:
        assert ran.wait(3), "a job waited behind a blocking step while a thread was idle"
    finally:
        gate.set()


def test_jobs_held_by_a_fan_out_do_not_wait_behind_a_step_that_blocks(pool: Scheduler) -> None:
    # At the end of a fan-out one thread is woken for the jobs it held: when the first
    # of them blocks, the others run on the pool's other thread.
    gate = threading.Event()
    ran = threading.Event()
    with pool.fan_out():
        pool.submit(Job(lambda: gate.wait(10), "blocks"))
        pool.submit(Job(ran.set, "held with it"))
    try:
        assert ran.wait(3), "a job waited behind a blocking step while a thread was idle"
    finally:
        gate.set()


def test_a_run_that_schedules_itself_and_a_cancel_from_elsewhere_meanwhile(
    pool: Scheduler,
) -> None:
    # A job may schedule itself from its own run: it runs again at that time.
    runs: list[float] = []
    again = threading.Event()

    def step() -> None:
        runs.append(time.monotonic())
        if len(runs) == 1:
            pool.schedule(job, time.monotonic() + 0.05)
        else:
            again.set()

    job = Job(step, "self")
    pool.submit(job)
    assert again.wait(5)
    assert runs[1] - runs[0] >= 0.05 - RESOLUTION

    # A cancel from another thread while the run is still going wins over the time
    # the run gave itself: the later call counts.
    inside, leave = threading.Event(), threading.Event()
    ran: list[int] = []

    def blocking_step() -> None:
        ran.append(1)
        if len(ran) == 1:
            pool.schedule(other, time.monotonic() + 0.05)
            inside.set()
            leave.wait(5)

    other = Job(blocking_step, "cancelled while running")
    pool.submit(other)
    assert inside.wait(5)
    pool.cancel(other)
    leave.set()
    time.sleep(0.3)  # the time it gave itself has long passed
    assert ran == [1]
