"""RFC 6455 conformance of the server, section by section, over real sockets.

Every test drives a raw client (gaman_sync.testing.raw) that writes exact bytes,
and checks both what comes back on the wire and what the handler saw. The
cases follow the RFC's sections and the areas of the Autobahn|Testsuite
server cases (1-7, 9), with the strict reading: the exact close code, and the
server closing TCP after the close frame.
"""

from __future__ import annotations

import os
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gaman_sync.strategies import control_payloads, fragmentations, messages
from gaman_sync.testing import (
    BINARY,
    CLOSE,
    CONT,
    PING,
    PONG,
    TEXT,
    RawPeer,
    chunks,
    close_frame,
    frame,
)

from .conftest import WAIT
from .helpers import RecordingBlock, utf8_error_at

MiB = 1024 * 1024
FAST = 2.0  # seconds: what "at once" may take on a loaded machine

# The codes a peer may send (RFC 6455 7.4.1 and 7.4.2, plus the IANA registry:
# 1012-1014 are assigned, so they are not "reserved and unassigned").
VALID_CODES = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014,
               3000, 3999, 4000, 4999]
INVALID_CODES = [0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535]


@pytest.fixture
def serve(make_server):
    """``serve(**options)``: a server with a recording echo block at /echo."""

    def factory(**options):
        options.setdefault("ping_interval", None)  # no keepalive ping among our frames
        options.setdefault("close_timeout", 2.0)
        rb = RecordingBlock("/echo")
        server = make_server(rb.block, **options)
        return server, rb

    return factory


@pytest.fixture
def echo(serve):
    return serve()


def open_client(server, **kw) -> RawPeer:
    path = kw.pop("path", "/echo")
    return RawPeer.open("127.0.0.1", server.port, path, **kw)


def text_of_size(n: int) -> str:
    """A text of exactly ``n`` bytes of UTF-8, mixing 1- to 4-byte characters."""
    unit = "aé€😀"  # 1 + 2 + 3 + 4 bytes
    s = unit * (n // 10)
    rest = n - len(s.encode("utf-8"))
    return s + "a" * rest


def expect_echo(client: RawPeer, opcode: int, payload: bytes, timeout=None) -> None:
    f = client.recv_frame(timeout)
    assert (f.opcode, f.fin, f.rsv, f.masked) == (opcode, True, 0, False), \
        (f.opcode, f.fin, f.rsv, f.masked, f.payload[:80])
    assert len(f.payload) == len(payload)
    assert f.payload == payload


def expect_failure(client: RawPeer, code: int, rb: RecordingBlock = None):
    """The server fails the connection: a close frame with ``code``, nothing else
    after it, then the TCP close; ``on_close`` reports the same code."""
    f = client.expect_close()
    assert f.close_code() == code, (f.close_code(), f.close_reason())
    f.close_reason().decode("utf-8")  # a reason is UTF-8 (RFC 6455 5.5.1)
    assert client.wait_eof() == b"", "the server sent something after its close frame"
    # Our side of the TCP close, so that the server need not wait for it.
    client.close()
    if rb is not None:
        events = rb.recorder().wait_kind("close")
        assert events[-1][:2] == ("close", code)
    return f


# -- 4. The opening handshake (the positive case; errors: test_handshake.py) --

def test_4_2_2_accept_key_and_frames_in_the_handshake_segment(echo):
    server, rb = echo
    # The first frames may arrive in the same segment as the request.
    client = open_client(server, after=frame(TEXT, "early") + frame(PING, b"p"))
    expect_echo(client, TEXT, b"early")
    expect_echo(client, PONG, b"p")
    assert client.close_handshake().close_code() == 1000
    assert rb.recorder().wait_kind("close")[0] == ("open",)


# -- 5.2 Base framing: every length class, echoed exactly ---------------------

LENGTHS = [0, 1, 125, 126, 127, 65535, 65536, 65537, 200_000]


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("opcode", [TEXT, BINARY])
def test_5_2_every_length_class_echoes(echo, opcode, n):
    server, _ = echo
    payload = text_of_size(n).encode() if opcode == TEXT else os.urandom(n)
    with open_client(server) as client:
        client.send_frame(opcode, payload)
        expect_echo(client, opcode, payload)
        assert client.close_handshake().close_code() == 1000


@pytest.mark.parametrize("opcode", [TEXT, BINARY])
def test_5_2_several_mib_up_to_the_limit(serve, opcode):
    limit = 4 * MiB
    server, _rb = serve(max_message_size=limit)
    payload = text_of_size(limit).encode() if opcode == TEXT else os.urandom(limit)
    with open_client(server, timeout=WAIT) as client:
        client.send_frame(opcode, payload)
        expect_echo(client, opcode, payload)
        # The same size again in fragments of 1 MiB, and a 3 MiB one.
        parts = chunks(payload, range(MiB, limit, MiB))
        for i, part in enumerate(parts):
            client.send_frame(opcode if i == 0 else CONT, part, fin=i == len(parts) - 1)
        expect_echo(client, opcode, payload)
        smaller = text_of_size(3 * MiB).encode() if opcode == TEXT else payload[:3 * MiB]
        client.send_frame(opcode, smaller)
        expect_echo(client, opcode, smaller)
        assert client.close_handshake().close_code() == 1000


def test_5_2_one_byte_at_a_time_behaves_as_one_segment(echo):
    server, _ = echo
    stream = (frame(TEXT, "frag", fin=False) + frame(PING, b"between")
              + frame(CONT, "mented ü", fin=True) + frame(BINARY, bytes(range(200)))
              + frame(PONG, b"unsolicited") + frame(TEXT, "") + close_frame(4002, "bye"))
    replies = []
    for bytewise in (False, True):
        with open_client(server) as client:
            if bytewise:
                client.send_bytewise(stream)
            else:
                client.send(stream)
            got = client.recv_frames_until_close()
            assert client.wait_eof() == b""
            replies.append([(f.opcode, f.payload) for f in got])
    assert replies[0] == replies[1]
    assert replies[0] == [(PONG, b"between"), (TEXT, "fragmented ü".encode()),
                          (BINARY, bytes(range(200))), (TEXT, b""),
                          (CLOSE, struct.pack("!H", 4002) + b"bye")]


def test_5_2_many_frames_in_one_segment(echo):
    server, rb = echo
    n = 300
    stream = b"".join(frame(TEXT, f"m{i}") + frame(PING, str(i).encode()) for i in range(n))
    with open_client(server) as client:
        client.send(stream)
        for i in range(n):
            expect_echo(client, TEXT, f"m{i}".encode())
            expect_echo(client, PONG, str(i).encode())
        assert client.close_handshake().close_code() == 1000
    events = rb.recorder().wait_kind("close")
    assert [e[1] for e in events if e[0] == "message"] == [f"m{i}" for i in range(n)]


def test_5_2_64_bit_length_with_the_high_bit_set_fails(echo):
    server, rb = echo
    with open_client(server) as client:
        client.send(bytes([0x82, 0xFF]) + struct.pack("!Q", 1 << 63) + os.urandom(4))
        expect_failure(client, 1002, rb)


# -- 5.2 Reserved bits, 5.3 masking, reserved opcodes -------------------------

@pytest.mark.parametrize("rsv", range(1, 8))
@pytest.mark.parametrize("opcode", [TEXT, BINARY, PING, CLOSE])
def test_5_2_reserved_bits_without_extension_fail(echo, rsv, opcode):
    server, rb = echo
    payload = struct.pack("!H", 1000) if opcode == CLOSE else b"x"
    with open_client(server) as client:
        client.send_frame(opcode, payload, rsv=rsv)
        expect_failure(client, 1002, rb)
    assert rb.messages() == []


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 11, 12, 13, 14, 15])
def test_5_2_reserved_opcodes_fail(echo, opcode):
    server, rb = echo
    with open_client(server) as client:
        client.send_frame(opcode, b"reserved")
        expect_failure(client, 1002, rb)
    assert rb.messages() == []


@pytest.mark.parametrize("opcode", [TEXT, BINARY, PING, PONG, CLOSE])
def test_5_3_unmasked_client_frame_fails(echo, opcode):
    server, rb = echo
    payload = struct.pack("!H", 1000) if opcode == CLOSE else b"unmasked"
    with open_client(server) as client:
        client.send_frame(opcode, payload, mask=False)
        expect_failure(client, 1002, rb)
    assert rb.messages() == []


# The offending frames of RFC 6455 5.2-5.5, each after valid traffic in the
# same write: the valid part is handled in full first, nothing after it is.
OFFENDERS = {
    "rsv1": frame(TEXT, "bad", rsv=4),
    "reserved-opcode": frame(5, b"bad"),
    "unmasked": frame(TEXT, "bad", mask=False),
    "orphan-continuation": frame(CONT, "bad"),
    "data-inside-message": frame(TEXT, "x", fin=False) + frame(BINARY, b"bad"),
    "control-over-125": frame(PING, b"p" * 126),
    "fragmented-control": frame(PING, b"bad", fin=False),
    "invalid-close-code": close_frame(1004),
}


@pytest.mark.parametrize("name", sorted(OFFENDERS))
def test_5_valid_traffic_before_a_bad_frame_is_handled_first(echo, name):
    server, rb = echo
    before = frame(TEXT, "before") + frame(PING, b"ping-before") + frame(BINARY, b"\x00b")
    after = frame(TEXT, "after") + frame(PING, b"ping-after")
    with open_client(server) as client:
        client.send(before + OFFENDERS[name] + after)
        expect_echo(client, TEXT, b"before")
        expect_echo(client, PONG, b"ping-before")
        expect_echo(client, BINARY, b"\x00b")
        expect_failure(client, 1002, rb)
    assert [e for e in rb.recorder().events if e[0] == "message"] == [
        ("message", "before"), ("message", b"\x00b")]


# -- 5.4 Fragmentation --------------------------------------------------------

@settings(max_examples=60)
@given(data=st.data(), message=messages(max_size=3000))
def test_5_4_any_fragmentation_echoes_the_whole_message(echo, data, message):
    server, _rb = echo
    fragments = data.draw(fragmentations(message), label="fragments")
    pings = data.draw(st.lists(control_payloads(), max_size=len(fragments) - 1), label="pings")
    stream = b""
    for i, fragment in enumerate(fragments):
        stream += fragment.wire
        if i < len(pings):
            stream += frame(PING, pings[i])  # control frames may sit between fragments
    with open_client(server) as client:
        client.send(stream)
        for ping in pings:
            expect_echo(client, PONG, ping)
        expect_echo(client, fragments[0].opcode, b"".join(f.payload for f in fragments))
        assert client.close_handshake().close_code() == 1000


def test_5_4_empty_fragments(echo):
    server, _ = echo
    with open_client(server) as client:
        client.send(frame(TEXT, "", fin=False) + frame(CONT, "", fin=False)
                    + frame(CONT, "x", fin=False) + frame(CONT, "", fin=True))
        expect_echo(client, TEXT, b"x")
        client.send(frame(BINARY, b"", fin=False) + frame(CONT, b"", fin=True))
        expect_echo(client, BINARY, b"")
        assert client.close_handshake().close_code() == 1000


@pytest.mark.parametrize("fin", [True, False])
def test_5_4_continuation_with_nothing_to_continue_fails(echo, fin):
    server, rb = echo
    with open_client(server) as client:
        client.send_frame(CONT, "orphan", fin=fin)
        expect_failure(client, 1002, rb)
    assert rb.messages() == []


@pytest.mark.parametrize("first,second", [(TEXT, TEXT), (TEXT, BINARY), (BINARY, TEXT),
                                          (BINARY, BINARY)])
def test_5_4_new_data_frame_inside_an_unfinished_message_fails(echo, first, second):
    server, rb = echo
    with open_client(server) as client:
        client.send(frame(first, b"one", fin=False) + frame(second, b"two"))
        expect_failure(client, 1002, rb)
    assert rb.messages() == []


def test_5_4_new_data_frame_inside_a_message_is_1002_even_past_the_limit(serve):
    """A data frame that is not a continuation is no part of the unfinished
    message: it is a protocol error, not that message growing too big. The
    answer must not depend on how TCP cut the bytes either (it did: 1009
    when the header arrived alone, 1002 when header and payload came together)."""
    server, rb = serve(max_message_size=1000)
    with open_client(server) as client:
        client.send_frame(BINARY, b"a" * 600, fin=False)
        client.send_frame(PING, b"sync")
        expect_echo(client, PONG, b"sync")
        second = frame(BINARY, b"b" * 500)
        client.send(second[:8])  # its header (2 + 2 length + 4 mask) alone
        # Watch what the header alone brings: nothing yet, or the 1002.
        early = client.frames_within(0.5)
        assert early in ([], [(CLOSE, 1002)]), early
        if not early:
            client.send(second[8:])
            assert client.frames_within(FAST) == [(CLOSE, 1002)]
        assert client.wait_eof() == b""
    assert rb.messages() == []


def test_5_4_fragments_arriving_separately_with_pings_between(echo):
    server, rb = echo
    with open_client(server) as client:
        client.send_frame(TEXT, "Hello, ", fin=False)
        client.send_frame(PING, b"1")
        expect_echo(client, PONG, b"1")
        client.send_frame(CONT, "World", fin=False)
        client.send_frame(PONG, b"unsolicited")
        client.send_frame(PING, b"2")
        expect_echo(client, PONG, b"2")
        client.send_frame(CONT, "!", fin=True)
        expect_echo(client, TEXT, b"Hello, World!")
        assert client.close_handshake().close_code() == 1000
    assert ("pong", b"unsolicited") in rb.recorder().wait_kind("close")


# -- 5.5 Control frames -------------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 124, 125])
def test_5_5_2_ping_is_answered_with_an_identical_pong(echo, n):
    server, _ = echo
    payload = os.urandom(n)
    with open_client(server) as client:
        client.send_frame(PING, payload)
        expect_echo(client, PONG, payload)
        assert client.close_handshake().close_code() == 1000


@pytest.mark.parametrize("opcode", [PING, PONG, CLOSE])
@pytest.mark.parametrize("n,form", [(126, None), (125, 2), (65536, None)])
def test_5_5_control_frame_over_125_bytes_fails(echo, opcode, n, form):
    server, _rb = echo
    payload = struct.pack("!H", 1000) + b"r" * (n - 2) if opcode == CLOSE else b"p" * n
    with open_client(server) as client:
        # With a 16-bit length form, even 125 bytes announce themselves as "long".
        client.send_frame(opcode, payload, length_form=form)
        frames = client.recv_frames_until_close()
        assert [f.opcode for f in frames] == [CLOSE], "no pong for an oversized ping"
        assert frames[-1].close_code() == 1002
        assert client.wait_eof() == b""


@pytest.mark.parametrize("opcode", [PING, PONG, CLOSE])
def test_5_5_fragmented_control_frame_fails(echo, opcode):
    server, rb = echo
    payload = struct.pack("!H", 1000) if opcode == CLOSE else b"frag"
    with open_client(server) as client:
        client.send(frame(opcode, payload, fin=False) + frame(CONT, b"ment"))
        expect_failure(client, 1002, rb)


@pytest.mark.parametrize("n", [0, 10, 125])
def test_5_5_3_unsolicited_pong_is_accepted_and_reaches_on_pong(echo, n):
    server, rb = echo
    payload = os.urandom(n)
    with open_client(server) as client:
        client.send_frame(PONG, payload)
        client.send_frame(TEXT, "still open")
        expect_echo(client, TEXT, b"still open")
        rec = rb.recorder()
        rec.wait_kind("pong")
        assert client.close_handshake().close_code() == 1000
    events = rec.wait_kind("close")
    assert [e for e in events if e[0] != "message"] == [
        ("open",), ("pong", payload), ("close", 1000, "")]


def test_5_5_2_ping_flurry_each_answered_in_order(echo):
    server, _ = echo
    payloads = [os.urandom(i % 126) for i in range(200)]
    with open_client(server) as client:
        client.send(b"".join(frame(PING, p) for p in payloads))
        for p in payloads:
            expect_echo(client, PONG, p)
        assert client.close_handshake().close_code() == 1000


# -- 5.6 / 8.1 Text and UTF-8 -------------------------------------------------

VALID_TEXTS = [
    "",
    "ASCII only",
    "κόσμε",
    "Hello-µ@ßöäüàá-UTF-8!!",
    # One character from each Unicode plane in use, the first and last
    # scalar values, noncharacters (valid in UTF-8), and the edges of the
    # surrogate gap.
    "\u0000\u007f\u0080\u07ff\u0800\uffff\U00010000\U0010ffff",
    "\U0001f600\U00020000\U00030000\U000e0001\U000f0000\U00100000",
    "\ud7ff\ue000\ufffd\ufeff\ufffe",
    "".join(chr(c) for c in range(0x20, 0x10FFFF, 4099) if not 0xD800 <= c <= 0xDFFF),
]


@pytest.mark.parametrize("text", VALID_TEXTS, ids=range(len(VALID_TEXTS)))
def test_8_1_valid_text_round_trips(echo, text):
    server, rb = echo
    data = text.encode("utf-8")
    with open_client(server) as client:
        client.send_frame(TEXT, data)
        expect_echo(client, TEXT, data)
        # And split into one-byte fragments, cutting every character.
        parts = chunks(data, range(1, len(data))) or [b""]
        client.send(b"".join(frame(TEXT if i == 0 else CONT, p, fin=i == len(parts) - 1)
                             for i, p in enumerate(parts)))
        expect_echo(client, TEXT, data)
        assert client.close_handshake().close_code() == 1000
    assert [e[1] for e in rb.recorder().events if e[0] == "message"] == [text, text]


INVALID_UTF8 = [
    b"\xff", b"\xfe", b"\xc0\xaf", b"\xc1\xbf", b"\xe0\x80\xaf", b"\xe0\x9f\xbf",
    b"\xf0\x80\x80\xaf", b"\xf0\x8f\xbf\xbf", b"\xf8\x88\x80\x80\xaf",
    b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xed\xa0\x80\xed\xb0\x80",
    b"\xf4\x90\x80\x80", b"\xf5\x80\x80\x80", b"\x80", b"\xbf", b"\xc2\x41",
    b"\xe1\x80\x41", b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited",
]


@pytest.mark.parametrize("bad", INVALID_UTF8, ids=lambda b: b.hex())
def test_8_1_invalid_text_closes_with_1007(echo, bad):
    server, rb = echo
    with open_client(server) as client:
        client.send_frame(TEXT, b"ok " + bad + b" tail")
        expect_failure(client, 1007, rb)
    assert rb.messages() == []


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_8_1_text_ending_inside_a_character_closes_with_1007(echo, cut):
    server, rb = echo
    with open_client(server) as client:
        client.send_frame(TEXT, "ab😀".encode()[:2 + cut])
        expect_failure(client, 1007, rb)


@pytest.mark.parametrize("bad", INVALID_UTF8, ids=lambda b: b.hex())
def test_8_1_fragmented_text_fails_fast_at_the_invalid_fragment(echo, bad):
    """RFC 6455 8.1 / Autobahn 6.4: the server must not wait for the end of the
    message. The fragment that ends right at the byte that makes the text
    invalid (found by an independent validator) is the last thing sent;
    the client then waits, sending nothing, for the 1007."""
    server, _rb = echo
    data = "κόσμε ".encode() + bad + b" and more"
    at = utf8_error_at(data, final=False)
    assert at is not None
    with open_client(server) as client:
        client.send_frame(TEXT, data[:6], fin=False)
        client.send_frame(PING, b"sync")
        expect_echo(client, PONG, b"sync")
        client.send_frame(CONT, data[6:at + 1], fin=False)
        # A ping after the invalid fragment: an answer to it would show that
        # the server still took the message for valid.
        client.send_frame(PING, b"too late")
        assert client.frames_within(FAST) == [(CLOSE, 1007)]
        assert client.wait_eof() == b""


@pytest.mark.parametrize("bad", [b"\xf4\x90\x80\x80", b"\xed\xa0\x80", b"\xc0\xaf"],
                         ids=lambda b: b.hex())
def test_8_1_single_frame_fails_fast_before_its_end(echo, bad):
    """One frame announcing more than is sent: the invalid bytes alone must fail it."""
    server, _rb = echo
    data = b"valid " + bad
    at = utf8_error_at(data, final=False)
    with open_client(server) as client:
        head = frame(TEXT, data + b"x" * 100)
        header_len = len(head) - len(data) - 100
        client.send(head[:header_len + at + 1])
        assert client.frames_within(FAST) == [(CLOSE, 1007)]
        assert client.wait_eof() == b""


# -- 7. Closing the connection ------------------------------------------------

@pytest.mark.parametrize("code", VALID_CODES)
def test_7_4_valid_close_code_is_echoed(echo, code):
    server, rb = echo
    with open_client(server) as client:
        client.send_close(code, "reason")
        f = client.expect_close()
        assert f.close_code() == code
        assert client.wait_eof() == b""
    assert rb.recorder().wait_kind("close")[-1][:2] == ("close", code)


@pytest.mark.parametrize("code", INVALID_CODES)
def test_7_4_invalid_close_code_fails_with_1002(echo, code):
    server, rb = echo
    with open_client(server) as client:
        client.send_close(code)
        expect_failure(client, 1002, rb)


def test_7_1_5_empty_close_is_answered_with_an_empty_close(echo):
    server, rb = echo
    with open_client(server) as client:
        client.send_close(None)
        f = client.expect_close()
        assert f.payload in (b"", struct.pack("!H", 1000))
        assert client.wait_eof() == b""
    # No status code received: 1005 (RFC 6455 7.1.5).
    assert rb.recorder().wait_kind("close")[-1][:2] == ("close", 1005)


def test_5_5_1_close_with_one_byte_payload_fails(echo):
    server, rb = echo
    with open_client(server) as client:
        client.send_frame(CLOSE, b"\x03")
        expect_failure(client, 1002, rb)


def test_5_5_1_close_reason_of_123_bytes_is_accepted(echo):
    server, _ = echo
    reason = ("é" * 61 + "a").encode()
    assert len(reason) == 123
    with open_client(server) as client:
        client.send_close(1000, reason)
        f = client.expect_close()
        assert f.close_code() == 1000
        assert client.wait_eof() == b""


@pytest.mark.parametrize("reason", [b"\xff", b"ok\xed\xa0\x80", b"\xce\xba\xe1\xbd"],
                         ids=lambda b: b.hex())
def test_5_5_1_close_with_invalid_utf8_reason_fails_with_1002(echo, reason):
    # The issue asks for 1002 here: the reason is part of the close frame's
    # syntax, not a message (1007 is about message data).
    server, rb = echo
    with open_client(server) as client:
        client.send_close(1000, reason)
        expect_failure(client, 1002, rb)


def test_7_data_after_a_close_frame_is_ignored(echo):
    server, rb = echo
    with open_client(server) as client:
        client.send(close_frame(1000) + frame(TEXT, "after close") + frame(PING, b"p")
                    + frame(5, b"garbage after close"))
        frames = client.recv_frames_until_close()
        assert [f.opcode for f in frames] == [CLOSE]
        assert frames[0].close_code() == 1000
        assert client.wait_eof() == b""
    assert rb.recorder().wait_kind("close") == [("open",), ("close", 1000, "")]


@pytest.mark.parametrize("code", [1000, 1001, 4321])
def test_7_close_between_fragments_is_an_ordinary_close(echo, code):
    server, rb = echo
    with open_client(server) as client:
        client.send(frame(TEXT, "unfinished", fin=False) + close_frame(code)
                    + frame(CONT, " message", fin=True))
        f = client.expect_close()
        assert f.close_code() == code
        assert client.wait_eof() == b""
    assert rb.recorder().wait_kind("close") == [("open",), ("close", code, "")]


def test_7_1_1_server_closes_tcp_promptly_once_its_close_is_answered(serve):
    close_timeout = 6.0
    server, rb = serve(close_timeout=close_timeout)
    with open_client(server) as client:
        client.send_frame(TEXT, RecordingBlock.COMMAND + "close:4001")
        f = client.expect_close()
        assert f.close_code() == 4001
        start = time.monotonic()
        client.send_close(4001)
        client.wait_eof(timeout=close_timeout)
        assert time.monotonic() - start < close_timeout / 3
    assert rb.recorder().wait_kind("close")[-1][:2] == ("close", 4001)


def test_7_1_1_server_closes_tcp_within_close_timeout_if_never_answered(serve):
    server, rb = serve(close_timeout=0.5)
    with open_client(server) as client:
        client.send_frame(TEXT, RecordingBlock.COMMAND + "close:4002")
        assert client.expect_close().close_code() == 4002
        start = time.monotonic()
        # The client keeps reading but never answers.
        client.wait_eof(timeout=WAIT)
        elapsed = time.monotonic() - start
        assert 0.3 <= elapsed < 3.0, elapsed
    assert rb.recorder().wait_kind("close")[-1][:2] == ("close", 4002)


def test_7_server_ignores_pings_and_data_after_its_own_close(serve):
    server, _rb = serve(close_timeout=5.0)
    with open_client(server) as client:
        client.send_frame(TEXT, RecordingBlock.COMMAND + "close:4003")
        assert client.expect_close().close_code() == 4003
        # No pong may follow the server's close frame (RFC 6455 5.5.1: no
        # data frames, and our close frame is the last one it sends).
        client.send(frame(PING, b"late") + close_frame(4003))
        assert client.wait_eof() == b""


def test_7_close_reaches_on_close_once_and_last(echo):
    server, rb = echo
    with open_client(server) as client:
        client.send_frame(TEXT, "a")
        expect_echo(client, TEXT, b"a")
        client.send(close_frame(1001) + close_frame(1000))
        assert client.expect_close().close_code() == 1001
        assert client.wait_eof() == b""
    events = rb.recorder().wait_kind("close")
    assert events == [("open",), ("message", "a"), ("close", 1001, "")]


# -- 10.4 Limits ---------------------------------------------------------------

def test_10_4_oversized_frame_fails_at_its_header(serve):
    server, rb = serve(max_message_size=4 * MiB)
    with open_client(server) as client:
        # Only the header: the server must not wait for (or buffer) the payload.
        head = frame(BINARY, b"", length=4 * MiB + 1)
        client.send(head)
        expect_failure(client, 1009, rb)
    assert rb.messages() == []


def test_10_4_oversized_frame_fails_with_the_start_of_its_payload(serve):
    server, rb = serve(max_message_size=4 * MiB)
    with open_client(server) as client:
        # The header and the first bytes of the payload in one segment.
        whole = frame(BINARY, b"\0" * (4 * MiB + 1))
        client.send(whole[:1000])
        expect_failure(client, 1009, rb)
    assert rb.messages() == []


def test_10_4_huge_announced_length_fails_at_its_header(echo):
    server, rb = echo
    with open_client(server) as client:
        client.send(frame(TEXT, b"", length=(1 << 62)))
        expect_failure(client, 1009, rb)


def test_10_4_fragments_over_the_limit_fail_at_the_crossing_fragment(serve):
    server, rb = serve(max_message_size=100_000)
    with open_client(server) as client:
        client.send(frame(BINARY, os.urandom(60_000), fin=False)
                    + frame(CONT, os.urandom(30_000), fin=False))
        client.send_frame(PING, b"sync")
        expect_echo(client, PONG, b"sync")
        client.send(frame(CONT, b"", length=10_001, fin=True))  # header only
        expect_failure(client, 1009, rb)
    assert rb.messages() == []


def test_10_4_message_exactly_at_the_limit_passes(serve):
    server, _rb = serve(max_message_size=1000)
    with open_client(server) as client:
        client.send(frame(TEXT, "x" * 600, fin=False) + frame(CONT, "y" * 400))
        expect_echo(client, TEXT, b"x" * 600 + b"y" * 400)
        client.send(frame(TEXT, "é" * 500))
        expect_echo(client, TEXT, "é".encode() * 500)
        assert client.close_handshake().close_code() == 1000


def test_10_4_text_over_the_limit_counts_bytes_not_decoded_characters(serve):
    """The limit is in bytes on the wire. A fragment that takes the text over
    it while ending inside a character is over the limit all the same."""
    server, _rb = serve(max_message_size=10)
    with open_client(server) as client:
        client.send_frame(TEXT, b"a" * 10 + b"\xc3", fin=False)  # 11 bytes > 10
        client.send_frame(PING, b"after")
        assert client.frames_within(FAST) == [(CLOSE, 1009)]
        assert client.wait_eof() == b""


def test_10_4_the_limit_leaves_other_connections_alone(serve):
    server, _rb = serve(max_message_size=1000)
    with open_client(server, path="/echo?id=bystander") as bystander, \
            open_client(server) as client:
        client.send(frame(BINARY, b"", length=1001))
        expect_failure(client, 1009)
        bystander.send_frame(BINARY, b"b" * 1000)
        expect_echo(bystander, BINARY, b"b" * 1000)
        assert bystander.close_handshake().close_code() == 1000
