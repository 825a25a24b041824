"""The opening handshake (RFC 6455 section 4) against bad, slow and random input.

A request that cannot open a WebSocket gets a proper HTTP error response
(status line, short plain-text reason, Content-Length, Connection: close),
one log line without a traceback, and the TCP close. Slow clients are cut
at handshake_timeout, and max_connections answers 503 without a thread.
"""

from __future__ import annotations

import base64
import logging
import os
import random
import re
import socket
import threading
import time
from typing import List, Optional, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gaman_sync.protocol.handshake import accept_token
from gaman_sync.testing import BINARY, PING, PONG, RawPeer, handshake_request

from .conftest import WAIT
from .helpers import RecordingBlock

MAX_BODY = 256     # bytes: what "a short reason" may take
PING_FRAME = bytes([0x80 | PING, 0x82, 0, 0, 0, 0]) + b"hi"  # masked with a zero key
MAX_LOG_LINE = 300  # characters


class Exchange:
    """One raw HTTP exchange: what the server answered and what it logged."""

    def __init__(self, raw: bytes, port: int, records: List[logging.LogRecord]) -> None:
        self.raw = raw
        self.local_port = port
        self.records = records
        self.status: Optional[int] = None
        self.headers: List[Tuple[str, str]] = []
        self.body = b""
        if raw:
            head, sep, self.body = raw.partition(b"\r\n\r\n")
            assert sep, f"an incomplete HTTP response: {raw[:300]!r}"
            lines = head.decode("latin-1").split("\r\n")
            m = re.fullmatch(r"HTTP/1\.1 (\d{3}) (\S.*)", lines[0])
            assert m, f"a bad status line: {lines[0]!r}"
            self.status = int(m.group(1))
            for line in lines[1:]:
                name, colon, value = line.partition(":")
                assert colon and name and name == name.strip(), f"bad header line {line!r}"
                self.headers.append((name.lower(), value.strip()))

    def header(self, name: str) -> Optional[str]:
        values = [v for k, v in self.headers if k == name.lower()]
        return ", ".join(values) if values else None

    def log_lines(self) -> List[logging.LogRecord]:
        """The log records about this connection (they name its address)."""
        tag = re.compile(rf"127\.0\.0\.1:{self.local_port}\b")
        return [r for r in self.records if tag.search(r.getMessage())]


def exchange(server, data: bytes, caplog, half_close: bool = False,
             pieces: Optional[List[int]] = None, timeout: float = 5.0) -> Exchange:
    """Send ``data`` (cut at ``pieces``), read everything until the server
    closes TCP, and collect the server's log records."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        port = sock.getsockname()[1]
        cuts = [0, *sorted(pieces or []), len(data)]
        try:
            for a, b in zip(cuts, cuts[1:]):
                if b > a:
                    sock.sendall(data[a:b])
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and close before it has read it all
        raw = b""
        deadline = time.monotonic() + timeout
        while True:
            sock.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            except socket.timeout:
                raise AssertionError(f"the server neither answered nor closed: {raw!r}") from None
            if not chunk:
                break
            raw += chunk
    return Exchange(raw, port, list(caplog.records))


def assert_no_traceback(records: List[logging.LogRecord]) -> None:
    bad = [r for r in records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


def assert_rejected(ex: Exchange, status: int) -> None:
    """A proper, short HTTP error response, one log line, then the TCP close."""
    assert ex.status == status, ex.raw[:400]
    assert ex.header("content-length") == str(len(ex.body))
    assert "close" in [t.strip().lower() for t in ex.header("connection").split(",")]
    assert ex.header("content-type").startswith("text/plain")
    assert len(ex.body) <= MAX_BODY, f"a {len(ex.body)}-byte reason: {ex.body[:120]!r}..."
    assert ex.body.startswith(str(status).encode())
    lines = ex.log_lines()
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert lines[0].levelno <= logging.WARNING
    assert len(lines[0].getMessage()) <= MAX_LOG_LINE, lines[0].getMessage()[:200]
    assert_no_traceback(ex.records)


@pytest.fixture
def hs(make_server, caplog):
    """A recording echo server for handshake tests, with the log captured."""
    caplog.set_level(logging.INFO, logger="gaman_sync")

    def factory(**options):
        options.setdefault("ping_interval", None)
        options.setdefault("close_timeout", 1.0)
        rb = RecordingBlock("/echo")
        return make_server(rb.block, **options), rb

    return factory


def still_serves(server) -> None:
    with RawPeer.open("127.0.0.1", server.port, "/echo") as client:
        client.send_frame(BINARY, b"alive")
        f = client.recv_frame()
        assert (f.opcode, f.payload) == (BINARY, b"alive")


def replace_header(request: bytes, name: str, value: Optional[str]) -> bytes:
    """``request`` with header ``name`` set to ``value`` (None: removed)."""
    lines = request.split(b"\r\n")
    out = [ln for ln in lines if not ln.lower().startswith(name.lower().encode() + b":")]
    if value is not None:
        out.insert(1, f"{name}: {value}".encode("latin-1"))
    return b"\r\n".join(out)


GOOD = handshake_request("/echo", key=b"dGhlIHNhbXBsZSBub25jZQ==")

BAD_REQUESTS = {
    "garbage": (b"\x00\x01\x02 not http\r\n\r\n", 400),
    "no-request-line": (b"\r\n\r\n", 400),
    "bad-request-line": (b"GET\r\nHost: x\r\n\r\n", 400),
    "bad-header-line": (GOOD.replace(b"Host:", b"Ho st:"), 400),
    "nul-in-header": (replace_header(GOOD, "X-Bad", "a\x00b"), 400),
    "missing-key": (replace_header(GOOD, "Sec-WebSocket-Key", None), 400),
    "repeated-key": (GOOD.replace(b"\r\n\r\n", b"\r\nSec-WebSocket-Key: "
                                  b"dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"), 400),
    "key-not-base64": (replace_header(GOOD, "Sec-WebSocket-Key", "!!not base64!!"), 400),
    "key-15-bytes": (replace_header(GOOD, "Sec-WebSocket-Key",
                                    base64.b64encode(b"x" * 15).decode()), 400),
    "key-17-bytes": (replace_header(GOOD, "Sec-WebSocket-Key",
                                    base64.b64encode(b"x" * 17).decode()), 400),
    "http-1.0": (GOOD.replace(b"HTTP/1.1", b"HTTP/1.0"), 400),
    "no-connection-upgrade": (replace_header(GOOD, "Connection", "keep-alive"), 400),
    "no-upgrade": (replace_header(GOOD, "Upgrade", None), 426),
    "version-8": (replace_header(GOOD, "Sec-WebSocket-Version", "8"), 426),
    "version-14": (replace_header(GOOD, "Sec-WebSocket-Version", "14"), 426),
    "no-version": (replace_header(GOOD, "Sec-WebSocket-Version", None), 426),
    "post": (GOOD.replace(b"GET", b"POST", 1), 405),
    "put": (GOOD.replace(b"GET", b"PUT", 1), 405),
    "delete": (GOOD.replace(b"GET", b"DELETE", 1), 405),
    "unknown-path": (GOOD.replace(b"/echo", b"/nowhere", 1), 404),
    "long-garbage-line": (b"\xff" * 8000 + b"\r\n\r\n", 400),
    "long-bad-header": (replace_header(GOOD, "X-Long", "\x00" * 8000), 400),
    "transfer-encoding-gzip": (replace_header(GOOD, "Transfer-Encoding", "gzip"), 501),
    "obs-fold": (GOOD.replace(b"\r\n\r\n", b"\r\nX-A: a\r\n b\r\n\r\n"), 400),
    "obs-text-in-target": (GOOD.replace(b"/echo", b"/\xe9cho", 1), 400),
    "content-length-not-digits": (replace_header(GOOD, "Content-Length", "0\xa0"), 400),
}


@pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
def test_bad_request_gets_a_short_http_error_once_logged(hs, caplog, name):
    server, rb = hs()
    data, status = BAD_REQUESTS[name]
    ex = exchange(server, data, caplog)
    assert_rejected(ex, status)
    if status == 426:
        assert ex.header("sec-websocket-version") == "13"
    if status == 405:
        assert ex.header("allow") == "GET"
    assert rb.all == [], "a rejected request reached the block's handler"
    still_serves(server)


def test_good_request_is_accepted(hs, caplog):
    server, _ = hs()
    ex = exchange(server, GOOD, caplog, half_close=True)
    assert ex.status == 101
    assert ex.header("sec-websocket-accept") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455 1.3
    assert ex.header("upgrade").lower() == "websocket"
    assert "upgrade" in ex.header("connection").lower()


def test_request_sent_one_byte_at_a_time_is_accepted(hs, caplog):
    server, _ = hs()
    ex = exchange(server, GOOD + PING_FRAME, caplog, half_close=True,
                  pieces=list(range(1, len(GOOD) + 1)))
    assert ex.status == 101
    assert ex.header("sec-websocket-accept") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert ex.body.startswith(bytes([0x80 | PONG, 2]) + b"hi")  # the frame after it, read


def test_blank_line_split_across_two_reads_is_accepted(hs, caplog):
    """``\r\n\r`` in one read, ``\n`` in the next: the end of the head is
    found across the two. The server must not answer the first part: the
    wait for its silence is also what makes the second part a later read."""
    server, _ = hs()
    with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert GOOD.endswith(b"\r\n\r\n")
        sock.sendall(GOOD[:-1])
        sock.settimeout(0.3)
        with pytest.raises(socket.timeout):
            sock.recv(100)  # no answer to a head without its end
        sock.settimeout(WAIT)
        sock.sendall(b"\n")
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            assert chunk, head
            head += chunk
    assert head.startswith(b"HTTP/1.1 101 "), head
    assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head
    assert_no_traceback(caplog.records)


def test_request_that_starts_badly_is_answered_at_once(hs, caplog):
    """A TLS hello sent to a plain port cannot start a request: 400 at once,
    not at the handshake's timeout (the client does not close its side)."""
    server, rb = hs(handshake_timeout=WAIT * 3)
    # exchange() fails unless the server answers and closes within WAIT.
    ex = exchange(server, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", caplog,
                  timeout=WAIT)
    assert_rejected(ex, 400)
    assert rb.all == []
    still_serves(server)


def test_headers_over_max_request_size_get_431(hs, caplog):
    server, rb = hs(max_request_size=1024)
    # The whole request in one write, so the server may well read it whole:
    # a complete request is no excuse to skip the limit.
    data = replace_header(GOOD, "X-Padding", "p" * 2000)
    ex = exchange(server, data, caplog)
    assert_rejected(ex, 431)
    assert rb.all == []
    still_serves(server)


def test_unfinished_headers_over_max_request_size_get_431(hs, caplog):
    server, _rb = hs(max_request_size=1024)
    data = replace_header(GOOD, "X-Padding", "p" * 2000)[:1500]  # no end of headers
    ex = exchange(server, data, caplog)
    assert_rejected(ex, 431)
    still_serves(server)


def test_headers_just_under_max_request_size_pass(hs, caplog):
    server, _ = hs(max_request_size=1024)
    data = replace_header(GOOD, "X-Padding", "p" * 700)
    assert len(data) < 1024
    ex = exchange(server, data, caplog, half_close=True)
    assert ex.status == 101


def test_client_that_closes_before_a_request_costs_nothing(hs, caplog):
    server, _rb = hs()
    ex = exchange(server, b"", caplog, half_close=True)
    assert ex.raw == b""
    ex = exchange(server, b"GET /echo HTTP/1.1\r\nHost: x\r\n", caplog, half_close=True)
    assert ex.status == 400  # a truncated request is answered, to a reader still there
    assert_no_traceback(ex.records)
    still_serves(server)


# -- Slow and silent clients ------------------------------------------------------

def test_silent_client_is_cut_at_the_handshake_timeout(hs, caplog):
    timeout = 1.0
    server, _ = hs(handshake_timeout=timeout)
    with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as sock:
        port = sock.getsockname()[1]
        start = time.monotonic()
        try:
            assert sock.recv(100) == b""
        except ConnectionResetError:
            pass
        elapsed = time.monotonic() - start
    assert timeout * 0.8 <= elapsed < timeout + 2.0, elapsed
    lines = [r for r in caplog.records if re.search(rf":{port}\b", r.getMessage())]
    assert len(lines) == 1 and "handshake" in lines[0].getMessage(), lines
    assert_no_traceback(caplog.records)


def test_trickling_client_is_cut_at_the_handshake_timeout(hs, caplog):
    """One byte at a time (every 0.2 s here, scaled down from one a second):
    each byte must not restart the clock."""
    timeout = 1.0
    server, _ = hs(handshake_timeout=timeout)
    request = GOOD
    with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as sock:
        start = time.monotonic()
        sent, closed_at = 0, None
        while sent < len(request) and time.monotonic() - start < timeout + 3.0:
            try:
                sock.sendall(request[sent:sent + 1])
            except (BrokenPipeError, ConnectionResetError):
                closed_at = time.monotonic()
                break
            sent += 1
            # The pause between bytes doubles as the wait for the server's close.
            sock.settimeout(0.2)
            try:
                if sock.recv(100) == b"":
                    closed_at = time.monotonic()
                    break
            except socket.timeout:
                continue
            except ConnectionResetError:
                closed_at = time.monotonic()
                break
    assert closed_at is not None, "the server kept a trickling handshake open"
    assert sent < len(request)
    elapsed = closed_at - start
    assert timeout * 0.8 <= elapsed < timeout + 2.0, elapsed
    assert_no_traceback(caplog.records)
    still_serves(server)


def test_max_connections_answers_503_without_a_thread(hs, caplog):
    server, rb = hs(max_connections=3, handshake_timeout=WAIT)
    # Handshakes in progress count: two silent sockets and one open WebSocket.
    silent = [socket.create_connection(("127.0.0.1", server.port), timeout=WAIT)
              for _ in range(2)]
    client = RawPeer.open("127.0.0.1", server.port, "/echo")
    try:
        rb.recorder().wait_kind("open")
        threads = set(threading.enumerate())
        for _ in range(3):
            ex = exchange(server, GOOD, caplog)
            assert ex.status == 503, ex.raw[:200]
            assert ex.header("retry-after") is not None
            assert ex.header("content-length") == str(len(ex.body))
            new = set(threading.enumerate()) - threads
            assert not new, f"threads for refused connections: {new}"
        assert_no_traceback(caplog.records)
        # One warning for the three refusals, not one each: a full server is
        # asked many times a second (health checks too).
        full = [r for r in caplog.records if "max_connections" in r.getMessage()]
        assert len(full) == 1 and full[0].levelname == "WARNING", full
        assert len(rb.all) == 1
        # A slot frees up: the next client is served again.
        thread = rb.recorder().ctx.thread
        client.send_close(1000)
        client.expect_close()
        client.wait_eof()
        thread.join(WAIT)
        assert not thread.is_alive()
        for s in silent:  # their handshakes count against max_connections too
            s.close()
        still_serves(server)
        again = [r.getMessage() for r in caplog.records if "accepting connections again" in
                 r.getMessage()]
        assert again and "3 refused" in again[0], again
    finally:
        client.close()
        for s in silent:
            s.close()


# -- Fuzzing the request parser -------------------------------------------------

def mutate(request: bytes, ops) -> bytes:
    data = bytearray(request)
    for kind, where, arg in ops:
        i = int(where * len(data)) if data else 0
        if kind == "flip" and data:
            data[min(i, len(data) - 1)] = arg[0] if arg else 0
        elif kind == "insert":
            data[i:i] = arg
        elif kind == "delete":
            del data[i:i + 1 + len(arg)]
        elif kind == "truncate":
            del data[i:]
        elif kind == "dup-line":
            lines = bytes(data).split(b"\r\n")
            k = min(int(where * len(lines)), len(lines) - 1)
            lines.insert(k, lines[k])
            data = bytearray(b"\r\n".join(lines))
        elif kind == "drop-line":
            lines = bytes(data).split(b"\r\n")
            if len(lines) > 1:
                del lines[min(int(where * len(lines)), len(lines) - 1)]
            data = bytearray(b"\r\n".join(lines))
        elif kind == "lf-only":
            data = bytearray(bytes(data).replace(b"\r\n", b"\n"))
        elif kind == "swap-case":
            data = bytearray(bytes(data).swapcase())
    return bytes(data)


mutation = st.tuples(
    st.sampled_from(["flip", "insert", "delete", "truncate", "dup-line", "drop-line",
                     "lf-only", "swap-case"]),
    st.floats(0, 1, exclude_max=True),
    st.binary(max_size=12) | st.sampled_from([b"\r\n", b":", b" ", b"\x00", b"\xff",
                                              b"GET", b"websocket", b"13"]))
fuzz_input = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=200).map(lambda b: b + b"\r\n\r\n"),
    st.lists(mutation, min_size=1, max_size=4).map(lambda ops: mutate(GOOD, ops)),
)


def keys_in(request: bytes) -> List[bytes]:
    return [line.split(b":", 1)[1].strip() for line in request.split(b"\n")
            if line.lower().startswith(b"sec-websocket-key:")]


@settings(max_examples=200)
@given(data=fuzz_input)
def test_fuzzed_requests_get_an_http_error_or_a_close(hs, caplog, data):
    # One server for every example: the fixture is set up once per test, and
    # the server must survive them all.
    if not hasattr(hs, "fuzz_server"):
        hs.fuzz_server = hs(handshake_timeout=2.0, max_request_size=2048)
    server, _rb = hs.fuzz_server
    caplog.clear()
    ex = exchange(server, data, caplog, half_close=True)
    assert_no_traceback(ex.records)
    assert len(ex.log_lines()) <= 1, [r.getMessage() for r in ex.log_lines()]
    if ex.status == 101:
        expected = {accept_token(k).decode() for k in keys_in(data)}
        assert ex.header("sec-websocket-accept") in expected
    elif ex.status is not None:
        assert 400 <= ex.status < 600, ex.raw[:200]
        assert ex.header("content-length") == str(len(ex.body))
        assert len(ex.body) <= MAX_BODY, f"a {len(ex.body)}-byte reason: {ex.body[:120]!r}..."
        assert len(ex.log_lines()) == 1
    # (No status: closed without a word, for a request that never came whole.)
    still_serves(server)


def test_server_serves_after_the_fuzzing(hs, caplog):
    server, _ = hs(handshake_timeout=2.0)
    rng = random.Random(6455)
    for _ in range(30):
        data = mutate(GOOD, [(rng.choice(["flip", "insert", "delete", "dup-line"]),
                              rng.random(), os.urandom(rng.randrange(8)))])
        exchange(server, data, caplog, half_close=True)
    assert_no_traceback(caplog.records)
    still_serves(server)
    with RawPeer.open("127.0.0.1", server.port, "/echo") as client:
        client.send_frame(PING, b"ok")
        assert client.recv_frame().opcode == PONG
