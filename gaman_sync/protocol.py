"""The protocol glue: wsproto's events turned into what a handler sees.

Theory of operation
-------------------
wsproto parses and validates every frame; this module adds what wsproto
leaves to its user, and no I/O at all:

- it answers pings, echoes the peer's close, and fails the connection with
  the right close code (1002 for protocol errors, 1007 for invalid UTF-8,
  1009 for a message over the size limit);
- it joins fragments into whole messages and enforces ``max_message_size``
  as soon as a frame header announces too much, never buffering it first;
- it remembers the close code that ended the connection: ours if we closed
  first, the peer's if it did.

:meth:`Protocol.next_event` hands out one application event at a time,
together with the bytes that must reach the wire *before* that event is
dispatched. The caller holds its connection lock only around the call, not
while it runs the callback, so a callback can send. Doing it one event at a
time keeps the wire in order: a message that arrived before a bad frame is
delivered (and its echo sent) before the close frame that fails the
connection.

wsproto is not thread-safe: every method here must be called with the
connection's lock held.
"""

from __future__ import annotations

import struct
from typing import Optional, Tuple, Union

from wsproto.connection import Connection as _WSConnection
from wsproto.connection import ConnectionState, ConnectionType
from wsproto.events import (BytesMessage, CloseConnection, Ping, Pong as _WSPong,
                            TextMessage)
from wsproto.frame_protocol import Opcode

from .errors import ConnectionClosed

__all__ = ["Protocol", "Message", "Pong", "Closed", "Failed", "ProtocolEvent",
           "encode_frame", "ConnectionState", "NO_STATUS", "ABNORMAL"]

NO_STATUS = 1005
ABNORMAL = 1006
_OPEN = ConnectionState.OPEN
_LOCAL_CLOSING = ConnectionState.LOCAL_CLOSING
_REMOTE_CLOSING = ConnectionState.REMOTE_CLOSING
_CLOSED = ConnectionState.CLOSED


class Message:
    """A whole message: ``str`` for text, ``bytes`` for binary."""

    __slots__ = ("data",)

    def __init__(self, data: Union[str, bytes]) -> None:
        self.data = data

    def __repr__(self) -> str:
        return f"Message({self.data!r:.60})"


class Pong:
    """The peer sent a pong (solicited or not)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class Closed:
    """The closing handshake is complete: close the TCP connection now."""

    __slots__ = ()


class Failed:
    """We failed the connection (bad input, or a limit): our close frame is
    on its way; stop reading messages and close the TCP connection."""

    __slots__ = ("code", "reason")

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason


ProtocolEvent = Union[Message, Pong, Closed, Failed]
_CLOSED_EVENT = Closed()

_HEADER_SMALL = struct.Struct("!BB").pack
_HEADER_MEDIUM = struct.Struct("!BBH").pack
_HEADER_LARGE = struct.Struct("!BBQ").pack


def encode_frame(message: Union[str, bytes, bytearray, memoryview]) -> Tuple[bytes, bytes]:
    """The header and the payload of an unmasked, unfragmented data frame.

    A server sends every message in one frame, so the header depends only on
    the type and the length: this is what lets a broadcast encode its frame
    once for every client (without extensions), and lets a large payload go
    out with ``sendmsg`` without being copied behind its header.
    """
    if isinstance(message, str):
        payload = message.encode("utf-8")
        first = 0x81  # FIN | TEXT
    elif isinstance(message, (bytes, bytearray, memoryview)):
        payload = message if isinstance(message, bytes) else bytes(message)
        first = 0x82  # FIN | BINARY
    else:
        raise TypeError(f"a message is str or bytes, not {type(message).__name__}")
    length = len(payload)
    if length < 126:
        return _HEADER_SMALL(first, length), payload
    if length < 65536:
        return _HEADER_MEDIUM(first, 126, length), payload
    return _HEADER_LARGE(first, 127, length), payload


class Protocol:
    """One server-side WebSocket connection after its handshake, without I/O."""

    __slots__ = ("_conn", "_events", "_parts", "_size", "_max", "_done",
                 "close_code", "close_reason")

    def __init__(self, max_message_size: Optional[int] = None,
                 trailing_data: bytes = b"") -> None:
        self._conn = _WSConnection(ConnectionType.SERVER)
        self._events = None  # the wsproto events generator while it has events
        self._parts: list = []
        self._size = 0
        self._max = max_message_size
        self._done = False
        self.close_code: Optional[int] = None
        """The code that ended the connection: ours if we closed first, else the peer's."""
        self.close_reason = ""
        if trailing_data:
            self.receive_data(trailing_data)

    @property
    def state(self) -> ConnectionState:
        """wsproto's state of the connection."""
        return self._conn.state

    @property
    def is_open(self) -> bool:
        """True while data may be sent (no close frame sent or received)."""
        return self._conn.state is _OPEN

    def receive_data(self, data: bytes) -> None:
        """Bytes from the peer. Ignored once the connection has failed or closed."""
        if not self._done:
            self._conn.receive_data(data)

    def next_event(self) -> Tuple[bytes, Optional[ProtocolEvent]]:
        """Bytes to write, then the next event for the application (or ``None``
        when everything received so far has been handled)."""
        out = b""
        while not self._done:
            if self._events is None:
                self._events = self._conn.events()
            event = next(self._events, None)
            if event is None:
                self._events = None
                if self._max is not None and self._announced_size() > self._max:
                    return out + self._fail(1009, "message too big"), self._failed()
                return out, None
            kind = type(event)
            if kind is TextMessage or kind is BytesMessage:
                data = event.data
                if self._max is not None:
                    self._size += len(data) if kind is BytesMessage or data.isascii() \
                        else len(data.encode("utf-8"))
                    if self._size > self._max:
                        return out + self._fail(1009, "message too big"), self._failed()
                if not event.message_finished:
                    self._parts.append(data)
                    continue
                if self._parts:
                    self._parts.append(data)
                    data = ("" if kind is TextMessage else b"").join(self._parts)
                    self._parts = []
                self._size = 0
                return out, Message(data)
            if kind is Ping:
                if self._conn.state is _OPEN:
                    out += self._conn.send(_WSPong(payload=event.payload))
                continue
            if kind is _WSPong:
                return out, Pong(bytes(event.payload))
            if kind is CloseConnection:
                state = self._conn.state
                if state is _REMOTE_CLOSING:
                    # The peer closed first: echo its code and adopt it.
                    self._set_close(event.code, event.reason or "")
                    out += self._conn.send(event.response())
                elif state is not _CLOSED:
                    # wsproto reports a frame it could not parse as a close
                    # event without a state change: that is a failure of ours.
                    return out + self._fail(event.code, event.reason or ""), self._failed()
                self._done = True
                self._events = None
                return out, _CLOSED_EVENT
        return out, None

    def _announced_size(self) -> int:
        """Bytes the current message will have once its current frame is in.

        Peeks at wsproto's frame decoder so that a frame announcing more than
        the limit fails at its header instead of after the limit is buffered.
        """
        decoder = getattr(getattr(self._conn, "_proto", None), "_frame_decoder", None)
        header = getattr(decoder, "header", None)
        if header is None or header.opcode.iscontrol():
            return self._size
        return self._size + header.payload_len - decoder.payload_consumed

    def _set_close(self, code: int, reason: str) -> None:
        if self.close_code is None:
            self.close_code = int(code)
            self.close_reason = reason

    def _fail(self, code: int, reason: str) -> bytes:
        self._done = True
        self._events = None
        self._parts = []
        return self.close(code, reason)

    def _failed(self) -> Failed:
        return Failed(self.close_code or 1002, self.close_reason)

    def send_message(self, message: Union[str, bytes]) -> Tuple[bytes, bytes]:
        """Header and payload of a data frame; raises :class:`ConnectionClosed`
        unless the connection is open."""
        if self._conn.state is not _OPEN:
            raise ConnectionClosed(self.close_code, self.close_reason)
        return encode_frame(message)

    def ping(self, data: bytes = b"") -> bytes:
        """A ping frame; raises :class:`ConnectionClosed` unless open."""
        if self._conn.state is not _OPEN:
            raise ConnectionClosed(self.close_code, self.close_reason)
        if len(data) > 125:
            raise ValueError("a ping's payload is at most 125 bytes")
        return self._conn.send(Ping(payload=bytes(data)))

    def close(self, code: int = 1000, reason: str = "") -> bytes:
        """Our close frame, if none was sent or received yet (else ``b""``)."""
        if self._conn.state is not _OPEN:
            return b""
        self._set_close(code, reason)
        if code == NO_STATUS:
            return bytes(self._conn.send(CloseConnection(code=code)))
        return bytes(self._conn.send(CloseConnection(code=code, reason=reason)))

    def abandon(self, code: int = ABNORMAL, reason: str = "") -> None:
        """The TCP connection is gone: record ``code`` unless one is known, and
        stop parsing."""
        self._set_close(code, reason)
        self._done = True
        self._events = None


def check_close_code(code: int) -> None:
    """Raise ``ValueError`` unless an application may send ``code`` (RFC 6455 7.4)."""
    if code == 1000 or 3000 <= code <= 4999 or code in (1001, 1002, 1003, 1007, 1008,
                                                          1009, 1010, 1011, 1012, 1013, 1014):
        return
    raise ValueError(f"close code {code} may not be sent; use 1000, 1001-1003, "
                     "1007-1014 or 3000-4999")
