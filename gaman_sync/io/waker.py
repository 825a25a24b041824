"""A socket pair that wakes a thread blocked in a selector.

The accept thread and the writer thread each sleep in ``select()`` and must be
woken from other threads (a socket to watch, a stop): writing a byte to one
end of a socket pair makes the other end readable.
"""

from __future__ import annotations

import selectors
import socket

__all__ = ["Waker"]


class Waker:
    """Registered in ``selector`` for reading; :meth:`wake` from any thread."""

    __slots__ = ("_r", "_w", "_selector")

    def __init__(self, selector: selectors.BaseSelector) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        self._selector = selector
        selector.register(self._r, selectors.EVENT_READ, self)

    def owns(self, key: selectors.SelectorKey) -> bool:
        """Is this selector event the waker's?"""
        return key.data is self

    def wake(self) -> None:
        """Make the selector return (a no-op once closed, or already woken)."""
        try:
            self._w.send(b"\0")
        except OSError:  # BlockingIOError included: a wake-up is already pending
            pass

    def drain(self) -> None:
        """Consume the wake-ups (in the selector's thread)."""
        try:
            while self._r.recv(4096):
                pass
        except OSError:
            pass

    def close(self) -> None:
        """Close both ends (the selector's thread, last)."""
        try:
            self._selector.unregister(self._r)
        except (KeyError, ValueError):
            pass
        self._r.close()
        self._w.close()
