"""One shared thread that drains the outgoing buffers of slow peers.

Writes are non-blocking: a frame goes straight to the socket whenever the
kernel takes it, which is nearly always. Only what the kernel refused waits
in the connection's buffer, and this thread sends it as the socket becomes
writable. So no sender ever blocks on a peer that is not reading, and a
whole runtime needs one writer thread instead of one per connection.
"""

from __future__ import annotations

import logging
import selectors
import threading
from collections import deque
from typing import Any, Callable, Deque, Dict, Optional, Tuple

from .waker import Waker

__all__ = ["Flusher", "FlushCallback"]

logger = logging.getLogger("gaman_sync")

FlushCallback = Callable[[], bool]
"""Sends what it can; returns True when nothing is left to wait for."""


class Flusher:
    """Waits for writability of what it watches and calls each one's flush.

    What it watches is anything a selector takes: a socket, or a transport
    with ``fileno()``.
    """

    def __init__(self, name: str = "gaman_sync-writer") -> None:
        self._name = name
        self._lock = threading.Lock()
        self._todo: Deque[Tuple[bool, Any, Optional[FlushCallback]]] = deque()
        self._thread: Optional[threading.Thread] = None
        self._selector: Optional[selectors.BaseSelector] = None
        self._waker: Optional[Waker] = None
        self._stopped = False

    @property
    def thread(self) -> Optional[threading.Thread]:
        """The thread, once started."""
        return self._thread

    def watch(self, target: Any, flush: FlushCallback) -> None:
        """Call ``flush()`` each time ``target`` can take more, until it returns True."""
        self._submit(True, target, flush)

    def forget(self, target: Any) -> None:
        """Stop watching ``target`` (call before closing it)."""
        self._submit(False, target, None)

    def _submit(self, add: bool, target: Any, flush: Optional[FlushCallback]) -> None:
        with self._lock:
            if self._stopped:
                return
            if self._thread is None:
                if not add:
                    return
                self._start()
            self._todo.append((add, target, flush))
            waker = self._waker
        assert waker is not None
        waker.wake()

    def _start(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._waker = Waker(self._selector)
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self, timeout: Optional[float] = None) -> None:
        """End the thread; what is still unsent is dropped (its sockets are closing)."""
        with self._lock:
            self._stopped = True
            thread, waker = self._thread, self._waker
        if thread is None or waker is None:
            return
        waker.wake()
        if thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        selector, waker = self._selector, self._waker
        assert selector is not None and waker is not None
        watched: Dict[Any, FlushCallback] = {}
        try:
            while not self._stopped:
                for key, _ in selector.select():
                    if waker.owns(key):
                        waker.drain()
                        continue
                    target = key.fileobj
                    flush = watched.get(target)
                    done = True
                    if flush is not None:
                        try:
                            done = flush()
                        except Exception:
                            logger.exception("error while flushing a connection")
                    if done:
                        watched.pop(target, None)
                        _unregister(selector, target)
                # Applied in the order submitted, so a socket's forget always
                # comes before a new socket that reuses its descriptor.
                while True:
                    with self._lock:
                        if not self._todo:
                            break
                        add, target, flush = self._todo.popleft()
                    if add:
                        assert flush is not None
                        if target in watched:
                            watched[target] = flush
                            continue
                        try:
                            selector.register(target, selectors.EVENT_WRITE)
                        except (ValueError, OSError, KeyError):
                            continue  # already closed
                        watched[target] = flush
                    elif watched.pop(target, None) is not None:
                        _unregister(selector, target)
        finally:
            with self._lock:
                waker.close()
            selector.close()


def _unregister(selector: selectors.BaseSelector, target: Any) -> None:
    try:
        selector.unregister(target)
    except (KeyError, ValueError, OSError):
        pass
