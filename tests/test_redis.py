"""Broadcasts across processes through a real Redis (``redis-server``, run
here on 127.0.0.1, a free port, nothing saved): two server processes
(``tests/cluster_node.py``) share it, with clients on both.

Skipped, with the reason, when ``redis-server`` or the ``redis`` package is
missing, unless ``GAMAN_SYNC_REQUIRE_PEERS=1`` (``.ci/run`` sets it and
installs both): then they fail.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, List, Optional

import pytest

from .conftest import WAIT
from .test_rooms import Peer

NODE = Path(__file__).resolve().parent / "cluster_node.py"


def missing() -> Optional[str]:
    if shutil.which("redis-server") is None:
        return ("redis-server is not installed (Debian: apt-get install redis-server; "
                ".ci/run does it)")
    try:
        import redis  # noqa: F401
    except ImportError:
        return "the redis package is not installed: pip install -e '.[test]'"
    return None


@pytest.fixture(autouse=True)
def redis_available() -> None:
    reason = missing()
    if reason is None:
        return
    if os.environ.get("GAMAN_SYNC_REQUIRE_PEERS") == "1":
        pytest.fail(f"{reason} (GAMAN_SYNC_REQUIRE_PEERS=1 forbids skipping)", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """``redis-server`` on 127.0.0.1:``port``, nothing saved; kill() and
    start() again on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: Optional[subprocess.Popen] = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--logfile", ""],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        ready = queue.Queue()

        def read() -> None:
            for line in self.proc.stdout:
                if "Ready to accept connections" in line:
                    ready.put(True)
            ready.put(False)

        threading.Thread(target=read, daemon=True).start()
        try:
            ok = ready.get(timeout=WAIT)
        except queue.Empty:
            ok = False
        assert ok, f"redis-server did not start on port {self.port}"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(WAIT)
            self.proc.stdout.close()

    def client(self):
        import redis
        return redis.Redis.from_url(self.url)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.kill()


class Node:
    """A server process of tests/cluster_node.py through ``url``; its log
    lines are collected as they come."""

    def __init__(self, url: str) -> None:
        self.proc = subprocess.Popen([sys.executable, str(NODE), url], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.log: List[str] = []
        self.pid = self.proc.pid
        threading.Thread(target=self._read_log, daemon=True).start()
        box: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: box.put(self.proc.stdout.readline()), daemon=True).start()
        try:
            line = box.get(timeout=30)
        except queue.Empty:
            line = ""
        if not line.startswith("READY "):
            self.stop()
            raise AssertionError(f"the node did not start: {line!r} {self.log}")
        self.url = f"ws://127.0.0.1:{int(line.split()[1])}"

    def _read_log(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line.rstrip("\n"))

    def warnings(self, text: str) -> List[str]:
        return [line for line in self.log if line.startswith("WARNING") and text in line]

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def sockets(self) -> int:
        fds = Path(f"/proc/{self.pid}/fd")
        count = 0
        for fd in fds.iterdir():
            with contextlib.suppress(OSError):
                count += os.readlink(fd).startswith("socket:")
        return count

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(WAIT)
        self.proc.stdout.close()


@pytest.fixture
def nodes(redis_server):
    started: List[Node] = []
    try:
        started.extend(Node(redis_server.url) for _ in range(2))
        yield started
    finally:
        for node in started:
            node.stop()


def test_every_client_of_both_processes_gets_every_broadcast_once_in_order(nodes):
    a, b = nodes
    peers = [Peer(a.url), Peer(a.url), Peer(a.url), Peer(b.url), Peer(b.url), Peer(b.url)]
    assert len({p.id for p in peers}) == 6  # ids unique across processes
    senders = [peers[0], peers[1], peers[3], peers[4]]
    count = 60

    def send_all(k: int, peer: Peer) -> None:
        for i in range(count):
            # Even: text; odd: binary. Each sender's thread sends at once.
            peer.do(op="say", text=f"m:{k}:{i}", binary=bool(i % 2))
        peer.do(op="say", text=f"end:{k}")

    threads = [threading.Thread(target=send_all, args=(k, p)) for k, p in enumerate(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    for peer in peers:
        got, ended = [], set()
        while len(ended) < len(senders):
            message = peer.recv()
            text = message.decode() if isinstance(message, bytes) else message
            kind, k, *rest = text.split(":")
            if kind == "end":
                ended.add(int(k))
                continue
            i = int(rest[0])
            assert isinstance(message, bytes) == bool(i % 2), f"type changed: {message!r}"
            assert int(k) not in ended, f"{text} after the end of its sender"
            got.append((int(k), i))
        # Exactly once each, in order per sender.
        assert sorted(got) == [(k, i) for k in range(len(senders)) for i in range(count)]
        for k in range(len(senders)):
            assert [i for s, i in got if s == k] == list(range(count))


def test_rooms_and_exclude_across_processes(nodes):
    a, b = nodes
    a1, a2, b1, b2 = Peer(a.url), Peer(a.url), Peer(b.url), Peer(b.url)
    a1.join("r")
    b1.join("r")
    # A room: its members on both processes, no one else.
    assert a2.say("room", room="r") == 1  # a1, in this process
    assert a1.recv() == "room" and b1.recv() == "room"
    a2.do(op="say", text="marker1")  # to all: the next thing a2 and b2 get
    for p in (a2, b2, a1, b1):
        assert p.recv() == "marker1"
    # exclude names connections of both processes.
    assert a1.say("skip", exclude=[b1.id, a2.id]) == 1
    assert a1.recv() == "skip" and b2.recv() == "skip"
    a1.do(op="say", text="marker2")
    for p in (b1, a2, a1, b2):
        assert p.recv() == "marker2"
    # A room with exclude, from the other process.
    b2.join("r")
    assert b2.say("room-but-a1", room="r", exclude=[a1.id]) == 2
    assert b1.recv() == "room-but-a1" and b2.recv() == "room-but-a1"
    b2.do(op="say", text="marker3")
    for p in (a1, a2, b1, b2):
        assert p.recv() == "marker3"
    # Leaving: a1 no longer gets the room's broadcasts from b.
    a1.leave("r")
    b1.do(op="say", text="after-leave", room="r")
    b1.do(op="say", text="marker4")
    assert a1.recv() == "marker4"


def wait_crossing(sender: Peer, receiver: Peer, tag: str, timeout: float = WAIT) -> float:
    """Broadcast probes from ``sender`` every 50 ms until ``receiver`` gets
    one; the seconds that took."""
    start = time.monotonic()
    n = 0
    while True:
        sender.do(op="say", text=f"{tag}:{n}")
        n += 1
        try:
            message = receiver.client.recv(0.05)
        except TimeoutError:
            assert time.monotonic() - start < timeout, f"no {tag} crossed in {timeout} s"
            continue
        if message.startswith(f"{tag}:"):
            return time.monotonic() - start


def drain(peer: Peer, tag: str, last: str) -> None:
    """Skip ``peer``'s messages up to ``last`` (probes tagged ``tag``)."""
    while True:
        message = peer.recv()
        assert message.startswith(tag + ":"), message
        if message == last:
            return


def test_redis_lost_and_back(nodes, redis_server):
    a, b = nodes
    a1, a2, b1 = Peer(a.url), Peer(a.url), Peer(b.url)
    redis_server.kill()
    # Local delivery never stops: a's clients get every broadcast of a.
    for i in range(20):
        a1.do(op="say", text=f"down:{i}")
    for peer in (a1, a2):
        assert [peer.recv() for _ in range(20)] == [f"down:{i}" for i in range(20)]
    redis_server.start()
    took = max(wait_crossing(a1, b1, "ab"), wait_crossing(b1, a2, "ba"))
    assert took < 5.0, f"cross-process delivery resumed after {took:.1f} s"
    for node in (a, b):
        # One warning for the outage, not one per broadcast.
        assert len(node.warnings("is unreachable")) == 1, node.log


def test_redis_down_at_start_is_a_clear_error():
    from gaman_sync import BrokerUnavailable, RedisBroker, WebSocketServer

    from .cluster_node import room_block

    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    server = WebSocketServer(room_block(), port=0, broker=RedisBroker(url, connect_timeout=1))
    with pytest.raises(BrokerUnavailable, match=r"cannot reach Redis at redis://127\.0\.0\.1"):
        server.start()
    assert server.threads == [] and not server.listener_open
    server.shutdown()


def test_a_start_that_fails_to_listen_leaves_no_broker_running(redis_server):
    from gaman_sync import RedisBroker, WebSocketServer

    from .cluster_node import room_block

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = WebSocketServer(room_block(), port=taken.getsockname()[1],
                                 broker=RedisBroker(redis_server.url))
        with pytest.raises(OSError):
            server.start()
        assert server.threads == [] and not server.broker.connected
    with server:  # the port is free again: a retry works
        assert server.broker.connected and len(server.broker.threads) == 2
    assert server.threads == []


def test_channels_are_prefixed_per_application(redis_server):
    from gaman_sync import RedisBroker, WebSocketServer

    from .cluster_node import room_block

    def server(prefix: str) -> WebSocketServer:
        return WebSocketServer(room_block(), port=0, ping_interval=None,
                               broker=RedisBroker(redis_server.url, prefix=prefix))

    one, two, one_again = server("one"), server("two"), server("one")
    with one, two, one_again:
        assert one.broker.connected and "connected" in repr(one.broker)
        channels = sorted(c.decode() for c in redis_server.client().pubsub_channels())
        assert channels == ["one:/rooms", "two:/rooms"]
        p1, p2, p3 = Peer(one), Peer(two), Peer(one_again)
        p1.do(op="say", text="for one")
        assert p1.recv() == "for one" and p3.recv() == "for one"
        p2.do(op="say", text="for two")
        assert p2.recv() == "for two"  # and not "for one" first
        # The whole server's broadcast goes out on each block's channel.
        assert one.broadcast(b"root") == 1
        assert p3.recv() == b"root"
        # A payload that is not an envelope is skipped, and logged once.
        redis_server.client().publish("one:/rooms", b"x" * 16 + b"garbage")
        p1.do(op="say", text="still fine")
        assert p3.recv() == "still fine"
    assert not one.broker.connected and one.broker.threads == []


def quiesce(peers: List[Peer], tag: str) -> None:
    """Each of ``peers`` (senders of probes) broadcasts a marker; each reads
    until it has every marker, so every probe sent before is behind it
    (one thread's broadcasts arrive in order)."""
    for peer in peers:
        peer.do(op="say", text=tag)
    for peer in peers:
        seen = 0
        while seen < len(peers):
            seen += peer.recv() == tag


def test_twenty_redis_restarts_leak_nothing(nodes, redis_server):
    a, b = nodes
    a1, b1 = Peer(a.url), Peer(b.url)
    wait_crossing(a1, b1, "warm")
    quiesce([a1, b1], "warm-sync")
    before = [(n.threads(), n.sockets()) for n in nodes]
    for restart in range(20):
        redis_server.kill()
        a1.do(op="say", text=f"down:{restart}")
        assert a1.recv() == f"down:{restart}"  # local delivery goes on
        redis_server.start()
        wait_crossing(a1, b1, f"ab{restart}")
        wait_crossing(b1, a1, f"ba{restart}")
        quiesce([a1, b1], f"sync{restart}")
    after = [(n.threads(), n.sockets()) for n in nodes]
    assert after == before, f"threads and sockets per process: {before} then {after}"
    # Two Redis connections per process (publisher, subscriber), no more.
    clients = redis_server.client().client_list()
    assert len(clients) - 1 == 4, clients
    for node in nodes:
        # Each restart was an outage each process noticed, and warned of once.
        assert len(node.warnings("is unreachable")) == 20, node.log


def test_the_cluster_example_shows_a_message_crossing(redis_server):
    root = NODE.parent.parent
    out = subprocess.run([sys.executable, str(root / "examples" / "cluster.py"), "--redis",
                          redis_server.url], capture_output=True, text=True, timeout=60,
                         cwd=root)
    assert out.returncode == 0, out.stderr
    assert "bob got, through Redis: 'hello from the first server'" in out.stdout
    assert "carol got: \"carol's garden\" (not alice's)" in out.stdout
