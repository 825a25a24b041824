"""The pool of connection threads: reuse, bounds, and nothing left behind."""

from __future__ import annotations

import threading
import time

from gaman_sync.io.workers import Workers

from .conftest import WAIT


def run_and_wait(workers, task):
    done = threading.Event()

    def wrapped():
        task()
        done.set()

    workers.run(wrapped)
    assert done.wait(WAIT)


def idle_threads(workers):
    return workers.idle_threads


def test_a_finished_thread_serves_the_next_task():
    workers = Workers("test-worker", idle_timeout=WAIT)
    seen = []
    run_and_wait(workers, lambda: seen.append(threading.get_ident()))
    # The first thread parks itself just after the task; nothing announces
    # it, so poll, within a deadline.
    deadline = time.monotonic() + WAIT
    while not idle_threads(workers):
        assert time.monotonic() < deadline, "the thread never went idle"
        time.sleep(0.005)
    run_and_wait(workers, lambda: seen.append(threading.get_ident()))
    assert seen[0] == seen[1]
    workers.stop(WAIT)


def test_idle_threads_end_after_the_idle_timeout():
    workers = Workers("test-worker", idle_timeout=0.1)
    threads = []
    run_and_wait(workers, lambda: threads.append(threading.current_thread()))
    threads[0].join(WAIT)
    assert not threads[0].is_alive()
    assert idle_threads(workers) == []


def test_at_most_max_idle_threads_wait_and_stop_ends_them():
    workers = Workers("test-worker", max_idle=2, idle_timeout=WAIT)
    started = []
    release = threading.Event()
    barrier = threading.Barrier(5, timeout=WAIT)

    def task():
        started.append(threading.current_thread())
        barrier.wait()
        release.wait(WAIT)

    for _ in range(4):
        workers.run(task)
    barrier.wait()  # four tasks run at once: four threads
    release.set()
    for thread in started:
        thread.join(0.5)  # the two over max_idle end at once; two wait
    alive = [t for t in started if t.is_alive()]
    assert len(set(started)) == 4 and len(alive) == 2
    workers.stop(WAIT)
    for thread in alive:
        thread.join(WAIT)
        assert not thread.is_alive()
