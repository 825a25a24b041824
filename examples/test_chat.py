"""A property test of the chat room (examples/chat.py), written with the
public testing toolkit only: ``gaman_sync.strategies`` for the messages,
``gaman_sync.testing.RawPeer`` for the members.

The property: for any interleaving of joins, messages and leaves, every
member present when a message is sent receives it exactly once, in the
order the messages were sent (its sender too: the room echoes). The room
speaks JSON: a text message arrives as ``{"type": "message", "from": id,
"text": ...}`` and is compared as (sender's id, text); a binary one arrives
as it was sent; the room's notices of who joined or left are not messages. Hypothesis
drives a state machine: its model is the list of members present and what
each must have received so far; after each message, every member present
reads until it holds as many messages as the model says, and the two lists
must be equal. A message missing fails on a bounded wait (``WAIT``); one
too many, or one out of order, fails at once (it is read ahead of what was
expected). A member that left is never written to again.

Run it: ``pytest examples/test_chat.py``.
"""

from __future__ import annotations

import json
from typing import List, Optional, Tuple, Union

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

from gaman_sync import WebSocketServer
from gaman_sync.strategies import messages
from gaman_sync.testing import BINARY, TEXT, Frame, RawPeer

from .chat import block

WAIT = 3.0  # seconds: the longest a member waits for a message that is due
MAX_MEMBERS = 4

Message = Union[Tuple[int, str], bytes]  # (sender's id, text), or binary as sent


class Member:
    """One client of the room, and what it must have received."""

    def __init__(self, name: str, port: int) -> None:
        self.name = name
        self.peer = RawPeer.open("127.0.0.1", port, "/chat", name=name, timeout=WAIT)
        self.id: Optional[int] = None
        self.expected: List[Message] = []
        self.received: List[Message] = []
        # The room's welcome comes first, with this member's id.
        self.peer.read_until(lambda: self.id is not None, self.on_frame, timeout=WAIT)

    def __repr__(self) -> str:
        return self.name

    def on_frame(self, frame: Frame) -> None:
        if frame.opcode == TEXT:
            event = json.loads(frame.payload.decode("utf-8"))
            if event["type"] == "welcome":
                self.id = event["id"]
            elif event["type"] == "message":
                self.received.append((event["from"], event["text"]))
        elif frame.opcode == BINARY:
            self.received.append(frame.payload)

    def check(self) -> None:
        """Read until it holds what is due (or more), then compare."""
        try:
            self.peer.read_until(lambda: len(self.received) >= len(self.expected),
                                 self.on_frame, timeout=WAIT)
        except (TimeoutError, ConnectionError):
            pass  # the comparison says what is missing
        assert self.received == self.expected, \
            f"{self.name} received {self.received!r:.300}, expected {self.expected!r:.300}"


class ChatRoom(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.server = WebSocketServer(block, host="127.0.0.1", port=0,
                                      ping_interval=None).start()
        self.members: List[Member] = []
        self.gone: List[Member] = []
        self.joins = 0
        self.checked = True  # every check so far passed

    def check(self, member: Member) -> None:
        self.checked = False
        member.check()
        self.checked = True

    @precondition(lambda self: len(self.members) < MAX_MEMBERS)
    @rule()
    def join(self) -> None:
        self.joins += 1
        self.members.append(Member(f"member{self.joins}", self.server.port))

    @precondition(lambda self: self.members)
    @rule(data=st.data(), message=messages(max_size=300))
    def say(self, data: st.DataObject, message: Message) -> None:
        sender = data.draw(st.sampled_from(self.members), label="sender")
        sender.peer.send_frame(TEXT if isinstance(message, str) else BINARY, message)
        for member in self.members:
            member.expected.append((sender.id, message) if isinstance(message, str) else message)
        for member in self.members:
            self.check(member)

    @precondition(lambda self: self.members)
    @rule(data=st.data(), how=st.sampled_from(["close", "drop"]))
    def leave(self, data: st.DataObject, how: str) -> None:
        member = data.draw(st.sampled_from(self.members), label="leaving")
        self.members.remove(member)
        self.gone.append(member)
        if how == "close":  # with the closing handshake
            member.peer.send_close(1000)
            member.peer.read_to_eof(member.on_frame, timeout=WAIT)
            assert member.received == member.expected, member.name
        else:  # TCP dropped, no close frame
            member.peer.abort()

    def teardown(self) -> None:
        try:
            for member in self.members if self.checked else ():
                member.check()  # nothing arrived late, or twice
        finally:
            for member in self.members + self.gone:
                member.peer.close()
            self.server.shutdown(timeout=2)


ChatRoom.TestCase.settings = settings(
    max_examples=100, stateful_step_count=12, derandomize=True, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow])
TestChatRoom = pytest.mark.slow(ChatRoom.TestCase)  # a long property run
