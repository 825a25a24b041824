"""A raw WebSocket client for tests: it writes exactly the bytes a test asks for.

A real client library refuses to send what a hostile peer sends (unmasked
frames, reserved bits, bad lengths, half a frame), so conformance tests build
frames byte by byte here, and read the server's frames back without
interpreting them beyond RFC 6455's framing. Every read has a timeout: a
server that hangs fails the test instead of hanging it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import struct
import threading
import time
from typing import Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

from gaman_sync import ConnectionClosed, define_block

from .conftest import Recorder

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
DEFAULT_TIMEOUT = 5.0


class Frame(NamedTuple):
    fin: bool
    rsv: int
    opcode: int
    payload: bytes
    masked: bool

    def close_code(self) -> Optional[int]:
        """The status code of a close frame (None for an empty close)."""
        assert self.opcode == CLOSE, self
        if len(self.payload) < 2:
            return None
        return struct.unpack("!H", self.payload[:2])[0]

    def close_reason(self) -> bytes:
        assert self.opcode == CLOSE, self
        return self.payload[2:]


class ServerClosed(Exception):
    """The server closed the TCP connection (EOF or reset) where a frame was expected."""


def mask_bytes(data: bytes, key: bytes) -> bytes:
    """XOR ``data`` with the 4-byte ``key``; one big-int XOR is fast even for MiB."""
    n = len(data)
    if n == 0:
        return b""
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


def frame(opcode: int, payload: Union[bytes, str] = b"", *, fin: bool = True, rsv: int = 0,
          mask: bool = True, key: Optional[bytes] = None, length: Optional[int] = None,
          length_form: Optional[int] = None) -> bytes:
    """The bytes of one frame as a client sends it.

    ``rsv`` is the three reserved bits as a number 0-7; ``length`` overrides
    the announced payload length (to lie about it); ``length_form`` forces the
    7-bit (0), 16-bit (2) or 64-bit (8) length encoding.
    """
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    n = len(payload) if length is None else length
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
        return head + payload
    if key is None:
        key = os.urandom(4)
    return head + key + mask_bytes(payload, key)


def close_frame(code: Optional[int] = None, reason: Union[bytes, str] = b"", **kw) -> bytes:
    if isinstance(reason, str):
        reason = reason.encode("utf-8")
    payload = b"" if code is None else struct.pack("!H", code) + reason
    return frame(CLOSE, payload, **kw)


def handshake_request(path: str = "/echo", key: Optional[bytes] = None,
                      extra: Sequence[Tuple[str, str]] = (), version: str = "13") -> bytes:
    if key is None:
        key = base64.b64encode(os.urandom(16))
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", "Upgrade: websocket",
             "Connection: Upgrade", f"Sec-WebSocket-Key: {key.decode()}",
             f"Sec-WebSocket-Version: {version}"]
    lines += [f"{k}: {v}" for k, v in extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def accept_for(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


class HTTPResponse(NamedTuple):
    status: int
    reason: str
    headers: List[Tuple[str, str]]
    body: bytes

    def header(self, name: str) -> Optional[str]:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return ", ".join(values) if values else None


class RawClient:
    """One TCP connection to the server, driven byte by byte."""

    def __init__(self, port: int, timeout: float = DEFAULT_TIMEOUT,
                 sock: Optional[socket.socket] = None) -> None:
        """Connect to ``port`` on 127.0.0.1, or take over the connected ``sock``."""
        self.timeout = timeout
        if sock is None:
            sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock = sock
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()

    # -- opening -------------------------------------------------------

    @classmethod
    def open(cls, port: int, path: str = "/echo", timeout: float = DEFAULT_TIMEOUT,
             extra: Sequence[Tuple[str, str]] = (), after: bytes = b"") -> "RawClient":
        """Connect and complete the opening handshake (``after``: bytes sent in
        the same write as the request, i.e. the first frames)."""
        client = cls(port, timeout)
        key = base64.b64encode(os.urandom(16))
        client.sock.sendall(handshake_request(path, key, extra) + after)
        response = client.read_http_response(body=False)
        if response.status != 101:
            client.sock.close()
            raise AssertionError(f"handshake failed: {response}")
        assert response.header("Sec-WebSocket-Accept") == accept_for(key).decode()
        return client

    def read_http_response(self, body: bool = True) -> HTTPResponse:
        """Read a status line and headers (and a Content-Length body if ``body``)."""
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
        self.buf = bytearray(rest)
        lines = head.decode("latin-1").split("\r\n")
        version, status, reason = (lines[0].split(" ", 2) + [""])[:3]
        assert version == "HTTP/1.1", lines[0]
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            assert sep, f"malformed header line {line!r}"
            headers.append((name.strip(), value.strip()))
        data = b""
        if body:
            length = int(dict((k.lower(), v) for k, v in headers).get("content-length", "0"))
            while len(self.buf) < length:
                self._fill()
            data, self.buf = bytes(self.buf[:length]), self.buf[length:]
        return HTTPResponse(int(status), reason, headers, data)

    # -- writing -------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_frame(self, opcode: int, payload: Union[bytes, str] = b"", **kw) -> None:
        self.sock.sendall(frame(opcode, payload, **kw))

    def send_bytewise(self, data: bytes) -> None:
        # TCP_NODELAY is on, so each byte leaves in its own segment.
        for i in range(len(data)):
            self.sock.sendall(data[i:i + 1])

    def send_close(self, code: Optional[int] = 1000, reason: Union[bytes, str] = b"") -> None:
        self.sock.sendall(close_frame(code, reason))

    # -- reading -------------------------------------------------------

    def _fill(self, timeout: Optional[float] = None) -> None:
        self.sock.settimeout(self.timeout if timeout is None else timeout)
        try:
            data = self.sock.recv(1 << 20)
        except ConnectionResetError:
            data = b""
        if not data:
            raise ServerClosed(f"EOF with {len(self.buf)} unparsed bytes")
        self.buf += data

    def _need(self, n: int, deadline: float) -> None:
        while len(self.buf) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout("timed out waiting for a frame")
            self._fill(remaining)

    def recv_frame(self, timeout: Optional[float] = None) -> Frame:
        """The next frame from the server; ``socket.timeout`` or ``ServerClosed``
        if none comes."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        self._need(2, deadline)
        b0, b1 = self.buf[0], self.buf[1]
        n = b1 & 0x7F
        pos = 2
        if n == 126:
            self._need(4, deadline)
            n = struct.unpack("!H", self.buf[2:4])[0]
            pos = 4
        elif n == 127:
            self._need(10, deadline)
            n = struct.unpack("!Q", self.buf[2:10])[0]
            pos = 10
        masked = bool(b1 & 0x80)
        key = b""
        if masked:
            self._need(pos + 4, deadline)
            key = bytes(self.buf[pos:pos + 4])
            pos += 4
        self._need(pos + n, deadline)
        payload = bytes(self.buf[pos:pos + n])
        del self.buf[:pos + n]
        if masked:
            payload = mask_bytes(payload, key)
        return Frame(bool(b0 & 0x80), (b0 >> 4) & 7, b0 & 0x0F, payload, masked)

    def recv_frames_until_close(self, timeout: Optional[float] = None) -> List[Frame]:
        """Frames up to and including the first close frame."""
        frames = []
        while True:
            f = self.recv_frame(timeout)
            frames.append(f)
            if f.opcode == CLOSE:
                return frames

    def frames_within(self, timeout: float) -> List[Tuple[int, object]]:
        """What arrives within ``timeout``, up to a close frame or the TCP close,
        summarised for assertions: (opcode, payload), or (CLOSE, code) for a
        close frame, and ("EOF", None) for the TCP close."""
        out: List[Tuple[int, object]] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                f = self.recv_frame(max(deadline - time.monotonic(), 0.001))
            except socket.timeout:
                return out
            except ServerClosed:
                return out + [("EOF", None)]
            if f.opcode == CLOSE:
                return out + [(CLOSE, f.close_code())]
            out.append((f.opcode, f.payload))

    def expect_close(self, timeout: Optional[float] = None) -> Frame:
        """The next frame, which must be a close frame."""
        f = self.recv_frame(timeout)
        assert f.opcode == CLOSE, f"expected a close frame, got {f}"
        return f

    def wait_eof(self, timeout: Optional[float] = None) -> bytes:
        """Wait until the server closes TCP; return whatever arrived before.
        Raises ``socket.timeout`` if the connection stays open."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout("the server kept the connection open")
            try:
                self._fill(remaining)
            except ServerClosed:
                data, self.buf = bytes(self.buf), bytearray()
                return data

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "RawClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def roundtrip_close(client: RawClient, code: int = 1000) -> Frame:
    """Client-initiated closing handshake: send close, get the echo, see TCP end."""
    client.send_close(code)
    reply = client.expect_close()
    client.wait_eof()
    return reply


def chunks(data: bytes, cuts: Iterable[int]) -> List[bytes]:
    """``data`` split at the given offsets (sorted, deduplicated, clipped)."""
    points = sorted({c for c in cuts if 0 < c < len(data)})
    out, prev = [], 0
    for p in points + [len(data)]:
        out.append(data[prev:p])
        prev = p
    return out


# -- The server side of a test: a block that records what user code sees ----

class RecordingBlock:
    """An echo block whose connections each get a ``Recorder`` of their callbacks.

    Events: ("open",), ("message", msg), ("pong", data), ("close", code, reason),
    ("error", exc). A connection is found by the ``id`` query parameter of its
    request (``/path?id=...``), or as the latest one. A text message
    ``"\\x00cmd:close:CODE"`` makes the server start the closing handshake.
    """

    COMMAND = "\x00cmd:"

    def __init__(self, path: str = "/echo", echo: bool = True) -> None:
        self.echo = echo
        self.by_id: dict = {}
        self.all: list = []
        self._cond = threading.Condition()
        self.block = define_block(path, websocket=self._websocket)

    def _websocket(self, ctx):
        rec = Recorder()
        rec.ctx = ctx
        with self._cond:
            self.all.append(rec)
            self.by_id[ctx.request.query.get("id")] = rec
            self._cond.notify_all()

        def on_message(msg):
            rec.add("message", msg)
            if isinstance(msg, str) and msg.startswith(self.COMMAND):
                _, _, arg = msg[len(self.COMMAND):].partition("close:")
                ctx.close(int(arg))
                return
            if self.echo:
                try:
                    ctx.send(msg)
                except ConnectionClosed:
                    # The peer's close crossed this message: no echo is due.
                    rec.add("send-after-close")

        return {"on_open": lambda: rec.add("open"), "on_message": on_message,
                "on_pong": lambda data: rec.add("pong", data),
                "on_close": lambda code, reason: rec.add("close", code, reason),
                "on_error": lambda exc: rec.add("error", exc)}

    def recorder(self, conn_id: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT):
        """The recorder of connection ``conn_id`` (default: the latest), once it exists."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: (conn_id in self.by_id) if conn_id is not None else bool(self.all),
                timeout)
            assert ok, f"no connection {conn_id!r} reached the handler"
            return self.by_id[conn_id] if conn_id is not None else self.all[-1]

    def messages(self) -> list:
        """Every message any connection delivered to on_message."""
        with self._cond:
            recs = list(self.all)
        return [e[1] for r in recs for e in list(r.events) if e[0] == "message"]


# -- An independent UTF-8 validator (RFC 3629, table 3-7 of Unicode) ----------

def _utf8_lead(b: int) -> Optional[Tuple[int, int, int]]:
    """(continuation bytes, range of the first one) for a lead byte, None if invalid."""
    if 0xC2 <= b <= 0xDF:
        return 1, 0x80, 0xBF
    if b == 0xE0:
        return 2, 0xA0, 0xBF
    if 0xE1 <= b <= 0xEC or b in (0xEE, 0xEF):
        return 2, 0x80, 0xBF
    if b == 0xED:  # no surrogates
        return 2, 0x80, 0x9F
    if b == 0xF0:
        return 3, 0x90, 0xBF
    if 0xF1 <= b <= 0xF3:
        return 3, 0x80, 0xBF
    if b == 0xF4:  # nothing past U+10FFFF
        return 3, 0x80, 0x8F
    return None


def utf8_error_at(data: bytes, final: bool = True) -> Optional[int]:
    """Index of the first byte after which ``data`` can no longer be (the
    start of) valid UTF-8; ``len(data)`` if ``final`` and it stops inside a
    character; None if it is valid (or, not final, a valid prefix)."""
    i, n = 0, len(data)
    while i < n:
        b = data[i]
        if b < 0x80:
            i += 1
            continue
        lead = _utf8_lead(b)
        if lead is None:
            return i
        need, lo, hi = lead
        for k in range(1, need + 1):
            j = i + k
            if j >= n:
                return n if final else None
            c = data[j]
            if not (lo <= c <= hi if k == 1 else 0x80 <= c <= 0xBF):
                return j
        i += need + 1
    return None
