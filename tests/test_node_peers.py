"""Peers this project did not write, on Node: the ``ws`` library (the one
GamanJS runs on) as a client of our server and as a server for our client,
and ``wscat``, a command-line client.

``tests/node/peer.js`` is a ``ws`` client or server driven in JSON lines
(commands on its stdin, events on its stdout; see its header). Our server
runs ``gaman_block`` of ``tests/test_client.py``: it echoes, closes on
``!close CODE REASON``, pings on ``!ping`` and answers each pong it gets in
``on_pong`` with the message ``pong DATA``, so that the Node side sees
``on_pong`` fire. The Node server acts on the same commands.

The command-line client is ``wscat`` rather than ``websocat``: websocat is
not packaged in Debian bookworm and cargo's registry is out of reach here,
while wscat installs with npm, with ``ws``.

Node and the modules come from ``npm install --prefix tests/node`` (which
``.ci/run`` does). Without them these tests skip and say why, unless
``GAMAN_SYNC_REQUIRE_PEERS=1`` (set by ``.ci/run``): then they fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest

import gaman_sync
from gaman_sync import ConnectionClosedError, define_block

from .conftest import WAIT, Recorder, child
from .test_client import gaman_block

NODE_DIR = Path(__file__).resolve().parent / "node"
MODULES = ("ws", "wscat")


def missing_peers() -> Optional[str]:
    """Why the Node peers cannot run here, or None when they can."""
    if shutil.which("node") is None:
        return "node is not installed (install Node.js and npm)"
    for module in MODULES:
        if not (NODE_DIR / "node_modules" / module / "package.json").is_file():
            return (f"the npm package {module!r} is not installed: "
                    f"run npm install --prefix tests/node")
    return None


@pytest.fixture(autouse=True)
def node_peers() -> None:
    reason = missing_peers()
    if reason is None:
        return
    if os.environ.get("GAMAN_SYNC_REQUIRE_PEERS") == "1":
        pytest.fail(f"{reason} (GAMAN_SYNC_REQUIRE_PEERS=1 forbids skipping)", pytrace=False)
    pytest.skip(reason)


class NodePeer:
    """``node tests/node/peer.js CONFIG``: ``do`` sends it a command,
    ``expect`` waits (``WAIT`` at most) for the next event of a kind."""

    def __init__(self, **config: Any) -> None:
        self.stack = contextlib.ExitStack()
        self.proc = self.stack.enter_context(
            child(["node", str(NODE_DIR / "peer.js"), json.dumps(config)]))
        self.events: queue.Queue[Dict[str, Any]] = queue.Queue()
        self.seen: List[Dict[str, Any]] = []  # read, not yet expected
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.events.put(json.loads(line))
        self.events.put({"event": "exit"})

    def do(self, op: str, **fields: Any) -> None:
        self.proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.proc.stdin.flush()

    def expect(self, kind: str) -> Dict[str, Any]:
        """The next event ``kind``; any ``error`` or the process's end fails."""
        for event in self.seen:
            if event["event"] == kind:
                self.seen.remove(event)
                return event
        while True:
            try:
                event = self.events.get(timeout=WAIT)
            except queue.Empty:
                raise AssertionError(f"no {kind!r} from node in {WAIT} s; "
                                     f"seen: {self.seen}") from None
            if event["event"] == kind:
                return event
            if event["event"] in ("error", "exit"):
                raise AssertionError(f"waiting for {kind!r}, node said {event}; "
                                     f"stderr: {self.stop()}")
            self.seen.append(event)

    def stop(self) -> str:
        """End the process (its stdin closed, killed if still there after
        ``WAIT``); what it wrote on stderr. Once only: then ``""``."""
        if self.proc.stdin.closed:
            return ""
        self.proc.stdin.close()
        try:
            self.proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        err = self.proc.stderr.read()
        self.reader.join(WAIT)
        self.stack.close()
        return err


@pytest.fixture
def node() -> Iterator[Any]:
    """``node(**config)``: a started :class:`NodePeer`, stopped after the test."""
    peers: List[NodePeer] = []

    def start(**config: Any) -> NodePeer:
        peers.append(NodePeer(**config))
        return peers[-1]

    yield start
    for peer in peers:
        peer.stop()


@pytest.fixture
def ours(make_server):
    """Our server with ``gaman_block`` at /echo; its ``on_close`` calls are
    recorded in ``events``."""
    events = Recorder()
    server = make_server(gaman_block(events, "/echo"), ping_interval=None)
    server.events = events
    server.url = f"ws://127.0.0.1:{server.port}/echo"
    return server


@pytest.fixture
def ws_client(ours, node) -> NodePeer:
    """A Node ws client, open on ``ours``."""
    client = node(mode="client", url=ours.url)
    client.expect("open")
    return client


# -- A Node ws client against our server ------------------------------------------


def test_ws_client_text_and_binary_echo(ws_client):
    ws_client.do("send", data="héllo ✓")
    assert ws_client.expect("message") == {"event": "message", "data": "héllo ✓"}
    ws_client.do("send", hex="00ff10" * 1000)
    assert ws_client.expect("message") == {"event": "message", "hex": "00ff10" * 1000}
    ws_client.do("send", data="")
    assert ws_client.expect("message") == {"event": "message", "data": ""}


def test_ws_client_fragmented_sends_are_joined(ws_client):
    """ws's ``send(data, {fin: false})`` then the rest: one message for us."""
    ws_client.do("send", data="frag", fin=False)
    ws_client.do("send", data="men", fin=False)
    ws_client.do("send", data="ted τέξτ")
    assert ws_client.expect("message")["data"] == "fragmented τέξτ"
    ws_client.do("send", hex="0001", fin=False)
    ws_client.do("send", hex="02" * 70000)
    assert ws_client.expect("message")["hex"] == "0001" + "02" * 70000


def test_ws_client_ping_gets_our_automatic_pong(ws_client):
    ws_client.do("ping", data="are you there")
    assert ws_client.expect("pong")["data"] == "are you there"


def test_our_ping_gets_ws_pong_and_on_pong_fires(ws_client):
    ws_client.do("send", data="!ping")  # ctx.ping(b"srv"); on_pong sends "pong srv"
    assert ws_client.expect("ping")["data"] == "srv"
    assert ws_client.expect("message")["data"] == "pong srv"


def test_unsolicited_pong_from_ws_reaches_on_pong(ws_client):
    ws_client.do("pong", data="unasked")
    assert ws_client.expect("message")["data"] == "pong unasked"


def test_ws_client_closes_with_code_and_reason(ours, ws_client):
    ws_client.do("close", code=4001, reason="bye")
    assert ws_client.expect("close") == {"event": "close", "code": 4001, "reason": "bye"}
    ours.events.wait_kind("close")
    assert ours.events.events == [("close", 4001, "bye")]


def test_we_close_with_code_and_reason_seen_by_ws(ours, ws_client):
    ws_client.do("send", data="!close 4002 see you")
    assert ws_client.expect("close") == {"event": "close", "code": 4002, "reason": "see you"}
    ours.events.wait_kind("close")
    assert ours.events.events == [("close", 4002, "see you")]


def test_ws_client_follows_our_redirect(make_server, node):
    """``define_block('/old', redirect='/new')``: ws (followRedirects) emits
    'redirect' with the new URL and opens there; our on_redirect saw it."""
    events, hops = Recorder(), Recorder()
    server = make_server([
        define_block("/old", redirect="/new",
                     on_redirect=lambda url, request: hops.add("hop", url, request.target)),
        gaman_block(events, "/new")], ping_interval=None)
    base = f"ws://127.0.0.1:{server.port}"
    client = node(mode="client", url=base + "/old?x=1", followRedirects=True)
    assert client.expect("redirect")["url"] == base + "/new?x=1"
    assert client.expect("open")["url"] == base + "/new?x=1"
    assert hops.wait_kind("hop") == [("hop", base + "/new?x=1", "/old?x=1")]
    client.do("send", data="moved")
    assert client.expect("message")["data"] == "moved"


# -- Our client against a Node ws server ------------------------------------------


@pytest.fixture
def ws_server(node) -> Iterator[NodePeer]:
    server = node(mode="server")
    server.url = f"ws://127.0.0.1:{server.expect('listening')['port']}/here"
    return server


def connect(url: str, **kwargs: Any) -> gaman_sync.ClientConnection:
    return gaman_sync.connect(url, open_timeout=WAIT, ping_interval=None, **kwargs)


def test_our_client_text_and_binary_echo(ws_server):
    with connect(ws_server.url) as conn:
        assert ws_server.expect("connection")["path"] == "/here"
        for message in ["hello ✓", b"\x00\xff" * 40000, "", b""]:
            conn.send(message)
            assert conn.recv(timeout=WAIT) == message
    assert ws_server.expect("close") == {"event": "close", "code": 1000, "reason": ""}


def test_our_client_closes_with_code_and_reason(ws_server):
    conn = connect(ws_server.url)
    conn.close(4003, "ours")
    assert (conn.close_code, conn.close_reason) == (4003, "ours")
    assert ws_server.expect("close") == {"event": "close", "code": 4003, "reason": "ours"}


def test_ws_server_closes_with_code_and_reason(ws_server):
    with connect(ws_server.url) as conn:
        conn.send("!close 4004 theirs")
        with pytest.raises(ConnectionClosedError) as caught:
            conn.recv(timeout=WAIT)
        assert (caught.value.code, caught.value.reason) == (4004, "theirs")
    assert ws_server.expect("close")["code"] == 4004


def test_our_client_pings_and_answers_pings(ws_server):
    pongs = Recorder()
    with connect(ws_server.url, handler={"on_pong": lambda data: pongs.add("pong", data),
                                         "on_message": lambda m: pongs.add("message", m)}) as conn:
        conn.ping(b"cli")
        assert ws_server.expect("ping")["data"] == "cli"
        assert pongs.wait_kind("pong") == [("pong", b"cli")]
        conn.send("!ping")  # ws pings with "srv", sends "pong srv" once we answered
        assert ws_server.expect("pong")["data"] == "srv"
        assert pongs.wait_kind("message")[-1] == ("message", "pong srv")


# -- wscat, a command-line client ------------------------------------------------


def test_wscat_sends_a_line_and_reads_the_echo(ours):
    """wscat (npm; standing in for websocat, which is not packaged here):
    ``-x LINE`` sends the line once connected, the echo is printed (as the
    line alone, stdout not being a terminal), and ``-w`` seconds later it
    closes, with a close frame without a code (1005 for us), and exits 0.
    Its stdin stays open meanwhile: at the end of stdin wscat exits at once."""
    wscat = NODE_DIR / "node_modules" / ".bin" / "wscat"
    with child([str(wscat), "--no-color", "-c", ours.url, "-x", "hello wscat ✓",
                "-x", "second", "-w", "0.5"]) as proc:
        assert proc.wait(WAIT) == 0, proc.stderr.read()
        assert proc.stdout.read().splitlines() == ["hello wscat ✓", "second"]
    assert ours.events.wait_kind("close") == [("close", 1005, "")]
