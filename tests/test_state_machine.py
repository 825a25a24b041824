"""A stateful model of one connection, driven by hypothesis.

Each run opens a connection and applies random steps: whole messages (maybe
fragmented, with pings in between), fragments one at a time, pings, unsolicited
pongs, a close from the client or from the server, a protocol error. The
model knows what the wire must show after each step and what the handler
must have seen; the invariants hold after every step:

- ``on_open`` comes first and once;
- ``on_close`` comes at most once, and last;
- the messages seen are exactly the complete messages sent, in order;
- the pongs seen are (a prefix of) the unsolicited pongs sent, in order.
"""

from __future__ import annotations

import itertools
from typing import List, Optional, Tuple

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from gaman_sync.strategies import (
    binary_messages,
    close_codes,
    close_reasons,
    control_payloads,
    text_messages,
)
from gaman_sync.testing import BINARY, CONT, PING, PONG, TEXT, RawPeer, chunks, close_frame, frame

from .helpers import RecordingBlock

_ids = itertools.count()

texts = text_messages(max_size=300).filter(lambda s: not s.startswith(RecordingBlock.COMMAND))
payloads = st.one_of(texts, binary_messages(max_size=300))
control = control_payloads()
client_codes = st.one_of(st.none(), close_codes())
server_codes = st.sampled_from([1000, 1001, 1008, 3001, 4002])
# Frames that fail the connection, and the code they fail it with.
PROTOCOL_ERRORS = {
    "reserved-bit": (frame(BINARY, b"x", rsv=1), 1002),
    "reserved-opcode": (frame(0xB, b"x"), 1002),
    "unmasked": (frame(TEXT, "x", mask=False), 1002),
    "long-ping": (frame(PING, b"x" * 126), 1002),
    "fragmented-ping": (frame(PING, b"x", fin=False), 1002),
    "bad-close-code": (close_frame(1005), 1002),
    "invalid-utf8": (frame(TEXT, b"\xff\xfe"), 1007),
}


class ConnectionMachine(RuleBasedStateMachine):
    port: int = 0
    block: RecordingBlock = None  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()
        self.id = f"sm{next(_ids)}"
        self.client = RawPeer.open("127.0.0.1", self.port, path=f"/sm?id={self.id}")
        self.rec = self.block.recorder(self.id)
        # on_open runs after the 101 that open() waited for: wait for it too,
        # or the first invariant may look before it was recorded.
        self.rec.wait_kind("open")
        self.messages: list = []
        self.pongs: List[bytes] = []
        self.partial: Optional[Tuple[int, list]] = None  # an unfinished message
        self.open = True
        self.close_code: Optional[int] = None

    # -- helpers -------------------------------------------------------

    def expect(self, opcode: int, payload: bytes) -> None:
        f = self.client.recv_frame()
        assert (f.opcode, f.payload) == (opcode, payload), f

    def closed(self, code: int) -> None:
        """The TCP connection must end now; the handler's on_close must say ``code``."""
        assert self.client.wait_eof() == b""
        self.client.close()
        self.open = False
        self.partial = None
        self.close_code = code
        self.rec.wait_kind("close")

    # -- rules ---------------------------------------------------------

    @precondition(lambda self: self.open and self.partial is None)
    @rule(msg=payloads, cuts=st.lists(st.integers(0, 300), max_size=4),
          pings=st.lists(control, max_size=3))
    def send_message(self, msg, cuts, pings):
        data = msg.encode() if isinstance(msg, str) else msg
        opcode = TEXT if isinstance(msg, str) else BINARY
        parts = chunks(data, cuts) or [b""]
        stream, sent_pings = b"", []
        for i, part in enumerate(parts):
            stream += frame(opcode if i == 0 else CONT, part, fin=i == len(parts) - 1)
            if i < len(parts) - 1 and i < len(pings):
                stream += frame(PING, pings[i])
                sent_pings.append(pings[i])
        self.client.send(stream)
        for p in sent_pings:
            self.expect(PONG, p)
        self.expect(opcode, data)
        self.messages.append(msg)

    @precondition(lambda self: self.open and self.partial is None)
    @rule(binary=st.booleans(), data=st.binary(max_size=40))
    def start_fragmented(self, binary, data):
        # Text fragments are ASCII, so that any cut is valid UTF-8.
        opcode = BINARY if binary else TEXT
        if not binary:
            data = bytes(b & 0x7F for b in data)
        self.client.send_frame(opcode, data, fin=False)
        self.partial = (opcode, [data])

    @precondition(lambda self: self.open and self.partial is not None)
    @rule(data=st.binary(max_size=40), last=st.booleans())
    def continue_fragmented(self, data, last):
        opcode, parts = self.partial
        if opcode == TEXT:
            data = bytes(b & 0x7F for b in data)
        self.client.send_frame(CONT, data, fin=last)
        parts.append(data)
        if last:
            whole = b"".join(parts)
            self.expect(opcode, whole)
            self.messages.append(whole.decode() if opcode == TEXT else whole)
            self.partial = None

    @precondition(lambda self: self.open)
    @rule(data=control)
    def ping(self, data):
        self.client.send_frame(PING, data)
        self.expect(PONG, data)

    @precondition(lambda self: self.open)
    @rule(data=control)
    def unsolicited_pong(self, data):
        self.client.send_frame(PONG, data)
        self.pongs.append(data)

    @precondition(lambda self: self.open)
    @rule(code=client_codes, reason=close_reasons())
    def client_closes(self, code, reason):
        if code is None:
            self.client.send_close(None)
        else:
            self.client.send_close(code, reason)
        f = self.client.expect_close()
        assert f.close_code() == code or (code is None and f.close_code() == 1000)
        self.closed(1005 if code is None else code)

    @precondition(lambda self: self.open and self.partial is None)
    @rule(code=server_codes)
    def server_closes(self, code):
        command = f"{RecordingBlock.COMMAND}close:{code}"
        self.client.send_frame(TEXT, command)
        self.messages.append(command)
        f = self.client.expect_close()
        assert f.close_code() == code
        self.client.send_close(code)
        self.closed(code)

    @precondition(lambda self: self.open)
    @rule(kind=st.sampled_from(sorted(PROTOCOL_ERRORS)))
    def protocol_error(self, kind):
        data, code = PROTOCOL_ERRORS[kind]
        if kind == "invalid-utf8" and self.partial is not None:
            code = 1002  # a new text frame inside a message: wrong before its payload
        self.client.send(data)
        f = self.client.expect_close()
        assert f.close_code() == code, (kind, f)
        self.closed(code)

    @precondition(lambda self: not self.open)
    @rule()
    def nothing_after_close(self):
        assert self.rec.kinds()[-1] == "close"

    # -- invariants ------------------------------------------------------

    @invariant()
    def callbacks_are_well_ordered(self):
        with self.rec.cond:
            events = list(self.rec.events)
        kinds = [e[0] for e in events]
        assert kinds[0] == "open" and kinds.count("open") == 1, kinds
        assert kinds.count("close") <= 1, kinds
        if "close" in kinds:
            assert kinds[-1] == "close", kinds
            assert events[-1][1] == self.close_code, (events[-1], self.close_code)
        assert "error" not in kinds, events
        # Every message step waits for its echo, which the handler sends
        # after recording it: the record is complete, not just a prefix.
        assert [e[1] for e in events if e[0] == "message"] == self.messages
        seen_pongs = [e[1] for e in events if e[0] == "pong"]
        assert seen_pongs == self.pongs[:len(seen_pongs)]
        if not self.open:
            assert seen_pongs == self.pongs

    def teardown(self):
        try:
            if self.open:
                self.client.send_close(1000)
                assert self.client.expect_close().close_code() == 1000
                self.closed(1000)
                self.callbacks_are_well_ordered()
        finally:
            self.client.close()


def test_connection_state_machine(make_server):
    block = RecordingBlock("/sm")
    server = make_server(block.block, ping_interval=None, close_timeout=2.0)
    ConnectionMachine.port = server.port
    ConnectionMachine.block = block
    run_state_machine_as_test(
        ConnectionMachine, settings=settings(max_examples=150, stateful_step_count=30))
