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

After the handshake, wsproto's ``FrameProtocol`` is driven directly: it
parses and validates every frame (masking, reserved bits, opcodes, lengths,
fragmentation, UTF-8, close payloads); the four-state connection state
machine above it is small enough to keep here, and skipping wsproto's event
objects saves a fifth of the time a small message costs.

wsproto is not thread-safe: every method here must be called with the
connection's lock held.
"""

from __future__ import annotations

import struct
from typing import Any, Callable, Iterator, Optional, Tuple, Union, cast

from wsproto.connection import ConnectionState
from wsproto.frame_protocol import (Frame, FrameDecoder, FrameProtocol, Opcode, ParseFailed,
                                    XorMaskerSimple)

from .errors import ConnectionClosed

try:
    from ._speedups import xor_mask
except ImportError:  # not built: wsproto's own unmasking is used
    xor_mask = None  # type: ignore[assignment]

__all__ = ["Protocol", "Message", "Pong", "Closed", "Failed", "ProtocolEvent",
           "encode_frame", "ConnectionState", "NO_STATUS", "ABNORMAL"]

NO_STATUS = 1005
ABNORMAL = 1006
_OPEN = ConnectionState.OPEN
_LOCAL_CLOSING = ConnectionState.LOCAL_CLOSING
_CLOSED = ConnectionState.CLOSED
_TEXT = Opcode.TEXT
_BINARY = Opcode.BINARY
_PING = Opcode.PING
_PONG = Opcode.PONG


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


def valid_peer_close_code(code: int) -> bool:
    """May a peer send ``code`` in a close frame? (RFC 6455 7.4, and the IANA
    registry, which added 1012-1014 after the RFC.)"""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


# wsproto 1.2's masker returns bytes, 1.3's the bytearray (which 1.3 then
# copies into bytes itself): ours returns what wsproto's does.
_MASKER_GIVES_BYTES = type(XorMaskerSimple(b"\0\0\0\0").process(bytearray(b"x"))) is bytes


class _Unmasker:
    """wsproto's ``XorMaskerSimple`` with the XOR done in C and in place.

    wsproto hands the masker a fresh ``bytearray`` slice of its buffer and
    uses what it returns, so XORing that slice in place is safe and saves
    wsproto's copy; the key turns as wsproto's does, so that a frame whose
    payload arrives in several reads is unmasked as one.
    """

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        self._key = bytes(key)

    def process(self, data: bytearray) -> bytearray:
        if data:
            if type(data) is not bytearray:
                data = bytearray(data)
            key = self._key
            xor_mask(data, key)
            turn = len(data) & 3
            if turn:
                self._key = key[turn:] + key[:turn]
            if _MASKER_GIVES_BYTES:
                return bytes(data)  # type: ignore[return-value]
        return data


class _FrameDecoder(FrameDecoder):
    """wsproto's frame decoder, unmasking with :class:`_Unmasker`: wsproto
    still parses and validates every header and payload."""

    def parse_header(self) -> bool:
        if not super().parse_header():
            return False
        key = getattr(self.masker, "_masking_key", None)
        if type(self.masker) is XorMaskerSimple and key is not None:
            self.masker = _Unmasker(key)  # type: ignore[assignment]
        return True


class _FrameProtocol(FrameProtocol):
    """wsproto's frame protocol, with the close payload checked against the
    current registry: wsproto refuses 1014, and reports an invalid UTF-8
    reason as 1007 where a malformed close frame is a protocol error (1002).
    With the C helper built, its decoder unmasks in C (:class:`_Unmasker`)."""

    def __init__(self, client: bool, extensions: list) -> None:
        super().__init__(client, extensions)
        if xor_mask is not None:
            self._frame_decoder = _FrameDecoder(self.client, self.extensions)

    def _process_close(self, frame: Frame) -> Frame:
        data = cast(bytes, frame.payload)
        if not data:
            return Frame(frame.opcode, (NO_STATUS, ""), frame.frame_finished,
                         frame.message_finished)
        if len(data) == 1:
            raise ParseFailed("close frame with a 1-byte payload")
        (code,) = struct.unpack("!H", data[:2])
        if not valid_peer_close_code(code):
            raise ParseFailed(f"invalid close code {code}")
        try:
            reason = bytes(data[2:]).decode("utf-8")
        except UnicodeDecodeError:
            raise ParseFailed("close reason is not valid UTF-8") from None
        return Frame(frame.opcode, (code, reason), frame.frame_finished, frame.message_finished)


class Protocol:
    """One server-side WebSocket connection after its handshake, without I/O."""

    __slots__ = ("_fp", "_frames", "_inbox", "_feed", "_state", "_parts", "_size", "_max",
                 "_done", "close_code", "close_reason")

    def __init__(self, max_message_size: Optional[int] = None,
                 trailing_data: bytes = b"") -> None:
        self._fp = _FrameProtocol(client=False, extensions=[])
        self._frames: Optional[Iterator] = None  # wsproto's frame generator, while it yields
        # wsproto's input buffer: when it is empty, every frame that can be
        # parsed has been, and asking wsproto again would only cost time.
        inbox: Any = getattr(getattr(self._fp, "_frame_decoder", None), "buffer", None)
        if not hasattr(inbox, "buffer"):
            inbox = None  # another wsproto: always ask it
        self._inbox = inbox
        self._feed: Callable[[bytes], None] = (inbox.feed if inbox is not None
                                               else self._fp.receive_bytes)
        self._state = _OPEN
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
        """OPEN, LOCAL_CLOSING (we sent close), REMOTE_CLOSING or CLOSED."""
        return self._state

    @property
    def is_open(self) -> bool:
        """True while data may be sent (no close frame sent or received)."""
        return self._state is _OPEN

    def receive_data(self, data: bytes) -> None:
        """Bytes from the peer. Ignored once the connection has failed or closed."""
        if not self._done:
            self._feed(data)

    def next_event(self) -> Tuple[bytes, Optional[ProtocolEvent]]:
        """Bytes to write, then the next event for the application (or ``None``
        when everything received so far has been handled)."""
        out = b""
        inbox = self._inbox
        while not self._done:
            if inbox is not None and not inbox.buffer:
                frame = None
            else:
                if self._frames is None:
                    self._frames = self._fp.received_frames()
                try:
                    frame = next(self._frames, None)
                except ParseFailed as exc:
                    return out + self._fail(exc.code, str(exc)), self._failed()
            if frame is None:
                self._frames = None
                if self._max is not None and self._announced_size() > self._max:
                    return out + self._fail(1009, "message too big"), self._failed()
                return out, None
            opcode = frame.opcode
            if opcode is _TEXT or opcode is _BINARY:
                data = frame.payload
                held = 0  # bytes of a character split across frames
                if opcode is _TEXT and not frame.message_finished:
                    held = self._held_utf8()
                    if held < 0:
                        return out + self._fail(1007, "invalid UTF-8 (a surrogate)"), \
                            self._failed()
                if self._max is not None:
                    self._size += len(data) if opcode is _BINARY or data.isascii() \
                        else len(data.encode("utf-8"))
                    if self._size + held > self._max:
                        return out + self._fail(1009, "message too big"), self._failed()
                if not frame.message_finished:
                    self._parts.append(data)
                    continue
                if self._parts:
                    self._parts.append(data)
                    data = ("" if opcode is _TEXT else b"").join(self._parts)
                    self._parts = []
                self._size = 0
                return out, Message(data)
            if opcode is _PING:
                if self._state is _OPEN:
                    out += self._fp.pong(frame.payload)
                continue
            if opcode is _PONG:
                return out, Pong(bytes(frame.payload))
            # A close frame: wsproto has validated its code and reason.
            code, reason = frame.payload
            if self._state is _OPEN:
                # The peer closed first: echo its code and adopt it.
                self._set_close(code, reason)
                out += self._fp.close() if code == NO_STATUS else self._fp.close(code, reason)
            self._state = _CLOSED
            self._done = True
            self._frames = None
            return out, _CLOSED_EVENT
        return out, None

    def _held_utf8(self) -> int:
        """Bytes wsproto's UTF-8 decoder holds back for the next frame, or -1
        if they already cannot start a valid character.

        Python's decoder waits for the third byte before it rejects an
        encoded surrogate (ED A0-BF): checking here makes a fragmented
        message fail at the fragment that made it invalid.
        """
        decoder = getattr(getattr(self._fp, "_message_decoder", None), "decoder", None)
        if decoder is None:
            return 0
        held = decoder.getstate()[0]
        if len(held) >= 2 and held[0] == 0xED and held[1] >= 0xA0:
            return -1
        return len(held)

    def _announced_size(self) -> int:
        """Bytes the current message will have once its current frame is in.

        Peeks at wsproto's frame decoder so that a frame announcing more than
        the limit fails at its header instead of after the limit is buffered.
        """
        decoder: Any = getattr(self._fp, "_frame_decoder", None)
        header = getattr(decoder, "header", None)
        if header is None or header.opcode.iscontrol():
            return self._size
        if header.opcode is not Opcode.CONTINUATION:
            # A new message (or a protocol error wsproto reports next): this
            # frame is all of it, whatever part of it was consumed already.
            return header.payload_len
        return self._size + header.payload_len - decoder.payload_consumed

    def _set_close(self, code: int, reason: str) -> None:
        if self.close_code is None:
            self.close_code = int(code)
            self.close_reason = reason

    def _fail(self, code: int, reason: str) -> bytes:
        self._done = True
        self._frames = None
        self._parts = []
        return self.close(code, reason)

    def _failed(self) -> Failed:
        return Failed(self.close_code or 1002, self.close_reason)

    def ping(self, data: bytes = b"") -> bytes:
        """A ping frame; raises :class:`ConnectionClosed` unless open."""
        if len(data) > 125:
            raise ValueError("a ping's payload is at most 125 bytes")
        if self._state is not _OPEN:
            raise ConnectionClosed(self.close_code, self.close_reason)
        return bytes(self._fp.ping(bytes(data)))

    def close(self, code: int = 1000, reason: str = "") -> bytes:
        """Our close frame, if none was sent or received yet (else ``b""``)."""
        if self._state is not _OPEN:
            return b""
        self._set_close(code, reason)
        self._state = _LOCAL_CLOSING
        return bytes(self._fp.close(code, reason))

    def abandon(self, code: int = ABNORMAL, reason: str = "") -> None:
        """The TCP connection is gone: record ``code`` unless one is known, and
        stop parsing."""
        self._set_close(code, reason)
        self._state = _CLOSED
        self._done = True
        self._frames = None


def check_close_code(code: int) -> None:
    """Raise ``ValueError`` unless an application may send ``code`` (RFC 6455 7.4)."""
    if code == 1000 or 3000 <= code <= 4999 or code in (1001, 1002, 1003, 1007, 1008,
                                                          1009, 1010, 1011, 1012, 1013, 1014):
        return
    raise ValueError(f"close code {code} may not be sent; use 1000, 1001-1003, "
                     "1007-1014 or 3000-4999")
