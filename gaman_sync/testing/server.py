"""A server for one test: started on 127.0.0.1 port 0, shut down after, and
checked for anything it left behind.

Theory of operation
-------------------
:func:`run_server` makes a :class:`~gaman_sync.WebSocketServer`, starts it
(port 0: the kernel picks a free port, so tests run in parallel and never
collide), yields it, and on the way out calls :func:`shut_down_cleanly`.

A shutdown that returns is not yet a clean one: a callback that never
returns keeps its connection's thread alive, and a listening socket that
was not closed keeps its port. :func:`shut_down_cleanly` shuts the server
down, then waits a short ``grace`` for every thread the server owns (the
threads of its runtime, named ``gaman_sync-...``: timers, writer,
connection threads; and its accept thread) to end and checks that its
listening socket is closed. Whatever is left fails the test with an
``AssertionError`` naming each thread and where it is stuck (its innermost
frames), which is what a developer needs to find the callback that does not
return.

A body that raised keeps its own exception: the server is still shut down,
but a leak found then is only added as a note (Python 3.11+), so the first
failure stays the one reported.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from contextlib import contextmanager
from typing import Any, Iterator, List, Optional, Sequence, Union

from ..server import WebSocketServer
from ..server.blocks import Endpoint

__all__ = ["DEFAULT_SHUTDOWN_TIMEOUT", "LEAK_GRACE", "leftovers", "run_server",
           "server_threads", "shut_down_cleanly"]

DEFAULT_SHUTDOWN_TIMEOUT = 2.0
"""Seconds :func:`run_server` gives the shutdown unless the server's options
name a ``shutdown_timeout``."""

LEAK_GRACE = 2.0
"""Seconds a thread may take to end after the shutdown returned before it
counts as left behind."""


def server_threads(server: WebSocketServer) -> List[threading.Thread]:
    """The live threads of ``server``: its runtime's (timers, writer,
    connections) and its accept thread."""
    return server.threads


def _where(thread: threading.Thread, depth: int = 4) -> str:
    frame = sys._current_frames().get(thread.ident or -1)
    if frame is None:
        return "    (no frame)"
    lines = traceback.format_stack(frame)[-depth:]
    return "".join("    " + line.strip().replace("\n", "\n    ") + "\n" for line in lines)


def leftovers(server: WebSocketServer, grace: float = LEAK_GRACE) -> List[str]:
    """What ``server`` left behind after its shutdown: waits up to ``grace``
    seconds for its threads to end, then describes each thread still alive
    (with where it is stuck) and a listening socket still open. Empty when
    the server is clean."""
    deadline = time.monotonic() + grace
    for thread in server_threads(server):
        if thread is not threading.current_thread():
            thread.join(max(deadline - time.monotonic(), 0.0))
    problems = [f"thread {t.name!r} is still running, at:\n{_where(t)}"
                for t in server_threads(server) if t is not threading.current_thread()]
    if server.listener_open:
        problems.append(f"its listening socket (port {server.port}) is still open")
    return problems


def shut_down_cleanly(server: WebSocketServer, timeout: Optional[float] = None,
                      grace: float = LEAK_GRACE, what: str = "the server") -> None:
    """Shut ``server`` down within ``timeout`` seconds (default: its
    ``shutdown_timeout`` option), then raise ``AssertionError`` if a thread or
    the listening socket of it is left (see :func:`leftovers`)."""
    server.shutdown(timeout)
    problems = leftovers(server, grace)
    if problems:
        raise AssertionError(
            f"{what} ({server!r}) left {len(problems)} thing(s) behind after its shutdown "
            f"(a callback that does not return? a thread the handler started?):\n- "
            + "\n- ".join(problems))


@contextmanager
def run_server(blocks: Union[Endpoint, Sequence[Endpoint]],
               **options: Any) -> Iterator[WebSocketServer]:
    """Run a :class:`~gaman_sync.WebSocketServer` for the ``with`` body.

    The server listens on ``127.0.0.1``, port 0 (a free port: use
    ``server.port`` or ``server.url(path)``), unless ``host`` or ``port``
    are given. ``options`` are the server's (:class:`~gaman_sync.Options`).
    On exit it is shut down (within ``shutdown_timeout``, default
    :data:`DEFAULT_SHUTDOWN_TIMEOUT`) and the test fails with an
    ``AssertionError`` if one of its threads or its listening socket is left::

        with run_server(define_block("/echo", echo)) as server:
            with TestClient(server, "/echo") as client:
                client.send("hi")
                client.expect("hi")
    """
    options.setdefault("host", "127.0.0.1")
    options.setdefault("port", 0)
    options.setdefault("shutdown_timeout", DEFAULT_SHUTDOWN_TIMEOUT)
    server = WebSocketServer(blocks, **options)
    server.start()
    try:
        yield server
    except BaseException as exc:
        server.shutdown()
        problems = leftovers(server)
        if problems and hasattr(exc, "add_note"):
            exc.add_note("run_server: the server also left behind:\n- " + "\n- ".join(problems))
        raise
    shut_down_cleanly(server, what="run_server's server")
