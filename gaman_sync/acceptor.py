"""The accept thread: accepts sockets and carries them through the opening
handshake, then hands each open connection to its own thread.

Theory of operation
-------------------
A connection only gets a thread once its handshake succeeded. Until then it
is a socket in this thread's selector, read without blocking (MSG_DONTWAIT),
with a deadline: a client
that connects and sends nothing, or sends its request a byte a second, costs
a socket and a few hundred bytes, never a thread, and is cut at
``handshake_timeout``. Under load, the request has usually arrived by the
time its connection is accepted: it is read at once, and the socket never
enters the selector. Bad requests are answered (400, 404, 405, 426, 431,
503) from here too, so garbage never reaches a connection thread.

An answer that refuses a request is followed by a *lingering close*: we stop
writing (FIN) and read and discard until the client closes or a short
deadline passes. Closing at once, with the client's bytes unread, would make
the kernel send a reset that can destroy the answer before the client reads
it.

When ``accept()`` fails for lack of resources (EMFILE, ENFILE, ENOBUFS), the
loop logs once, stops watching the listener and retries after a short, growing
pause instead of spinning on a listener that stays readable.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import logging
import selectors
import socket
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import nonblocking
from .handshake import (HandshakeError, RequestParser, accept_response, check_upgrade,
                        error_response, to_request)
from .options import Options
from .request import Request, format_address

__all__ = ["Acceptor"]

logger = logging.getLogger("gaman_sync")

_RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_READ_SIZE = 4096
_LINGER = 2.0  # seconds a refused client has to close before we do
_MAX_BACKOFF = 0.1

Route = Callable[[Request], Any]
Opened = Callable[[socket.socket, Any, Request, Any, Optional[str], bytes, bytes], None]


class _Pending:
    """A socket between ``accept()`` and the end of its handshake."""

    __slots__ = ("sock", "address", "parser", "deadline", "lingering", "ours")

    def __init__(self, sock: socket.socket, address: Any, parser: Optional[RequestParser],
                 deadline: float) -> None:
        self.sock = sock
        self.address = address
        self.parser = parser
        self.deadline = deadline
        self.lingering = False
        self.ours = True  # until closed or handed to its connection


class Acceptor:
    """Runs the accept loop of one server (call :meth:`run` in a thread)."""

    def __init__(self, listener: socket.socket, options: Options, route: Route,
                 opened: Opened, capacity: Callable[[], int]) -> None:
        self._listener = listener
        self._options = options
        self._route = route
        self._opened = opened
        self._capacity = capacity  # how many more connections may be opened now
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._pending: Dict[socket.socket, _Pending] = {}
        self._handshaking = 0  # pending sockets that count against max_connections
        self._deadlines: List[Tuple[float, int, _Pending]] = []
        self._seq = itertools.count()
        self._stopping = False

    def stop(self) -> None:
        """Make :meth:`run` return soon; it closes every pending socket."""
        self._stopping = True
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    def run(self) -> None:
        """The accept loop; returns after :meth:`stop`."""
        selector = self._selector
        selector.register(self._listener, selectors.EVENT_READ)
        selector.register(self._wake_r, selectors.EVENT_READ)
        listening = True
        backoff = 0.0
        retry_at = 0.0
        try:
            while not self._stopping:
                now = time.monotonic()
                timeout = self._next_timeout(now)
                if not listening:
                    wait = max(retry_at - now, 0.0)
                    timeout = wait if timeout is None else min(timeout, wait)
                for key, _ in selector.select(timeout):
                    if key.fileobj is self._listener:
                        backoff = self._accept(backoff)
                        if backoff:
                            selector.unregister(self._listener)
                            listening = False
                            retry_at = time.monotonic() + backoff
                    elif key.fileobj is self._wake_r:
                        _drain(self._wake_r)
                    else:
                        self._readable(key.data)
                if not listening and time.monotonic() >= retry_at and not self._stopping:
                    selector.register(self._listener, selectors.EVENT_READ)
                    listening = True
                self._expire(time.monotonic())
        except Exception:
            logger.exception("the accept loop failed")
        finally:
            for pending in list(self._pending.values()):
                self._close(pending)
            selector.close()
            self._wake_r.close()
            self._wake_w.close()

    # -- Accepting ---------------------------------------------------------

    def _accept(self, backoff: float) -> float:
        """Accept what is waiting; return the pause before the next try (0: none)."""
        for _ in range(64):  # then let pending handshakes have a turn
            try:
                sock, address = nonblocking.accept(self._listener)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRORS:
                    if not backoff:
                        logger.warning("accept() failed (%s); retrying until resources "
                                       "are free", exc.strerror)
                    return min(max(backoff * 2, 0.005), _MAX_BACKOFF)
                if exc.errno not in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    logger.info("accept() failed: %s", exc)
                break
            if backoff:
                logger.warning("accept() works again")
                backoff = 0.0
            self._start(sock, address)
        return 0.0

    def _start(self, sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        options = self._options
        if not nonblocking.FLAGS_SUFFICE:
            sock.setblocking(False)
        if self._capacity() - self._handshaking <= 0:
            logger.warning("refusing a connection from %s: max_connections (%s) reached",
                           format_address(address), options.max_connections)
            pending = _Pending(sock, address, None, 0.0)
            self._refuse(pending, error_response(503, "too many connections, try again "
                                                 "later", [("Retry-After", "1")]))
            return
        timeout = options.handshake_timeout
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        pending = _Pending(sock, address, RequestParser(options.max_request_size), deadline)
        self._handshaking += 1
        try:
            self._readable(pending)
        except BaseException:
            if pending.ours and sock not in self._pending:
                self._close(pending)  # not tracked yet: run()'s cleanup would miss it
            raise
        if pending.ours and sock not in self._pending:
            self._track(pending)

    def _track(self, pending: _Pending) -> None:
        self._pending[pending.sock] = pending
        self._selector.register(pending.sock, selectors.EVENT_READ, pending)
        heapq.heappush(self._deadlines, (pending.deadline, next(self._seq), pending))

    # -- Reading requests ----------------------------------------------------

    def _readable(self, pending: _Pending) -> None:
        try:
            # The socket stays in blocking mode, which its connection's
            # thread wants: reading without blocking spares two fcntl calls.
            data = nonblocking.recv(pending.sock, _READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if pending.lingering:
            if not data:
                self._close(pending)
            return
        assert pending.parser is not None
        try:
            request = pending.parser.feed(data)
        except HandshakeError as exc:
            self._reject(pending, exc)
            return
        except EOFError:
            self._close(pending)
            return
        if request is not None:
            self._handshake(pending, to_request(request, pending.address))

    def _handshake(self, pending: _Pending, request: Request) -> None:
        try:
            if request.method != "GET":
                raise HandshakeError(405, "a WebSocket handshake is a GET request",
                                     [("Allow", "GET")])
            view = self._route(request)
            if view is None:
                raise HandshakeError(404, f"no WebSocket endpoint at {request.path}")
            key = check_upgrade(request)
        except HandshakeError as exc:
            self._reject(pending, exc)
            return
        subprotocol = next((p for p in request.subprotocols if p in view.block.subprotocols),
                           None)
        response = accept_response(key, subprotocol)
        assert pending.parser is not None
        trailing_data = pending.parser.trailing_data
        self._forget(pending)
        nonblocking.make_blocking(pending.sock)
        # The connection's thread sends the 101, under the connection's lock
        # and after it joined its block's clients: a broadcast can then
        # neither precede the 101 on the wire nor miss a client that has it.
        self._opened(pending.sock, pending.address, request, view, subprotocol,
                     trailing_data, response)

    # -- Refusing and closing -----------------------------------------------

    def _reject(self, pending: _Pending, exc: HandshakeError) -> None:
        logger.info("refused a handshake from %s with %s: %s", format_address(pending.address),
                    exc.status, exc.message)
        self._refuse(pending, error_response(exc.status, exc.message, exc.headers))

    def _refuse(self, pending: _Pending, response: bytes) -> None:
        try:
            nonblocking.send(pending.sock, response)
            pending.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(pending)
            return
        if pending.sock not in self._pending:
            self._track(pending)
        if pending.parser is not None:
            self._handshaking -= 1
        pending.lingering = True
        pending.parser = None
        pending.deadline = time.monotonic() + _LINGER
        heapq.heappush(self._deadlines, (pending.deadline, next(self._seq), pending))

    def _expire(self, now: float) -> None:
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            deadline, _, pending = heapq.heappop(deadlines)
            if deadline != pending.deadline or pending.sock not in self._pending:
                continue  # rescheduled or already gone
            if not pending.lingering:
                logger.info("no complete handshake from %s in %s s; closing",
                            format_address(pending.address), self._options.handshake_timeout)
            self._close(pending)

    def _next_timeout(self, now: float) -> Optional[float]:
        deadlines = self._deadlines
        while deadlines and deadlines[0][2].sock not in self._pending:
            heapq.heappop(deadlines)
        if not deadlines:
            return None
        return max(deadlines[0][0] - now, 0.0)

    def _forget(self, pending: _Pending) -> None:
        pending.ours = False
        if not pending.lingering and pending.parser is not None:
            pending.parser = None
            self._handshaking -= 1
        if self._pending.pop(pending.sock, None) is not None:
            try:
                self._selector.unregister(pending.sock)
            except (KeyError, ValueError):
                pass

    def _close(self, pending: _Pending) -> None:
        self._forget(pending)
        try:
            pending.sock.close()
        except OSError:
            pass


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(4096):
            pass
    except OSError:
        pass


