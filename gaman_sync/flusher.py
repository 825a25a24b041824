"""One shared thread that drains the outgoing buffers of slow peers.

Writes are non-blocking: a frame goes straight to the socket whenever the
kernel takes it, which is nearly always. Only what the kernel refused waits
in the connection's buffer, and this thread sends it as the socket becomes
writable. So no sender ever blocks on a peer that is not reading, and the
server needs one writer thread in all instead of one per connection.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
from collections import deque
from typing import Any, Callable, Deque, Dict, Optional, Tuple

__all__ = ["Flusher"]

logger = logging.getLogger("gaman_sync")

FlushCallback = Callable[[], bool]
"""Sends what it can; returns True when nothing is left to wait for."""


class Flusher:
    """Waits for writability of the sockets it watches and calls their flush."""

    def __init__(self, name: str = "gaman_sync-writer") -> None:
        self._name = name
        self._lock = threading.Lock()
        self._todo: Deque[Tuple[bool, socket.socket, Optional[FlushCallback]]] = deque()
        self._thread: Optional[threading.Thread] = None
        self._selector: Optional[selectors.BaseSelector] = None
        self._wake_r: Optional[socket.socket] = None
        self._wake_w: Optional[socket.socket] = None
        self._stopped = False

    @property
    def thread(self) -> Optional[threading.Thread]:
        """The thread, once started."""
        return self._thread

    def watch(self, sock: socket.socket, flush: FlushCallback) -> None:
        """Call ``flush()`` each time ``sock`` can take more, until it returns True."""
        self._submit(True, sock, flush)

    def forget(self, sock: socket.socket) -> None:
        """Stop watching ``sock`` (call before closing it)."""
        self._submit(False, sock, None)

    def _submit(self, add: bool, sock: socket.socket, flush: Optional[FlushCallback]) -> None:
        with self._lock:
            if self._stopped:
                return
            if self._thread is None:
                if not add:
                    return
                self._start()
            self._todo.append((add, sock, flush))
        self._wake()

    def _start(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")  # type: ignore[union-attr]
        except (BlockingIOError, OSError):
            pass  # already awake, or stopping

    def stop(self, timeout: Optional[float] = None) -> None:
        """End the thread; what is still unsent is dropped (its sockets are closing)."""
        with self._lock:
            self._stopped = True
            thread = self._thread
        if thread is None:
            return
        self._wake()
        if thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        selector = self._selector
        assert selector is not None
        watched: Dict[socket.socket, FlushCallback] = {}
        try:
            while not self._stopped:
                for key, _ in selector.select():
                    sock = key.fileobj
                    if sock is self._wake_r:
                        try:
                            while self._wake_r.recv(4096):  # type: ignore[union-attr]
                                pass
                        except (BlockingIOError, OSError):
                            pass
                        continue
                    flush = watched.get(sock)  # type: ignore[call-overload]
                    done = True
                    if flush is not None:
                        try:
                            done = flush()
                        except Exception:
                            logger.exception("error while flushing a connection")
                    if done:
                        watched.pop(sock, None)  # type: ignore[call-overload]
                        _unregister(selector, sock)
                # Applied in the order submitted, so a socket's forget always
                # comes before a new socket that reuses its descriptor.
                while True:
                    with self._lock:
                        if not self._todo:
                            break
                        add, sock, flush = self._todo.popleft()
                    if add:
                        assert flush is not None
                        if sock in watched:
                            watched[sock] = flush
                            continue
                        try:
                            selector.register(sock, selectors.EVENT_WRITE)
                        except (ValueError, OSError, KeyError):
                            continue  # already closed
                        watched[sock] = flush
                    elif watched.pop(sock, None) is not None:
                        _unregister(selector, sock)
        finally:
            selector.close()
            self._wake_r.close()  # type: ignore[union-attr]
            with self._lock:
                self._wake_w.close()  # type: ignore[union-attr]


def _unregister(selector: selectors.BaseSelector, sock: Any) -> None:
    try:
        selector.unregister(sock)
    except (KeyError, ValueError, OSError):
        pass
