"""A raw WebSocket peer: it writes exactly the bytes it is told to, and reads
back exactly the frames that arrive.

A real WebSocket library refuses to send what a hostile or broken peer sends
(unmasked frames, reserved bits, a length that lies, half a frame) and hides
what a test of an endpoint must see (how frames are laid out on the wire,
what a peer that stops reading does to the other end). :class:`RawPeer` is
one TCP connection driven at the frame level instead:

- **Opening.** :meth:`RawPeer.open` connects, sends an RFC 6455 upgrade
  request (:func:`handshake_request`; extra headers and the first frames may
  ride in the same write) and checks the ``101`` response and its
  ``Sec-WebSocket-Accept`` (computed by
  :func:`gaman_sync.protocol.handshake.accept_token`). A refusal raises
  :class:`HandshakeFailed`; :meth:`RawPeer.read_http_response` reads any other
  answer for a test that expects one.
- **Writing.** :func:`frame` builds any frame: any opcode, FIN, reserved bits,
  masked or not with any key, a length that lies or is encoded in a longer
  form than needed. :meth:`RawPeer.send_frame` sends one; :meth:`RawPeer.send`
  sends raw bytes; :func:`chunks`, :meth:`RawPeer.send_chunks` and
  :meth:`RawPeer.send_bytewise` split bytes over several TCP writes
  (``TCP_NODELAY`` is on, so each write leaves in its own segment);
  :func:`fragmented` lays out one message as fragments, with pings (or any
  control frame) between them.
- **Reading.** Every byte received goes through a :class:`FrameParser`, which
  cuts the stream into :class:`Frame` objects and notes when the last byte
  of each arrived (:meth:`RawPeer.recv_timed` returns it with the frame).
  By default it is *strict*: it expects what a server sends (whole,
  unmasked, unfragmented frames, known opcodes, short control frames, valid
  UTF-8 in text), and anything else is a :class:`ProtocolViolation`, an
  ``AssertionError``, raised as soon as the header shows it. That is how
  two interleaved writes on the other side show up. ``strict=False`` reads
  whatever arrives, masked or fragmented. Every
  read has a timeout: an endpoint that hangs fails the caller instead of
  hanging it (``socket.timeout``), and the end of the stream is
  :class:`PeerClosed` (or the ``eof`` flag, for the batch readers).
- **Answering.** :meth:`RawPeer.read_until`, :meth:`RawPeer.read_to_eof` and
  :class:`MultiReader` answer pings with pongs and echo a close frame, unless
  the peer's ``answer_pings``/``answer_close`` say not to: a peer that never
  answers is one attribute away. :meth:`RawPeer.recv_frame` answers nothing.
- **Closing.** :meth:`RawPeer.close_handshake` sends a close frame, reads the
  echo and waits for the TCP close; :meth:`RawPeer.wait_eof` returns whatever
  arrived before the TCP close; :meth:`RawPeer.abort` resets the connection.
- **Crowds.** :func:`connect_many` opens many peers with every request sent
  before any answer is read, so the endpoint handshakes them in parallel;
  :class:`MultiReader` reads hundreds of them from one thread with a selector
  (one thread per peer would compete for the cores with the endpoint under
  test); :func:`raise_nofile` raises the descriptor limit they need.

Only the standard library and :mod:`gaman_sync.protocol` are used, so the
module tests any WebSocket server, not only this package's.
"""

from __future__ import annotations

import base64
import os
import selectors
import socket
import struct
import threading
import time
from collections import deque
from typing import (
    Any,
    Callable,
    Deque,
    Dict,
    Iterable,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Type,
    Union,
    cast,
)

from ..protocol.frames import mask_payload
from ..protocol.handshake import accept_token

__all__ = ["CONT", "TEXT", "BINARY", "CLOSE", "PING", "PONG", "DEFAULT_TIMEOUT",
           "Frame", "FrameParser", "HTTPResponse", "HandshakeFailed", "MultiReader",
           "PeerClosed", "ProtocolViolation", "RawPeer", "chunks", "close_frame",
           "close_payload", "connect_many", "fragmented", "frame", "handshake_request",
           "parse_close", "raise_nofile"]

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
"""The opcodes of RFC 6455 5.2."""
_DATA = (CONT, TEXT, BINARY)
_CONTROL = (CLOSE, PING, PONG)

DEFAULT_TIMEOUT = 10.0
"""Seconds: how long a read or a handshake waits unless told otherwise."""

Payload = Union[bytes, bytearray, memoryview, str]


class Frame(NamedTuple):
    """One frame as it arrived (the payload unmasked if it was masked)."""

    opcode: int
    payload: bytes
    fin: bool = True
    rsv: int = 0  #: the three reserved bits, as a number 0-7
    masked: bool = False

    def close_code(self) -> Optional[int]:
        """The status code of a close frame (None for an empty close)."""
        assert self.opcode == CLOSE, self
        return parse_close(self.payload, decode=False)[0]

    def close_reason(self) -> bytes:
        """The reason of a close frame, as the bytes that arrived."""
        assert self.opcode == CLOSE, self
        return self.payload[2:]


class ProtocolViolation(AssertionError):
    """The endpoint put something on the wire that is not a whole, valid frame
    (or answered the handshake wrongly)."""


class PeerClosed(Exception):
    """The endpoint closed the TCP connection (EOF or reset) where a frame was
    expected."""


class HandshakeFailed(ConnectionError):
    """The endpoint refused the opening handshake or closed during it."""

    def __init__(self, message: str, response: Optional[HTTPResponse] = None) -> None:
        super().__init__(message)
        self.response = response  #: the answer, when one came


# -- Building what a client sends ------------------------------------------------

def _as_bytes(data: Payload) -> bytes:
    return data.encode("utf-8") if isinstance(data, str) else bytes(data)


def frame(opcode: int, payload: Payload = b"", *, fin: bool = True, rsv: int = 0,
          mask: bool = True, key: Optional[bytes] = None, length: Optional[int] = None,
          length_form: Optional[int] = None) -> bytes:
    """The bytes of one frame (by default as a client must send it: masked).

    ``str`` payloads are encoded as UTF-8. ``rsv`` is the three reserved bits
    as a number 0-7; ``key`` is the 4-byte masking key (random by default);
    ``length`` overrides the announced payload length (to lie about it);
    ``length_form`` forces the 7-bit (0), 16-bit (2) or 64-bit (8) encoding.
    """
    data = _as_bytes(payload)
    n = len(data) if length is None else length
    first = (0x80 if fin else 0) | ((rsv & 7) << 4) | (opcode & 0x0F)
    mbit = 0x80 if mask else 0
    if length_form is None:
        length_form = 0 if n < 126 else 2 if n < 65536 else 8
    if length_form == 0:
        head = struct.pack("!BB", first, mbit | n)
    elif length_form == 2:
        head = struct.pack("!BBH", first, mbit | 126, n)
    else:
        head = struct.pack("!BBQ", first, mbit | 127, n)
    if not mask:
        return head + data
    if key is None:
        key = os.urandom(4)
    return head + key + mask_payload(data, key)


def close_payload(code: Optional[int] = 1000, reason: Payload = b"") -> bytes:
    """The payload of a close frame: empty if ``code`` is None."""
    if code is None:
        return b""
    return struct.pack("!H", code) + _as_bytes(reason)


def close_frame(code: Optional[int] = 1000, reason: Payload = b"", **kw: object) -> bytes:
    """The bytes of a close frame; ``kw`` as for :func:`frame`."""
    return frame(CLOSE, close_payload(code, reason), **kw)  # type: ignore[arg-type]


def parse_close(payload: bytes, decode: bool = True
                ) -> Tuple[Optional[int], Union[str, bytes]]:
    """``(code, reason)`` of a close frame's payload; ``(None, "")`` if empty.
    The reason is decoded from UTF-8 unless ``decode`` is false."""
    reason = payload[2:]
    if len(payload) < 2:
        return None, "" if decode else b""
    return struct.unpack("!H", payload[:2])[0], reason.decode("utf-8") if decode else reason


def handshake_request(path: str = "/", *, host: str = "127.0.0.1",
                      key: Optional[bytes] = None, headers: Sequence[Tuple[str, str]] = (),
                      version: str = "13") -> bytes:
    """An RFC 6455 upgrade request for ``path`` (``key``: the base64
    ``Sec-WebSocket-Key``, random by default; ``headers`` are appended)."""
    if key is None:
        key = base64.b64encode(os.urandom(16))
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Upgrade: websocket",
             "Connection: Upgrade", f"Sec-WebSocket-Key: {key.decode()}",
             f"Sec-WebSocket-Version: {version}"]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def fragmented(opcode: int, fragments: Sequence[Payload],
               controls: Iterable[Tuple[int, bytes]] = (), **kw: Any) -> bytes:
    """The bytes of one message sent as ``fragments`` (at least one; empty
    ones allowed): the first frame has ``opcode``, the others are
    continuations, the last has FIN. ``controls`` are ``(index, frame)``
    pairs: each ``frame`` (the bytes of a ping, say: ``frame(PING, b"p")``)
    goes right before fragment ``index`` (``len(fragments)``: after the
    last), in the order given. ``kw`` as for :func:`frame` (mask, rsv...)."""
    if not fragments:
        raise ValueError("a message has at least one fragment")
    before: Dict[int, List[bytes]] = {}
    for index, control in controls:
        if not 0 <= index <= len(fragments):
            raise ValueError(f"control frame index {index} out of 0..{len(fragments)}")
        before.setdefault(index, []).append(control)
    out: List[bytes] = []
    last = len(fragments) - 1
    for i, piece in enumerate(fragments):
        out.extend(before.get(i, ()))
        out.append(frame(opcode if i == 0 else CONT, piece, fin=i == last, **kw))
    out.extend(before.get(len(fragments), ()))
    return b"".join(out)


def chunks(data: bytes, cuts: Iterable[int]) -> List[bytes]:
    """``data`` split at the given offsets (sorted, deduplicated, clipped):
    the pieces to send as separate TCP writes."""
    points = sorted({c for c in cuts if 0 < c < len(data)})
    out, prev = [], 0
    for p in [*points, len(data)]:
        out.append(data[prev:p])
        prev = p
    return out


# -- Reading what an endpoint sends -----------------------------------------------

class FrameParser:
    """Cuts a byte stream into :class:`Frame` objects.

    ``strict`` (the default) checks each frame as a server must send it: FIN
    set (the endpoint is expected to send every message as one frame, so a
    fragment can only come from two writes mixing on the wire), no reserved
    bits, no mask, a known opcode, control frames of at most 125 bytes, and
    text that is valid UTF-8. A violation raises :class:`ProtocolViolation`
    as soon as the frame's header has arrived. Without ``strict``, any frame
    is returned as it came, unmasked.
    """

    def __init__(self, strict: bool = True) -> None:
        self.strict = strict
        self._buf = bytearray()
        self._pos = 0  # where the next frame starts in _buf
        self._base = 0  # the stream offset of _buf[0]
        # (stream offset just past a chunk, monotonic time it arrived), oldest first
        self._arrivals: Deque[Tuple[int, float]] = deque()
        self.last_arrival: Optional[float] = None
        """When the bytes that completed the frame last returned arrived
        (``time.monotonic()``)."""

    @property
    def pending(self) -> int:
        """Bytes received that do not make a whole frame yet."""
        return len(self._buf) - self._pos

    def append(self, data: bytes, at: Optional[float] = None) -> None:
        """Add received bytes without parsing them; ``at`` is when they
        arrived (default: now)."""
        if self._pos:
            del self._buf[:self._pos]
            self._base += self._pos
            self._pos = 0
        self._buf += data
        if data:
            self._arrivals.append((self._base + len(self._buf),
                                   time.monotonic() if at is None else at))

    def take(self) -> bytes:
        """Remove and return every byte not parsed yet."""
        data = bytes(self._buf[self._pos:])
        self._base += len(self._buf)
        self._buf = bytearray()
        self._pos = 0
        self._arrivals.clear()
        return data

    def next_frame(self) -> Optional[Frame]:
        """The next whole frame in the buffer, or None until more bytes come."""
        buf, pos = self._buf, self._pos
        available = len(buf) - pos
        if available < 2:
            return None
        b0, b1 = buf[pos], buf[pos + 1]
        length = b1 & 0x7F
        start = pos + 2
        if length == 126:
            if available < 4:
                return None
            length = (buf[pos + 2] << 8) | buf[pos + 3]
            start = pos + 4
        elif length == 127:
            if available < 10:
                return None
            length = struct.unpack_from("!Q", buf, pos + 2)[0]
            start = pos + 10
        if self.strict:
            # Checked before waiting for the payload: a corrupt header must
            # fail now, not look like a message that never comes.
            self._check(b0, b1, length)
        masked = bool(b1 & 0x80)
        key = b""
        if masked:
            key = bytes(buf[start:start + 4])
            start += 4
        end = start + length
        if end > len(buf):
            return None
        payload = bytes(buf[start:end])
        if masked:
            payload = mask_payload(payload, key)
        opcode = b0 & 0x0F
        if self.strict and opcode == TEXT:
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                raise ProtocolViolation(
                    f"text frame with invalid UTF-8: {payload[:60]!r}") from None
        self._stamp(self._base + end)
        if end == len(buf):
            buf.clear()
            self._base += end
            self._pos = 0
        else:
            self._pos = end
        return Frame(opcode, payload, bool(b0 & 0x80), (b0 >> 4) & 7, masked)

    def _stamp(self, stream_end: int) -> None:
        """Set :attr:`last_arrival` for a frame that ends at ``stream_end``."""
        arrivals = self._arrivals
        while arrivals and arrivals[0][0] < stream_end:
            arrivals.popleft()
        if arrivals:
            self.last_arrival = arrivals[0][1]
            if arrivals[0][0] == stream_end:
                arrivals.popleft()

    def feed(self, data: bytes, at: Optional[float] = None) -> List[Frame]:
        """Add ``data`` (arrived at ``at``, default now); return every frame
        now whole."""
        self.append(data, at)
        frames: List[Frame] = []
        while True:
            f = self.next_frame()
            if f is None:
                return frames
            frames.append(f)

    @staticmethod
    def _check(b0: int, b1: int, length: int) -> None:
        opcode = b0 & 0x0F
        if b1 & 0x80:
            raise ProtocolViolation("the server sent a masked frame")
        if b0 & 0x70:
            raise ProtocolViolation(f"reserved bits set in frame header byte {b0:#04x}")
        if not b0 & 0x80:
            raise ProtocolViolation(f"fragment without FIN (opcode {opcode:#x}): the server "
                                    "sends whole frames, so writes have mixed")
        if opcode not in (TEXT, BINARY) and opcode not in _CONTROL:
            raise ProtocolViolation(f"frame with opcode {opcode:#x}")
        if opcode in _CONTROL and length > 125:
            raise ProtocolViolation(f"control frame {opcode:#x} of {length} bytes")


class HTTPResponse(NamedTuple):
    """An HTTP response to the opening handshake."""

    status: int
    reason: str
    headers: List[Tuple[str, str]]
    body: bytes

    def header(self, name: str) -> Optional[str]:
        """The values of header ``name`` joined with ", ", or None if absent."""
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return ", ".join(values) if values else None


# -- The peer ---------------------------------------------------------------------

class RawPeer:
    """One client connection on a plain socket, driven frame by frame.

    Blocking, with a timeout on every read (``timeout``, unless a call gives
    its own). ``parser`` holds what arrived and is not read yet. The flags
    ``eof``, ``reset`` and ``eof_at`` (a ``time.monotonic()``) record the end
    of the stream, ``received_close`` the ``(code, reason)`` of the close
    frame seen by the answering readers, and ``user`` is free for the caller.
    """

    def __init__(self, sock: socket.socket, *, name: str = "",
                 timeout: float = DEFAULT_TIMEOUT, strict: bool = True) -> None:
        """Drive the connected ``sock`` (the handshake is the caller's, or
        :meth:`finish_handshake`'s)."""
        self.sock = sock
        self.name = name
        self.timeout = timeout
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # not TCP
        self.parser = FrameParser(strict)
        self.write_lock = threading.Lock()
        self.key: Optional[bytes] = None  # Sec-WebSocket-Key, when we sent the request
        self.eof = False
        self.reset = False
        self.eof_at: Optional[float] = None
        self.received_close: Optional[Tuple[Optional[int], str]] = None
        self.answer_pings = True
        self.answer_close = True
        self.close_sent = False
        self.user: Dict[Any, Any] = {}
        self._head = bytearray()  # the HTTP response, until it is whole

    # -- Opening ------------------------------------------------------------

    @staticmethod
    def new_socket(rcvbuf: Optional[int] = None, mss: Optional[int] = None,
                   family: int = socket.AF_INET) -> socket.socket:
        """A TCP socket with ``SO_RCVBUF``/``TCP_MAXSEG`` set before connect()
        (the window scale and the MSS are agreed on in the SYN)."""
        sock = socket.socket(family, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if mss is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
        return sock

    @classmethod
    def start(cls: Type[RawPeer], host: str, port: int, path: str, *,
              timeout: float = DEFAULT_TIMEOUT, headers: Sequence[Tuple[str, str]] = (),
              after: bytes = b"", rcvbuf: Optional[int] = None, mss: Optional[int] = None,
              name: str = "", strict: bool = True) -> RawPeer:
        """Connect and send the upgrade request (and ``after``, the first
        frames, in the same write), without reading the answer."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = cls.new_socket(rcvbuf, mss, family)
        try:
            sock.settimeout(timeout)
            sock.connect((host, port))
            peer = cls(sock, name=name or path, timeout=timeout, strict=strict)
            peer.key = base64.b64encode(os.urandom(16))
            authority = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
            peer.send(handshake_request(path, host=authority, key=peer.key, headers=headers)
                      + after)
        except BaseException:
            sock.close()
            raise
        return peer

    @classmethod
    def open(cls: Type[RawPeer], host: str, port: int, path: str,
             **options: Any) -> RawPeer:
        """Connect and complete the opening handshake; ``options`` as for
        :meth:`start` (timeout, headers, after, rcvbuf, mss, name, strict).
        Raises :class:`HandshakeFailed` if it is refused."""
        peer = cls.start(host, port, path, **options)
        try:
            peer.finish_handshake()
        except BaseException:
            peer.close()
            raise
        return peer

    def finish_handshake(self, timeout: Optional[float] = None) -> HTTPResponse:
        """Read the answer to the upgrade request: it must be a ``101`` with the
        right ``Sec-WebSocket-Accept``. Frames that came with it stay in
        ``parser``."""
        try:
            response = self.read_http_response(body=False, timeout=timeout)
        except PeerClosed:
            raise HandshakeFailed(f"{self.name}: closed during the handshake: "
                                  f"{bytes(self._head)!r}") from None
        if response.status != 101:
            raise HandshakeFailed(f"{self.name}: handshake refused: {response}", response)
        if self.key is not None and \
                response.header("Sec-WebSocket-Accept") != accept_token(self.key).decode():
            raise ProtocolViolation(f"{self.name}: wrong Sec-WebSocket-Accept in {response}")
        return response

    def read_http_response(self, body: bool = True,
                           timeout: Optional[float] = None) -> HTTPResponse:
        """Read a status line and headers (and a Content-Length body if
        ``body``); what follows is left to the frame parser."""
        deadline = self._deadline(timeout)
        buf = self._head
        while b"\r\n\r\n" not in buf:
            buf += self._read_or_raise(deadline)
        head, _, rest = bytes(buf).partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        version, status, reason = [*lines[0].split(" ", 2), ""][:3]
        if version != "HTTP/1.1":
            raise ProtocolViolation(f"{self.name}: not an HTTP/1.1 response: {lines[0]!r}")
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise ProtocolViolation(f"{self.name}: malformed header line {line!r}")
            headers.append((name.strip(), value.strip()))
        data = b""
        if body:
            length = int(dict((k.lower(), v) for k, v in headers).get("content-length", "0"))
            rest_buf = bytearray(rest)
            while len(rest_buf) < length:
                rest_buf += self._read_or_raise(deadline)
            data, rest = bytes(rest_buf[:length]), bytes(rest_buf[length:])
        self._head = bytearray()
        self.parser.append(rest)
        return HTTPResponse(int(status), reason, headers, data)

    # -- Writing --------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Send raw bytes, in one write."""
        with self.write_lock:
            self.sock.sendall(data)

    def send_frame(self, opcode: int, payload: Payload = b"", **kw: object) -> None:
        """Send one frame; ``kw`` as for :func:`frame` (fin, rsv, mask, key...)."""
        self.send(frame(opcode, payload, **kw))  # type: ignore[arg-type]

    def send_text(self, text: str) -> None:
        """Send a whole text message."""
        self.send_frame(TEXT, text)

    def send_chunks(self, data: bytes, cuts: Iterable[int], pause: float = 0.0) -> None:
        """Send ``data`` split at the offsets ``cuts`` (see :func:`chunks`),
        one write per piece (so one TCP segment each), sleeping ``pause``
        seconds between writes to keep the receiver's reads apart too."""
        with self.write_lock:
            for i, piece in enumerate(chunks(data, cuts)):
                if i and pause:
                    time.sleep(pause)
                self.sock.sendall(piece)

    def send_bytewise(self, data: bytes) -> None:
        """Send ``data`` one byte per write (so one byte per TCP segment)."""
        with self.write_lock:
            for i in range(len(data)):
                self.sock.sendall(data[i:i + 1])

    def send_close(self, code: Optional[int] = 1000, reason: Payload = b"",
                   **kw: object) -> None:
        """Send a close frame (empty if ``code`` is None), once: a second call
        does nothing (send another with :meth:`send_frame` or :meth:`send`)."""
        with self.write_lock:
            if self.close_sent:
                return
            self.close_sent = True
            self.sock.sendall(close_frame(code, reason, **kw))

    # -- Reading frame by frame ---------------------------------------------------

    def _deadline(self, timeout: Optional[float]) -> float:
        return time.monotonic() + (self.timeout if timeout is None else timeout)

    def _read(self, timeout: float) -> bytes:
        """One recv; ``b""`` at the end of the stream, which sets the flags."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(262144)
        except ConnectionResetError:
            self.reset = True
            data = b""
        if not data:
            self.eof = True
            if self.eof_at is None:
                self.eof_at = time.monotonic()
        return data

    def _read_or_raise(self, deadline: float) -> bytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout(f"{self.name}: timed out waiting for data")
        data = self._read(remaining)
        if not data:
            raise PeerClosed(f"{self.name}: EOF with {self.parser.pending + len(self._head)}"
                             " unparsed bytes")
        return data

    def recv_frame(self, timeout: Optional[float] = None) -> Frame:
        """The next frame; ``socket.timeout`` or :class:`PeerClosed` if none comes."""
        deadline = self._deadline(timeout)
        while True:
            f = self.parser.next_frame()
            if f is not None:
                return f
            self.parser.append(self._read_or_raise(deadline))

    def recv_timed(self, timeout: Optional[float] = None) -> Tuple[float, Frame]:
        """``(arrived, frame)``: the next frame and the ``time.monotonic()`` at
        which its last byte was read (``socket.timeout`` or
        :class:`PeerClosed` if none comes)."""
        f = self.recv_frame(timeout)
        assert self.parser.last_arrival is not None
        return self.parser.last_arrival, f

    def expect_close(self, timeout: Optional[float] = None) -> Frame:
        """The next frame, which must be a close frame."""
        f = self.recv_frame(timeout)
        assert f.opcode == CLOSE, f"expected a close frame, got {f}"
        return f

    def recv_frames_until_close(self, timeout: Optional[float] = None) -> List[Frame]:
        """Frames up to and including the first close frame."""
        frames = []
        while True:
            f = self.recv_frame(timeout)
            frames.append(f)
            if f.opcode == CLOSE:
                return frames

    def frames_within(self, timeout: float) -> List[Tuple[object, object]]:
        """What arrives within ``timeout``, up to a close frame or the TCP close,
        summarised for assertions: (opcode, payload), or (CLOSE, code) for a
        close frame, and ("EOF", None) for the TCP close."""
        out: List[Tuple[object, object]] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                f = self.recv_frame(max(deadline - time.monotonic(), 0.001))
            except socket.timeout:
                return out
            except PeerClosed:
                return [*out, ("EOF", None)]
            if f.opcode == CLOSE:
                return [*out, (CLOSE, f.close_code())]
            out.append((f.opcode, f.payload))

    def wait_eof(self, timeout: Optional[float] = None) -> bytes:
        """Wait until the endpoint closes TCP; return the bytes that arrived
        and were not read as frames. ``socket.timeout`` if it stays open."""
        deadline = self._deadline(timeout)
        while True:
            try:
                self.parser.append(self._read_or_raise(deadline))
            except socket.timeout:
                raise socket.timeout(f"{self.name}: the endpoint kept the connection "
                                     "open") from None
            except PeerClosed:
                return self.parser.take()

    def close_handshake(self, code: Optional[int] = 1000, reason: Payload = b"",
                        timeout: Optional[float] = None) -> Frame:
        """Close from this side: send a close frame, read the echo (returned),
        see the TCP close."""
        self.send_close(code, reason)
        reply = self.expect_close(timeout)
        self.wait_eof(timeout)
        return reply

    # -- Reading in batches, answering pings and closes -------------------------

    def recv_frames(self, timeout: Optional[float] = None) -> List[Frame]:
        """The frames already whole, or else those of one read (empty at the
        end of the stream, which sets ``eof``)."""
        frames = self.parser.feed(b"")
        if frames:
            return frames
        data = self._read(self.timeout if timeout is None else timeout)
        return self.parser.feed(data) if data else []

    def handle_control(self, f: Frame) -> None:
        """What the answering readers do with each frame: answer a ping (if
        ``answer_pings``), record a close frame in ``received_close`` and echo
        it (if ``answer_close``)."""
        if f.opcode == PING and self.answer_pings and not self.close_sent:
            try:
                self.send_frame(PONG, f.payload)
            except OSError:
                pass
        elif f.opcode == CLOSE:
            code, reason = parse_close(f.payload)
            self.received_close = (code, cast(str, reason))  # decoded: decode=True
            if self.answer_close:
                try:
                    self.send_close(1000 if code is None else code)
                except OSError:
                    pass

    def read_until(self, done: Callable[[], bool], on_frame: Callable[[Frame], None],
                   timeout: Optional[float] = None) -> None:
        """Read frames until ``done()``, passing each to :meth:`handle_control`
        then to ``on_frame``. ``TimeoutError`` on timeout, ``ConnectionError``
        if the stream ends first."""
        deadline = self._deadline(timeout)
        for f in self.parser.feed(b""):
            self.handle_control(f)
            on_frame(f)
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.name}: timed out reading")
            if self.eof:
                raise ConnectionError(f"{self.name}: connection closed while reading")
            try:
                frames = self.recv_frames(remaining)
            except socket.timeout:
                raise TimeoutError(f"{self.name}: timed out reading") from None
            for f in frames:
                self.handle_control(f)
                on_frame(f)

    def read_to_eof(self, on_frame: Callable[[Frame], None] = lambda f: None,
                    timeout: Optional[float] = None) -> None:
        """Read (answering as configured) until the endpoint closes TCP."""
        try:
            self.read_until(lambda: self.eof, on_frame, timeout)
        except ConnectionError:
            if not self.eof:
                raise

    # -- Ending ---------------------------------------------------------------

    def abort(self) -> None:
        """Drop the connection with a TCP reset: no close frame, no FIN."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.sock.close()

    def close(self) -> None:
        """Close the socket (a FIN, with no close frame)."""
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- Many peers ---------------------------------------------------------------------

def raise_nofile(needed: int) -> None:
    """Raise the soft descriptor limit toward the hard one if ``needed`` asks for it."""
    import resource  # Unix only: imported where it is needed
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    assert target >= needed, f"this needs {needed} descriptors; the hard limit is {hard}"


def connect_many(host: str, port: int, paths: Iterable[str], rcvbuf: Optional[int] = None,
                 timeout: float = DEFAULT_TIMEOUT) -> List[RawPeer]:
    """Open one peer per path at once: every request is sent before any
    answer is read, so the endpoint handshakes them in parallel."""
    peers: List[RawPeer] = []
    try:
        for path in paths:
            peers.append(RawPeer.start(host, port, path, timeout=timeout, rcvbuf=rcvbuf))
        for peer in peers:
            peer.finish_handshake(timeout)
    except BaseException:
        for peer in peers:
            peer.close()
        raise
    return peers


class MultiReader:
    """One thread that reads many :class:`RawPeer` objects with a selector.

    Data frames go to ``on_data(peer, opcode, payload)`` in the reader thread;
    control frames to each peer's :meth:`RawPeer.handle_control`. A frame the
    parser rejects, or an ``on_data`` that raises, lands in ``errors`` (and the
    peer's socket is closed for the former). Callers wait on ``cond``
    (notified after each round of reads) through :meth:`wait_for`.
    """

    def __init__(self, on_data: Optional[Callable[[RawPeer, int, bytes], None]] = None,
                 wait: float = DEFAULT_TIMEOUT) -> None:
        self.on_data = on_data or (lambda peer, opcode, payload: None)
        self.wait = wait  #: the default of :meth:`wait_for`, and the bound of :meth:`stop`
        self.cond = threading.Condition()
        self.errors: List[str] = []
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._todo: List[RawPeer] = []
        self._todo_lock = threading.Lock()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="test-multireader", daemon=True)
        self._thread.start()

    def add(self, peers: Iterable[RawPeer]) -> None:
        """Start reading ``peers`` (their sockets become non-blocking)."""
        peers = list(peers)
        for peer in peers:
            peer.sock.setblocking(False)
        with self._todo_lock:
            self._todo.extend(peers)
        self._wake_w.send(b"\0")

    def wait_for(self, predicate: Callable[[], bool], timeout: Optional[float] = None,
                 what: str = "condition") -> None:
        """Wait until ``predicate()``; ``AssertionError`` on timeout or on any error."""
        if timeout is None:
            timeout = self.wait
        with self.cond:
            ok = self.cond.wait_for(lambda: predicate() or self.errors, timeout)
            if self.errors:
                raise AssertionError(f"reader errors: {self.errors[:5]}")
            if not ok:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    def stop(self) -> None:
        """End the thread and close every peer's socket (a second call does nothing)."""
        if self._stopped:
            return
        self._stopped = True
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass
        self._thread.join(self.wait)
        assert not self._thread.is_alive(), "the reader thread did not stop"
        for key in list(self._selector.get_map().values()):
            if key.fileobj is not self._wake_r:
                key.fileobj.close()  # type: ignore[union-attr]
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def _run(self) -> None:
        selector = self._selector
        try:
            while not self._stopped:
                for key, _ in selector.select():
                    if key.fileobj is self._wake_r:
                        try:
                            while self._wake_r.recv(4096):
                                pass
                        except BlockingIOError:
                            pass
                        continue
                    self._read(key.data)
                with self._todo_lock:
                    todo, self._todo = self._todo, []
                for peer in todo:
                    selector.register(peer.sock, selectors.EVENT_READ, peer)
                    self._deliver(peer, b"")  # what came with the 101 response
                with self.cond:
                    self.cond.notify_all()
        except BaseException as exc:  # surface it to the waiting caller, never hang it
            with self.cond:
                self.errors.append(f"reader crashed: {exc!r}")
                self.cond.notify_all()
            raise

    def _read(self, peer: RawPeer) -> None:
        try:
            data = peer.sock.recv(262144)
        except BlockingIOError:
            return
        except ConnectionResetError:
            peer.reset = True
            data = b""
        except OSError as exc:
            self.errors.append(f"{peer.name}: recv failed: {exc!r}")
            data = b""
        if not data:
            peer.eof = True
            peer.eof_at = time.monotonic()
            self._selector.unregister(peer.sock)
            peer.sock.close()
            return
        self._deliver(peer, data)

    def _deliver(self, peer: RawPeer, data: bytes) -> None:
        try:
            frames = peer.parser.feed(data)
        except ProtocolViolation as exc:
            self.errors.append(f"{peer.name}: {exc}")
            self._selector.unregister(peer.sock)
            peer.sock.close()
            return
        on_data = self.on_data
        for f in frames:
            if f.opcode in _DATA:
                try:
                    on_data(peer, f.opcode, f.payload)
                except Exception as exc:
                    self.errors.append(f"{peer.name}: check failed: {exc!r}")
            else:
                peer.handle_control(f)
