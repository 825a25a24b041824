"""permessage-deflate (RFC 7692), both ends, without I/O.

Theory of operation
-------------------
Negotiation. A client offers the extension in ``Sec-WebSocket-Extensions``
(:func:`client_offer`) and checks the answer (:func:`client_agreement`); a
server picks the first offer it can accept (:func:`server_answer`) and
declines the rest, as RFC 7692 5 asks (an invalid offer is declined, never
an error). Both give an :class:`Agreement`: the four parameters as
negotiated, and the :class:`~gaman_sync.options.Deflate` settings.

A server always answers with ``server_no_context_takeover`` (RFC 7692
7.1.1.1 lets it, even when the client did not ask): each message it sends is
compressed on its own, so that

- one compressed frame is valid for every client that negotiated the same
  server window: a broadcast is compressed once per window, not per client;
- the server keeps no compressor per connection. Compressors are pooled per
  (window, level, memLevel) and shared by all connections: after each
  message a ``Z_FULL_FLUSH`` (not ``Z_SYNC_FLUSH``) empties the history, so
  the next message, whoever it is for, refers to nothing before it.

A client compresses on its own with context takeover unless
``client_no_context_takeover`` was offered or answered; its compressor is
then stateful and its messages must be compressed in the order they go on
the wire (:attr:`Compressor.in_order`: the engine compresses under the
connection's lock).

Receiving. wsproto parses every frame; :class:`Inflater` is a wsproto
extension that clears it to accept RSV1 on the first frame of a data
message, and inflates payloads as wsproto hands them over, chunk by chunk.
Inflation is bounded: ``decompress(data, max_length)`` never makes more than
the room left under ``max_message_size`` plus one byte, so a message that
inflates past the limit fails the connection with 1009 once the limit is
passed, with no more than the limit in memory (a zip bomb costs the limit,
not its inflated size). Corrupt data fails with 1007. The decompressor is
made on the first compressed message (an idle connection has none) and
dropped after each message when the peer compresses without context.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple, Union

from wsproto.extensions import Extension
from wsproto.frame_protocol import (
    CloseReason,
    FrameDecoder,
    FrameProtocol,
    Opcode,
    ParseFailed,
    RsvBits,
)

from ..options import Deflate
from .frames import Data, frame_bytes

__all__ = ["Agreement", "Compressor", "Inflater", "NegotiationError", "client_agreement",
           "client_offer", "compressor", "parse_extensions", "server_answer"]

NAME = "permessage-deflate"
_TAIL = b"\x00\x00\xff\xff"  # RFC 7692 7.2.1: removed after compressing, added back to inflate
_PARAMS = ("server_no_context_takeover", "client_no_context_takeover",
           "server_max_window_bits", "client_max_window_bits")
_BITS = {str(n): n for n in range(8, 16)}  # RFC 7692 7.1.2: "8" to "15", no leading zero
_KEEP_FREE = 8  # idle compressors kept per pool
_FIRST, _NEXT, _CONTROL = object(), object(), object()  # kinds of frame headers


class NegotiationError(ValueError):
    """A server's answer to our offer that we cannot accept."""


@dataclass(frozen=True)
class Agreement:
    """The negotiated parameters of one connection, and the settings in force."""

    server_max_window_bits: int
    client_max_window_bits: int
    server_no_context_takeover: bool
    client_no_context_takeover: bool
    options: Deflate

    def sending(self, client: bool) -> Tuple[int, bool]:
        """(window bits, no context takeover) of what ``client`` (or the server) sends."""
        if client:
            return self.client_max_window_bits, self.client_no_context_takeover
        return self.server_max_window_bits, self.server_no_context_takeover

    def receiving(self, client: bool) -> Tuple[int, bool]:
        """(window bits, no context takeover) of what ``client`` (or the server) receives."""
        return self.sending(not client)

    def broadcast_window(self) -> int:
        """The window a server compresses with (0: it cannot, 8 bits asked):
        the frames of a broadcast are made once per value."""
        bits = self.server_max_window_bits
        return bits if bits >= 9 else 0


# -- The header ------------------------------------------------------------------

Param = Tuple[str, Optional[str]]
_OWS = " \t"


def parse_extensions(values: Sequence[str]) -> List[Tuple[str, List[Param]]]:
    """``Sec-WebSocket-Extensions`` values as (name, [(param, value or None)]),
    in order; names lower-cased, quoted values unquoted. Raises ``ValueError``
    for what is not the RFC 6455 9.1 grammar."""
    result: List[Tuple[str, List[Param]]] = []
    for value in values:
        for item in value.split(","):
            item = item.strip(_OWS)  # HTTP's whitespace only: see protocol.http
            if not item:
                continue
            parts = [p.strip(_OWS) for p in item.split(";")]
            name = parts[0].lower()
            if not _is_token(name):
                raise ValueError(f"invalid extension name {parts[0]!r}")
            params: List[Param] = []
            for part in parts[1:]:
                key, eq, raw = part.partition("=")
                key = key.strip(_OWS).lower()
                if not _is_token(key):
                    raise ValueError(f"invalid extension parameter {part!r}")
                if not eq:
                    params.append((key, None))
                    continue
                raw = raw.strip(_OWS)
                if len(raw) >= 2 and raw[0] == raw[-1] == '"':
                    raw = raw[1:-1]
                if not _is_token(raw):
                    raise ValueError(f"invalid value in extension parameter {part!r}")
                params.append((key, raw))
            result.append((name, params))
    return result


_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"
                         "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _is_token(text: str) -> bool:
    return bool(text) and all(c in _TOKEN_CHARS for c in text)


def _check_params(params: List[Param], answer: bool) -> Dict[str, Optional[str]]:
    """The parameters as a dict, or ``ValueError`` for one unknown, repeated
    or with an invalid value (RFC 7692 7.1)."""
    seen: Dict[str, Optional[str]] = {}
    for key, value in params:
        if key not in _PARAMS:
            raise ValueError(f"unknown parameter {key}")
        if key in seen:
            raise ValueError(f"repeated parameter {key}")
        if key.endswith("no_context_takeover"):
            if value is not None:
                raise ValueError(f"{key} takes no value")
        elif value is None:
            # An offer may carry client_max_window_bits without a value; an answer may not.
            if key == "server_max_window_bits" or answer:
                raise ValueError(f"{key} needs a value")
        elif value not in _BITS:
            raise ValueError(f"{key}={value} is not 8 to 15")
        seen[key] = value
    return seen


# -- A server's answer -------------------------------------------------------------

def server_answer(values: Sequence[str], options: Deflate) -> Optional[Tuple[str, Agreement]]:
    """The ``Sec-WebSocket-Extensions`` value that accepts the first
    permessage-deflate offer in ``values`` we can accept, and its agreement;
    None if there is none (or the header does not parse): no compression.

    Clients of one kind send the same offer: its answer is remembered, so
    that their connections share one agreement and parse it once."""
    if sum(len(value) for value in values) > 512:
        return _server_answer(tuple(values), options)  # not worth remembering
    return _remembered_answer(tuple(values), options)


def _server_answer(values: Tuple[str, ...], options: Deflate
                   ) -> Optional[Tuple[str, Agreement]]:
    try:
        offers = parse_extensions(values)
    except ValueError:
        return None
    for name, params in offers:
        if name != NAME:
            continue
        try:
            seen = _check_params(params, answer=False)
        except ValueError:
            continue  # RFC 7692 5: decline this offer, try the next
        answer = [NAME, "server_no_context_takeover"]
        client_nct = options.client_no_context_takeover or "client_no_context_takeover" in seen
        if client_nct:
            answer.append("client_no_context_takeover")
        server_bits = options.server_max_window_bits
        asked = seen.get("server_max_window_bits")
        if asked is not None:
            server_bits = min(server_bits, _BITS[asked])
        if asked is not None or server_bits < 15:
            answer.append(f"server_max_window_bits={server_bits}")
        client_bits = 15
        if "client_max_window_bits" in seen:  # else the answer must not limit it
            hint = seen["client_max_window_bits"]
            client_bits = min(options.client_max_window_bits,
                              _BITS[hint] if hint is not None else 15)
            if client_bits < 15:
                answer.append(f"client_max_window_bits={client_bits}")
        return "; ".join(answer), Agreement(server_bits, client_bits, True, client_nct, options)
    return None


_remembered_answer = lru_cache(maxsize=64)(_server_answer)


# -- A client's offer and its check of the answer ------------------------------------

def client_offer(options: Deflate) -> str:
    """The ``Sec-WebSocket-Extensions`` value a client sends."""
    offer = [NAME]
    if options.server_no_context_takeover:
        offer.append("server_no_context_takeover")
    if options.client_no_context_takeover:
        offer.append("client_no_context_takeover")
    if options.server_max_window_bits < 15:
        offer.append(f"server_max_window_bits={options.server_max_window_bits}")
    bits = options.client_max_window_bits
    offer.append("client_max_window_bits" + (f"={bits}" if bits < 15 else ""))
    return "; ".join(offer)


def client_agreement(values: Sequence[str], options: Deflate) -> Agreement:
    """Check the server's ``Sec-WebSocket-Extensions`` against the offer of
    :func:`client_offer`; the agreement, or :class:`NegotiationError`."""
    try:
        extensions = parse_extensions(values)
    except ValueError as exc:
        raise NegotiationError(f"the server's Sec-WebSocket-Extensions does not parse: "
                               f"{exc}") from None
    names = [name for name, _ in extensions]
    if names != [NAME]:
        raise NegotiationError(f"the server selected {', '.join(names)}; we offered only "
                               f"{NAME}, once")
    try:
        seen = _check_params(extensions[0][1], answer=True)
    except ValueError as exc:
        raise NegotiationError(f"invalid {NAME} answer: {exc}") from None
    server_nct = "server_no_context_takeover" in seen
    if options.server_no_context_takeover and not server_nct:
        raise NegotiationError(f"the server's {NAME} answer lacks the "
                               "server_no_context_takeover we asked for")
    server_bits = 15
    value = seen.get("server_max_window_bits")
    if value is not None:
        server_bits = _BITS[value]
        if server_bits > options.server_max_window_bits:
            raise NegotiationError(f"the server answered server_max_window_bits={value}, "
                                   f"more than the {options.server_max_window_bits} we asked")
    elif options.server_max_window_bits < 15:
        raise NegotiationError(f"the server's {NAME} answer lacks the "
                               "server_max_window_bits we asked for")
    client_bits = options.client_max_window_bits
    value = seen.get("client_max_window_bits")
    if value is not None:
        client_bits = min(client_bits, _BITS[value])
    client_nct = options.client_no_context_takeover or "client_no_context_takeover" in seen
    return Agreement(server_bits, client_bits, server_nct, client_nct, options)


# -- Sending ---------------------------------------------------------------------------

class _Pool:
    """Compressors of one (window, level, memLevel), shared by every
    connection, each reset by a full flush after each message."""

    __slots__ = ("_free", "_args")

    def __init__(self, bits: int, level: int, mem_level: int) -> None:
        self._free: List[zlib._Compress] = []
        self._args = (level, zlib.DEFLATED, -bits, mem_level)

    def compress(self, data: bytes) -> bytes:
        free = self._free
        try:
            compressor = free.pop()  # atomic: no lock, whichever thread
        except IndexError:
            compressor = zlib.compressobj(*self._args)
        out = compressor.compress(data) + compressor.flush(zlib.Z_FULL_FLUSH)
        if len(free) < _KEEP_FREE:
            free.append(compressor)
        return out[:-4]  # the empty stored block of the flush: 00 00 ff ff


_pools: Dict[Tuple[int, int, int], _Pool] = {}


def _pool(bits: int, level: int, mem_level: int) -> _Pool:
    key = (bits, level, mem_level)
    pool = _pools.get(key)
    if pool is None:
        pool = _pools.setdefault(key, _Pool(*key))
    return pool


class Compressor:
    """Encodes the data frames one side sends under an agreement: messages
    of ``min_size`` bytes or more compressed (RSV1 set), smaller ones plain.

    Stateless (``in_order`` False: each message compressed on its own, by a
    shared pool) unless a client compresses with context takeover; then
    :meth:`encode` must be called in wire order, under the connection's lock.
    """

    __slots__ = ("bits", "min_size", "mask", "in_order", "_pool", "_zlib")

    def __init__(self, bits: int, options: Deflate, mask: bool, in_order: bool) -> None:
        self.bits = bits if bits >= 9 else 0  # zlib cannot compress with 8: send plain
        self.min_size = options.min_size
        self.mask = mask
        self.in_order = in_order and bool(self.bits)
        self._pool = _pool(self.bits, options.level, options.mem_level) if self.bits else None
        self._zlib = (zlib.compressobj(options.level, zlib.DEFLATED, -self.bits,
                                       options.mem_level) if self.in_order else None)

    def encode(self, message: Data) -> Tuple[bytes, bytes]:
        """(header, payload) of the frame for ``message``."""
        if isinstance(message, str):
            payload: bytes = message.encode("utf-8")
            first = 0x81  # FIN | TEXT
        elif isinstance(message, (bytes, bytearray, memoryview)):
            payload = bytes(message)
            first = 0x82  # FIN | BINARY
        else:
            raise TypeError(f"a message is str or bytes, not {type(message).__name__}")
        if len(payload) < self.min_size or not self.bits:
            return frame_bytes(first, payload, self.mask)
        if self._zlib is not None:
            data = self._zlib.compress(payload) + self._zlib.flush(zlib.Z_SYNC_FLUSH)
            return frame_bytes(first | 0x40, data[:-4], self.mask)
        assert self._pool is not None
        data = self._pool.compress(payload)
        if len(data) >= len(payload):
            return frame_bytes(first, payload, self.mask)  # incompressible: plain is smaller
        return frame_bytes(first | 0x40, data, self.mask)


_shared: Dict[Tuple[int, Deflate, bool], Compressor] = {}


def compressor(agreement: Agreement, client: bool) -> Compressor:
    """The compressor for what ``client`` (or the server) sends: shared by
    every connection with the same window and settings when stateless."""
    bits, no_context = agreement.sending(client)
    if client and not no_context:
        return Compressor(bits, agreement.options, True, in_order=True)
    key = (bits, agreement.options, client)
    found = _shared.get(key)
    if found is None:
        found = _shared.setdefault(key, Compressor(bits, agreement.options, client, False))
    return found


def broadcast_frame(message: Data, agreement: Agreement) -> bytes:
    """A server's whole frame for ``message``, valid for every client whose
    agreement has the same :meth:`Agreement.broadcast_window` and settings."""
    header, payload = compressor(agreement, client=False).encode(message)
    return header + payload


# -- Receiving --------------------------------------------------------------------------

Decoding = Union[FrameDecoder, FrameProtocol]


class Inflater(Extension):
    """The wsproto extension that inflates received messages, bounded by
    ``max_size`` (see the module's docstring)."""

    name = NAME
    __slots__ = ("_bits", "_no_context", "_max", "_max_wire", "_zlib", "_message",
                 "_compressed", "_frame", "_control", "_size", "_wire", "_pending")

    def __init__(self, bits: int, no_context: bool, max_size: Optional[int]) -> None:
        # A larger window inflates anything a smaller one made; zlib makes
        # no 8-bit raw stream (it uses 9), so 9 at least.
        self._bits = max(bits, 9)
        self._no_context = no_context
        self._max = max_size
        # Compressed bytes a message may take. Data that does not compress
        # goes out in stored blocks of 5 bytes of header each, and a block
        # holds as little as zlib's pending buffer: 2 KiB at memLevel 5 (what
        # websockets sends with: 0.24 % more), 128 bytes at memLevel 1 (4 %).
        self._max_wire = None if max_size is None else max_size + (max_size >> 4) + 1024
        self._zlib: Optional[zlib._Decompress] = None
        self._message = False      # inside a data message (its first frame seen)
        self._compressed = False   # that message is compressed
        self._frame = False        # the frame being received is a compressed data frame
        self._control = False      # the frame being received is a control frame
        self._pending: Optional[Tuple[object, bool, int]] = None  # a header, parsed
        self._size = 0             # bytes inflated so far in the message
        self._wire = 0             # compressed bytes announced so far in the message

    @property
    def compressing(self) -> bool:
        """Is the message being received compressed? (Its frame headers then
        announce compressed bytes, not the message's size.)"""
        pending = self._pending
        if pending is not None and pending[0] is _FIRST:
            return pending[1]
        return self._message and self._compressed

    def enabled(self) -> bool:
        return True

    def offer(self) -> Union[bool, str]:
        return NAME  # negotiation is ours (see above); wsproto never asks

    def frame_inbound_header(self, proto: Decoding, opcode: Opcode, rsv: RsvBits,
                             payload_length: int) -> Union[CloseReason, RsvBits]:
        # wsproto calls this again for the same header when the rest of it
        # (the masking key) had not arrived: nothing is decided here but
        # what may be refused at once; the frame starts at its first payload.
        if opcode.iscontrol():
            self._pending = (_CONTROL, False, 0)
            return RsvBits(False, False, False)  # RSV1 on a control frame: 1002
        if opcode is Opcode.CONTINUATION:
            if rsv.rsv1:
                raise ParseFailed("RSV1 set on a continuation frame", CloseReason.PROTOCOL_ERROR)
            self._pending = (_NEXT, False, payload_length)
            return RsvBits(False, False, False)
        if self._message:
            raise ParseFailed(f"expected a continuation frame, got {opcode.name}",
                              CloseReason.PROTOCOL_ERROR)
        self._pending = (_FIRST, rsv.rsv1, payload_length)
        return RsvBits(True, False, False)

    def _begin(self) -> None:
        """The frame whose header was parsed last starts (its first payload)."""
        assert self._pending is not None
        kind, rsv1, length = self._pending
        self._pending = None
        self._control = kind is _CONTROL
        if self._control:
            self._frame = False
            return
        if kind is _FIRST:
            self._message = True
            self._compressed = rsv1
            self._size = self._wire = 0
        self._frame = self._compressed
        if self._frame and self._max_wire is not None:
            self._wire += length
            if self._wire > self._max_wire:
                raise ParseFailed("message too big", CloseReason.MESSAGE_TOO_BIG)

    def frame_inbound_payload_data(self, proto: Decoding, data: bytes
                                   ) -> Union[bytes, CloseReason]:
        if self._pending is not None:
            self._begin()
        if not self._frame or not data:
            return data
        return self._inflate(data)

    def frame_inbound_complete(self, proto: Decoding, fin: bool
                               ) -> Union[bytes, CloseReason, None]:
        if self._pending is not None:
            self._begin()
        if self._control or not fin:
            return None  # a control frame never ends the message around it
        self._message = False
        if not self._frame:
            return None
        out = self._inflate(_TAIL)
        decompressor = self._zlib
        if decompressor is not None and decompressor.eof:
            if len(decompressor.unused_data) > len(_TAIL):
                raise ParseFailed("data after the end of the compressed message",
                                  CloseReason.INVALID_FRAME_PAYLOAD_DATA)
            self._zlib = None  # a final block: the next message starts afresh
        if self._no_context:
            self._zlib = None
        self._compressed = self._frame = False
        return out

    def _inflate(self, data: bytes) -> bytes:
        decompressor = self._zlib
        if decompressor is None:
            decompressor = self._zlib = zlib.decompressobj(-self._bits)
        try:
            if self._max is None:
                out = decompressor.decompress(data)
            else:
                room = self._max - self._size
                # At most one byte past the limit: an unconsumed tail is then
                # left in zlib, never inflated.
                out = decompressor.decompress(data, room + 1)
                if len(out) > room:
                    self._zlib = None
                    raise ParseFailed("message too big", CloseReason.MESSAGE_TOO_BIG)
        except zlib.error as exc:
            self._zlib = None
            raise ParseFailed(f"invalid compressed data ({exc})",
                              CloseReason.INVALID_FRAME_PAYLOAD_DATA) from None
        self._size += len(out)
        return out

    def __repr__(self) -> str:
        return f"<Inflater window={self._bits} no_context={self._no_context}>"
