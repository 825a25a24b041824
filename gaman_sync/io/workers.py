"""Reusable threads for connections.

``Thread.start()`` waits until the new thread has run, so under load the
accept thread, which starts every connection's thread, stalls behind each
start. A thread whose connection ended instead waits a moment for the next
one; handing it a connection is a lock release. At most ``max_idle`` threads
wait, for at most ``idle_timeout`` seconds: a burst of connections reuses
threads, and a server that went quiet keeps none.
"""

from __future__ import annotations

import threading
from typing import Callable, List, Optional, Type

__all__ = ["Workers"]

Task = Callable[[], None]


class _Worker:
    __slots__ = ("wake", "task", "thread")

    def __init__(self) -> None:
        self.wake = threading.Lock()
        self.wake.acquire()  # released to hand over a task (or to end)
        self.task: Optional[Task] = None
        self.thread = threading.current_thread()


class Workers:
    """Runs each task in a thread of its own, reusing threads that are idle."""

    def __init__(self, name: str, max_idle: int = 16, idle_timeout: float = 1.0) -> None:
        self._name = name
        # Its threads are instances of a class of its own: owns() asks their
        # class, where a set of them would keep a weak reference per thread.
        self._thread_class: Type[threading.Thread] = type(
            "WorkerThread", (threading.Thread,), {"__slots__": ()})
        self._max_idle = max_idle
        self._idle_timeout = idle_timeout
        self._lock = threading.Lock()
        self._idle: List[_Worker] = []
        self._stopped = False

    def run(self, task: Task) -> None:
        """Run ``task`` in an idle thread, or in a new one (RuntimeError if
        none can be started)."""
        with self._lock:
            worker = self._idle.pop() if self._idle else None
        if worker is not None:
            worker.task = task
            worker.wake.release()
            return
        thread = self._thread_class(target=self._loop, args=(task,), name=self._name,
                                    daemon=True)
        thread.start()

    def owns(self, thread: threading.Thread) -> bool:
        """Is ``thread`` one of these workers?"""
        return type(thread) is self._thread_class

    @property
    def idle_threads(self) -> List[threading.Thread]:
        """The threads waiting for a task (a snapshot)."""
        with self._lock:
            return [worker.thread for worker in self._idle]

    def stop(self, timeout: Optional[float] = None) -> None:
        """End the idle threads, waiting up to ``timeout`` for them; a busy
        one ends when its task does, and refuses more."""
        with self._lock:
            self._stopped = True
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.wake.release()  # with no task: the thread ends
        for worker in idle:
            worker.thread.join(timeout)

    def _loop(self, task: Optional[Task]) -> None:
        me: Optional[_Worker] = None
        while task is not None:
            task()
            task = None
            if len(self._idle) >= self._max_idle:
                return  # the usual case after a burst: no shared lock to queue on
            if me is None:
                me = _Worker()
            with self._lock:
                if self._stopped or len(self._idle) >= self._max_idle:
                    return
                self._idle.append(me)
            if not me.wake.acquire(timeout=self._idle_timeout):
                with self._lock:
                    if me in self._idle:
                        self._idle.remove(me)
                        return
                # A task was handed over just as the wait ended.
                me.wake.acquire()
            task, me.task = me.task, None

