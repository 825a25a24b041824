"""The synchronous client: ``connect(url)`` and :class:`ClientConnection`.

Theory of operation
-------------------
``connect`` opens TCP, sends the opening request and reads the response in
the calling thread, within ``open_timeout``. Once the 101 is checked, the
connection gets its thread from the client runtime (one for every client of
the program, with one timer thread and one writer thread), and the shared
engine runs it exactly as it runs a server's connection: same write path and
backpressure, same keepalive, same closing rules. Only the protocol's side
differs: the client masks its frames and lets the server close TCP first.

Two ways to consume messages:

- with ``handler=`` (the callbacks of :class:`~gaman_sync.WebSocketHandler`,
  or a dict of them), the connection's thread calls them, as on a server;
- without, messages wait in a queue for :meth:`ClientConnection.recv` (or a
  ``for`` loop). When ``max_queue`` messages wait, the connection's thread
  stops reading, so a fast server is slowed by TCP, not by our memory.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import deque
from typing import Any, Deque, Iterator, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import urlsplit

from ..connection import Connection, HandlerLike, WebSocketHandler, as_handler
from ..exceptions import HandshakeTimeout, InvalidURI, closed_error
from ..io import PlainTransport, Runtime
from ..options import SERVER_ONLY, Options
from ..protocol import ClientHandshake, Protocol, Response, Side

__all__ = ["connect", "ClientConnection"]

_runtime: Optional[Runtime] = None
_runtime_lock = threading.Lock()


def client_runtime() -> Runtime:
    """The shared threads of every client of this program (made on first use)."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = Runtime("gaman_sync-client")
        return _runtime


class ClientConnection(Connection):
    """A WebSocket connection opened by :func:`connect`.

    ``send``, ``ping``, ``close`` may be called from any thread; ``recv`` and
    iteration from one thread at a time (unless a handler was given).
    """

    __slots__ = ("response", "subprotocol", "url", "_messages", "_max_queue", "_arrived",
                 "_has_handler", "_done")

    def __init__(self, transport: PlainTransport, protocol: Protocol, runtime: Runtime,
                 options: Options, url: str, response: Response, subprotocol: Optional[str],
                 handler: Optional[WebSocketHandler], max_queue: int) -> None:
        self.url = url
        """The URL connected to."""
        self.response = response
        """The server's 101 response (status, headers)."""
        self.subprotocol = subprotocol
        """The subprotocol the server selected, or ``None``."""
        self._has_handler = handler is not None
        self._messages: Deque[Union[str, bytes]] = deque()
        self._max_queue = max_queue
        self._arrived = threading.Condition(threading.Lock())
        self._done = threading.Event()
        if handler is None:
            handler = WebSocketHandler(on_message=self._enqueue)
        super().__init__(transport, protocol, runtime, options,
                         transport.sock.getpeername(), handler)

    # -- Receiving without a handler -----------------------------------------

    def _enqueue(self, message: Union[str, bytes]) -> None:
        """on_message when there is no handler (the connection's thread)."""
        with self._arrived:
            while len(self._messages) >= self._max_queue and self.is_open:
                # Stop reading until recv() makes room: TCP holds the server.
                self._arrived.wait(1.0)
            self._messages.append(message)
            self._arrived.notify_all()

    def recv(self, timeout: Optional[float] = None) -> Union[str, bytes]:
        """The next message: ``str`` for text, ``bytes`` for binary.

        Waits up to ``timeout`` seconds (``None``: as long as it takes), then
        raises ``TimeoutError``; the connection stays usable. Once the
        connection has closed and every message that arrived before has been
        returned, raises :class:`~gaman_sync.ConnectionClosedOK` (a normal
        close) or :class:`~gaman_sync.ConnectionClosedError`, with the code.
        """
        if self._has_handler:
            raise RuntimeError("recv() is not available on a connection with a handler: "
                               "its messages go to on_message")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._arrived:
            while not self._messages:
                if self._done.is_set():
                    raise closed_error(self.close_code, self.close_reason)
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"no message in {timeout} s")
                self._arrived.wait(remaining)
            message = self._messages.popleft()
            self._arrived.notify_all()
            return message

    def __iter__(self) -> Iterator[Union[str, bytes]]:
        """Every message until the connection closes; a normal close ends the
        loop, any other raises :class:`~gaman_sync.ConnectionClosedError`."""
        while True:
            try:
                yield self.recv()
            except ConnectionError:  # pragma: no cover - not raised by recv
                raise
            except Exception as exc:
                from ..exceptions import ConnectionClosedOK
                if isinstance(exc, ConnectionClosedOK):
                    return
                raise

    # -- Closing ---------------------------------------------------------------

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the connection and wait (up to about ``close_timeout``) until it
        is closed: the closing handshake done and TCP closed by the server.
        From a callback of this connection, starts the close and returns."""
        super().close(code, reason)
        if threading.current_thread() is not self.thread:
            self.wait_closed()

    def wait_closed(self, timeout: Optional[float] = None) -> bool:
        """Wait until the connection has ended (``on_close`` ran); True if it has."""
        if timeout is None:
            close_timeout = self.options.close_timeout
            timeout = 2 * (close_timeout if close_timeout is not None else 10.0) + 1.0
        return self._done.wait(timeout)

    def run(self) -> None:
        try:
            super().run()
        finally:
            self._done.set()
            with self._arrived:
                self._arrived.notify_all()

    def describe(self) -> str:
        return f"client connection to {self.url}"

    def __enter__(self) -> "ClientConnection":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.is_open:
            self.close()
        else:
            self.wait_closed()


def _parse_url(url: str) -> Tuple[str, int, str, str]:
    """(host, port, request target, Host header) of a ``ws://`` URL."""
    if not isinstance(url, str):
        raise TypeError(f"url must be a str like 'ws://host:port/path', not {url!r}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidURI(f"{url!r} is not a valid URL: {exc}") from None
    if parts.scheme == "wss":
        raise InvalidURI(f"{url!r}: wss:// (TLS) is not supported yet; use ws://")
    if parts.scheme != "ws":
        raise InvalidURI(f"{url!r} is not a ws:// URL")
    if not parts.hostname:
        raise InvalidURI(f"{url!r} has no host")
    if parts.username or parts.password:
        raise InvalidURI(f"{url!r}: user information in the URL is not supported")
    host = parts.hostname
    port = port if port is not None else 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    netloc_host = f"[{host}]" if ":" in host else host
    host_header = netloc_host if port == 80 else f"{netloc_host}:{port}"
    return host, port, target, host_header


def connect(url: str, *, subprotocols: Sequence[str] = (),
            headers: Union[Mapping[str, str], Sequence[Tuple[str, str]], None] = None,
            origin: Optional[str] = None, open_timeout: Optional[float] = 10.0,
            handler: HandlerLike = None, max_queue: int = 16,
            **options: Any) -> ClientConnection:
    """Open a WebSocket connection to ``url`` (``ws://host:port/path``).

    ``subprotocols`` are offered in order of preference; ``headers`` are
    added to the request; ``origin`` sets its ``Origin``. ``open_timeout``
    bounds the TCP connect and the handshake together. With ``handler`` (a
    :class:`~gaman_sync.WebSocketHandler` or a dict of callbacks) the
    connection's thread calls them; without, use ``recv()`` or iterate.
    Other keyword arguments are the connection options of
    :class:`~gaman_sync.Options` (``max_message_size``, ``ping_interval``,
    ``close_timeout``, ``write_limit``, ...).

    Raises :class:`~gaman_sync.InvalidHandshake` subclasses when the server
    refuses or answers wrongly, and ``OSError`` when TCP cannot connect.
    """
    server_only = sorted(SERVER_ONLY & set(options))
    if server_only:
        raise TypeError(f"{', '.join(server_only)}: server option(s), not for connect()")
    opts = Options.from_kwargs(options)
    if isinstance(subprotocols, (str, bytes)):
        raise TypeError(f"subprotocols must be a list of str, not {subprotocols!r}")
    if not isinstance(max_queue, int) or isinstance(max_queue, bool) or max_queue < 1:
        raise ValueError(f"max_queue must be a positive int, not {max_queue!r}")
    if open_timeout is not None and (isinstance(open_timeout, bool) or not isinstance(
            open_timeout, (int, float)) or open_timeout <= 0):
        raise ValueError(f"open_timeout must be a positive number of seconds or None, "
                         f"not {open_timeout!r}")
    extra = list(headers.items()) if isinstance(headers, Mapping) else list(headers or ())
    callbacks = as_handler(handler) if handler is not None else None
    host, port, target, host_header = _parse_url(url)
    handshake = ClientHandshake(host_header, target, subprotocols, extra, origin)

    deadline = None if open_timeout is None else time.monotonic() + open_timeout
    try:
        sock = socket.create_connection((host, port), timeout=open_timeout)
    except socket.timeout:
        raise HandshakeTimeout(f"could not connect to {host}:{port} in {open_timeout} s") \
            from None
    except OSError as exc:
        raise type(exc)(exc.errno, f"could not connect to {host}:{port}: "
                        f"{exc.strerror or exc}") from None
    try:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(handshake.request())
        while True:
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise socket.timeout
                sock.settimeout(remaining)
            if handshake.receive(sock.recv(65536)):
                break
        sock.settimeout(None)
    except socket.timeout:
        sock.close()
        raise HandshakeTimeout(f"no answer to the opening handshake from {url} in "
                               f"{open_timeout} s") from None
    except BaseException:
        sock.close()
        raise
    assert handshake.response is not None
    runtime = client_runtime()
    conn = ClientConnection(
        PlainTransport(sock),
        Protocol(Side.CLIENT, opts.max_message_size, handshake.trailing_data),
        runtime, opts, url, handshake.response, handshake.subprotocol, callbacks, max_queue)
    try:
        runtime.workers.run(conn.run)
    except RuntimeError:
        sock.close()
        raise
    return conn
