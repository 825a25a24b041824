"""Hypothesis strategies for testing WebSocket programs: messages, the frames
and TCP writes that carry them, close codes, opening handshakes and routes.

Needs `hypothesis <https://hypothesis.readthedocs.io>`_ (``pip install
hypothesis``, or ``pip install 'gaman_sync[test]'``); without it, importing
this module raises an ``ImportError`` that says so. It imports nothing of
this package but the sans-IO :mod:`gaman_sync.protocol`, so it serves tests
of any WebSocket endpoint, this package's or another's; pair it with
:class:`gaman_sync.testing.RawPeer`, which sends the bytes.

Theory
------
A WebSocket endpoint is wrong in the seams that its authors' own clients
never exercise: a message cut into frames elsewhere than where their client
cuts it (an empty fragment, a cut inside a UTF-8 character), the same bytes
arriving over one TCP read or over many (a header split in two, a byte at a
time), a control frame between two fragments, a length at a boundary of the
length encoding (125/126, 65535/65536), a close code at the edge of a
reserved range. The strategies here aim there on purpose:

- **Messages** (:func:`text_messages`, :func:`binary_messages`,
  :func:`messages`) mix free content (any character, astral planes
  included) with sizes drawn at and around the frame-length boundaries
  (:data:`LENGTH_BOUNDARIES`), filled with a cheap pattern, so that a 64 KiB
  message costs hypothesis no more than a short one.
- **Carrying them**: :func:`fragmentations` is every way a peer may split one
  message into data frames (any cut, empty fragments, cuts inside a
  character); :func:`chunkings` is every way bytes may be split across TCP
  reads. They compose: the fragments' wire bytes, with control frames in
  between, cut again into TCP writes.
- **Single frames** (:func:`frames`) come as a :class:`FrameSpec`: the
  fields, the bytes on the wire, and, for an invalid frame, what RFC 6455
  prescribes to its receiver: the close code it must fail the connection
  with. An invalid frame has exactly one fault, so the expected code is not
  a matter of which check runs first.
- **Handshakes and routes** (:func:`handshake_requests`, :func:`paths`,
  :func:`queries`) come with what the server must answer, or must see.

Every strategy shrinks toward the smallest readable case: the empty
message, one fragment, one TCP write, code 1000, a zero masking key (so that
a shrunk frame's payload reads in clear on the wire). The docstrings show
one shrunk case each, as ``hypothesis.find`` gives it.

Example: a property of an echo server, with the raw peer::

    from hypothesis import given, strategies as st
    from gaman_sync.strategies import chunkings, fragmentations, messages
    from gaman_sync.testing import RawPeer

    @given(st.data())
    def test_echo(data):
        message = data.draw(messages(max_size=1000))
        wire = b"".join(f.wire for f in data.draw(fragmentations(message)))
        with RawPeer.open("127.0.0.1", port, "/echo") as peer:
            for piece in data.draw(chunkings(wire)):
                peer.send(piece)
            ...  # read the echo back, compare with message
"""

from __future__ import annotations

import base64
import struct
from dataclasses import dataclass, field
from typing import (
    Any,
    Callable,
    Dict,
    FrozenSet,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Union,
)
from urllib.parse import quote

try:
    from hypothesis import strategies as st
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "gaman_sync.strategies needs hypothesis, which is not installed: "
        "pip install hypothesis (or pip install 'gaman_sync[test]')") from exc

from .protocol.frames import is_valid_close_code, mask_payload

__all__ = ["CONT", "TEXT", "BINARY", "CLOSE", "PING", "PONG", "LENGTH_BOUNDARIES",
           "BAD_UTF8", "FrameSpec", "HandshakeRequest", "Query", "binary_messages",
           "chunkings", "close_codes", "close_reasons", "control_payloads", "fragmentations",
           "frames", "handshake_requests", "messages", "paths", "queries", "text_messages"]

SearchStrategy = st.SearchStrategy
Message = Union[str, bytes]

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
"""The opcodes of RFC 6455 5.2 (the same numbers as :mod:`gaman_sync.testing`'s)."""
_NAMES = {CONT: "CONT", TEXT: "TEXT", BINARY: "BINARY", CLOSE: "CLOSE", PING: "PING",
          PONG: "PONG"}
RESERVED_OPCODES = (3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF)

LENGTH_BOUNDARIES = (0, 1, 125, 126, 127, 65535, 65536, 65537)
"""Payload lengths at the edges of the 7-bit, 16-bit and 64-bit length forms."""

DEFAULT_MAX_SIZE = 1 << 17
"""Bytes: the largest message :func:`messages` draws unless told (past 65536,
so that the 64-bit length form is reached)."""

BAD_UTF8 = (b"\xff", b"\x80", b"\xc0\xaf", b"\xc2", b"\xe2\x82", b"\xe0\x80\xaf",
            b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80")
"""Byte strings that are not UTF-8, and cannot start it either: a lone
continuation byte, overlong forms, surrogates, past U+10FFFF, a truncated
character."""

_ZERO_KEY = b"\x00\x00\x00\x00"


# -- Messages ------------------------------------------------------------------

def _truncate_utf8(text: str, max_bytes: int) -> str:
    """``text`` cut at a character boundary to at most ``max_bytes`` of UTF-8."""
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return text
    return data[:max_bytes].decode("utf-8", "ignore")


def _sizes(min_size: int, max_size: int) -> SearchStrategy[int]:
    """Lengths in [min_size, max_size]: at the length-form boundaries, or anywhere."""
    edges = [n for n in LENGTH_BOUNDARIES if min_size <= n <= max_size]
    anywhere = st.integers(min_size, max_size)
    return st.one_of(st.sampled_from(edges), anywhere) if edges else anywhere


_TEXT_PATTERN = "aé€😀"  # 1, 2, 3 and 4 bytes of UTF-8: any cut may land inside one


def _patterned_text(n: int) -> str:
    """Exactly ``n`` bytes of UTF-8, every character width mixed in."""
    base = _truncate_utf8(_TEXT_PATTERN * (n // 10 + 1), n)
    return base + "a" * (n - len(base.encode("utf-8")))


def _patterned_bytes(n: int) -> bytes:
    return (bytes(range(256)) * (n // 256 + 1))[:n]


def text_messages(min_size: int = 0, max_size: int = DEFAULT_MAX_SIZE) -> SearchStrategy[str]:
    """Text messages of ``min_size`` to ``max_size`` bytes of UTF-8.

    Free text (any character but surrogates, astral planes included, up to
    ~256 bytes), or a message of a drawn size, at a frame-length boundary
    (:data:`LENGTH_BOUNDARIES`) or anywhere, made of characters 1 to 4 bytes
    long.

    >>> text_messages(max_size=200).example()  # doctest: +SKIP
    'Ê\\U000e0fd2'

    Shrinks to ``''``; the smallest with a 4-byte character is ``'𐀀'``.
    """
    free = st.text(st.characters(exclude_categories=["Cs"]), max_size=min(max_size, 256))
    free = free.map(lambda s: _truncate_utf8(s, max_size)).filter(
        lambda s: len(s.encode("utf-8")) >= min_size)
    return st.one_of(free, _sizes(min_size, max_size).map(_patterned_text))


def binary_messages(min_size: int = 0, max_size: int = DEFAULT_MAX_SIZE
                    ) -> SearchStrategy[bytes]:
    """Binary messages of ``min_size`` to ``max_size`` bytes: free bytes (up to
    256), or a drawn size (at a length boundary or anywhere) of patterned
    bytes.

    >>> binary_messages(max_size=100).example()  # doctest: +SKIP
    b'\\x8f\\x00'

    Shrinks to ``b''``.
    """
    free = st.binary(min_size=min(min_size, 256), max_size=min(max_size, 256)).filter(
        lambda b: len(b) >= min_size)
    return st.one_of(free, _sizes(min_size, max_size).map(_patterned_bytes))


def messages(max_size: int = DEFAULT_MAX_SIZE) -> SearchStrategy[Message]:
    """Any message: ``str`` (text) or ``bytes`` (binary), at most ``max_size``
    bytes on the wire.

    >>> messages(max_size=1000).example()  # doctest: +SKIP
    b'\\x00\\x01\\x02...'

    Shrinks to ``''``.
    """
    return st.one_of(text_messages(max_size=max_size), binary_messages(max_size=max_size))


def control_payloads() -> SearchStrategy[bytes]:
    """Payloads for a ping or a pong: 0 to 125 bytes (RFC 6455 5.5).

    Shrinks to ``b''``.
    """
    return st.binary(max_size=125)


# -- Frames --------------------------------------------------------------------

def _encode(opcode: int, payload: bytes, fin: bool, rsv: int, key: Optional[bytes]) -> bytes:
    """One frame's bytes; masked with ``key`` unless it is None."""
    n = len(payload)
    first = (0x80 if fin else 0) | (rsv & 7) << 4 | opcode & 0x0F
    mbit = 0x80 if key is not None else 0
    if n < 126:
        head = struct.pack("!BB", first, mbit | n)
    elif n < 65536:
        head = struct.pack("!BBH", first, mbit | 126, n)
    else:
        head = struct.pack("!BBQ", first, mbit | 127, n)
    if key is None:
        return head + payload
    return head + key + bytes(mask_payload(payload, key))


@dataclass(frozen=True)
class FrameSpec:
    """One frame as a test sends it: its fields, its bytes (:attr:`wire`),
    and what its receiver must do.

    ``expected_close`` is None for a valid frame, and for an invalid one the
    close code RFC 6455 prescribes to the receiver: 1002 (protocol error)
    or 1007 (invalid data). ``accepted_closes`` is every code a conformant
    receiver may send (the RFC names no code for a close frame's reason that
    is not UTF-8: this package answers 1002, others 1007). ``why`` says what
    is wrong, in words.
    """

    opcode: int
    payload: bytes = b""
    fin: bool = True
    rsv: int = 0
    masked: bool = True
    key: bytes = _ZERO_KEY  #: the masking key, used when ``masked``
    expected_close: Optional[int] = None
    accepted_closes: FrozenSet[int] = field(default=frozenset(), compare=False)
    why: str = ""

    @property
    def wire(self) -> bytes:
        """The frame's bytes, masked with :attr:`key` if :attr:`masked`."""
        return _encode(self.opcode, self.payload, self.fin, self.rsv,
                       self.key if self.masked else None)

    @property
    def valid(self) -> bool:
        return self.expected_close is None

    @property
    def is_control(self) -> bool:
        return self.opcode >= 8

    def __repr__(self) -> str:
        parts = [_NAMES.get(self.opcode, hex(self.opcode)), repr(self.payload)]
        if not self.fin:
            parts.append("fin=False")
        if self.rsv:
            parts.append(f"rsv={self.rsv}")
        if not self.masked:
            parts.append("masked=False")
        elif self.key != _ZERO_KEY:
            parts.append(f"key={self.key!r}")
        if self.expected_close is not None:
            parts.append(f"expected_close={self.expected_close}")
        if self.why:
            parts.append(f"why={self.why!r}")
        return f"FrameSpec({', '.join(parts)})"


def _keys(masked: bool) -> SearchStrategy[bytes]:
    return st.binary(min_size=4, max_size=4) if masked else st.just(_ZERO_KEY)


@st.composite
def fragmentations(draw: st.DrawFn, message: Message, client: bool = True,
                   max_fragments: int = 8) -> List[FrameSpec]:
    """Every way a peer may split ``message`` into data frames: the first
    frame carries its opcode (TEXT for ``str``, BINARY for ``bytes``), the
    others are continuations, the last one has FIN. Cuts fall anywhere,
    inside a UTF-8 character too, and fragments may be empty (at the start,
    the end, or between two others). ``client``: masked, with drawn keys,
    as a client must send them.

    >>> find(fragmentations("héllo"), lambda fs: len(fs) > 2)  # doctest: +SKIP
    [FrameSpec(TEXT, b'', fin=False), FrameSpec(CONT, b'', fin=False),
     FrameSpec(CONT, b'h\\xc3\\xa9llo')]

    Shrinks to one frame: ``[FrameSpec(TEXT, b'')]`` for ``""``.
    """
    data = message.encode("utf-8") if isinstance(message, str) else bytes(message)
    opcode = TEXT if isinstance(message, str) else BINARY
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=max_fragments - 1)))
    bounds = [0, *cuts, len(data)]
    pieces = [data[a:b] for a, b in zip(bounds, bounds[1:])]
    return [FrameSpec(opcode if i == 0 else CONT, piece, fin=i == len(pieces) - 1,
                      masked=client, key=draw(_keys(client)))
            for i, piece in enumerate(pieces)]


@st.composite
def chunkings(draw: st.DrawFn, data: bytes, max_chunks: int = 8,
              bytewise_up_to: int = 2048) -> List[bytes]:
    """Every way ``data`` may be split across TCP reads: non-empty pieces
    that join into ``data``. One piece; up to ``max_chunks`` pieces cut
    anywhere (a frame header split, a masking key split); or one byte per
    piece (only for ``data`` of at most ``bytewise_up_to`` bytes). Send each
    piece in its own write (:class:`~gaman_sync.testing.RawPeer` sets
    ``TCP_NODELAY``, so each leaves in its own segment).

    >>> find(chunkings(b"\\x81\\x85abcd"), lambda cs: len(cs) > 1)  # doctest: +SKIP
    [b'\\x81', b'\\x85', b'a', b'b', b'c', b'd']

    Shrinks to ``[data]``.
    """
    if len(data) <= 1:
        return [data] if data else []
    how = draw(st.sampled_from(["whole", "cuts", "bytewise"] if len(data) <= bytewise_up_to
                               else ["whole", "cuts"]))
    if how == "whole":
        return [data]
    if how == "bytewise":
        return [data[i:i + 1] for i in range(len(data))]
    cuts = draw(st.lists(st.integers(1, len(data) - 1), min_size=1, max_size=max_chunks - 1,
                         unique=True))
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


# -- Close codes and reasons -------------------------------------------------------

_DEFINED_CODES = (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014)
_INVALID_EDGES = (1005, 1004, 1006, 1015, 0, 999, 1016, 2999, 5000, 65535)


def close_codes(valid: bool = True) -> SearchStrategy[int]:
    """Close codes a peer may send in a close frame (``valid=True``: the
    defined ones 1000-1003, 1007-1014, and 3000-4999), or codes it must not
    (``valid=False``: 0-999, 1004-1006, 1015, 1016-2999, 5000-65535), which
    fail the connection with 1002.

    >>> close_codes().example()  # doctest: +SKIP
    4321

    Shrinks to ``1000`` (valid) or ``1005`` (invalid).
    """
    if valid:
        return st.one_of(st.sampled_from(_DEFINED_CODES), st.integers(3000, 4999))
    return st.one_of(st.sampled_from(_INVALID_EDGES), st.integers(0, 999),
                     st.integers(1016, 2999), st.integers(5000, 65535)).filter(
        lambda c: not is_valid_close_code(c))


def close_reasons() -> SearchStrategy[str]:
    """Close reasons: text of at most 123 bytes of UTF-8 (RFC 6455 5.5: a
    close frame's payload is at most 125 bytes, 2 of them the code).

    >>> close_reasons().example()  # doctest: +SKIP
    'bye 👋'

    Shrinks to ``''``.
    """
    return st.one_of(
        st.text(st.characters(exclude_categories=["Cs"]), max_size=123),
        st.sampled_from(["é" * 61 + "a", "😀" * 30 + "abc"]),  # exactly 123 bytes
    ).map(lambda s: _truncate_utf8(s, 123))


# -- Single frames, valid or not ---------------------------------------------------

def _valid_frames(client: bool) -> SearchStrategy[FrameSpec]:
    key = _keys(client)

    def spec(opcode: int, payload: SearchStrategy[bytes],
             fin: SearchStrategy[bool] = st.just(True)) -> SearchStrategy[FrameSpec]:
        return st.builds(FrameSpec, st.just(opcode), payload, fin, st.just(0),
                         st.just(client), key)

    text = text_messages(max_size=300).map(lambda s: s.encode("utf-8"))
    close = st.one_of(st.just(b""), st.builds(
        lambda code, reason: struct.pack("!H", code) + reason.encode("utf-8"),
        close_codes(), close_reasons()))
    return st.one_of(spec(TEXT, text, st.booleans()),
                     spec(BINARY, binary_messages(max_size=300), st.booleans()),
                     spec(PING, control_payloads()), spec(PONG, control_payloads()),
                     spec(CLOSE, close))


@st.composite
def _invalid_frames(draw: st.DrawFn, client: bool) -> FrameSpec:
    """A frame with one fault, and what its receiver must answer."""
    valid = draw(_valid_frames(client))
    fault = draw(st.sampled_from(["rsv", "opcode", "continuation", "masking", "control-fin",
                                  "control-length", "close-1-byte", "close-code",
                                  "close-reason", "text-utf8"]))
    change: Dict[str, Any]
    if fault == "rsv":
        change = dict(rsv=draw(st.integers(1, 7)), expected_close=1002,
                      why="a reserved bit set, with no extension agreed")
    elif fault == "opcode":
        change = dict(opcode=draw(st.sampled_from(RESERVED_OPCODES)), expected_close=1002,
                      why="a reserved opcode")
    elif fault == "continuation":
        change = dict(opcode=CONT, fin=draw(st.booleans()), expected_close=1002,
                      why="a continuation with no message to continue")
    elif fault == "masking":
        change = dict(masked=not client, key=draw(_keys(not client)), expected_close=1002,
                      why="an unmasked client frame" if client else "a masked server frame")
    elif fault == "control-fin":
        change = dict(opcode=draw(st.sampled_from([PING, PONG, CLOSE])), payload=b"",
                      fin=False, expected_close=1002, why="a fragmented control frame")
    elif fault == "control-length":
        change = dict(opcode=draw(st.sampled_from([PING, PONG])),
                      payload=draw(st.binary(min_size=126, max_size=200)), fin=True,
                      expected_close=1002, why="a control frame over 125 bytes")
    elif fault == "close-1-byte":
        change = dict(opcode=CLOSE, payload=draw(st.binary(min_size=1, max_size=1)), fin=True,
                      expected_close=1002, why="a close frame of one byte")
    elif fault == "close-code":
        change = dict(opcode=CLOSE, fin=True, expected_close=1002,
                      payload=struct.pack("!H", draw(close_codes(valid=False))),
                      why="a close code that may not be sent")
    elif fault == "close-reason":
        change = dict(opcode=CLOSE, fin=True, expected_close=1002,
                      accepted_closes=frozenset({1002, 1007}),
                      payload=struct.pack("!H", draw(close_codes())) + draw(
                          st.sampled_from(BAD_UTF8)),
                      why="a close reason that is not UTF-8")
    else:
        prefix = draw(st.text(max_size=4)).encode("utf-8")
        change = dict(opcode=TEXT, fin=True, expected_close=1007,
                      payload=prefix + draw(st.sampled_from(BAD_UTF8)),
                      why="a text message that is not UTF-8")
    fields = {**valid.__dict__, **change}
    fields.setdefault("accepted_closes", frozenset())
    if not fields["accepted_closes"]:
        fields["accepted_closes"] = frozenset({fields["expected_close"]})
    return FrameSpec(**fields)


def frames(valid: bool = True, client: bool = True) -> SearchStrategy[FrameSpec]:
    """Single frames, as a :class:`FrameSpec` (fields, :attr:`~FrameSpec.wire`
    bytes, expected close code).

    ``valid=True``: frames valid as the first frame of a connection: TEXT and
    BINARY with or without FIN, PING and PONG of 0-125 bytes, CLOSE empty or
    with a valid code and reason. ``valid=False``: one fault each, over every
    opcode and flag: a reserved bit, a reserved opcode (3-7, 11-15), a
    continuation with nothing to continue, the wrong masking for the side, a
    control frame without FIN or over 125 bytes, a close frame of one byte,
    with a code that may not be sent or a reason that is not UTF-8, text
    that is not UTF-8; with ``expected_close`` the code the receiver must
    fail the connection with (1002, or 1007 for text). ``client``: frames a
    client sends (masked) or, if false, a server (unmasked).

    >>> find(frames(valid=False), lambda f: f.expected_close == 1007)  # doctest: +SKIP
    FrameSpec(TEXT, b'\\xff', expected_close=1007, why='a text message that is not UTF-8')

    Shrinks to ``FrameSpec(PING, b'')`` (valid) or ``FrameSpec(PING, b'',
    rsv=1, expected_close=1002, why='a reserved bit set, with no extension
    agreed')`` (invalid).
    """
    return _valid_frames(client) if valid else _invalid_frames(client)


# -- The opening handshake ---------------------------------------------------------

class HandshakeRequest(NamedTuple):
    """An HTTP request to open a WebSocket, and what the server must answer.

    ``expected_status`` is 101 for a valid request, else the status RFC 6455
    (or HTTP) names for the fault; ``accepted_statuses`` all those a
    conformant server may answer (the RFC says "such as" for most).
    """

    wire: bytes
    path: str
    key: str  #: the Sec-WebSocket-Key sent ("" if none)
    expected_status: int
    accepted_statuses: FrozenSet[int]
    why: str = ""


_CASINGS: Tuple[Callable[[str], str], ...] = (str, str.lower, str.upper)


@st.composite
def _request_parts(draw: st.DrawFn, path: Optional[str], host: str
                   ) -> Tuple[str, List[Tuple[str, str]], str]:
    target = path if path is not None else draw(paths())
    key = base64.b64encode(draw(st.binary(min_size=16, max_size=16))).decode()
    case = draw(st.sampled_from(_CASINGS))
    headers = [
        ("Host", host),
        ("Upgrade", draw(st.sampled_from(["websocket", "WebSocket", "WEBSOCKET"]))),
        ("Connection", draw(st.sampled_from(["Upgrade", "upgrade", "keep-alive, Upgrade"]))),
        ("Sec-WebSocket-Key", key),
        ("Sec-WebSocket-Version", "13"),
    ]
    extra = draw(st.lists(st.sampled_from([("Origin", "http://example.com"),
                                           ("User-Agent", "hypothesis"),
                                           ("Pragma", "no-cache"),
                                           ("Cache-Control", "no-cache")]),
                          unique=True, max_size=4))
    headers = [(case(name), value) for name, value in headers + extra]
    headers = draw(st.permutations(headers)) if draw(st.booleans()) else headers
    return target, headers, key


def _render(method: str, target: str, version: str, headers: Sequence[Tuple[str, str]],
            space: str = " ") -> bytes:
    lines = [f"{method} {target} {version}"] + [f"{k}:{space}{v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


_FAULTS: Dict[str, Tuple[int, FrozenSet[int], str]] = {
    "no-upgrade": (400, frozenset({400, 426}), "no Upgrade: websocket header"),
    "wrong-upgrade": (400, frozenset({400, 426}), "Upgrade names another protocol"),
    "no-connection": (400, frozenset({400, 426}), "no Connection: Upgrade header"),
    "no-key": (400, frozenset({400}), "no Sec-WebSocket-Key"),
    "bad-key": (400, frozenset({400}), "a Sec-WebSocket-Key that is not 16 bytes of base64"),
    "no-version": (426, frozenset({400, 426}), "no Sec-WebSocket-Version"),
    "wrong-version": (426, frozenset({400, 426}), "a Sec-WebSocket-Version other than 13"),
    "no-host": (400, frozenset({400}), "no Host header"),
    "method": (405, frozenset({400, 405}), "a method other than GET"),
    "http-1.0": (400, frozenset({400, 426, 505}), "HTTP/1.0"),
}


@st.composite
def _handshakes(draw: st.DrawFn, valid: bool, path: Optional[str], host: str
                ) -> HandshakeRequest:
    target, headers, key = draw(_request_parts(path, host))
    space = draw(st.sampled_from([" ", "", "  "]))
    if valid:
        return HandshakeRequest(_render("GET", target, "HTTP/1.1", headers, space), target,
                                key, 101, frozenset({101}))
    fault = draw(st.sampled_from(sorted(_FAULTS)))
    method, version = "GET", "HTTP/1.1"

    def drop(name: str) -> List[Tuple[str, str]]:
        return [(k, v) for k, v in headers if k.lower() != name.lower()]

    def replace(name: str, value: str) -> List[Tuple[str, str]]:
        return [(k, value if k.lower() == name.lower() else v) for k, v in headers]

    if fault == "no-upgrade":
        headers = drop("Upgrade")
    elif fault == "wrong-upgrade":
        headers = replace("Upgrade", draw(st.sampled_from(["h2c", "websocket2", "TLS/1.0"])))
    elif fault == "no-connection":
        headers = replace("Connection", draw(st.sampled_from(["keep-alive", "close"])))
    elif fault == "no-key":
        headers, key = drop("Sec-WebSocket-Key"), ""
    elif fault == "bad-key":
        key = draw(st.one_of(
            st.binary(min_size=0, max_size=32).filter(lambda b: len(b) != 16)
            .map(lambda b: base64.b64encode(b).decode()),
            st.sampled_from(["!!not base64!!", "x"])))
        headers = replace("Sec-WebSocket-Key", key)
    elif fault == "no-version":
        headers = drop("Sec-WebSocket-Version")
    elif fault == "wrong-version":
        headers = replace("Sec-WebSocket-Version",
                          draw(st.sampled_from(["8", "12", "14", "7", "abc"])))
    elif fault == "no-host":
        headers = drop("Host")
    elif fault == "method":
        method = draw(st.sampled_from(["POST", "PUT", "DELETE", "HEAD"]))
    else:
        version = "HTTP/1.0"
    expected, accepted, why = _FAULTS[fault]
    return HandshakeRequest(_render(method, target, version, headers, space), target, key,
                            expected, accepted, why)


def handshake_requests(valid: bool = True, path: Optional[str] = None,
                       host: str = "127.0.0.1") -> SearchStrategy[HandshakeRequest]:
    """Opening handshakes (RFC 6455 4.1) for ``path`` (any of :func:`paths`
    if None), as :class:`HandshakeRequest` (``.wire`` is the request's bytes).

    ``valid=True``: well-formed upgrade requests in every allowed form:
    header names in any case and order, ``Upgrade: WebSocket``,
    ``Connection: keep-alive, Upgrade``, no space after the colon, optional
    headers added; the server must answer 101. ``valid=False``: one fault
    each (a missing or wrong Upgrade, Connection, key, version or Host; a
    method other than GET; HTTP/1.0), with the status expected.

    >>> find(handshake_requests(valid=False), lambda r: r.expected_status == 426)
    ... # doctest: +SKIP
    HandshakeRequest(wire=b'GET / HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\nUpgrade: websocket\\r\\n
    Connection: Upgrade\\r\\nSec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\\r\\n\\r\\n', path='/',
    key='AAAAAAAAAAAAAAAAAAAAAA==', expected_status=426, ..., why='no Sec-WebSocket-Version')

    Shrinks to ``GET / HTTP/1.1`` with the five required headers in order
    and the key ``AAAAAAAAAAAAAAAAAAAAAA==`` (valid); invalid, to
    ``b'GET / HTTP/1.1\\r\\nhost:127.0.0.1\\r\\nupgrade:websocket\\r\\n
    connection:keep-alive, Upgrade\\r\\nsec-websocket-version:13\\r\\n\\r\\n'``
    (``why='no Sec-WebSocket-Key'``, 400).
    """
    return _handshakes(valid, path, host)


# -- Routing -----------------------------------------------------------------------

_SEGMENT_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$'()*,;:@"


def paths() -> SearchStrategy[str]:
    """Request paths for routing: ``/`` and ``/``-separated non-empty segments
    of the characters RFC 3986 allows unencoded in a path segment (no ``?``,
    ``#``, ``%`` or ``/``), optionally with a trailing ``/``. The same string
    is a ``define_block`` path and a request target.

    >>> paths().example()  # doctest: +SKIP
    '/v1/chat~room/'

    Shrinks to ``'/'``; the smallest with two slashes is ``'/0/'``.
    """
    segment = st.text(st.sampled_from(_SEGMENT_CHARS), min_size=1, max_size=12)
    return st.builds(lambda segs, slash: "/" + "/".join(segs) + ("/" if slash and segs else ""),
                     st.lists(segment, max_size=4), st.booleans())


class Query(NamedTuple):
    """A query string (without the ``?``) and the parameters it carries, as
    ``urllib.parse.parse_qsl`` decodes them (keys are unique, so a dict of
    them is unambiguous)."""

    string: str
    params: Dict[str, str]


def _encode_query(params: Dict[str, str]) -> Query:
    string = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in params.items())
    return Query(string, dict(params))


def queries() -> SearchStrategy[Query]:
    """Query strings for routing, with the parameters a server must see: any
    keys (non-empty) and values (empty included), percent-encoded as UTF-8.

    >>> queries().example()  # doctest: +SKIP
    Query(string='id=%C3%A9&room=', params={'id': 'é', 'room': ''})

    Shrinks to ``Query(string='', params={})``; the smallest with one
    parameter is ``Query(string='0=', params={'0': ''})``.
    """
    chars = st.characters(exclude_categories=["Cs", "Cc"])
    return st.dictionaries(st.text(chars, min_size=1, max_size=10),
                           st.text(chars, max_size=20), max_size=5).map(_encode_query)
