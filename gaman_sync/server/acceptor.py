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

A request that is not a WebSocket upgrade fails the upgrade's checks (426,
404 or 405); only then, off the upgrade's path, does this thread look for
plain HTTP (see :mod:`.http`): the health path is answered from here, and a
GET or HEAD for a block that serves HTTP is handed to a connection thread,
since its answer runs user code or reads a file.

An answer that refuses a request is followed by a *lingering close*: we stop
writing (FIN) and read and discard until the client closes or a short
deadline passes. Closing at once, with the client's bytes unread, would make
the kernel send a reset that can destroy the answer before the client reads
it.

TLS (a server with an ``ssl_context``) adds one step in front, in this same
thread and under the same deadline: each socket gets a
:class:`~gaman_sync.io.tls.TLSTransport` at once, the ciphertext read
without blocking is fed to it, the handshake advances as records arrive,
and what it owes the client goes out with a non-blocking send (the socket
is watched for writability while the kernel holds some back). So a client
that opens TCP and never speaks TLS, or sends its hello a byte a second,
costs no thread and is cut at ``handshake_timeout`` like a slow HTTP
request. The request is then parsed from the decrypted bytes; refusals are
encrypted and followed by a ``close_notify``. A first byte that cannot
start a TLS record is answered at once: with a plain-text 400 when it looks
like an HTTP request (someone typed ``http://`` for ``https://``), by
closing otherwise. A failed TLS handshake is logged once, at INFO, without
a traceback, and the socket closed; the connection's thread gets the
transport, TLS state and all, once the upgrade is accepted. The handshake's
cryptography (a signature and a key exchange per client, tens of
microseconds with an ECDSA key, a millisecond or two with RSA-2048) runs
here with the GIL released: handshakes queue behind each other in this one
thread, never behind a slow client.

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
import ssl
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from ..io import PlainTransport, Transport, nonblocking
from ..io.tls import TLSTransport
from ..io.waker import Waker
from ..options import Options
from ..protocol.handshake import (
    HandshakeError,
    RequestParser,
    accept_response,
    error_response,
)
from ..protocol.http import Request, format_address, header_tokens
from .http import health_response, text_response

__all__ = ["Acceptor"]

logger = logging.getLogger("gaman_sync")

_RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_READ_SIZE = 4096
_LINGER = 2.0  # seconds a refused client has to close before we do
_MAX_BACKOFF = 0.1

Route = Callable[[Request], Any]
Accepted = Callable[[Transport, Request, Any, Optional[str], bytes, Optional[bytes], bytes],
                    None]
Plain = Callable[[Transport, Request, Any], None]
_TLS_HANDSHAKE_RECORD = 0x16  # the first byte of every ClientHello


class _Handshake:
    """A socket between ``accept()`` and the end of its handshake."""

    __slots__ = ("sock", "address", "parser", "deadline", "lingering", "ours", "tls",
                 "writing", "started")

    def __init__(self, sock: socket.socket, address: Any, parser: Optional[RequestParser],
                 deadline: float, tls: Optional[TLSTransport] = None) -> None:
        self.sock = sock
        self.address = address
        self.parser = parser
        self.deadline = deadline
        self.lingering = False
        self.ours = True  # until closed or handed to its connection
        self.tls = tls  # the TLS state, on a server with an ssl_context
        self.writing = False  # watched for writability: TLS output waits for the kernel
        self.started = False  # bytes have arrived


class Acceptor:
    """Runs the accept loop of one server (call :meth:`run` in a thread)."""

    def __init__(self, listener: Optional[socket.socket], options: Options, route: Route,
                 accepted: Accepted, capacity: Callable[[], int], plain: Optional[Plain] = None,
                 health_path: Optional[str] = None,
                 ssl_context: Optional[ssl.SSLContext] = None,
                 rejected: Optional[Callable[[int], None]] = None) -> None:
        self._listener = listener
        self._ssl_context = ssl_context
        self._options = options
        self._route = route
        self._accepted = accepted
        self._plain = plain  # hands a plain HTTP request to a connection thread
        self._health_path = health_path
        self._serves_http = plain is not None or health_path is not None
        self._capacity = capacity  # how many more connections may be opened now
        self._rejected = rejected  # told the status of each refused handshake
        self._refused_full = 0  # connections refused since the server became full
        self._selector = selectors.DefaultSelector()
        self._waker = Waker(self._selector)
        self._handshakes: Dict[socket.socket, _Handshake] = {}
        self._handshaking = 0  # handshaking sockets that count against max_connections
        self._deadlines: List[Tuple[float, int, _Handshake]] = []
        self._seq = itertools.count()
        self._stopping = False
        self._adopted: Deque[Tuple[socket.socket, Any]] = deque()

    def stop(self) -> None:
        """Make :meth:`run` return soon; it closes every socket still in its handshake."""
        self._stopping = True
        self._waker.wake()

    def adopt(self, sock: socket.socket, address: Any) -> None:
        """Carry a socket connected elsewhere through its handshake, as if it
        had been accepted here (from any thread)."""
        self._adopted.append((sock, address))
        self._waker.wake()

    def run(self) -> None:
        """The accept loop; returns after :meth:`stop`."""
        selector = self._selector
        listening = self._listener is not None
        if self._listener is not None:
            selector.register(self._listener, selectors.EVENT_READ)
        backoff = 0.0
        retry_at = 0.0
        try:
            while not self._stopping:
                now = time.monotonic()
                timeout = self._next_timeout(now)
                if not listening and self._listener is not None:  # backing off
                    wait = max(retry_at - now, 0.0)
                    timeout = wait if timeout is None else min(timeout, wait)
                for key, events in selector.select(timeout):
                    if key.fileobj is self._listener:
                        backoff = self._accept(backoff)
                        if backoff:
                            selector.unregister(self._listener)
                            listening = False
                            retry_at = time.monotonic() + backoff
                    elif self._waker.owns(key):
                        self._waker.drain()
                    else:
                        hs = key.data
                        if events & selectors.EVENT_WRITE:
                            self._writable(hs)
                        if events & selectors.EVENT_READ and hs.ours:
                            self._readable(hs)
                while self._adopted and not self._stopping:
                    self._start(*self._adopted.popleft())
                if self._listener is not None and not listening \
                        and time.monotonic() >= retry_at and not self._stopping:
                    selector.register(self._listener, selectors.EVENT_READ)
                    listening = True
                self._expire(time.monotonic())
        except Exception:
            logger.exception("the accept loop failed")
        finally:
            for hs in list(self._handshakes.values()):
                self._close(hs)
            while self._adopted:
                self._adopted.popleft()[0].close()
            self._waker.close()
            selector.close()

    # -- Accepting ---------------------------------------------------------

    def _accept(self, backoff: float) -> float:
        """Accept what is waiting; return the pause before the next try (0: none)."""
        assert self._listener is not None  # called only when it is ready
        for _ in range(64):  # then let handshakes under way have a turn
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
            # One line while the server stays full, not one per refusal: a
            # full server refuses every new connection (a load balancer's
            # health checks included), many per second.
            if not self._refused_full:
                logger.warning("refusing new connections (503): max_connections (%s) reached; "
                               "first from %s", options.max_connections,
                               format_address(address))
            self._refused_full += 1
            hs = _Handshake(sock, address, None, 0.0)
            if self._rejected is not None:
                self._rejected(503)
            if self._ssl_context is not None:
                # A TLS client could not read a plain 503, and a TLS
                # handshake per refusal is what an overloaded server cannot
                # afford: closed at once.
                self._close(hs)
                return
            self._refuse(hs, error_response(503, "too many connections, try again "
                                                 "later", [("Retry-After", "1")]))
            return
        if self._refused_full:
            logger.info("accepting connections again; %d refused while max_connections (%s) "
                        "were open", self._refused_full, options.max_connections)
            self._refused_full = 0
        timeout = options.handshake_timeout
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        tls = None
        if self._ssl_context is not None:
            try:
                tls = TLSTransport(sock, self._ssl_context, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                logger.warning("cannot start TLS for %s: %s", format_address(address), exc)
                sock.close()
                return
        hs = _Handshake(sock, address, RequestParser(options.max_request_size), deadline, tls)
        self._handshaking += 1
        try:
            self._readable(hs)
        except BaseException:
            if hs.ours and sock not in self._handshakes:
                self._close(hs)  # not tracked yet: run()'s cleanup would miss it
            raise
        if hs.ours and sock not in self._handshakes:
            self._track(hs)

    def _track(self, hs: _Handshake) -> None:
        self._handshakes[hs.sock] = hs
        self._selector.register(hs.sock, selectors.EVENT_READ | selectors.EVENT_WRITE
                                if hs.writing else selectors.EVENT_READ, hs)
        heapq.heappush(self._deadlines, (hs.deadline, next(self._seq), hs))

    # -- Reading requests ----------------------------------------------------

    def _readable(self, hs: _Handshake) -> None:
        try:
            # The socket stays in blocking mode, which its connection's
            # thread wants: reading without blocking spares two fcntl calls.
            data = nonblocking.recv(hs.sock, _READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if hs.lingering:
            if not data:
                self._close(hs)
            return
        if hs.tls is not None and data:
            data = self._decrypt(hs, data)
            if not data:
                return  # the handshake goes on, or the socket was closed
        assert hs.parser is not None
        try:
            request = hs.parser.feed(data)
        except HandshakeError as exc:
            self._reject(hs, exc)
            return
        except EOFError:
            self._close(hs)
            return
        if request is not None:
            request.remote_address = hs.address
            self._handshake(hs, request)

    def _decrypt(self, hs: _Handshake, data: bytes) -> bytes:
        """Feed ciphertext to ``hs``'s TLS: the plaintext it gives (``b""``:
        none yet, or ``hs`` was answered or closed)."""
        tls = hs.tls
        assert tls is not None
        try:
            if not tls.handshake_done:
                if not hs.started:
                    hs.started = True
                    if data[0] != _TLS_HANDSHAKE_RECORD:
                        self._not_tls(hs, data)
                        return b""
                tls.feed(data)
                done = tls.do_handshake()
                if not self._send_tls(hs) or not done:
                    return b""
            else:
                tls.feed(data)
            return tls.read_available()
        except ssl.SSLError as exc:
            logger.info("TLS with %s failed: %s", format_address(hs.address),
                        exc.reason or exc)
            self._send_tls(hs, closing=True)  # the alert, if the kernel takes it
            self._close(hs)
        except EOFError:
            self._close(hs)
        return b""

    def _not_tls(self, hs: _Handshake, data: bytes) -> None:
        """Bytes that cannot start TLS: answer plain HTTP in plain text, cut the rest."""
        logger.info("not TLS from %s (%r...)", format_address(hs.address), data[:8])
        hs.tls = None
        if data[:1].isalpha():  # an HTTP method: "GET /..." sent to the TLS port
            self._refuse(hs, error_response(400, "this port speaks TLS: use https:// or "
                                                 "wss://"))
        else:
            self._close(hs)

    def _send_tls(self, hs: _Handshake, closing: bool = False) -> bool:
        """Send what ``hs``'s TLS owes the client without blocking; False if
        the socket was closed. What the kernel does not take waits, and the
        socket is watched for writability until it goes."""
        tls = hs.tls
        assert tls is not None
        if not tls.wants_write:
            return True
        try:
            done = tls.flush_nowait()
        except OSError:
            if not closing:
                self._close(hs)
            return False
        if closing or done == (not hs.writing):
            return True
        hs.writing = not done
        if hs.sock in self._handshakes:
            self._selector.modify(hs.sock, selectors.EVENT_READ | selectors.EVENT_WRITE
                                  if hs.writing else selectors.EVENT_READ, hs)
        return True

    def _writable(self, hs: _Handshake) -> None:
        if hs.tls is not None and hs.ours:
            self._send_tls(hs)

    def _handshake(self, hs: _Handshake, request: Request) -> None:
        assert hs.parser is not None
        try:
            if request.method != "GET":
                raise HandshakeError(405, "a WebSocket handshake is a GET request",
                                     [("Allow", "GET")])
            route = self._route(request)
            if route is None:
                raise HandshakeError(404, f"no WebSocket endpoint at {request.path}")
            view, request.params = route
            key = view.check_upgrade(request, hs.parser.fields)
        except HandshakeError as exc:
            if not (self._serves_http and self._answer_plain(hs, request, exc)):
                self._reject(hs, exc)
            return
        if view.decides:
            if not view.upgrades:
                self._reject(hs, HandshakeError(404, f"no WebSocket endpoint at {request.path}"))
                return
            # on_request, a redirect or a subprotocol function: user code, run
            # in the connection's thread, which then makes the 101 (or not).
            subprotocol, response = None, None
        else:
            offered = view.endpoint.subprotocols
            subprotocol = next((p for p in request.subprotocols if p in offered),
                               None) if offered else None
            response = accept_response(key, subprotocol)
        trailing_data = hs.parser.trailing_data
        transport = self._hand_over(hs)
        # The connection's thread sends the 101 once its handler returned,
        # under the connection's lock and after it joined its block's
        # clients: a broadcast can then neither precede the 101 on the wire
        # nor miss a client that has it.
        self._accepted(transport, request, view, subprotocol, trailing_data, response, key)

    def _hand_over(self, hs: _Handshake) -> Transport:
        """``hs``'s socket, made ready for its connection's thread."""
        self._forget(hs)
        nonblocking.make_blocking(hs.sock)
        # TLS output still waiting (session tickets) goes out before the first write.
        return hs.tls if hs.tls is not None else PlainTransport(hs.sock)

    def _answer_plain(self, hs: _Handshake, request: Request, exc: HandshakeError) -> bool:
        """A request that failed the upgrade's checks with ``exc``, on a
        server that serves plain HTTP: answer it as plain HTTP if it is (True),
        or leave it to the refusal (False)."""
        if any(t.lower() == "websocket"
               for t in header_tokens(request.headers.get_all("upgrade"))):
            return False  # an upgrade that failed: its refusal stands
        method = request.method
        if method in ("GET", "HEAD") and request.raw_path == self._health_path:
            self._refuse(hs, health_response(method == "HEAD"))
            return True
        if self._plain is None:
            return False
        route = self._route(request)
        if route is None or route[0].http is None:
            if route is None and method in ("GET", "HEAD"):
                logger.debug("answered %s %s from %s with 404", method, request.path,
                             format_address(hs.address))
                self._refuse(hs, text_response(404, f"nothing at {request.path}",
                                               method == "HEAD"))
                return True
            return False
        if method not in ("GET", "HEAD"):
            self._reject(hs, HandshakeError(405, f"{request.path} answers GET and HEAD",
                                            [("Allow", "GET, HEAD")]))
            return True
        view, request.params = route
        self._plain(self._hand_over(hs), request, view)
        return True

    # -- Refusing and closing -----------------------------------------------

    def _reject(self, hs: _Handshake, exc: HandshakeError) -> None:
        logger.info("refused a handshake from %s with %s: %s", format_address(hs.address),
                    exc.status, exc.message)
        if self._rejected is not None:
            self._rejected(exc.status)
        self._refuse(hs, error_response(exc.status, exc.message, exc.headers))

    def _refuse(self, hs: _Handshake, response: bytes) -> None:
        try:
            if hs.tls is not None:
                hs.tls.write_nowait(response)
                hs.tls.close_notify()
                hs.tls.flush_nowait()  # a short answer: the kernel takes it whole
            else:
                nonblocking.send(hs.sock, response)
            hs.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(hs)
            return
        if hs.sock not in self._handshakes:
            self._track(hs)
        if hs.parser is not None:
            self._handshaking -= 1
        hs.lingering = True
        hs.parser = None
        if hs.writing:
            hs.writing = False
            self._selector.modify(hs.sock, selectors.EVENT_READ, hs)
        hs.deadline = time.monotonic() + _LINGER
        heapq.heappush(self._deadlines, (hs.deadline, next(self._seq), hs))

    def _expire(self, now: float) -> None:
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            deadline, _, hs = heapq.heappop(deadlines)
            if deadline != hs.deadline or hs.sock not in self._handshakes:
                continue  # rescheduled or already gone
            if not hs.lingering:
                logger.info("no complete handshake from %s in %s s; closing",
                            format_address(hs.address), self._options.handshake_timeout)
            self._close(hs)

    def _next_timeout(self, now: float) -> Optional[float]:
        deadlines = self._deadlines
        while deadlines and deadlines[0][2].sock not in self._handshakes:
            heapq.heappop(deadlines)
        if not deadlines:
            return None
        return max(deadlines[0][0] - now, 0.0)

    def _forget(self, hs: _Handshake) -> None:
        hs.ours = False
        if not hs.lingering and hs.parser is not None:
            hs.parser = None
            self._handshaking -= 1
        if self._handshakes.pop(hs.sock, None) is not None:
            try:
                self._selector.unregister(hs.sock)
            except (KeyError, ValueError):
                pass

    def _close(self, hs: _Handshake) -> None:
        self._forget(hs)
        try:
            hs.sock.close()
        except OSError:
            pass
