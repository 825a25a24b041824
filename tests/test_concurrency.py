"""Concurrent writers, broadcast to many clients, and slow readers.

What is checked on the wire, by parsing every frame a client receives: no
frame is torn or interleaved with another, every message arrives exactly
once, and the messages of one sending thread arrive in the order it sent
them. What is checked inside the server: a broadcast never waits on a client
that does not read, and such a client is closed with 1008.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from typing import Callable, Dict, List, Optional

import pytest

import gaman_sync.connection
import gaman_sync.server
from gaman_sync import ConnectionClosed, ReadyState, SendTimeout, define_block
from gaman_sync.testing import (
    BINARY,
    CLOSE,
    PING,
    TEXT,
    RawPeer,
    connect_many,
    parse_close,
    raise_nofile,
)

from .conftest import WAIT
from .helpers import RoomClients, room_payload

N_CLIENTS = 200
N_SENDERS = 8
N_MESSAGES = 500
# Sizes cycle per message so that both 7-bit and 16-bit length headers occur:
# about 1 MB per client in all, several times what the stalled client can
# absorb (write_limit, plus what the kernels hold; see STALL_MSS).
SIZES = (24, 120, 300, 560)
STALL_WRITE_LIMIT = 256 * 1024
# Linux sizes a socket's send buffer from the MSS; loopback's 64 KiB MSS lets
# the server's kernel take about 3 MB toward even a peer with a tiny window.
# A small MSS on the stalled client keeps that near 50 KB, so it overflows
# after ~300 KB instead of ~3 MB, and the test moves 5 times less data.
STALL_MSS = 536
BROADCAST_BOUND = 0.2  # seconds; generous, for loaded CI machines
# Each sender keeps at most this many of its messages unreceived by its own
# client. The test's clients are all read by one Python thread; without this
# the harness itself would become the slow reader and be dropped with 1008.
WINDOW = 32


# SENT_BYTES[s][n]: bytes on the wire for sender s's first n messages (the
# smallest header, 2 bytes, counted for each: a lower bound).
SENT_BYTES = [[0] for _ in range(N_SENDERS)]
for _s in range(N_SENDERS):
    for _i in range(N_MESSAGES):
        SENT_BYTES[_s].append(SENT_BYTES[_s][-1] + len(room_payload(_s, _i, SIZES)) + 2)


class BroadcastRoom:
    """A block whose every message is broadcast, timing each broadcast."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.ctxs: Dict[str, object] = {}
        self.closes: Dict[str, List[tuple]] = {}
        self.durations: List[float] = []
        self.errors: List[BaseException] = []
        # Set by a broadcast over the bound, so that a failing run ends then.
        self.too_slow = threading.Event()
        self.broadcast_counts: Dict[str, int] = {}
        self.watched: Optional[object] = None  # a ctx whose buffer is sampled
        self.max_buffered = 0
        self.on_watched_close: Optional[Callable[[], None]] = None
        self.block = define_block("/room", self.handler)

    def handler(self, ctx):
        cid = ctx.request.query["cid"]

        def on_open():
            with self.cond:
                self.ctxs[cid] = ctx
                self.broadcast_counts[cid] = 0
                self.cond.notify_all()

        def on_message(message):
            start = time.perf_counter()
            try:
                ctx.server.broadcast(message)
            except BaseException as exc:  # broadcast is not supposed to raise
                self.errors.append(exc)
                raise
            finally:
                took = time.perf_counter() - start
                self.durations.append(took)
                if took >= BROADCAST_BOUND:
                    self.too_slow.set()
            self.broadcast_counts[cid] += 1
            watched = self.watched
            if watched is not None:
                amount = watched.buffered_amount
                if amount > self.max_buffered:
                    self.max_buffered = amount

        def on_close(code, reason):
            if ctx is self.watched and self.on_watched_close is not None:
                self.on_watched_close()
            with self.cond:
                self.closes.setdefault(cid, []).append((code, reason, time.monotonic()))
                self.cond.notify_all()

        return {"on_open": on_open, "on_message": on_message, "on_close": on_close}

    def wait_opened(self, count: int, timeout: float = WAIT) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.ctxs) >= count, timeout), \
                f"only {len(self.ctxs)} of {count} clients opened"


def run_broadcast_room(make_server, room: BroadcastRoom, stalled: bool,
                       write_limit: Optional[int] = None):
    """200 clients, 8 of them sending 500 messages each; all of them listen.

    Returns the server, the clients' process and its report, and the
    stalled client (if any).
    """
    raise_nofile(N_CLIENTS + 100)
    options = {"ping_interval": None}
    if write_limit is not None:
        options["write_limit"] = write_limit
    server = make_server(room.block, **options)
    crowd = RoomClients(server.port, "/room", N_CLIENTS, N_SENDERS, N_MESSAGES, SIZES, WINDOW)
    quiet = None
    try:
        crowd.expect("connected", 60)
        if stalled:
            # It finishes the handshake (the only recv it ever makes) and
            # reads nothing after.
            quiet = RawPeer.open("127.0.0.1", server.port, "/room?cid=stalled", rcvbuf=4096,
                                      mss=STALL_MSS)
        room.wait_opened(N_CLIENTS + (1 if stalled else 0))
        if stalled:
            room.watched = room.ctxs["stalled"]
        assert len(server.clients) == N_CLIENTS + (1 if stalled else 0)
        crowd.go()
        try:
            report = crowd.expect("done", 240, abort=room.too_slow if stalled else None)
        except AssertionError:
            if room.too_slow.is_set():
                raise AssertionError(f"a broadcast took {BROADCAST_BOUND} s or more: "
                                     f"{summary(room.durations)}") from None
            raise
    except BaseException:
        crowd.close()
        if quiet is not None:
            quiet.close()
        raise
    return server, crowd, report, quiet


def check_everyone_got_everything(room, report) -> None:
    assert not room.errors, room.errors[:3]
    assert not report["errors"], report["errors"]
    assert report["next"] == [[N_MESSAGES] * N_SENDERS] * N_CLIENTS
    assert report["count"] == [N_SENDERS * N_MESSAGES] * N_CLIENTS
    assert not report["eof"], f"disconnected: {report['eof']}"
    with room.cond:
        closed = {cid: c for cid, c in room.closes.items() if cid != "stalled"}
    assert not closed, f"healthy clients were closed: {closed}"


def summary(durations: List[float]) -> str:
    ordered = sorted(durations)
    n = len(ordered)
    return (f"{n} broadcasts: max {ordered[-1] * 1000:.1f} ms, "
            f"p99 {ordered[int(n * 0.99)] * 1000:.2f} ms, median {ordered[n // 2] * 1000:.2f} ms")


@pytest.mark.slow
def test_eight_senders_broadcast_to_200_clients(make_server, capsys):
    room = BroadcastRoom()
    server, crowd, report, _ = run_broadcast_room(make_server, room, stalled=False)
    try:
        check_everyone_got_everything(room, report)
        assert len(room.durations) == N_SENDERS * N_MESSAGES
        assert len(server.clients) == N_CLIENTS
        with capsys.disabled():
            print(f"\n[broadcast, all reading] {summary(room.durations)}; "
                  f"all delivered in {report['finished'] - report['started']:.2f} s")
    finally:
        crowd.close()


def test_stalled_client_does_not_hold_up_broadcasts(make_server, caplog, capsys):
    caplog.set_level(logging.WARNING, logger="gaman_sync")
    room = BroadcastRoom()
    stall_closed = {}

    def note_close():
        # What had been broadcast when it was dropped, at least: the
        # broadcasts that had returned.
        counts = dict(room.broadcast_counts)
        stall_closed["at"] = time.monotonic()
        stall_closed["bytes"] = sum(SENT_BYTES[int(cid)][n] for cid, n in counts.items()
                                    if cid.isdigit() and int(cid) < N_SENDERS)

    room.on_watched_close = note_close
    server, crowd, report, quiet = run_broadcast_room(
        make_server, room, stalled=True, write_limit=STALL_WRITE_LIMIT)
    started, finished = report["started"], report["finished"]
    try:
        check_everyone_got_everything(room, report)
        with room.cond:
            assert room.cond.wait_for(lambda: "stalled" in room.closes, WAIT), \
                "the stalled client was never closed"
            closes = room.closes["stalled"]
        assert len(closes) == 1, closes
        code, reason, _ = closes[0]
        assert code == 1008 and reason, (code, reason)
        assert stall_closed["bytes"] >= STALL_WRITE_LIMIT, \
            f"closed after only {stall_closed['bytes']} bytes were broadcast"
        assert room.max_buffered <= STALL_WRITE_LIMIT + max(SIZES) + 4, \
            f"its buffer grew to {room.max_buffered} bytes, over write_limit by more than a frame"
        assert [c for c in server.clients if c is room.ctxs["stalled"]] == []
        warnings = [r.getMessage() for r in caplog.records
                    if r.levelno == logging.WARNING and "write_limit" in r.getMessage()]
        assert warnings, [r.getMessage() for r in caplog.records]
        assert all(f"connection {room.ctxs['stalled'].id} " in w for w in warnings), warnings
        longest = max(room.durations)
        with capsys.disabled():
            print(f"\n[broadcast, one client stalled] {summary(room.durations)}; "
                  f"stalled client closed {stall_closed['at'] - started:.2f} s after the "
                  f"start, after {stall_closed['bytes'] / 1e6:.2f} MB broadcast "
                  f"(its buffer peaked at {room.max_buffered} bytes); "
                  f"all delivered in {finished - started:.2f} s")
        assert longest < BROADCAST_BOUND, summary(room.durations)

        # What reached it before the drop is an in-order prefix per sender.
        got = {s: [] for s in range(N_SENDERS)}
        quiet.sock.settimeout(WAIT)
        while True:
            try:
                data = quiet.sock.recv(262144)
            except ConnectionResetError:
                break
            if not data:
                break
            for f in quiet.parser.feed(data):
                opcode, body = f.opcode, f.payload
                assert opcode == TEXT
                got[int(body[:2])].append(int(body[3:8]))
        for sender, seqs in got.items():
            assert seqs == list(range(len(seqs))), f"sender {sender}: {seqs[:20]}..."
    finally:
        crowd.close()
        quiet.close()


def test_broadcast_encodes_the_frame_once(make_server, monkeypatch):
    calls = {"server": 0, "connection": 0}

    def counting(name, real):
        def encode(message, *args):
            calls[name] += 1
            return real(message, *args)
        return encode

    # The broadcast's encoder, and the one each connection's send uses.
    monkeypatch.setattr(gaman_sync.server.blocks, "encode_frame",
                        counting("server", gaman_sync.server.blocks.encode_frame))
    monkeypatch.setattr(gaman_sync.protocol.state, "encode_frame",
                        counting("connection", gaman_sync.protocol.state.encode_frame))
    room = BroadcastRoom()
    server = make_server(room.block, ping_interval=None)
    clients = connect_many("127.0.0.1", server.port, (f"/room?cid={i}" for i in range(30)))
    try:
        room.wait_opened(30)
        view = server.blocks[0]
        for i in range(5):
            assert view.broadcast(f"hello {i}") == 30
        assert calls == {"server": 5, "connection": 0}
        for client in clients:
            got = []
            client.read_until(lambda: len(got) == 5, lambda f: got.append((f.opcode, f.payload)))  # noqa: B023 (called now)
            assert got == [(TEXT, f"hello {i}".encode()) for i in range(5)]
    finally:
        for client in clients:
            client.close()


# -- Many threads sending on one connection ------------------------------------

SEND_THREADS = 12
SENDS_PER_THREAD = 150
PINGERS = 2
PINGS_PER_THREAD = 100
# Lengths around each header-size boundary, around the size at which the
# server switches from joining header and payload to sendmsg(), and large.
SEND_SIZES = (0, 1, 125, 126, 127, 4000, 16383, 16384, 16385, 65535, 65536, 70000, 300000)


def send_payload(tid: int, seq: int):
    size = SEND_SIZES[(tid * 7 + seq) % len(SEND_SIZES)]
    head = f"{tid:02d}:{seq:04d}:"
    body = (head + f"[{tid}/{seq}]" * (size // 4 + 1))[:max(size, len(head))]
    return body if (tid + seq) % 2 else body.encode()


def capture_connection():
    """A handler that hands its connection to the test once it is open, and
    its close code (``holder["code"]``, then ``closed`` is set) once closed."""
    opened = threading.Event()
    closed = threading.Event()
    holder = {}

    def handler(ctx):
        def on_open():
            holder["ctx"] = ctx
            opened.set()

        def on_close(code, reason):
            holder["code"] = code
            closed.set()
        return {"on_open": on_open, "on_close": on_close}

    return handler, holder, opened, closed


def test_many_threads_send_on_one_connection(make_server):
    handler, holder, opened, _ = capture_connection()

    # A small write_limit makes senders queue and wait for room while the
    # client is not reading yet, so every write path runs concurrently.
    server = make_server(define_block("/", handler), ping_interval=None,
                         write_limit=256 * 1024, send_timeout=30)
    client = RawPeer.open("127.0.0.1", server.port, "/", rcvbuf=64 * 1024)
    try:
        assert opened.wait(WAIT)
        ctx = holder["ctx"]
        queued = threading.Event()
        saw_queue = []
        failures: List[BaseException] = []
        done = []
        go = threading.Barrier(SEND_THREADS + PINGERS, timeout=WAIT)

        def sender(tid: int) -> None:
            try:
                go.wait()
                for seq in range(SENDS_PER_THREAD):
                    ctx.send(send_payload(tid, seq))
                    if ctx.buffered_amount:
                        saw_queue.append(True)
                        queued.set()
            except BaseException as exc:
                failures.append(exc)
            finally:
                done.append(tid)
                if len(done) == SEND_THREADS + PINGERS:
                    queued.set()

        def pinger(pid: int) -> None:
            try:
                go.wait()
                for seq in range(PINGS_PER_THREAD):
                    ctx.ping(f"p{pid}:{seq}")
            except BaseException as exc:
                failures.append(exc)
            finally:
                done.append(pid)
                if len(done) == SEND_THREADS + PINGERS:
                    queued.set()

        threads = [threading.Thread(target=sender, args=(t,)) for t in range(SEND_THREADS)]
        threads += [threading.Thread(target=pinger, args=(p,)) for p in range(PINGERS)]
        for thread in threads:
            thread.start()
        # Read only once the server has had to queue: that is the path where
        # a torn frame would come from.
        assert queued.wait(WAIT)

        nxt = [0] * SEND_THREADS
        pings = [0] * PINGERS
        client.answer_pings = False  # the pings are data here, not keepalive

        def on_frame(frame):
            opcode, data = frame.opcode, frame.payload
            if opcode == PING:
                pid, seq = data.decode()[1:].split(":")
                assert int(seq) == pings[int(pid)], f"ping {data!r} out of order"
                pings[int(pid)] += 1
                return
            assert opcode in (TEXT, BINARY), frame[:1]
            tid, seq = int(data[:2]), int(data[3:7])
            assert seq == nxt[tid], f"thread {tid}: got #{seq}, expected #{nxt[tid]}"
            want = send_payload(tid, seq)
            assert (opcode, data) == ((TEXT, want.encode()) if isinstance(want, str)
                                      else (BINARY, want)), f"message {tid}/{seq} corrupted"
            nxt[tid] += 1

        client.read_until(lambda: failures or (nxt == [SENDS_PER_THREAD] * SEND_THREADS
                                               and pings == [PINGS_PER_THREAD] * PINGERS),
                          on_frame, timeout=60)
        for thread in threads:
            thread.join(WAIT)
            assert not thread.is_alive()
        assert not failures, failures
        assert client.parser.pending == 0
        assert saw_queue, "the senders never had to queue: the test missed the write path"
    finally:
        client.close()


# -- send() toward a peer that does not read -----------------------------------

def test_send_to_stalled_client_times_out_without_delaying_others(make_server):
    ctxs = {}
    cond = threading.Condition()

    def handler(ctx):
        def on_open():
            with cond:
                ctxs[ctx.request.query["cid"]] = ctx
                cond.notify_all()
        return {"on_open": on_open}

    limit = 64 * 1024
    server = make_server(define_block("/", handler), ping_interval=None, write_limit=limit,
                         send_timeout=5)
    stalled = RawPeer.open("127.0.0.1", server.port, "/?cid=stalled", rcvbuf=4096, mss=STALL_MSS)
    healthy = RawPeer.open("127.0.0.1", server.port, "/?cid=healthy")
    try:
        with cond:
            assert cond.wait_for(lambda: len(ctxs) == 2, WAIT)
        chunk = b"x" * 16384
        timeout = 0.3
        raised = None
        sent = 0
        start = time.monotonic()
        while raised is None and sent < 100_000_000:
            start = time.monotonic()
            try:
                ctxs["stalled"].send(chunk, timeout=timeout)
                sent += len(chunk)
            except SendTimeout as exc:
                raised = exc
        waited = time.monotonic() - start
        assert raised is not None, "send never waited on a peer that does not read"
        assert timeout - 0.01 <= waited <= timeout + 0.5, waited
        assert "write_limit" in str(raised)
        assert ctxs["stalled"].ready_state is ReadyState.OPEN
        # send waits only when the next frame would not fit.
        assert ctxs["stalled"].buffered_amount + len(chunk) > limit

        # While a send waits on the stalled peer, the other connection's
        # sends go straight through.
        blocked_result = []

        def blocked_send():
            began = time.monotonic()
            try:
                ctxs["stalled"].send(chunk, timeout=1.0)
                blocked_result.append(("returned", time.monotonic() - began))
            except Exception as exc:
                blocked_result.append((exc, time.monotonic() - began))

        waiter = threading.Thread(target=blocked_send)
        waiter.start()
        assert waiting_in_send(waiter), "the second send did not wait"
        began = time.monotonic()
        for i in range(50):
            ctxs["healthy"].send(f"h{i}")
        quick = time.monotonic() - began
        assert waiter.is_alive(), "the stalled send stopped waiting too early to tell"
        got = []
        healthy.read_until(lambda: len(got) == 50, lambda f: got.append((f.opcode, f.payload)))
        assert got == [(TEXT, f"h{i}".encode()) for i in range(50)]
        assert quick < 0.2, f"sending to a healthy client took {quick:.3f} s"
        waiter.join(WAIT)
        assert isinstance(blocked_result[0][0], SendTimeout), blocked_result
    finally:
        stalled.close()
        healthy.close()


def test_send_waiting_for_room_raises_when_the_connection_is_dropped(make_server):
    """A send that waits on a full buffer must not report success once the
    connection is gone: its message was never sent."""
    handler, holder, opened, closed = capture_connection()

    server = make_server(define_block("/", handler), ping_interval=None,
                         write_limit=32 * 1024, send_timeout=10)
    stalled = RawPeer.open("127.0.0.1", server.port, "/", rcvbuf=4096, mss=STALL_MSS)
    try:
        assert opened.wait(WAIT)
        ctx = holder["ctx"]
        chunk = b"y" * 16384
        while ctx.buffered_amount + len(chunk) <= 32 * 1024:  # until the next one won't fit
            ctx.send(chunk, timeout=1)
        outcome = []

        def blocked():
            try:
                ctx.send(chunk)
                outcome.append("returned as if sent")
            except ConnectionClosed as exc:
                outcome.append(exc)
            except Exception as exc:
                outcome.append(exc)

        thread = threading.Thread(target=blocked)
        thread.start()
        # Nothing signals that the send has started waiting for room, so its
        # stack is watched for it: the drop must hit a waiting send.
        assert waiting_in_send(thread), "send never waited for room"
        ctx.terminate()
        assert closed.wait(WAIT)
        thread.join(WAIT)
        assert not thread.is_alive(), "send kept waiting after the connection was dropped"
        assert isinstance(outcome[0], ConnectionClosed), outcome
    finally:
        stalled.close()


@pytest.mark.parametrize("how", ["peer_reset", "peer_fin", "terminate"])
def test_send_after_connection_lost_raises(make_server, how):
    """After on_close, send() from another thread raises ConnectionClosed
    instead of dropping the message silently."""
    handler, holder, opened, closed = capture_connection()

    server = make_server(define_block("/", handler), ping_interval=None)
    client = RawPeer.open("127.0.0.1", server.port, "/")
    assert opened.wait(WAIT)
    ctx = holder["ctx"]
    if how == "peer_reset":
        client.abort()
    elif how == "peer_fin":
        client.sock.shutdown(socket.SHUT_WR)
    else:
        ctx.terminate()
    assert closed.wait(WAIT)
    assert holder["code"] == 1006
    assert ctx.ready_state is ReadyState.CLOSED
    outcome = []
    for call in (lambda: ctx.send("late"), lambda: ctx.send(b"late"), lambda: ctx.ping()):
        thread = threading.Thread(target=_capture, args=(outcome, call))
        thread.start()
        thread.join(WAIT)
    client.close()
    assert all(isinstance(o, ConnectionClosed) for o in outcome), outcome
    assert ctx.ready_state is ReadyState.CLOSED


def waiting_in_send(thread: threading.Thread, timeout: float = WAIT) -> bool:
    """Wait until ``thread`` is blocked in a Condition wait inside ctx.send()."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and thread.is_alive():
        frame = sys._current_frames().get(thread.ident)
        names = []
        while frame is not None:
            names.append((frame.f_code.co_name, frame.f_code.co_filename))
            frame = frame.f_back
        in_wait = any(name == "wait" and path.endswith("threading.py") for name, path in names)
        in_send = any(name == "send" and "gaman_sync" in path for name, path in names)
        if in_wait and in_send:
            return True
        time.sleep(0.001)
    return False


def _capture(outcome: list, call) -> None:
    try:
        call()
        outcome.append("returned as if sent")
    except Exception as exc:
        outcome.append(exc)


def test_close_frame_of_a_send_is_never_split(make_server):
    """ctx.close() from one thread while others send: the close frame is the
    last frame and whole, and no data frame follows it."""
    handler, holder, opened, _ = capture_connection()

    server = make_server(define_block("/", handler), ping_interval=None)
    client = RawPeer.open("127.0.0.1", server.port, "/")
    try:
        assert opened.wait(WAIT)
        ctx = holder["ctx"]
        results: Dict[int, List[int]] = {}
        go = threading.Barrier(5, timeout=WAIT)

        def sender(tid):
            sent = results.setdefault(tid, [])
            go.wait()
            for seq in range(2000):
                try:
                    ctx.send(f"{tid}:{seq}:" + "z" * (seq % 300))
                except ConnectionClosed:
                    return
                sent.append(seq)

        threads = [threading.Thread(target=sender, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        go.wait()
        ctx.close(4000, "enough")
        for thread in threads:
            thread.join(WAIT)
        frames = []
        client.read_to_eof(frames.append)
        closes = [i for i, f in enumerate(frames) if f[0] == CLOSE]
        assert closes == [len(frames) - 1], "the close frame is not last, or not alone"
        assert parse_close(frames[-1][1]) == (4000, "enough")
        per_thread: Dict[int, List[int]] = {}
        for _opcode, data in ((f.opcode, f.payload) for f in frames[:-1]):
            tid, seq, _ = data.decode().split(":")
            per_thread.setdefault(int(tid), []).append(int(seq))
        for tid, sent in results.items():
            # What send() accepted reached the peer, in order, before the close.
            assert per_thread.get(tid, []) == sent, f"thread {tid}"
    finally:
        client.close()
