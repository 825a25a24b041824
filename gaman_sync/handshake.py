"""The server side of the opening handshake (RFC 6455, section 4.2), without I/O.

h11 parses the HTTP request, because it is strict and bounded; the checks and
the responses are RFC 6455's and small enough to write out here, so that an
accepted connection costs one parse and no HTTP state machine after it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from http import HTTPStatus
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import h11

from .request import Headers, Request, _tokens

__all__ = ["HandshakeError", "RequestParser", "check_upgrade", "accept_response",
           "error_response", "accept_token"]

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


def to_request(event: h11.Request, remote_address: Optional[Tuple]) -> Request:
    """Our :class:`Request` for an h11 request event."""
    headers = Headers([(k.decode("latin-1"), v.decode("latin-1"))
                       for k, v in event.headers.raw_items()])
    return Request(event.method.decode("ascii"), event.target.decode("latin-1"), headers,
                   remote_address, event.http_version.decode("ascii"))


def check_upgrade(request: Request) -> bytes:
    """Check that ``request`` is a valid WebSocket upgrade; return its key.

    The routing (404) and the method (405) are checked by the caller first.
    """
    # Indexed once here, for the six lookups below; not kept, since the
    # request stays with its connection for its whole life.
    headers: Dict[str, List[str]] = {}
    for name, value in request.headers.raw_items():
        headers.setdefault(name.lower(), []).append(value)
    upgrade = [t.lower() for t in _tokens(headers.get("upgrade", []))]
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
    if "upgrade" not in (t.lower() for t in _tokens(headers.get("connection", []))):
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
    return key


def accept_token(key: bytes) -> bytes:
    """The ``Sec-WebSocket-Accept`` value for a client's key."""
    return base64.b64encode(hashlib.sha1(key + _GUID).digest())


def accept_response(key: bytes, subprotocol: Optional[str] = None) -> bytes:
    """The ``101 Switching Protocols`` response that opens the connection."""
    lines = [b"HTTP/1.1 101 Switching Protocols", b"Upgrade: websocket",
             b"Connection: Upgrade", b"Sec-WebSocket-Accept: " + accept_token(key)]
    if subprotocol:
        lines.append(b"Sec-WebSocket-Protocol: " + subprotocol.encode("ascii"))
    return b"\r\n".join(lines) + b"\r\n\r\n"


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
