"""The opening handshake (RFC 6455, section 4), both sides, without I/O.

A server reads the client's request with :class:`RequestParser`: strict,
bounded, and two regular expressions rather than an HTTP state machine, so
that an accepted connection costs one parse and nothing after it (see the
class). A client reads the server's response with h11, which also reads the
body of a refusal; a client makes one handshake, not thousands a second.
The checks and the messages are RFC 6455's, and small enough to write out.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from http import HTTPStatus
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import h11

from ..exceptions import InvalidHeader, InvalidMessage, InvalidStatus
from ..options import Deflate
from .deflate import Agreement, NegotiationError, client_agreement, client_offer
from .http import (
    HEADER_LINE,
    HEADER_VALUE,
    REQUEST_LINE,
    TOKEN,
    Headers,
    Request,
    Response,
    header_tokens,
)

__all__ = ["HandshakeError", "RequestParser", "Fields", "check_upgrade", "accept_response",
           "add_header", "error_response", "accept_token", "check_header", "ClientHandshake"]

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class HandshakeError(Exception):
    """The request cannot open a WebSocket; answer ``status`` and close."""

    def __init__(self, status: int, message: str,
                 headers: Sequence[Tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = tuple(headers)


# The grammar of the request head is in .http (the headers of a request
# keep its lines); what follows it here is h11's checks.
_HEAD_RE = re.compile(
    rf"{REQUEST_LINE}((?:{TOKEN}:[ \t]*(?:{HEADER_VALUE}[ \t]*)?\r?\n)*)\r?\n", re.ASCII)
_REQUEST_LINE_RE = re.compile(REQUEST_LINE, re.ASCII)
_FIELD_RE = re.compile(HEADER_LINE, re.ASCII)
_HEAD_END_RE = re.compile(rb"\n\r?\n")
_OBS_FOLD_RE = re.compile(r"\n[ \t]")
# At most 20 digits, as h11 (2**64 has 20): a length is read as a number.
_CONTENT_LENGTH_RE = re.compile(r"[0-9]{1,20}", re.ASCII)
# 16 bytes in base64, as base64.b64decode(key, validate=True) accepts them.
_KEY_RE = re.compile(r"[A-Za-z0-9+/]{22}==", re.ASCII)

_COMMON = {text: text for text in ("GET", "HEAD", "1.1", "1.0")}

Fields = Dict[str, List[str]]
"""A request's header values by lower-cased name, in the order sent."""


class RequestParser:
    """Reads one request head, strictly and within a size limit.

    Written out rather than run through h11's HTTP state machine, which a
    connection that upgrades never needs beyond its first request: one
    regular expression checks the whole head and another splits its header
    lines, both in C, so that reading a request costs a fraction of an h11
    connection's work. The grammar is h11's (the tests compare the two on
    generated requests), and so are the checks that follow from it: one
    ``Host`` for HTTP/1.1, ``Content-Length`` digits that agree,
    ``Transfer-Encoding: chunked`` or none (501 otherwise). A body is never
    read: a WebSocket upgrade has none, and a plain HTTP request is answered
    and closed.
    """

    __slots__ = ("_buffer", "_max", "_searched", "trailing_data", "fields")

    def __init__(self, max_request_size: int) -> None:
        self._buffer = bytearray()
        self._max = max_request_size
        self._searched = 0  # where the search for the blank line resumes
        self.trailing_data = b""
        """Bytes that arrived after the request: the first WebSocket frames."""
        self.fields: Fields = {}
        """The request's headers by lower-cased name, once it is whole: for
        :func:`check_upgrade`, and not kept by the request, which lives as
        long as its connection."""

    def feed(self, data: bytes) -> Optional[Request]:
        """Add ``data`` (``b""`` at end of stream); return the request once
        whole (its ``remote_address`` not set).

        Raises :class:`HandshakeError` for a malformed or oversized request,
        and ``EOFError`` when the stream ends before a request.
        """
        if not data:
            if self._buffer:
                raise HandshakeError(400, "bad HTTP request: cut short")
            raise EOFError("the client closed the connection before sending a request")
        buffer: Union[bytes, bytearray] = self._buffer
        if buffer:
            buffer += data  # a request in several reads: a bytearray, grown in place
        else:
            buffer = data  # the usual case: the whole request in one read, not copied
        end = _HEAD_END_RE.search(buffer, self._searched)
        if end is None:
            if buffer[0] < 0x21:
                # No request starts with whitespace or a control byte: refused
                # at once, as h11 does (a TLS hello sent to a plain port, say),
                # rather than at the size limit or the handshake's timeout.
                raise HandshakeError(400, "bad HTTP request: illegal request line")
            if len(buffer) > self._max:
                raise HandshakeError(431, "request headers too large")
            if buffer is data:
                self._buffer = bytearray(data)
            self._searched = max(len(buffer) - 2, 0)  # the blank line may end in the next read
            return None
        size = end.end()
        if size > self._max:
            # The same answer however the request was cut into reads: one
            # that starts badly is refused before it grows (above).
            if buffer[0] < 0x21:
                raise HandshakeError(400, "bad HTTP request: illegal request line")
            raise HandshakeError(431, "request headers too large")
        self.trailing_data = bytes(buffer[size:])
        head = buffer[:size].decode("latin-1")
        match = _HEAD_RE.fullmatch(head)
        if match is None:
            if not _REQUEST_LINE_RE.match(head):
                raise HandshakeError(400, "bad HTTP request: illegal request line")
            if _OBS_FOLD_RE.search(head):
                raise HandshakeError(400, "bad HTTP request: a header line starts with a "
                                          "space or a tab (obs-fold, RFC 9112 5.2)")
            raise HandshakeError(400, "bad HTTP request: illegal header line")
        method, target, version, block = match.groups()
        # The usual method and version as shared strings: two fewer objects
        # for every connection to keep (its request lives as long as it does).
        method = _COMMON.get(method, method)
        version = _COMMON.get(version, version)
        items = _FIELD_RE.findall(block)
        fields = self.fields
        for name, value in items:
            key = name.lower()
            values = fields.get(key)
            if values is None:
                fields[key] = [value]
            else:
                values.append(value)
        if "host" in fields:
            if len(fields["host"]) > 1:
                raise HandshakeError(400, "bad HTTP request: repeated Host header")
        elif version == "1.1":
            raise HandshakeError(400, "bad HTTP request: no Host header")
        if "content-length" in fields:
            lengths = {part.strip(" \t") for value in fields["content-length"]
                       for part in value.split(",")}
            if len(lengths) != 1 or not _CONTENT_LENGTH_RE.fullmatch(lengths.pop()):
                raise HandshakeError(400, "bad HTTP request: bad Content-Length")
        if "transfer-encoding" in fields:
            codings = fields["transfer-encoding"]
            if len(codings) != 1 or codings[0].lower() != "chunked":
                raise HandshakeError(501, "unsupported Transfer-Encoding")
        return Request(method, target, Headers.from_lines(block), None, version)


def check_upgrade(request: Request, fields: Optional[Fields] = None) -> bytes:
    """Check that ``request`` is a valid WebSocket upgrade; return its key
    (and set its :attr:`~gaman_sync.protocol.Request.extensions`).

    ``fields`` are its headers by lower-cased name, if the caller has them
    (:attr:`RequestParser.fields`). The routing (404) and the method (405)
    are checked by the caller first.
    """
    if fields is None:
        fields = {}
        for name, value in request.headers.raw_items():
            fields.setdefault(name.lower(), []).append(value)
    get = fields.get
    upgrade = get("upgrade")
    # The usual values first (one token); then any list of tokens.
    if upgrade is None or (upgrade != ["websocket"] and "websocket" not in
                           [t.lower() for t in header_tokens(upgrade)]):
        raise HandshakeError(
            426, "this is a WebSocket endpoint: send a WebSocket upgrade request",
            [("Upgrade", "websocket"), ("Connection", "Upgrade, close"),
             ("Sec-WebSocket-Version", "13")])
    if request.http_version != "1.1":
        raise HandshakeError(400, "a WebSocket upgrade needs HTTP/1.1")
    if "transfer-encoding" in fields or \
            ", ".join(get("content-length", ["0"])).strip(" \t") != "0":
        # Its body would be read as WebSocket frames.
        raise HandshakeError(400, "a WebSocket upgrade request has no body")
    connection = get("connection")
    if connection is None or (connection != ["Upgrade"] and "upgrade" not in
                              [t.lower() for t in header_tokens(connection)]):
        raise HandshakeError(400, "missing 'Connection: Upgrade'")
    if get("sec-websocket-version") != ["13"]:
        raise HandshakeError(426, "unsupported Sec-WebSocket-Version; this server speaks 13",
                             [("Sec-WebSocket-Version", "13")])
    keys = get("sec-websocket-key")
    if keys is None or len(keys) != 1:
        raise HandshakeError(400, "missing or repeated Sec-WebSocket-Key")
    key = keys[0].strip(" \t")  # HTTP's whitespace, not str's (0x85, 0xa0...)
    if not _KEY_RE.fullmatch(key):
        raise HandshakeError(400, "Sec-WebSocket-Key is not 16 bytes in base64")
    extensions = get("sec-websocket-extensions")
    if extensions:
        request.extensions = tuple(extensions)
    return key.encode("ascii")


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
