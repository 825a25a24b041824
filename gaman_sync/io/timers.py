"""One shared thread that runs short callbacks at given times.

Every connection's timeouts (closing handshake, keepalive) live here, so
that they cost a heap entry each instead of a thread each. Callbacks must be
quick and must never block: they close sockets or queue a frame.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from typing import Any, Callable, List, Optional, Tuple

__all__ = ["Timers", "Timer"]

logger = logging.getLogger("gaman_sync")


class Timer:
    """A scheduled call; :meth:`cancel` it if it is no longer wanted."""

    __slots__ = ("when", "seq", "callback", "args", "cancelled")

    def __init__(self, when: float, seq: int, callback: Callable[..., Any],
                 args: Tuple[Any, ...]) -> None:
        self.when = when
        self.seq = seq
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        """Do not run it (a no-op if it already ran)."""
        self.cancelled = True
        self.callback = self.args = None  # type: ignore[assignment]

    def __lt__(self, other: Timer) -> bool:
        return (self.when, self.seq) < (other.when, other.seq)


class Timers:
    """The timer thread of one server (started on first use)."""

    def __init__(self, name: str = "gaman_sync-timers") -> None:
        self._name = name
        self._heap: List[Timer] = []
        self._cond = threading.Condition(threading.Lock())
        self._seq = itertools.count()
        self._thread: Optional[threading.Thread] = None
        self._stopped = False

    @property
    def thread(self) -> Optional[threading.Thread]:
        """The thread, once started."""
        return self._thread

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> Timer:
        """Run ``callback(*args)`` in the timer thread after ``delay`` seconds."""
        timer = Timer(time.monotonic() + delay, next(self._seq), callback, args)
        with self._cond:
            if self._stopped:
                timer.cancelled = True
                return timer
            heapq.heappush(self._heap, timer)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            elif self._heap[0] is timer:
                self._cond.notify()
        return timer

    def stop(self, timeout: Optional[float] = None) -> None:
        """Drop pending timers and end the thread."""
        with self._cond:
            self._stopped = True
            self._heap.clear()
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        heap = self._heap
        while True:
            with self._cond:
                while True:
                    if self._stopped:
                        return
                    if heap and heap[0].cancelled:
                        heapq.heappop(heap)
                        continue
                    delay = heap[0].when - time.monotonic() if heap else None
                    if delay is not None and delay <= 0:
                        timer = heapq.heappop(heap)
                        break
                    self._cond.wait(delay)
            callback, args = timer.callback, timer.args
            if callback is None:
                continue
            try:
                callback(*args)
            except Exception:  # a timer must never end the thread
                logger.exception("error in a timer callback")
