"""The WebSocket state machine after the handshake, for either side, without I/O.

Theory of operation
-------------------
Everything that decides what a connection may do next lives here, and
nothing else: no socket, no thread, no clock. wsproto parses and validates
every frame (see :mod:`._wsproto`); this module adds what wsproto leaves to
its user:

- it answers pings, echoes the peer's close, and fails the connection with
  the right close code (1002 for protocol errors, 1007 for invalid UTF-8,
  1009 for a message over the size limit);
- it joins fragments into whole messages and enforces ``max_message_size``
  as soon as a frame header announces too much, never buffering it first;
- it remembers the close code that ended the connection: ours if we closed
  first, the peer's if it did; the first one recorded wins.

The side (client or server) is given once, to :class:`Protocol`: it decides
whether our frames are masked and which end closes TCP first. Nothing above
this module asks which side it is on.

:meth:`Protocol.next_event` hands out one application event at a time,
together with the bytes that must reach the wire *before* that event is
dispatched. The caller holds its connection lock only around the call, not
while it runs the callback, so a callback can send. Doing it one event at a
time keeps the wire in order: a message that arrived before a bad frame is
delivered (and its echo sent) before the close frame that fails the
connection.

States: OPEN, then CLOSING once a close frame was sent or received (no data
may be sent), then CLOSED once the handshake completed, failed or TCP was
lost. wsproto is not thread-safe: every method must be called with the
connection's lock held.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Callable, List, Optional, Tuple

from ..exceptions import ConnectionClosed
from ._wsproto import Decoder, Opcode, ParseFailed
from .deflate import Agreement, Inflater, compressor
from .events import Closed, Event, Failed, MessageReceived, PongReceived
from .frames import CloseCode, Data, client_frame, encode_frame

__all__ = ["Protocol", "Side", "State"]

_TEXT = Opcode.TEXT
_BINARY = Opcode.BINARY
_PING = Opcode.PING
_PONG = Opcode.PONG
_NO_STATUS = CloseCode.NO_STATUS_RCVD
_ABNORMAL = CloseCode.ABNORMAL_CLOSURE


class Side(Enum):
    """Which end of the connection we are."""

    SERVER = "server"
    CLIENT = "client"


class State(Enum):
    """Where the closing handshake stands."""

    OPEN = 1
    CLOSING = 2
    CLOSED = 3


_OPEN = State.OPEN
_CLOSING = State.CLOSING
_CLOSED = State.CLOSED
_CLOSED_EVENT = Closed()


def _encode_masked(message: Data) -> Tuple[bytes, bytes]:
    return encode_frame(message, True)


class Protocol:
    """One WebSocket connection after its handshake, without I/O."""

    __slots__ = ("side", "_decoder", "_inbox", "unparsed", "_next_frame", "state", "_parts",
                 "_size", "_max", "close_code", "close_reason", "encode", "deflate",
                 "encodes_in_order", "encode_whole")

    def __init__(self, side: Side, max_message_size: Optional[int] = None,
                 trailing_data: bytes = b"", unmask_in_c: bool = True,
                 deflate: Optional[Agreement] = None) -> None:
        self.side = side
        """:attr:`Side.SERVER` or :attr:`Side.CLIENT`."""
        client = side is Side.CLIENT
        self.deflate = deflate
        """The permessage-deflate agreement, or None (no compression)."""
        self.encodes_in_order = False
        """True when :attr:`encode` must be called in wire order, under the
        connection's lock (a client compressing with context takeover)."""
        # RFC 6455 5.3: a client masks every frame it sends, each with its own key.
        self.encode: Callable[[Data], Tuple[bytes, bytes]] = (
            _encode_masked if client else encode_frame)
        """A data frame for a message as this side sends it: (header, payload)."""
        self.encode_whole: Optional[Callable[[Data], bytes]] = (
            client_frame if client and deflate is None else None)
        """Where the C helper is built, a client's data frame for a message as
        one ``bytes`` (header, key and masked payload, made in one pass), in
        any order; else None, and :attr:`encode` it is."""
        inflater = None
        if deflate is not None:
            encoder = compressor(deflate, client)
            self.encode = encoder.encode
            self.encodes_in_order = encoder.in_order
            bits, no_context = deflate.receiving(client)
            inflater = Inflater(bits, no_context, max_message_size)
        self._decoder = decoder = Decoder(client, unmask_in_c, inflater)
        # What every message touches, bound once: wsproto's input buffer (a
        # bytearray it changes in place) and its frame parser's next().
        self._inbox = decoder.inbox
        self.unparsed: bytearray = decoder.inbox
        """Bytes received and not parsed yet (true when any): a reader's check
        without a call. Read it, never change it."""
        # (of Any: a frame's payload type follows its opcode, which wsproto's
        # annotations cannot say)
        self._next_frame: Callable[[], Any] = decoder.next_frame
        self.state = _OPEN
        """:attr:`State.OPEN`, ``CLOSING`` or ``CLOSED``."""
        self._parts: List[Any] = []  # str or bytes parts of one message
        self._size = 0
        self._max = max_message_size
        self.close_code: Optional[int] = None
        """The code that ended the connection: ours if we closed first, else the peer's."""
        self.close_reason = ""
        if trailing_data:
            self.receive_data(trailing_data)

    @property
    def is_open(self) -> bool:
        """True while data may be sent (no close frame sent or received)."""
        return self.state is _OPEN

    @property
    def unmasks_in_c(self) -> bool:
        """True when received payloads are unmasked by the C helper."""
        return self._decoder.unmasks_in_c

    @property
    def closes_tcp_first(self) -> bool:
        """RFC 6455 7.1.1: the server closes TCP first; a client waits for it."""
        return self.side is Side.SERVER

    def has_buffered_input(self) -> bool:
        """Are there received bytes not parsed yet?"""
        return len(self._inbox) > 0

    def receive_data(self, data: bytes) -> None:
        """Bytes from the peer. Ignored once the connection has failed or closed."""
        if self.state is not _CLOSED:
            self._inbox += data  # wsproto's own buffer, in place

    def next_event(self, received: bytes = b"") -> Tuple[bytes, Optional[Event]]:
        """Bytes to write, then the next event for the application (or ``None``
        when everything received so far has been handled). ``received``,
        bytes just read, are added first, as :meth:`receive_data` does (a call
        less for a reader that handles what it reads at once)."""
        out = b""
        decoder = self._decoder
        inbox = self._inbox
        if received and self.state is not _CLOSED:
            inbox += received  # wsproto's own buffer, in place
        while self.state is not _CLOSED:
            if not inbox:
                frame = None  # nothing to parse: asking wsproto would only cost time
            else:
                try:
                    frame = self._next_frame()
                except ParseFailed as exc:
                    return out + self._fail(exc.code, str(exc)), self._failed()
                except StopIteration:  # wsproto stops after a close (we do too)
                    frame = None
            if frame is None:
                if self._max is not None and decoder.announced_size(self._size) > self._max:
                    return out + self._fail(1009, "message too big"), self._failed()
                return out, None
            opcode = frame.opcode
            if opcode is _TEXT or opcode is _BINARY:
                data = frame.payload
                held = 0  # bytes of a character split across frames
                if opcode is _TEXT and not frame.message_finished:
                    held = decoder.held_utf8()
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
                return out, MessageReceived(data)
            if opcode is _PING:
                if self.state is _OPEN:
                    out += decoder.pong(frame.payload)
                continue
            if opcode is _PONG:
                return out, PongReceived(bytes(frame.payload))
            # A close frame: its code and reason were validated in _wsproto.
            code, reason = frame.payload
            if self.state is _OPEN:
                # The peer closed first: echo its code and adopt it.
                self._record_close(code, reason)
                out += decoder.close() if code == _NO_STATUS else decoder.close(code, reason)
            self._end()
            return out, _CLOSED_EVENT
        return out, None

    def _record_close(self, code: int, reason: str) -> None:
        if self.close_code is None:
            self.close_code = int(code)
            self.close_reason = reason

    def _fail(self, code: int, reason: str) -> bytes:
        data = self.close(code, reason)
        self._end()
        self._parts = []
        return data

    def _failed(self) -> Failed:
        return Failed(self.close_code or 1002, self.close_reason)

    def _end(self) -> None:
        self.state = _CLOSED

    def ping(self, data: bytes = b"") -> bytes:
        """A ping frame; raises :class:`ConnectionClosed` unless open."""
        if len(data) > 125:
            raise ValueError("a ping's payload is at most 125 bytes")
        if self.state is not _OPEN:
            raise ConnectionClosed(self.close_code, self.close_reason)
        return bytes(self._decoder.ping(bytes(data)))

    def close(self, code: int = 1000, reason: str = "") -> bytes:
        """Our close frame, if none was sent or received yet (else ``b""``)."""
        if self.state is not _OPEN:
            return b""
        self._record_close(code, reason)
        self.state = _CLOSING
        return bytes(self._decoder.close(code, reason))

    def abandon(self, code: int = _ABNORMAL, reason: str = "", force: bool = False) -> None:
        """TCP is gone, or going: record ``code`` unless one is known (or, with
        ``force``, in place of it: the handshake did not complete after all),
        and stop parsing."""
        if force:
            self.close_code = None
        self._record_close(code, reason)
        self._end()
