"""The shared threads of a server, or of all the clients of a program.

A runtime owns the few threads that serve every connection it runs: the
timer thread (close and keepalive timeouts), the writer thread (slow peers'
buffers) and the pool of connection threads. Each starts on first use. The
runtime knows its threads, so that a shutdown can tell when it is called from
one of them (it cannot wait for the thread it runs in).
"""

from __future__ import annotations

import threading
from typing import Optional

from .flusher import Flusher
from .timers import Timers
from .workers import Workers

__all__ = ["Runtime"]


class Runtime:
    """Timers, a writer thread and connection threads, named after ``name``."""

    def __init__(self, name: str = "gaman_sync") -> None:
        self.name = name
        self.timers = Timers(f"{name}-timers")
        """The timer thread."""
        self.flusher = Flusher(f"{name}-writer")
        """The writer thread."""
        self.workers = Workers(f"{name}-conn")
        """The connection threads."""

    def owns(self, thread: Optional[threading.Thread] = None) -> bool:
        """Is ``thread`` (default: the calling thread) one of this runtime's?"""
        thread = thread or threading.current_thread()
        return (self.workers.owns(thread) or thread is self.timers.thread
                or thread is self.flusher.thread)
