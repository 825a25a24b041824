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
- without, :meth:`ClientConnection.recv` (or a ``for`` loop) returns them.

Without a handler, the application's thread reads. Handing each message
from one thread to another costs a wake-up of the receiving thread, which
is most of the cost of a small round trip; so once the application waits in
``recv()``, the connection's thread lends it the reading
(:meth:`~gaman_sync.connection.Connection.lend_reader`) and waits: ``recv()``
then reads the socket and parses in the caller's thread, answering pings on
the way, as websocket-client does, and a request-response exchange costs no
thread switch. The connection's thread takes the reading back whenever the
application stays away from ``recv()`` for 50 ms (so pings are answered,
keepalive pongs noted and the server's close handled without its help), when
``recv()`` meets the server's close or a protocol error, and when the
connection is closed or dropped from any thread. While the thread reads,
messages wait in a queue; when ``max_queue`` of them wait, it stops reading,
so a fast server is slowed by TCP, not by our memory.

A message handed straight to a ``recv()`` that was waiting for it keeps the
order a handler would give: the connection's thread handles nothing received
after it (no later frame, no close, no protocol error) until the application
has come back, by calling ``recv``, ``send``, ``ping``, ``close`` or
``terminate`` again, or for at most ``_HANDOFF_WAIT`` seconds. It waits only
when there is something to handle: with nothing more received, it goes back
to reading at once, and a request-response exchange never waits. So an answer
to a message goes out before whatever the server sent after it can close
the connection: an echo is sent before the close frame of a protocol error
in the next frame, as a server's ``on_message`` would send it (Autobahn
3.2, 4.1.3, 5.15 and the like check exactly this). Messages that arrive
while the application is busy elsewhere are queued without waiting.

``send()`` runs in the caller's thread, as a server's does: with the C
helper built (and no compression), each frame is encoded and masked in one
call (:attr:`~gaman_sync.protocol.Protocol.encode_whole`) and goes to the
kernel with one non-blocking send under the connection's lock.

``wss://`` runs TLS in memory over the same plain socket
(:class:`~gaman_sync.io.tls.TLSTransport`): the TLS handshake happens in
``connect``, within ``open_timeout``, with ``ssl_context`` (default
``ssl.create_default_context()``: the system's certificate authorities,
host name checked against the URL's host). A certificate that does not
verify raises :class:`~gaman_sync.InvalidCertificate`, which is both an
:class:`~gaman_sync.InvalidHandshake` (every failed opening) and the
``ssl.SSLCertVerificationError`` that other TLS clients raise, its message
naming the URL and the reason; other TLS failures raise the ``ssl.SSLError``
they are. Redirects may go from ``ws://`` to ``wss://``, never back.
"""

from __future__ import annotations

import re
import socket
import ssl
import threading
import time
from collections import deque
from dataclasses import fields
from typing import (
    Any,
    Callable,
    Deque,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)
from urllib.parse import urljoin, urlsplit

from ..connection import Connection, HandlerLike, WebSocketHandler, as_handler
from ..exceptions import (
    ConnectionClosedOK,
    HandshakeTimeout,
    InvalidRedirect,
    InvalidStatus,
    InvalidURI,
    closed_error,
)
from ..io import PlainTransport, Runtime
from ..io.tls import InvalidCertificate, TLSTransport
from ..options import SERVER_ONLY, Deflate, Options
from ..protocol import ClientHandshake, Headers, Protocol, Request, Response, Side

__all__ = ["connect", "ClientConnection"]

# Seconds the connection's thread waits, after handing a message to a waiting
# recv(), for the application to come back (see the module's docstring).
_HANDOFF_WAIT = 1.0

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
                 "_has_handler", "_done", "_receivers", "_comebacks", "_handing", "_awaiting")

    def __init__(self, transport: Union[PlainTransport, TLSTransport], protocol: Protocol,
                 runtime: Runtime,
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
        self._receivers = 0    # threads waiting in recv()
        self._comebacks = 0    # counts the application's calls after a message
        self._handing = False  # the connection's thread waits for the application
        self._awaiting: Optional[int] = None  # _comebacks when a message was handed over
        hold = None
        if handler is None:
            handler = WebSocketHandler(on_message=self._enqueue)
            hold = self._hold_for_app
        super().__init__(transport, protocol, runtime, options,
                         transport.sock.getpeername() or url, handler)
        self.hold_events = hold

    # -- Receiving without a handler -----------------------------------------

    def _enqueue(self, message: Union[str, bytes]) -> None:
        """on_message when there is no handler (the connection's thread)."""
        with self._arrived:
            while len(self._messages) >= self._max_queue and self.is_open:
                # Stop reading until recv() makes room: TCP holds the server.
                self._arrived.wait(1.0)
            handed = self._receivers > 0 and not self._messages
            self._messages.append(message)
            self._arrived.notify_all()
            if handed:
                # A recv() takes it now: what follows waits for the
                # application to come back (see _hold_for_app).
                self._awaiting = self._comebacks

    def _hold_for_app(self) -> None:
        """Called by the engine before it handles more of what was received:
        if a message was just handed to a ``recv()``, wait (``_HANDOFF_WAIT``
        at most) until the application comes back, so that its answer goes
        out before whatever follows can close the connection."""
        awaiting = self._awaiting
        if awaiting is None:
            return
        with self._arrived:
            deadline = time.monotonic() + _HANDOFF_WAIT
            self._handing = True
            try:
                while self._comebacks == awaiting and self.is_open:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._arrived.wait(remaining)
            finally:
                self._handing = False
                self._awaiting = None

    def _came_back(self) -> None:
        """The application acts again: the connection's thread may go on."""
        self._comebacks += 1
        if self._handing:
            with self._arrived:
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
        if not self._messages:
            # The usual case once the reading is lent: read here, at once.
            # (Nothing reaches the queue while it is lent.)
            self._comebacks += 1
            message = self.read_message(timeout)
            if message is not None:
                return message
        arrived = self._arrived
        while True:
            with arrived:
                self._comebacks += 1
                if self._handing:
                    arrived.notify_all()  # the connection's thread may go on
                while not self._messages:
                    if self._done.is_set():
                        raise closed_error(self.close_code, self.close_reason)
                    if self.reader_lent():
                        break  # read in this thread, below
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise TimeoutError(f"no message in {timeout} s")
                    # From its next read on, the connection's thread lets
                    # this one read: no hand-over between threads per message.
                    self.lend_reader(arrived)
                    self._receivers += 1
                    try:
                        arrived.wait(remaining)
                    finally:
                        self._receivers -= 1
                else:
                    message = self._messages.popleft()
                    arrived.notify_all()
                    return message
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            message = self.read_message(remaining)
            if message is not None:
                return message
            # The connection is ending, or the thread took its reading back:
            # what it handles reaches the queue.

    def __iter__(self) -> Iterator[Union[str, bytes]]:
        """Every message until the connection closes; a normal close ends the
        loop, any other raises :class:`~gaman_sync.ConnectionClosedError`."""
        while True:
            try:
                message = self.recv()
            except ConnectionClosedOK:
                return
            yield message

    # -- Sending -----------------------------------------------------------------

    def send(self, message: Any, timeout: Optional[float] = None) -> None:
        proto = self._proto
        try:
            if proto.encode_whole is not None:
                # The C helper encodes and masks the whole frame in one call.
                self.send_frame(proto.encode_whole(message), timeout)
            elif proto.encodes_in_order:
                self.send_in_order(message, timeout)  # compression with context takeover
            else:
                super().send(message, timeout)
        finally:
            # _came_back(), written out: every send passes here.
            self._comebacks += 1
            if self._handing:
                with self._arrived:
                    self._arrived.notify_all()

    send.__doc__ = Connection.send.__doc__

    def ping(self, data: Union[bytes, str] = b"") -> None:
        try:
            super().ping(data)
        finally:
            self._came_back()

    ping.__doc__ = Connection.ping.__doc__

    def terminate(self) -> None:
        try:
            super().terminate()
        finally:
            self._came_back()

    terminate.__doc__ = Connection.terminate.__doc__

    # -- Closing ---------------------------------------------------------------

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the connection and wait (up to about ``close_timeout``) until it
        is closed: the closing handshake done and TCP closed by the server.
        From a callback of this connection, starts the close and returns."""
        try:
            super().close(code, reason)
        finally:
            self._came_back()
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

    def __enter__(self) -> ClientConnection:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.is_open:
            self.close()
        else:
            self.wait_closed()


# RFC 7230 3.2.6: header names and subprotocols are tokens; header values
# and request targets never hold control characters (CR and LF above all).
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _check_arguments(subprotocols: Any, headers: Any, origin: Any, open_timeout: Any,
                     handler: Any, max_queue: Any
                     ) -> Tuple[List[str], List[Tuple[str, str]]]:
    """Check connect()'s own arguments before any I/O; return the
    subprotocols and the extra headers as lists."""
    if isinstance(subprotocols, (str, bytes)) or not isinstance(subprotocols, Iterable):
        raise TypeError(f"subprotocols must be a list of str, not {subprotocols!r}")
    offered = list(subprotocols)
    for subprotocol in offered:
        if not isinstance(subprotocol, str):
            raise TypeError(f"subprotocols must be a list of str; it holds {subprotocol!r}")
        if not _TOKEN.match(subprotocol):
            raise ValueError(f"subprotocols: {subprotocol!r} is not a valid subprotocol name "
                             "(an HTTP token: no spaces, commas or control characters)")
    if headers is None:
        pairs: List[Tuple[str, str]] = []
    elif isinstance(headers, Mapping):
        pairs = list(headers.items())
    elif isinstance(headers, (str, bytes)) or not isinstance(headers, Iterable):
        raise TypeError(f"headers must be a dict or a list of (name, value) pairs of str, "
                        f"not {headers!r}")
    else:
        pairs = []
        for pair in headers:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise TypeError(f"headers must be a dict or a list of (name, value) pairs of "
                                f"str; it holds {pair!r}")
            pairs.append((pair[0], pair[1]))
    for name, value in pairs:
        if not isinstance(name, str) or not isinstance(value, str):
            raise TypeError(f"headers: name and value must be str, not {name!r}: {value!r}")
        if not _TOKEN.match(name):
            raise ValueError(f"headers: {name!r} is not a valid header name")
        if _CONTROL.search(value):
            raise ValueError(f"headers: the value of {name!r} holds a control character "
                             f"(CR, LF, ...): {value!r}")
    if origin is not None:
        if not isinstance(origin, str):
            raise TypeError(f"origin must be a str or None, not {origin!r}")
        if _CONTROL.search(origin):
            raise ValueError(f"origin holds a control character: {origin!r}")
    if open_timeout is not None:
        if isinstance(open_timeout, bool) or not isinstance(open_timeout, (int, float)):
            raise TypeError(f"open_timeout must be a positive number of seconds or None, "
                            f"not {open_timeout!r}")
        if not 0 < open_timeout < float("inf"):
            raise ValueError(f"open_timeout must be a positive number of seconds or None, "
                             f"not {open_timeout!r}")
    if isinstance(max_queue, bool) or not isinstance(max_queue, int):
        raise TypeError(f"max_queue must be a positive int, not {max_queue!r}")
    if max_queue < 1:
        raise ValueError(f"max_queue must be a positive int, not {max_queue!r}")
    if handler is not None and not isinstance(handler, (WebSocketHandler, Mapping)):
        raise TypeError(f"handler must be a WebSocketHandler, a dict of callbacks or None, "
                        f"not {handler!r}")
    return offered, pairs


def _parse_url(url: str) -> Tuple[str, int, str, str, bool]:
    """(host, port, request target, Host header, TLS) of a ``ws://`` or
    ``wss://`` URL."""
    if not isinstance(url, str):
        raise TypeError(f"url must be a str like 'ws://host:port/path', not {url!r}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidURI(f"{url!r} is not a valid URL: {exc}") from None
    if parts.scheme not in ("ws", "wss"):
        raise InvalidURI(f"{url!r} is not a ws:// URL (nor wss://)")
    secure = parts.scheme == "wss"
    default_port = 443 if secure else 80
    if not parts.hostname:
        raise InvalidURI(f"{url!r} has no host")
    if parts.username or parts.password:
        raise InvalidURI(f"{url!r}: user information in the URL is not supported")
    host = parts.hostname
    port = port if port is not None else default_port
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if _CONTROL.search(target) or " " in target:
        raise InvalidURI(f"{url!r}: the path holds spaces or control characters; "
                         "percent-encode them")
    netloc_host = f"[{host}]" if ":" in host else host
    host_header = netloc_host if port == default_port else f"{netloc_host}:{port}"
    return host, port, target, host_header, secure


_REDIRECTS = (301, 302, 303, 307, 308)


def _next_request(url: str, offered: Sequence[str], extra: Sequence[Tuple[str, str]],
                  origin: Optional[str], compression: Optional[Deflate] = None) -> Request:
    """The request about to be sent to ``url`` (for ``on_redirect``)."""
    _, _, target, host_header, _ = _parse_url(url)
    handshake = ClientHandshake(host_header, target, offered, extra, origin,
                                compression=compression)
    return Request("GET", target, Headers(handshake.request_headers))


def next_hop(chain: List[str], location: str, max_redirects: int) -> str:
    """The URL a redirect to ``location`` leads to from the last URL of
    ``chain`` (which it is appended to), or :class:`~gaman_sync.InvalidRedirect`
    for a loop, too many hops, or ``wss://`` to anything but ``wss://``."""
    current = chain[-1]
    target = urljoin(current, location.strip())
    chain.append(target)
    if urlsplit(current).scheme == "wss" and urlsplit(target).scheme != "wss":
        raise InvalidRedirect(chain, "a redirect from wss:// to an unencrypted URL is refused")
    if target in chain[:-1]:
        raise InvalidRedirect(chain, "a redirect loop")
    if len(chain) - 1 > max_redirects:
        raise InvalidRedirect(chain, f"more than {max_redirects} redirects")
    if urlsplit(target).scheme not in ("ws", "wss"):
        raise InvalidRedirect(chain, "a redirect to a URL that is not ws:// or wss://")
    return target


def _handshake(url: str, handshake: ClientHandshake, sock: Optional[socket.socket],
               deadline: Optional[float], open_timeout: Optional[float],
               ssl_context: Optional[ssl.SSLContext]
               ) -> Tuple[Union[PlainTransport, TLSTransport], ClientHandshake]:
    """Connect (unless ``sock`` is given) and run ``handshake`` to its 101:
    the connection's transport."""
    host, port, _, _, secure = _parse_url(url)
    request = handshake.request()  # before any I/O: h11 checks what is left
    if sock is not None:
        if not isinstance(sock, socket.socket):
            raise TypeError(f"sock must be a connected socket.socket, not {sock!r}")
    else:
        remaining = None if deadline is None else max(deadline - time.monotonic(), 0.001)
        try:
            sock = socket.create_connection((host, port), timeout=remaining)
        except socket.timeout:
            raise HandshakeTimeout(f"could not connect to {host}:{port} in {open_timeout} s") \
                from None
        except OSError as exc:
            raise type(exc)(exc.errno, f"could not connect to {host}:{port}: "
                            f"{exc.strerror or exc}") from None
    tls: Optional[TLSTransport] = None
    try:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if secure:
            sock.settimeout(None)
            tls = _start_tls(url, sock, host, deadline,
                             ssl_context if ssl_context is not None else _default_context())
            tls.sendall_blocking(request, deadline)
        else:
            sock.sendall(request)
        while True:
            if tls is not None:
                if deadline is None:
                    data = tls.recv(65536)
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise socket.timeout
                    data = tls.recv_for(65536, remaining)
            else:
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise socket.timeout
                    sock.settimeout(remaining)
                data = sock.recv(65536)
            if handshake.receive(data):
                break
        sock.settimeout(None)
    except socket.timeout:
        sock.close()
        raise HandshakeTimeout(f"no answer to the opening handshake from {url} in "
                               f"{open_timeout} s") from None
    except ssl.SSLError as exc:
        sock.close()
        if isinstance(exc, (ssl.SSLCertVerificationError, InvalidCertificate)) \
                or "failed:" in str(exc):
            raise  # from _start_tls: it names the URL already
        # TLS 1.3: the server judges our certificate after its handshake, and
        # its alert is what the first read gets.
        raise type(exc)(exc.errno, f"TLS with {url} failed: {_tls_reason(exc)}") from None
    except BaseException:
        sock.close()
        raise
    return (tls if tls is not None else PlainTransport(sock)), handshake


def _tls_reason(exc: ssl.SSLError) -> str:
    # Not every SSLError has a reason (one raised in Python has not).
    why = str(getattr(exc, "reason", None) or exc.strerror or exc)
    if "CERTIFICATE_REQUIRED" in why:
        why += (" (the server asks for a client certificate: load one into ssl_context "
                "with load_cert_chain)")
    return why


_default: Optional[ssl.SSLContext] = None


def _default_context() -> ssl.SSLContext:
    """``ssl.create_default_context()``, made once (loading the system's
    certificate authorities takes milliseconds)."""
    global _default
    if _default is None:
        _default = ssl.create_default_context()
    return _default


def _start_tls(url: str, sock: socket.socket, host: str, deadline: Optional[float],
               context: ssl.SSLContext) -> TLSTransport:
    """The TLS handshake of a ``wss://`` URL, over ``sock``."""
    tls = TLSTransport(sock, context, server_side=False,
                       server_hostname=host if context.check_hostname else None)
    try:
        tls.handshake_blocking(deadline)
    except ssl.SSLCertVerificationError as exc:
        raise InvalidCertificate(url, exc) from None
    except ssl.SSLError as exc:
        raise type(exc)(exc.errno, f"TLS handshake with {url} failed: {_tls_reason(exc)}") \
            from None
    return tls


def connect(url: str, *, subprotocols: Sequence[str] = (),
            headers: Union[Mapping[str, str], Sequence[Tuple[str, str]], None] = None,
            origin: Optional[str] = None, open_timeout: Optional[float] = 10.0,
            handler: HandlerLike = None, max_queue: int = 16,
            sock: Optional[socket.socket] = None, ssl_context: Optional[ssl.SSLContext] = None,
            follow_redirects: bool = True,
            max_redirects: int = 5,
            on_redirect: Optional[Callable[[str, Request], Any]] = None,
            **options: Any) -> ClientConnection:
    """Open a WebSocket connection to ``url`` (``ws://host:port/path``).

    With ``sock``, an already connected socket (one end of a
    ``socket.socketpair()`` whose other end a server adopted, say), the
    handshake runs over it and ``url`` only names the host and the path.

    ``subprotocols`` are offered in order of preference; ``headers`` are
    added to the request; ``origin`` sets its ``Origin``. ``open_timeout``
    bounds the TCP connect and the handshake together. With ``handler`` (a
    :class:`~gaman_sync.WebSocketHandler` or a dict of callbacks) the
    connection's thread calls them; without, use ``recv()`` or iterate.
    Other keyword arguments are the connection options of
    :class:`~gaman_sync.Options` (``max_message_size``, ``ping_interval``,
    ``close_timeout``, ``write_limit``, ...). ``compression="deflate"`` (the
    default) offers permessage-deflate, ``None`` does not, and a
    :class:`~gaman_sync.Deflate` sets its parameters; an answer from the
    server that does not fit the offer raises
    :class:`~gaman_sync.InvalidHeader`.

    Redirects (301, 302, 303, 307, 308 with a ``Location``) are followed, up
    to ``max_redirects`` hops, relative locations resolved against the URL
    of the hop; ``on_redirect(url, request)`` (or the handler's) is called
    before each hop with the request about to be sent. A loop, too many
    hops, or ``wss://`` to ``ws://`` raise :class:`~gaman_sync.InvalidRedirect`
    naming the chain. ``follow_redirects=False`` raises the
    :class:`~gaman_sync.InvalidStatus` of the first redirect instead.

    ``ssl_context`` sets TLS for ``wss://`` URLs (default:
    ``ssl.create_default_context()``); it is refused with a ``ws://`` URL.
    A certificate that does not verify raises
    :class:`~gaman_sync.InvalidCertificate` (also an
    ``ssl.SSLCertVerificationError``).

    Raises :class:`~gaman_sync.InvalidHandshake` subclasses when the server
    refuses or answers wrongly (:class:`~gaman_sync.InvalidStatus` carries
    the status, the headers and the body), and ``OSError`` when TCP cannot
    connect.
    """
    server_only = sorted(SERVER_ONLY & set(options))
    if server_only:
        raise TypeError(f"{', '.join(server_only)}: server option(s), not for connect()")
    known = sorted({f.name for f in fields(Options)} - SERVER_ONLY)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(f"connect() got unknown argument(s) {', '.join(unknown)}; its options "
                        f"are {known}")
    opts = Options.from_kwargs(options)
    offered, extra = _check_arguments(subprotocols, headers, origin, open_timeout, handler,
                                      max_queue)
    callbacks = as_handler(handler) if handler is not None else None
    if on_redirect is None and callbacks is not None:
        on_redirect = callbacks.on_redirect
    if on_redirect is not None and not callable(on_redirect):
        raise TypeError(f"on_redirect must be a function (url, request) or None, "
                        f"not {on_redirect!r}")
    if isinstance(max_redirects, bool) or not isinstance(max_redirects, int) \
            or max_redirects < 0:
        raise ValueError(f"max_redirects must be an int of 0 or more, not {max_redirects!r}")
    if ssl_context is not None:
        if not isinstance(ssl_context, ssl.SSLContext):
            raise TypeError(f"ssl_context must be an ssl.SSLContext or None, "
                            f"not {ssl_context!r}")
        if not _parse_url(url)[4]:
            raise ValueError(f"ssl_context is for wss:// URLs; {url!r} is ws:// "
                             "(use wss:// or leave ssl_context out)")
    deadline = None if open_timeout is None else time.monotonic() + open_timeout
    chain = [url]
    while True:
        _, _, target, host_header, _ = _parse_url(url)
        handshake = ClientHandshake(host_header, target, offered, extra, origin,
                                    compression=opts.deflate)
        try:
            transport, handshake = _handshake(url, handshake, sock, deadline, open_timeout,
                                              ssl_context)
            break
        except InvalidStatus as exc:
            location = exc.headers.get("location")
            if not follow_redirects or exc.status not in _REDIRECTS or not location:
                raise
            url = next_hop(chain, location, max_redirects)
            sock = None  # a given socket served the first hop only
            if on_redirect is not None:
                on_redirect(url, _next_request(url, offered, extra, origin, opts.deflate))
    assert handshake.response is not None
    runtime = client_runtime()
    conn = ClientConnection(
        transport,
        Protocol(Side.CLIENT, opts.max_message_size, handshake.trailing_data,
                 deflate=handshake.deflate),
        runtime, opts, url, handshake.response, handshake.subprotocol, callbacks, max_queue)
    try:
        runtime.workers.run(conn.run)
    except RuntimeError:
        transport.close()
        raise
    return conn
