"""Rooms in one process, on real sockets: join, leave, leaving on close,
``room_clients``, a broadcast to a room with ``exclude``, rooms per block,
and the default broker."""

from __future__ import annotations

import collections
import json
import threading
import time

import pytest

from gaman_sync import Broker, LocalBroker, define_block
from gaman_sync.testing import TestClient

from .cluster_node import room_block
from .conftest import WAIT


class Peer:
    """A client of the rooms block, with its connection id."""

    def __init__(self, server, query: str = "", path: str = "/rooms") -> None:
        self.client = TestClient(server, path + query)
        self.pending: collections.deque = collections.deque()  # broadcasts read early
        hello = json.loads(self.client.recv(WAIT))
        self.id = hello["id"]

    def do(self, **cmd) -> None:
        self.client.send(json.dumps(cmd))

    def ask(self, **cmd) -> dict:
        """The answer to ``cmd``: the next JSON message (what was broadcast
        to this client before it waits for recv())."""
        self.do(**cmd)
        while True:
            message = self.client.recv(WAIT)
            if isinstance(message, str) and message.startswith("{"):
                return json.loads(message)
            self.pending.append(message)

    def join(self, room: str) -> None:
        assert self.ask(op="join", room=room) == {"joined": room}

    def leave(self, room: str) -> None:
        assert self.ask(op="leave", room=room) == {"left": room}

    def rooms(self) -> list:
        return self.ask(op="rooms")["rooms"]

    def say(self, text: str, **cmd) -> int:
        return self.ask(op="say", text=text, reply=True, **cmd)["sent"]

    def recv(self):
        return self.pending.popleft() if self.pending else self.client.recv(WAIT)

    def close(self) -> None:
        self.client.close()


def next_after(peer: Peer, marker_from: Peer, marker: str):
    """What ``peer`` receives next, once ``marker_from`` broadcast ``marker``
    to every client: a message that was wrongly delivered to ``peer`` before
    would come first (one thread's broadcasts arrive in order)."""
    marker_from.do(op="say", text=marker)
    return peer.recv()


@pytest.fixture
def closed_rooms():
    return {}


@pytest.fixture
def server(make_server, closed_rooms):
    return make_server(room_block(on_close=lambda ctx: closed_rooms.__setitem__(ctx.id, ctx.rooms)),
                       ping_interval=None)


def view(server):
    return server.blocks[0]


def test_a_room_broadcast_reaches_its_members_only(server):
    a, b, c = Peer(server), Peer(server), Peer(server)
    a.join("lobby")
    b.join("lobby")
    assert {conn.id for conn in view(server).room_clients("lobby")} == {a.id, b.id}
    assert view(server).rooms == ["lobby"]
    assert c.say("hi", room="lobby") == 2
    assert a.recv() == "hi" and b.recv() == "hi"
    assert next_after(c, a, "everyone") == "everyone"
    assert a.recv() == "everyone" and b.recv() == "everyone"
    # Binary stays binary.
    assert a.say("bytes", room="lobby", binary=True) == 2
    assert a.recv() == b"bytes" and b.recv() == b"bytes"
    assert next_after(c, a, "again") == "again"


def test_exclude_in_a_room_by_connection_and_by_id(server):
    a, b, c = Peer(server), Peer(server), Peer(server)
    for p in (a, b, c):
        p.join("r")
    assert a.say("not to me", room="r", exclude="self") == 2
    assert b.recv() == "not to me" and c.recv() == "not to me"
    assert a.say("not to b", room="r", exclude=[b.id]) == 2
    assert a.recv() == "not to b" and c.recv() == "not to b"
    assert next_after(b, c, "marker") == "marker"
    assert a.recv() == "marker"  # and "not to me" never came before "not to b"


def test_leave_and_rooms(server):
    a, b = Peer(server), Peer(server)
    a.join("x")
    a.join("y")
    a.join("x")  # twice is once
    assert a.rooms() == ["x", "y"]
    a.leave("x")
    a.leave("nowhere")  # nothing
    assert a.rooms() == ["y"]
    assert b.say("to x", room="x") == 0
    assert view(server).room_clients("x") == []
    assert next_after(a, b, "marker") == "marker"
    assert sorted(view(server).rooms) == ["y"]


def test_leaving_is_automatic_on_close(server, closed_rooms):
    a, b = Peer(server), Peer(server)
    a.join("x")
    a.join("y")
    b.join("x")
    ctx_a = next(c for c in view(server).clients if c.id == a.id)
    a.close()
    # on_close still saw the rooms; once the connection has ended, it is in none.
    with_timeout(lambda: a.id in closed_rooms and not view(server).room_clients("y"))
    assert closed_rooms[a.id] == frozenset({"x", "y"})
    with_timeout(lambda: view(server).rooms == ["x"])
    assert ctx_a.rooms == frozenset()
    assert [c.id for c in view(server).room_clients("x")] == [b.id]
    ctx_a.join("z")  # an ended connection joins nothing
    assert view(server).rooms == ["x"] and ctx_a.rooms == frozenset()


def with_timeout(predicate, timeout: float = WAIT) -> None:
    """Poll ``predicate`` (server state, which no event announces) until true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_room_joined_in_the_handler_counts_once_the_handler_returns(server):
    a = Peer(server, "?join=early")
    refused = TestClient(server, "/rooms?join=early&refuse=1")
    refused.expect_close(4001)
    assert [c.id for c in view(server).room_clients("early")] == [a.id]
    b = Peer(server)
    assert b.say("early bird", room="early") == 1
    assert a.recv() == "early bird"
    with_timeout(lambda: len(view(server).clients) == 2)
    assert [c.id for c in view(server).room_clients("early")] == [a.id]


def test_rooms_belong_to_a_block(make_server):
    server = make_server([room_block("/one"), room_block("/two")], ping_interval=None)
    a, b = Peer(server, path="/one"), Peer(server, path="/two")
    a.join("same")
    b.join("same")
    assert a.say("one only", room="same") == 1
    assert a.recv() == "one only"
    assert next_after(b, b, "two") == "two"


def test_join_and_leave_from_other_threads_while_clients_come_and_go(server):
    """Many threads join, leave and close at once: no membership outlives its
    connection."""
    peers = [Peer(server) for _ in range(20)]
    conns = list(view(server).clients)
    errors = []

    def churn(i: int) -> None:
        try:
            for n in range(50):
                conn = conns[(i + n) % len(conns)]
                conn.join(f"r{n % 5}")
                if n % 3 == 0:
                    conn.leave(f"r{(n + 1) % 5}")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=churn, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for p in peers[::2]:
        p.close()
    for t in threads:
        t.join(WAIT)
    assert not errors
    for p in peers[1::2]:
        p.close()
    with_timeout(lambda: not view(server).clients)
    with_timeout(lambda: view(server).rooms == [])
    assert all(c.rooms == frozenset() for c in conns)


def test_errors_name_the_argument(server):
    a = Peer(server)
    ctx = view(server).clients[0]
    with pytest.raises(TypeError, match="room must be a str"):
        ctx.join(3)
    with pytest.raises(TypeError, match="pass exclude="):
        view(server).broadcast("m", ctx)  # the pre-rooms positional exclude
    with pytest.raises(TypeError, match="exclude must be"):
        view(server).broadcast("m", room="r", exclude=["x"])
    with pytest.raises(TypeError, match="room must be a str"):
        view(server).room_clients(None)
    a.close()


def test_the_default_broker_is_local(make_server):
    server = make_server(define_block("/e", lambda ctx: {}))
    assert isinstance(server.broker, LocalBroker) and isinstance(server.broker, Broker)
    assert server.broker.remote is False
    with pytest.raises(TypeError, match="broker must be a Broker"):
        make_server(define_block("/e", lambda ctx: {}), broker="redis://localhost")


@pytest.mark.parametrize("data, why", [
    (b"x{}\nhi", "not a broadcast envelope"),
    (b"t{}", "no end of header"),
    (b"t{oops\nhi", "not JSON"),
    (b"t[]\nhi", "not a JSON object"),
    (b't{"room":1}\nhi', "room that is not a string"),
    (b't{"exclude":[true]}\nhi', "exclude is not a list"),
    (b"t{}\n\xff", "utf-8"),
])
def test_an_envelope_that_is_not_one_is_a_clear_error(data, why):
    from gaman_sync.broker.envelope import unpack
    with pytest.raises(ValueError, match=why):
        unpack(data)


@pytest.mark.parametrize("message, room, exclude", [
    ("hé", None, ()), (b"\x00\n\xff", "lobby", (3, 30000000017)), ("", "r\n{", (1,)),
])
def test_an_envelope_keeps_type_room_and_exclude(message, room, exclude):
    from gaman_sync.broker.envelope import pack, unpack
    assert unpack(pack(message, room, exclude)) == (message, room, frozenset(exclude))
