"""A blocking WebSocket client for tests, over loopback or in memory.

Theory of operation
-------------------
:class:`TestClient` wraps a :class:`~gaman_sync.ClientConnection` opened
with a handler of its own: the connection's thread puts each message in a
queue, each pong in a list and the close code in a field, under one
condition variable, and the test's thread waits on that condition, always
with a timeout (:data:`DEFAULT_TIMEOUT` unless told otherwise). So a test
that waits for a message that never comes fails in seconds with a message
saying what it waited for, instead of hanging the run.

It reaches a block in one of two ways, with the same code paths:

- **Over loopback**: ``TestClient(server, "/path")`` (or a ``ws://`` URL)
  connects over TCP, as any client would.
- **In memory**: ``TestClient.local(block, "/path")`` makes a
  :class:`~gaman_sync.WebSocketServer` that is never started (it listens on
  nothing), takes a ``socket.socketpair()``, gives one end to
  :meth:`~gaman_sync.WebSocketServer.adopt` and runs the client's
  ``connect(sock=...)`` on the other. The request, the 101, every frame and
  the closing handshake go through the same protocol layer and the same
  connection engine as on a real socket: the handler gets the same
  callbacks, in the same threads, with the same close codes. Only the
  kernel's TCP stack is skipped, so a round trip is faster (see
  ``benchmarks/testclient.py``). Closing the client shuts that private
  server down and fails if it left a thread behind.

The queue is unbounded (a test reads what it expects; nothing slows the
server down), and every message that arrives is kept in order until read,
so :meth:`TestClient.expect_close` can tell "closed" from "closed after
messages you did not read".
"""

from __future__ import annotations

import socket
import threading
import time
from collections import deque
from typing import Any, Deque, List, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import urlsplit

from ..client import ClientConnection, connect
from ..connection import WebSocketHandler
from ..exceptions import ConnectionClosed, closed_error
from ..server import WebSocketServer
from ..server.blocks import Endpoint
from .server import shut_down_cleanly

__all__ = ["DEFAULT_TIMEOUT", "ReceiveTimeout", "TestClient"]

DEFAULT_TIMEOUT = 2.0
"""Seconds a :class:`TestClient` waits for a message, a pong or the close
unless told otherwise."""

Message = Union[str, bytes]


class ReceiveTimeout(AssertionError, TimeoutError):
    """What a :class:`TestClient` waited for did not come in time (a test
    failure, and a ``TimeoutError`` for code that catches those)."""


def _show(message: Any) -> str:
    """A message as a failure shows it: its kind, its length, its start."""
    if isinstance(message, str):
        kind = "text"
    elif isinstance(message, (bytes, bytearray)):
        kind = "binary"
    else:
        return repr(message)
    text = repr(message if len(message) <= 80 else message[:80])
    more = "..." if len(message) > 80 else ""
    return f"{kind} of {len(message)}: {text}{more}"


def _difference(expected: Message, got: Message) -> str:
    """Where two messages of the same kind first differ."""
    n = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b),
             min(len(expected), len(got)))
    return (f"\n  first difference at index {n}: expected {expected[n:n + 20]!r}, "
            f"got {got[n:n + 20]!r}")


class TestClient:
    """A client for tests: ``send``, ``recv``, ``expect``, ``expect_close``,
    ``ping``, ``close``; every wait bounded by a timeout.

    ``TestClient(server_or_url, path="/")`` connects over loopback to a
    started :class:`~gaman_sync.WebSocketServer` (``path`` is appended) or
    to a ``ws://`` URL (any server; ``path`` is used if the URL has none).
    ``connect_options`` go to :func:`~gaman_sync.connect` (``subprotocols``,
    ``headers``, ``max_message_size``...; ``close_timeout`` defaults to
    ``timeout``, so that closing from a test never waits long on a server
    that does not answer). :meth:`local` connects in memory.
    Use it as a context manager, or call :meth:`close`.
    """

    __test__ = False  # a class named Test*: not a test for pytest to collect

    def __init__(self, server_or_url: Union[WebSocketServer, str], path: str = "/", *,
                 timeout: float = DEFAULT_TIMEOUT, open_timeout: float = 5.0,
                 sock: Optional[socket.socket] = None,
                 local_server: Optional[WebSocketServer] = None,
                 **connect_options: Any) -> None:
        """Connect (the opening handshake is done when this returns; a refusal
        raises :class:`~gaman_sync.InvalidHandshake`). ``sock`` and
        ``local_server`` are what :meth:`local` passes."""
        if isinstance(server_or_url, WebSocketServer):
            url = server_or_url.url(path)
        elif isinstance(server_or_url, str):
            parts = urlsplit(server_or_url)
            if parts.path:
                if path != "/":
                    raise ValueError(f"the path is given twice: in {server_or_url!r} and "
                                     f"as {path!r}")
                url = server_or_url
            else:
                url = server_or_url + path
        else:
            raise TypeError(f"expected a WebSocketServer or a ws:// URL, not "
                            f"{server_or_url!r}")
        self.url = url
        """The URL connected to (``ws://local/...`` in memory)."""
        self.timeout = timeout
        """The default timeout of every wait, in seconds."""
        self.server = local_server
        """The private in-memory server of :meth:`local`, else None."""
        self.pongs: List[bytes] = []
        """The payload of every pong received, in order."""
        self.errors: List[Exception] = []
        """Exceptions raised in this client's callbacks (a bug here, not in the server)."""
        self._messages: Deque[Message] = deque()
        self._closed: Optional[Tuple[int, str]] = None
        self._cond = threading.Condition()
        connect_options.setdefault("close_timeout", timeout)
        handler = WebSocketHandler(on_message=self._on_message, on_pong=self._on_pong,
                                   on_close=self._on_close, on_error=self.errors.append)
        try:
            self.connection: ClientConnection = connect(
                url, handler=handler, open_timeout=open_timeout, sock=sock, **connect_options)
            """The underlying :class:`~gaman_sync.ClientConnection`."""
        except BaseException:
            if local_server is not None:
                local_server.shutdown()
            raise

    @classmethod
    def local(cls, blocks: Union[Endpoint, Sequence[Endpoint]], path: str = "/", *,
              timeout: float = DEFAULT_TIMEOUT,
              connect_options: Optional[Mapping[str, Any]] = None,
              **options: Any) -> TestClient:
        """A client of ``blocks`` with no network: an unstarted server adopts
        one end of a ``socket.socketpair()`` and the client connects over the
        other. ``options`` are the server's; ``connect_options`` the client's.
        :meth:`close` (or the ``with`` block's end) shuts the server down and
        fails if it left a thread behind."""
        server = WebSocketServer(blocks, **options)
        a, b = socket.socketpair()
        try:
            server.adopt(a)
        except BaseException:
            a.close()
            b.close()
            server.shutdown()
            raise
        try:
            return cls("ws://local", path, timeout=timeout, sock=b, local_server=server,
                       **dict(connect_options or {}))
        except BaseException:
            b.close()
            raise

    # -- The connection's thread ------------------------------------------------

    def _on_message(self, message: Message) -> None:
        with self._cond:
            self._messages.append(message)
            self._cond.notify_all()

    def _on_pong(self, data: bytes) -> None:
        with self._cond:
            self.pongs.append(data)
            self._cond.notify_all()

    def _on_close(self, code: int, reason: str) -> None:
        with self._cond:
            self._closed = (code, reason)
            self._cond.notify_all()

    # -- Sending ----------------------------------------------------------------

    def send(self, message: Message) -> None:
        """Send ``str`` as a text message, ``bytes`` as binary."""
        self.connection.send(message)

    def ping(self, data: Union[bytes, str] = b"", timeout: Optional[float] = None) -> float:
        """Send a ping and wait for its pong; return the round trip in seconds.
        :class:`ReceiveTimeout` if no pong with that payload comes in time."""
        payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        with self._cond:
            seen = len(self.pongs)
        start = time.monotonic()
        self.connection.ping(payload)
        self._wait(lambda: payload in self.pongs[seen:] or self._closed is not None,
                   timeout, f"the pong to ping {payload!r}")
        with self._cond:
            if payload not in self.pongs[seen:]:
                raise AssertionError(f"the connection closed with {self._closed} before the "
                                     f"pong to ping {payload!r}")
        return time.monotonic() - start

    # -- Receiving --------------------------------------------------------------

    def _wait(self, predicate: Any, timeout: Optional[float], what: str) -> None:
        timeout = self.timeout if timeout is None else timeout
        with self._cond:
            if not self._cond.wait_for(predicate, timeout):
                raise ReceiveTimeout(f"{self.url}: no {what} within {timeout} s "
                                     f"({self._state()})")

    def _state(self) -> str:
        if self._closed is not None:
            return f"closed with {self._closed[0]} {self._closed[1]!r}"
        return f"open, {len(self._messages)} message(s) unread"

    def recv(self, timeout: Optional[float] = None) -> Message:
        """The next message (``str`` or ``bytes``), waiting up to ``timeout``
        seconds (default :attr:`timeout`): :class:`ReceiveTimeout` if none
        comes, :class:`~gaman_sync.ConnectionClosed` (with the code) once the
        connection closed and every message before the close was read."""
        self._wait(lambda: self._messages or self._closed is not None, timeout, "message")
        with self._cond:
            if self._messages:
                return self._messages.popleft()
            assert self._closed is not None
            raise closed_error(*self._closed)

    def expect(self, message: Message, timeout: Optional[float] = None) -> Message:
        """Receive the next message and assert that it equals ``message``
        (same kind, same content); return it."""
        try:
            got = self.recv(timeout)
        except ConnectionClosed as exc:
            raise AssertionError(f"expected {_show(message)}, but the connection closed "
                                 f"with {exc.code} {exc.reason!r}") from None
        except ReceiveTimeout as exc:
            raise ReceiveTimeout(f"expected {_show(message)}: {exc}") from None
        if got != message:
            detail = ""
            if type(got) is type(message):
                detail = _difference(message, got)
            raise AssertionError(f"expected {_show(message)}\n     got {_show(got)}{detail}")
        return got

    def expect_close(self, code: Optional[int] = None,
                     timeout: Optional[float] = None) -> Tuple[int, str]:
        """Wait until the connection has closed; return ``(code, reason)``.

        Asserts the code if one is given, and that no message was left
        unread before the close (read those first with :meth:`recv` or
        :meth:`expect`)."""
        self._wait(lambda: self._closed is not None, timeout, "close")
        with self._cond:
            unread = list(self._messages)
            closed = self._closed
        assert closed is not None
        if unread:
            raise AssertionError(f"the connection closed with {closed[0]} after "
                                 f"{len(unread)} unread message(s): "
                                 f"{[_show(m) for m in unread[:5]]}")
        if code is not None and closed[0] != code:
            raise AssertionError(f"expected close code {code}, got {closed[0]} "
                                 f"{closed[1]!r}")
        return closed

    @property
    def closed(self) -> Optional[Tuple[int, str]]:
        """``(code, reason)`` once the connection has closed, else None."""
        with self._cond:
            return self._closed

    # -- Ending -----------------------------------------------------------------

    def close(self, code: int = 1000, reason: str = "",
              timeout: Optional[float] = None) -> None:
        """Close (if still open) and wait for the close to complete; then shut
        the in-memory server down, failing if it left a thread behind.
        A second call does nothing more."""
        if self.connection.is_open:
            self.connection.close(code, reason)
        if not self.connection.wait_closed(self.timeout if timeout is None else timeout):
            self.connection.terminate()
            self.connection.wait_closed(self.timeout)
        server, self.server = self.server, None
        if server is not None:
            shut_down_cleanly(server, what="TestClient.local's server")

    def __enter__(self) -> TestClient:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<TestClient {self.url}, {self._state()}>"
