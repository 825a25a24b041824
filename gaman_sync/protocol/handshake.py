"""The opening handshake (RFC 6455, section 4), both sides, without I/O.

h11 parses the HTTP request (server) and response (client), because it is
strict and bounded; the checks and the messages are RFC 6455's and small
enough to write out here, so that an accepted connection costs one parse and
no HTTP state machine after it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from http import HTTPStatus
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import h11

from ..exceptions import InvalidHeader, InvalidMessage, InvalidStatus
from ..options import Deflate
from .deflate import Agreement, NegotiationError, client_agreement, client_offer
from .http import Headers, Request, Response, header_tokens

__all__ = ["HandshakeError", "RequestParser", "check_upgrade", "accept_response", "add_header",
           "error_response", "accept_token", "check_header", "ClientHandshake"]

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class HandshakeError(Exception):
    """The request cannot open a WebSocket; answer ``status`` and close."""

    def __init__(self, status: int, message: str,
                 headers: Sequence[Tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = tuple(headers)


class RequestParser:
    """Feeds bytes to h11 until one whole request has arrived."""

    __slots__ = ("_h11", "_fed", "_max")

    def __init__(self, max_request_size: int) -> None:
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=max_request_size)
        self._fed = 0
        self._max = max_request_size

    def feed(self, data: bytes) -> Optional[h11.Request]:
        """Add ``data`` (``b""`` at end of stream); return the request once whole.

        Raises :class:`HandshakeError` for a malformed or oversized request,
        and ``EOFError`` when the stream ends before a request.
        """
        self._h11.receive_data(data)
        self._fed += len(data)
        try:
            event = self._h11.next_event()
        except h11.RemoteProtocolError as exc:
            # h11's message quotes the offending bytes: keep only its gist, so
            # that a hostile request is not echoed into responses and logs.
            gist = str(exc).split(":", 1)[0][:60]
            raise HandshakeError(exc.error_status_hint, f"bad HTTP request: {gist}") from None
        if event is h11.NEED_DATA:
            return None
        if isinstance(event, h11.Request):
            # h11 bounds only requests still incomplete; one that arrived
            # whole in a single read is measured here.
            if self._fed - len(self._h11.trailing_data[0]) > self._max:
                raise HandshakeError(431, "request headers too large")
            return event
        raise EOFError("the client closed the connection before sending a request")

    @property
    def trailing_data(self) -> bytes:
        """Bytes that arrived after the request: the first WebSocket frames."""
        return self._h11.trailing_data[0]


def to_request(event: h11.Request, remote_address: Optional[Tuple[Any, ...]]) -> Request:
    """Our :class:`Request` for an h11 request event."""
    headers = Headers([(k.decode("latin-1"), v.decode("latin-1"))
                       for k, v in event.headers.raw_items()])
    return Request(event.method.decode("ascii"), event.target.decode("latin-1"), headers,
                   remote_address, event.http_version.decode("ascii"))


def check_upgrade(request: Request) -> bytes:
    """Check that ``request`` is a valid WebSocket upgrade; return its key
    (and set its :attr:`~gaman_sync.protocol.Request.extensions`).

    The routing (404) and the method (405) are checked by the caller first.
    """
    # Indexed once here, for the six lookups below; not kept, since the
    # request stays with its connection for its whole life.
    headers: Dict[str, List[str]] = {}
    for name, value in request.headers.raw_items():
        headers.setdefault(name.lower(), []).append(value)
    upgrade = [t.lower() for t in header_tokens(headers.get("upgrade", []))]
    if "websocket" not in upgrade:
        raise HandshakeError(
            426, "this is a WebSocket endpoint: send a WebSocket upgrade request",
            [("Upgrade", "websocket"), ("Connection", "Upgrade, close"),
             ("Sec-WebSocket-Version", "13")])
    if request.http_version != "1.1":
        raise HandshakeError(400, "a WebSocket upgrade needs HTTP/1.1")
    if "transfer-encoding" in headers or \
            ", ".join(headers.get("content-length", ["0"])).strip() != "0":
        # Its body would be read as WebSocket frames.
        raise HandshakeError(400, "a WebSocket upgrade request has no body")
    if "upgrade" not in (t.lower() for t in header_tokens(headers.get("connection", []))):
        raise HandshakeError(400, "missing 'Connection: Upgrade'")
    versions = headers.get("sec-websocket-version", [])
    if versions != ["13"]:
        raise HandshakeError(426, "unsupported Sec-WebSocket-Version; this server speaks 13",
                             [("Sec-WebSocket-Version", "13")])
    keys = headers.get("sec-websocket-key", [])
    if len(keys) != 1:
        raise HandshakeError(400, "missing or repeated Sec-WebSocket-Key")
    key = keys[0].strip().encode("ascii", "replace")
    try:
        valid = len(base64.b64decode(key, validate=True)) == 16
    except binascii.Error:
        valid = False
    if not valid:
        raise HandshakeError(400, "Sec-WebSocket-Key is not 16 bytes in base64")
    extensions = headers.get("sec-websocket-extensions")
    if extensions:
        request.extensions = tuple(extensions)
    return key


def accept_token(key: bytes) -> bytes:
    """The ``Sec-WebSocket-Accept`` value for a client's key."""
    return base64.b64encode(hashlib.sha1(key + _GUID).digest())


def accept_response(key: bytes, subprotocol: Optional[str] = None,
                    headers: Iterable[Tuple[str, str]] = ()) -> bytes:
    """The ``101 Switching Protocols`` response that opens the connection,
    with extra ``headers`` (a ``Set-Cookie``, say) after the required ones."""
    lines = [b"HTTP/1.1 101 Switching Protocols", b"Upgrade: websocket",
             b"Connection: Upgrade", b"Sec-WebSocket-Accept: " + accept_token(key)]
    if subprotocol:
        lines.append(b"Sec-WebSocket-Protocol: " + subprotocol.encode("ascii"))
    for name, value in headers:
        lines.append(f"{name}: {value}".encode("latin-1"))
    return b"\r\n".join(lines) + b"\r\n\r\n"


def add_header(response: bytes, name: str, value: str) -> bytes:
    """``response`` (a whole HTTP head, as :func:`accept_response` makes it)
    with one more header line at its end."""
    return response[:-2] + f"{name}: {value}\r\n\r\n".encode("latin-1")


def check_header(name: object, value: object) -> Tuple[str, str]:
    """Raise unless (``name``, ``value``) can go in a response as it is."""
    if not isinstance(name, str) or not isinstance(value, str):
        raise TypeError(f"a header is a (name, value) pair of str, not ({name!r}, {value!r})")
    if not name or any(c in name for c in " \t\r\n:") or any(c in value for c in "\r\n\0"):
        raise ValueError(f"invalid header {name!r}: {value!r}")
    try:
        (name + value).encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(f"header {name!r} is not latin-1") from None
    return name, value


def error_response(status: int, message: str,
                   headers: Iterable[Tuple[str, str]] = ()) -> bytes:
    """A short plain-text HTTP error response that closes the connection."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    body = f"{status} {phrase}: {message}\n".encode("utf-8", "replace")
    head = [f"HTTP/1.1 {status} {phrase}", "Content-Type: text/plain; charset=utf-8",
            f"Content-Length: {len(body)}"]
    names = {k.lower() for k, _ in headers}
    head.extend(f"{k}: {v}" for k, v in headers)
    if "connection" not in names:
        head.append("Connection: close")
    return "\r\n".join(head).encode("latin-1") + b"\r\n\r\n" + body


# -- The client side (RFC 6455, section 4.1) ---------------------------------

_BODY_KEPT = 1024  # bytes of a refusal's body kept for the error message


class ClientHandshake:
    """One client's opening handshake: the request to send, then the
    response fed in until it is whole and checked."""

    __slots__ = ("key", "subprotocols", "_h11", "_status", "_reason", "_headers", "_body",
                 "_max", "_fed", "_request", "response", "subprotocol", "_compression",
                 "deflate")

    def __init__(self, host: str, target: str, subprotocols: Sequence[str] = (),
                 headers: Sequence[Tuple[str, str]] = (), origin: Optional[str] = None,
                 max_response_size: int = 16 * 1024,
                 compression: Optional[Deflate] = None) -> None:
        self.key = base64.b64encode(os.urandom(16))
        self.subprotocols = tuple(subprotocols)
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_response_size)
        self._max = max_response_size
        self._fed = 0
        self._status = 0
        self._reason = ""
        self._headers: Optional[Headers] = None
        self._body = b""
        self.response: Optional[Response] = None
        """The server's response, once whole."""
        self.subprotocol: Optional[str] = None
        """The subprotocol the server selected, once the response is checked."""
        self._compression = compression
        self.deflate: Optional[Agreement] = None
        """The permessage-deflate agreement, once the response is checked, if
        the server accepted our offer."""
        request_headers = [("Host", host), ("Upgrade", "websocket"),
                           ("Connection", "Upgrade"), ("Sec-WebSocket-Key", self.key.decode()),
                           ("Sec-WebSocket-Version", "13")]
        if self.subprotocols:
            request_headers.append(("Sec-WebSocket-Protocol", ", ".join(self.subprotocols)))
        if origin is not None:
            request_headers.append(("Origin", origin))
        if compression is not None:
            request_headers.append(("Sec-WebSocket-Extensions", client_offer(compression)))
        request_headers.extend(headers)
        self._request = request_headers, target

    @property
    def request_headers(self) -> List[Tuple[str, str]]:
        """The headers of the request, as they will be sent."""
        return list(self._request[0])

    def request(self) -> bytes:
        """The request's bytes (call once)."""
        headers, target = self._request
        return self._h11.send(h11.Request(method="GET", target=target, headers=headers))

    def receive(self, data: bytes) -> bool:
        """Feed the server's bytes (``b""`` at end of stream); True once the
        response is whole and the connection is open. Raises
        :class:`~gaman_sync.InvalidHandshake` subclasses when it is refused."""
        self._fed += len(data)
        self._h11.receive_data(data)
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                if not data:  # h11 reports the end of the stream as an error
                    if self._headers is not None:
                        self._refused()  # the body of a refusal, cut short: enough
                    raise InvalidMessage("the server closed the connection before answering "
                                         "the opening handshake") from None
                raise InvalidMessage(f"the server's answer is not valid HTTP: "
                                     f"{str(exc)[:80]}") from None
            if event is h11.NEED_DATA:
                if not data:
                    if self._headers is not None:
                        self._refused()  # the body of a refusal, cut short: enough
                    raise InvalidMessage("the server closed the connection before answering "
                                         "the opening handshake")
                if self._headers is not None and len(self._body) >= _BODY_KEPT:
                    self._refused()
                return False
            if isinstance(event, h11.InformationalResponse) and event.status_code == 101:
                self._open(event)
                return True
            if isinstance(event, h11.Response):
                self._status = event.status_code
                self._reason = event.reason.decode("latin-1", "replace")
                self._headers = _headers(event.headers.raw_items())
                continue
            if isinstance(event, h11.Data):
                self._body += bytes(event.data)[:_BODY_KEPT - len(self._body)]
                continue
            if isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)) \
                    and self._headers is not None:
                self._refused()
            if isinstance(event, h11.InformationalResponse):
                continue  # 100 Continue and the like: the answer comes next
            raise InvalidMessage(f"unexpected {type(event).__name__} in the server's answer")

    @property
    def trailing_data(self) -> bytes:
        """Bytes that came after the 101: the server's first frames."""
        return self._h11.trailing_data[0]

    def _refused(self) -> None:
        assert self._headers is not None
        self.response = Response(self._status, self._reason, self._headers, self._body)
        body = self._body[:200].decode("utf-8", "replace").strip()
        detail = f"the server refused the WebSocket handshake with {self._status} " \
                 f"{self._reason}".rstrip()
        if body:
            detail += f": {body!r}"
        raise InvalidStatus(self.response, self._status, detail)

    def _open(self, event: h11.InformationalResponse) -> None:
        headers = _headers(event.headers.raw_items())
        self.response = Response(101, event.reason.decode("latin-1", "replace"), headers)
        upgrade = [t.lower() for t in header_tokens(headers.get_all("upgrade"))]
        if upgrade != ["websocket"]:
            raise InvalidHeader("Upgrade", f"the 101 has 'Upgrade: {headers.get('upgrade')}', "
                                "not 'Upgrade: websocket'")
        if "upgrade" not in (t.lower() for t in header_tokens(headers.get_all("connection"))):
            raise InvalidHeader("Connection", "the 101 has no 'Connection: Upgrade'")
        accept = headers.get_all("sec-websocket-accept")
        if accept != [accept_token(self.key).decode()]:
            raise InvalidHeader("Sec-WebSocket-Accept",
                                f"the 101's Sec-WebSocket-Accept is {accept!r}, not the "
                                "hash of our key: the server is not a WebSocket server, or a "
                                "proxy altered the handshake")
        extensions = headers.get_all("sec-websocket-extensions")
        if extensions:
            if self._compression is None:
                raise InvalidHeader("Sec-WebSocket-Extensions",
                                    "the server selected an extension we did not offer: "
                                    f"{headers.get('sec-websocket-extensions')}")
            try:
                self.deflate = client_agreement(extensions, self._compression)
            except NegotiationError as exc:
                raise InvalidHeader("Sec-WebSocket-Extensions", str(exc)) from None
        chosen = header_tokens(headers.get_all("sec-websocket-protocol"))
        if chosen:
            if len(chosen) > 1 or chosen[0] not in self.subprotocols:
                raise InvalidHeader("Sec-WebSocket-Protocol",
                                    f"the server selected subprotocol {', '.join(chosen)!r}, "
                                    f"which we did not offer (offered: "
                                    f"{list(self.subprotocols)})")
            self.subprotocol = chosen[0]


def _headers(raw: Iterable[Tuple[bytes, bytes]]) -> Headers:
    return Headers([(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw])
