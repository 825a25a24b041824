"""Property: for any sequence of frames, valid or not, cut into TCP writes in
any way, the server answers exactly what RFC 6455 prescribes.

A small oracle, written from the RFC and independent of wsproto (it has its
own UTF-8 validator), computes for a frame sequence the frames the server
must send (pongs and echoes, in order), the close code it must end with, and
what the handler must have seen (messages, pongs, the close code). The test
sends the sequence to a recording echo server and compares. A bystander
connection, open through all the examples, must see none of it.
"""

from __future__ import annotations

import itertools
import struct
from typing import FrozenSet, List, NamedTuple, Optional, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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

from .helpers import RecordingBlock, utf8_error_at

MAX_SIZE = 256  # max_message_size of the server under test: small, so it is reached
RESERVED_OPCODES = frozenset({3, 4, 5, 6, 7, 11, 12, 13, 14, 15})


class F(NamedTuple):
    """One client frame, as the strategies describe it."""
    opcode: int
    payload: bytes
    fin: bool = True
    rsv: int = 0
    masked: bool = True

    def encode(self) -> bytes:
        return frame(self.opcode, self.payload, fin=self.fin, rsv=self.rsv, mask=self.masked,
                     key=b"\x5a\x0f\xf0\xa5")


# -- The oracle ---------------------------------------------------------------

def valid_close_code(code: int) -> bool:
    # RFC 6455 7.4: 1000-1003, 1007-1011 defined; 1012-1014 assigned by IANA;
    # 1004-1006 and 1015 never on the wire; 1016-2999 reserved; 3000-4999 ok.
    return code in (1000, 1001, 1002, 1003) or 1007 <= code <= 1014 or 3000 <= code <= 4999


class Expected(NamedTuple):
    replies: List[Tuple[int, bytes]]      # frames before the close frame
    close_codes: FrozenSet[Optional[int]]  # acceptable codes of its close (None: empty)
    messages: list                         # what on_message must have received
    pongs: List[bytes]                     # what on_pong must have received
    ends_connection: bool                  # the sequence itself ends it


def oracle(frames: List[F], max_size: int = MAX_SIZE) -> Expected:
    replies: List[Tuple[int, bytes]] = []
    messages: list = []
    pongs: List[bytes] = []
    current: Optional[int] = None  # opcode of the unfinished message
    buf = b""

    def fail(*codes: int) -> Expected:
        return Expected(replies, frozenset(codes), messages, pongs, True)

    for f in frames:
        if f.rsv or not f.masked or f.opcode in RESERVED_OPCODES:
            return fail(1002)
        if f.opcode >= 8:
            if not f.fin or len(f.payload) > 125:
                return fail(1002)
            if f.opcode == PING:
                replies.append((PONG, f.payload))
            elif f.opcode == PONG:
                pongs.append(f.payload)
            else:
                if not f.payload:
                    return Expected(replies, frozenset({None, 1000}), messages, pongs, True)
                if len(f.payload) == 1:
                    return fail(1002)
                code = struct.unpack("!H", f.payload[:2])[0]
                if not valid_close_code(code) or utf8_error_at(f.payload[2:]) is not None:
                    return fail(1002)
                return Expected(replies, frozenset({code}), messages, pongs, True)
            continue
        if (f.opcode == CONT) != (current is not None):
            return fail(1002)  # an orphan continuation, or a new message inside one
        if f.opcode != CONT:
            current, buf = f.opcode, b""
        # The frame's header tells its size, before any of its payload.
        over = len(buf) + len(f.payload) > max_size
        bad = current == TEXT and utf8_error_at(buf + f.payload, final=f.fin) is not None
        if over and bad:
            # Both wrong in the same frame: the RFC gives no precedence, and
            # which the server sees first depends on how the frame arrives.
            return fail(1007, 1009)
        if over:
            return fail(1009)
        if bad:
            return fail(1007)
        buf += f.payload
        if f.fin:
            replies.append((current, buf))
            messages.append(buf.decode("utf-8") if current == TEXT else buf)
            current = None
    # Nothing closed: the test closes with 1000, even inside a message.
    return Expected(replies, frozenset({1000}), messages, pongs, False)


def test_oracle_examples():
    """The oracle's own sanity, on cases worked out by hand from the RFC."""
    t = lambda p, **kw: F(TEXT, p, **kw)  # noqa: E731
    assert oracle([t(b"hi"), F(PING, b"p")]).replies == [(TEXT, b"hi"), (PONG, b"p")]
    assert oracle([t(b"a", fin=False), F(PING, b"p"), F(CONT, b"b")]).messages == ["ab"]
    assert oracle([F(CONT, b"x")]).close_codes == {1002}
    assert oracle([t(b"\xed\xa0", fin=False)]).close_codes == {1007}
    assert oracle([t(b"\xc3", fin=False), F(CLOSE, struct.pack("!H", 4000))]).close_codes \
        == {4000}
    assert oracle([t(b"x" * 200, fin=False), F(CONT, b"y" * 57)]).close_codes == {1009}
    assert oracle([t(b"x" * 200, fin=False), F(CONT, b"y" * 56)]).messages \
        == ["x" * 200 + "y" * 56]
    assert oracle([F(CLOSE, b"")]).close_codes == {None, 1000}
    assert oracle([F(CLOSE, struct.pack("!H", 1014))]).close_codes == {1014}
    assert oracle([F(CLOSE, struct.pack("!H", 1016))]).close_codes == {1002}
    assert oracle([F(BINARY, b"x", rsv=1), t(b"y")]).replies == []


# -- Strategies -----------------------------------------------------------------

BAD_UTF8 = [b"\xff", b"\xc0\xaf", b"\xe0\x80\xaf", b"\xed\xa0\x80", b"\xed\xbf\xbf",
            b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80", b"\x80", b"\xc2", b"\xe2\x82"]

utf8_char = st.characters(exclude_categories=["Cs"]).map(lambda c: c.encode("utf-8"))
text_atom = st.one_of(utf8_char, utf8_char, utf8_char, st.text(min_size=10, max_size=60)
                      .map(lambda s: s.encode("utf-8")), st.sampled_from(BAD_UTF8))
text_payload = st.lists(text_atom, max_size=12).map(b"".join)
binary_payload = st.one_of(st.binary(max_size=40), st.binary(min_size=100, max_size=300))
control_payload = st.one_of(st.binary(max_size=20), st.binary(min_size=120, max_size=130))
close_payload = st.one_of(
    st.just(b""), st.binary(min_size=1, max_size=1),
    st.tuples(st.one_of(st.sampled_from([1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007,
                                         1011, 1012, 1013, 1014, 1015, 1016, 2999, 3000,
                                         4999, 5000]),
                        st.integers(0, 65535)),
              st.one_of(st.text(max_size=20).map(lambda s: s.encode("utf-8")),
                        st.sampled_from(BAD_UTF8)))
    .map(lambda cr: struct.pack("!H", cr[0]) + cr[1]))


@st.composite
def message_frames(draw) -> List[F]:
    """One data message, fragmented anywhere, with control frames in between."""
    opcode = draw(st.sampled_from([TEXT, BINARY]))
    payload = draw(text_payload if opcode == TEXT else binary_payload)
    cuts = draw(st.lists(st.integers(0, max(len(payload), 1)), max_size=4))
    parts = chunks(payload, cuts) if payload else [b""]
    out: List[F] = []
    for i, part in enumerate(parts):
        out.append(F(opcode if i == 0 else CONT, part, fin=i == len(parts) - 1))
        if i < len(parts) - 1 and draw(st.booleans()):
            out.append(F(draw(st.sampled_from([PING, PONG])), draw(st.binary(max_size=8))))
    if draw(st.integers(0, 9)) == 0:
        out.pop()  # a message left unfinished
    return out


@st.composite
def any_frame(draw) -> List[F]:
    """One frame with every field free: mostly wrong somewhere."""
    opcode = draw(st.integers(0, 15))
    payload = draw(close_payload if opcode == CLOSE else control_payload if opcode >= 8
                   else text_payload if opcode == TEXT else st.binary(max_size=30))
    return [F(opcode, payload, fin=draw(st.booleans()),
              rsv=draw(st.sampled_from([0, 0, 0, 1, 2, 4, 7])),
              masked=draw(st.sampled_from([True, True, True, False])))]


action = st.one_of(
    message_frames(), message_frames(),
    st.tuples(st.sampled_from([PING, PONG]), control_payload).map(lambda t: [F(*t)]),
    close_payload.map(lambda p: [F(CLOSE, p)]),
    any_frame(),
)
frame_sequences = st.lists(action, min_size=1, max_size=5).map(
    lambda actions: [f for a in actions for f in a])

# How the bytes are cut into writes: at frame boundaries, at random offsets,
# or one byte at a time.
segmentation = st.one_of(st.just("frames"), st.just("bytes"),
                         st.lists(st.integers(0, 2000), max_size=6))


# -- The property ----------------------------------------------------------------

@pytest.fixture
def world(make_server):
    rb = RecordingBlock("/echo")
    server = make_server(rb.block, max_message_size=MAX_SIZE, ping_interval=None,
                         close_timeout=2.0)
    bystander = RawPeer.open("127.0.0.1", server.port, path="/echo?id=bystander")
    yield server, rb, bystander
    bystander.close()


counter = itertools.count()


@settings(max_examples=200)
@given(frames=frame_sequences, cut=segmentation)
def test_server_reply_is_what_rfc6455_prescribes(world, frames, cut):
    server, rb, bystander = world
    expected = oracle(frames)
    # A close of our own ends every sequence: for one that does not end the
    # connection itself, it is the ordinary end; after one that does, the
    # server must ignore it.
    wire = [f.encode() for f in frames] + [close_frame(1000)]
    stream = b"".join(wire)
    if cut == "frames":
        writes = wire
    elif cut == "bytes":
        writes = chunks(stream, range(1, min(len(stream), 400))) if len(stream) > 1 else [stream]
    else:
        writes = chunks(stream, cut)

    conn_id = str(next(counter))
    with RawPeer.open("127.0.0.1", server.port, path=f"/echo?id={conn_id}") as client:
        for w in writes:
            try:
                client.send(w)
            except (BrokenPipeError, ConnectionResetError):
                break  # the server closed after failing; the rest is moot
        got = []
        while True:
            f = client.recv_frame()
            if f.opcode == CLOSE:
                break
            got.append((f.opcode, f.payload))
        assert got == expected.replies
        code = f.close_code()
        assert code in expected.close_codes, (code, f.close_reason())
        if code is None:
            assert f.payload == b""
        f.close_reason().decode("utf-8")
        assert client.wait_eof() == b"", "frames after the close frame"
    events = rb.recorder(conn_id).wait_kind("close")
    assert events[0] == ("open",)
    assert [e[1] for e in events if e[0] == "message"] == expected.messages
    assert [e[1] for e in events if e[0] == "pong"] == expected.pongs
    assert [e for e in events if e[0] == "error"] == []
    # on_close gets the code the server's close frame carried (1005 for none).
    assert events[-1][:2] == ("close", 1005 if code is None else code)
    assert [e[0] for e in events].count("close") == 1

    # Nothing of this reached the bystander, which still works.
    probe = f"probe {conn_id}".encode()
    bystander.send(frame(PING, probe) + frame(BINARY, probe))
    assert bystander.recv_frame().opcode == PONG
    f = bystander.recv_frame()
    assert (f.opcode, f.payload) == (BINARY, probe)
