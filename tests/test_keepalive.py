"""Keepalive pings and the closing-handshake timeout, timed against the clock.

The peers that misbehave are raw sockets that complete the handshake and
then never read: the kernel still acknowledges TCP segments, so only the
WebSocket-level pong is missing, which is exactly what keepalive exists to
detect. A websockets client on the same server is the peer that behaves.
"""

from __future__ import annotations

import threading
import time

import pytest
from websockets.sync.client import connect

from gaman_sync import define_block
from gaman_sync.testing import CLOSE, PING, MultiReader, RawPeer, connect_many, parse_close

from .conftest import WAIT

# Timer jitter on a loaded two-core machine stays well under this.
SLACK = 0.25


class Peers:
    """Per-client records, keyed by the ``cid`` query parameter."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.ctxs = {}
        self.opened = {}
        self.closes = {}
        self.pongs = {}
        self.block = define_block("/", self.handler)

    def handler(self, ctx):
        cid = ctx.request.query["cid"]

        def on_open():
            with self.cond:
                self.ctxs[cid] = ctx
                self.opened[cid] = time.monotonic()
                self.pongs[cid] = []
                self.cond.notify_all()

        def on_pong(data):
            with self.cond:
                self.pongs[cid].append(time.monotonic())
                self.cond.notify_all()

        def on_close(code, reason):
            with self.cond:
                self.closes.setdefault(cid, []).append((code, reason, time.monotonic()))
                self.cond.notify_all()

        return {"on_open": on_open, "on_pong": on_pong, "on_close": on_close}

    def wait(self, predicate, timeout: float = WAIT, what: str = "") -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, timeout), \
                f"timed out waiting for {what}; closes: {self.closes}"


def assert_closed_on_time(not_before: float, not_after: float, closed_at: float,
                          due: float, who: str = "") -> None:
    """The connection's clock started between ``not_before`` (the client
    began connecting) and ``not_after`` (on_open ran), and it was due to be
    closed ``due`` seconds after that: each bound is checked from the
    instant that cannot make it fail wrongly."""
    assert closed_at - not_before >= due - 0.02, \
        f"{who} closed early: {closed_at - not_before:.3f} s after connecting, due at {due} s"
    assert closed_at - not_after <= due + SLACK, \
        f"{who} closed late: {closed_at - not_after:.3f} s after on_open, due at {due} s"


@pytest.mark.parametrize("interval, timeout", [(0.3, 0.3), (0.2, 0.5), (0.5, 0.2)])
def test_peer_that_stops_answering_pings_is_closed_with_1011(make_server, interval, timeout):
    peers = Peers()
    server = make_server(peers.block, ping_interval=interval, ping_timeout=timeout,
                         close_timeout=2)
    # The keepalive clock starts somewhere between these two instants.
    before_connect = time.monotonic()
    silent = RawPeer.open("127.0.0.1", server.port, "/?cid=silent")
    try:
        with connect(f"ws://127.0.0.1:{server.port}/?cid=alive", max_size=None,
                     ping_interval=None, open_timeout=WAIT, close_timeout=WAIT) as alive:
            peers.wait(lambda: len(peers.ctxs) == 2, what="both clients to open")
            peers.wait(lambda: "silent" in peers.closes, interval + timeout + 2,
                       "the silent peer to be closed")
            (code, reason, closed_at), = peers.closes["silent"]
            assert code == 1011 and reason, (code, reason)
            # The first ping goes out after one interval; the peer then has
            # ping_timeout to answer it.
            assert_closed_on_time(before_connect, peers.opened["silent"], closed_at,
                                  interval + timeout)
            assert peers.ctxs["silent"] not in server.clients

            # The peer that answers is kept, through more than one full timeout
            # after the silent one was dropped.
            peers.wait(lambda: peers.pongs["alive"] and
                       peers.pongs["alive"][-1] > closed_at + timeout + interval,
                       what="the live client to keep answering")
            assert "alive" not in peers.closes
            assert peers.ctxs["alive"] in server.clients
            alive.send("still here")  # the client side saw no failure either

        # What the silent peer was sent: pings, then a close frame with 1011.
        frames = []
        silent.answer_pings = silent.answer_close = False
        silent.read_to_eof(frames.append)
        assert frames and frames[-1][0] == CLOSE, frames
        assert parse_close(frames[-1][1])[0] == 1011
        assert {f.opcode for f in frames[:-1]} == {PING}
    finally:
        silent.close()


class PreemptedAfterRelease:
    """A connection lock that, released by the timer thread, lets that thread
    lose the CPU for a while right after, as the scheduler may do at any
    point. Only the time the timer thread resumes changes, never what runs."""

    def __init__(self, lock, pause: float) -> None:
        self._lock = lock
        self._pause = pause
        self.pauses = 0

    def acquire(self, *args, **kwargs):
        return self._lock.acquire(*args, **kwargs)

    def release(self) -> None:
        self._lock.release()
        if threading.current_thread().name == "gaman_sync-timers":
            self.pauses += 1
            time.sleep(self._pause)

    def __getattr__(self, name):
        return getattr(self._lock, name)  # anything else the server may ask of its lock

    def __enter__(self):
        self._lock.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


@pytest.mark.parametrize("interval, timeout", [(0.3, 0.3), (0.4, 0.2)])
def test_ping_answered_at_once_never_times_out(make_server, interval, timeout):
    """The pong can be handled before the thread that sent the ping runs its
    next line; that must not make the ping look unanswered."""
    peers = Peers()
    locks = []

    def handler(ctx):
        callbacks = peers.handler(ctx)
        opened = callbacks["on_open"]

        def on_open():
            # Swapped before the first ping and before the connection's
            # reader starts: every later use of the lock goes through this.
            ctx._lock = PreemptedAfterRelease(ctx._lock, pause=0.05)
            locks.append(ctx._lock)
            opened()
        callbacks["on_open"] = on_open
        return callbacks

    server = make_server(define_block("/", handler), ping_interval=interval,
                         ping_timeout=timeout, close_timeout=2)
    with connect(f"ws://127.0.0.1:{server.port}/?cid=alive", max_size=None,
                 ping_interval=None, open_timeout=WAIT, close_timeout=WAIT):
        peers.wait(lambda: "alive" in peers.ctxs, what="open")
        # Three pings answered, each in well under ping_timeout.
        peers.wait(lambda: len(peers.pongs["alive"]) >= 3 or "alive" in peers.closes,
                   3 * interval + timeout + 2, "three pongs")
        assert locks[0].pauses >= 1, "the timer thread never took the lock: nothing was tested"
        assert "alive" not in peers.closes, \
            f"closed though every ping was answered: {peers.closes['alive']}, " \
            f"pongs {[round(t - peers.opened['alive'], 3) for t in peers.pongs['alive']]}"


def test_many_silent_peers_each_closed_on_time(make_server):
    """One timer thread serves every connection: a crowd of silent peers is
    closed on time, and the answering ones among them are not."""
    interval, timeout = 0.3, 0.3
    peers = Peers()
    server = make_server(peers.block, ping_interval=interval, ping_timeout=timeout,
                         close_timeout=2)
    before_connect = time.monotonic()
    silent = connect_many("127.0.0.1", server.port, (f"/?cid=s{i}" for i in range(100)))
    alive = connect_many("127.0.0.1", server.port, (f"/?cid=a{i}" for i in range(20)))
    reader = MultiReader()  # answers pings
    reader.add(alive)
    try:
        peers.wait(lambda: len(peers.ctxs) == 120, what="every client to open")
        peers.wait(lambda: all(f"s{i}" in peers.closes for i in range(100)),
                   interval + timeout + 2, "every silent peer to be closed")
        for i in range(100):
            (code, _, closed_at), = peers.closes[f"s{i}"]
            assert code == 1011
            assert_closed_on_time(before_connect, peers.opened[f"s{i}"], closed_at,
                                  interval + timeout, f"silent peer {i}")
        last = max(c[0][2] for c in peers.closes.values())
        peers.wait(lambda: all(p and p[-1] > last + timeout + interval
                               for cid, p in peers.pongs.items() if cid.startswith("a")),
                   what="the answering peers to answer beyond the timeout")
        assert not [cid for cid in peers.closes if cid.startswith("a")]
        assert sorted(c.request.query["cid"] for c in server.clients) == \
            sorted(f"a{i}" for i in range(20))
    finally:
        reader.stop()
        for client in silent:
            client.close()


@pytest.mark.parametrize("close_timeout", [0.3, 0.6])
def test_unanswered_close_ends_after_close_timeout(make_server, close_timeout):
    peers = Peers()
    server = make_server(peers.block, ping_interval=None, close_timeout=close_timeout)
    mute = RawPeer.open("127.0.0.1", server.port, "/?cid=mute")
    polite = RawPeer.open("127.0.0.1", server.port, "/?cid=polite")
    peers.wait(lambda: len(peers.ctxs) == 2, what="both clients to open")
    mute.answer_close = False
    started = time.monotonic()
    peers.ctxs["mute"].close(4000, "going")
    peers.ctxs["polite"].close(4001, "going too")
    frames = []
    polite.read_to_eof(frames.append)
    assert [f[0] for f in frames] == [CLOSE]
    peers.wait(lambda: "polite" in peers.closes, what="the polite close")
    # The polite peer's close completes on its answer, not on the timer.
    assert peers.closes["polite"][0][2] - started < close_timeout
    assert peers.closes["polite"][0][:2] == (4001, "going too")

    mute_frames = []
    mute.read_to_eof(mute_frames.append, timeout=close_timeout + 2)
    peers.wait(lambda: "mute" in peers.closes, what="the mute peer to be dropped")
    (code, reason, closed_at), = peers.closes["mute"]
    assert (code, reason) == (4000, "going")
    assert close_timeout - 0.02 <= closed_at - started <= close_timeout + SLACK, \
        closed_at - started
    assert mute.eof_at is not None and mute.eof_at - started >= close_timeout - 0.02
    assert [f[0] for f in mute_frames] == [CLOSE]
    assert parse_close(mute_frames[0][1]) == (4000, "going")
    assert server.clients == []
    mute.close()
    polite.close()
