"""server.shutdown(): with many clients, with a client that ignores the
close, from a callback, from a signal handler, from several threads at once,
and while clients keep connecting.

After every shutdown the test checks threading.enumerate() for the server's
threads (all named gaman_sync-*): shutdown() returning means none is left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import Dict, List, Optional

import pytest
from websockets.exceptions import ConnectionClosedOK
from websockets.sync.client import connect

from gaman_sync import define_block
from gaman_sync.testing import MultiReader, RawPeer, connect_many, raise_nofile

from .conftest import WAIT
from .helpers import server_threads

TIMEOUT = 3.0


class Tracker:
    """Opens and closes per client (``cid`` query parameter)."""

    def __init__(self, **extra) -> None:
        self.cond = threading.Condition()
        self.ctxs: Dict[str, object] = {}
        self.closes: Dict[str, List[tuple]] = {}
        self.extra = extra
        self.block = define_block("/", self.handler)

    def handler(self, ctx):
        cid = ctx.request.query.get("cid", str(ctx.id))

        def on_open():
            with self.cond:
                self.ctxs[cid] = ctx
                self.cond.notify_all()
            if "on_open" in self.extra:
                self.extra["on_open"](ctx, cid)

        def on_close(code, reason):
            with self.cond:
                self.closes.setdefault(cid, []).append((code, reason, time.monotonic()))
                self.cond.notify_all()
            if "on_close" in self.extra:
                self.extra["on_close"](ctx, cid)

        callbacks = {"on_open": on_open, "on_close": on_close}
        if "on_message" in self.extra:
            callbacks["on_message"] = lambda message: self.extra["on_message"](ctx, cid, message)
        return callbacks

    def wait(self, predicate, timeout: float = WAIT, what: str = "") -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, timeout), \
                f"timed out waiting for {what}: {len(self.ctxs)} opened, {len(self.closes)} closed"

    def assert_each_closed_once(self, code: int = 1001,
                                except_: Optional[Dict[str, int]] = None) -> None:
        except_ = except_ or {}
        with self.cond:
            assert set(self.closes) == set(self.ctxs), \
                f"never closed: {sorted(set(self.ctxs) - set(self.closes))[:10]}"
            for cid, closes in self.closes.items():
                assert len(closes) == 1, (cid, closes)
                assert closes[0][0] == except_.get(cid, code), (cid, closes)


def new_server_threads(before) -> List[threading.Thread]:
    return [t for t in server_threads() if t not in before]


def join_shutdown_threads() -> None:
    """The thread a callback's shutdown() started ends right after it is done."""
    for thread in threading.enumerate():
        if thread.name == "gaman_sync-shutdown":
            thread.join(WAIT)


def test_shutdown_with_500_clients_and_one_that_ignores_the_close(make_server, capsys):
    n_raw, n_ws = 496, 3
    raise_nofile(2 * (n_raw + n_ws + 1) + 200)
    # A thread left over by an earlier test is that test's business.
    before = set(server_threads())
    tracker = Tracker()
    server = make_server(tracker.block, ping_interval=None, close_timeout=TIMEOUT * 2)
    reader = MultiReader()
    ws_clients = []
    stack = contextlib.ExitStack()
    try:
        raw = connect_many("127.0.0.1", server.port, (f"/?cid=r{i}" for i in range(n_raw)))
        ignorer = RawPeer.open("127.0.0.1", server.port, "/?cid=ignorer")
        ignorer.answer_close = False
        reader.add([*raw, ignorer])
        for i in range(n_ws):
            ws_clients.append(stack.enter_context(connect(
                f"ws://127.0.0.1:{server.port}/?cid=w{i}", max_size=None,
                ping_interval=None, open_timeout=WAIT, close_timeout=WAIT)))
        tracker.wait(lambda: len(tracker.ctxs) == 500, what="500 clients to open")
        assert len(server.clients) == 500

        result = {}

        def do_shutdown():
            began = time.monotonic()
            server.shutdown(TIMEOUT)
            result["end"] = time.monotonic()
            result["elapsed"] = result["end"] - began

        shutter = threading.Thread(target=do_shutdown)
        started = time.monotonic()
        shutter.start()
        reader.wait_for(lambda: ignorer.received_close is not None,
                        what="the ignoring client to get its close frame")
        assert ignorer.received_close[0] == 1001
        # Closing has begun, so accepting has stopped.
        with pytest.raises(OSError):
            RawPeer.open("127.0.0.1", server.port, "/?cid=late", timeout=2).close()
        shutter.join(TIMEOUT + WAIT)
        assert not shutter.is_alive(), "shutdown() did not return"
        elapsed = result["elapsed"]

        leftover = new_server_threads(before)
        assert not leftover, f"threads still running after shutdown: {leftover}"
        assert elapsed <= TIMEOUT, f"shutdown took {elapsed:.2f} s, over its timeout"
        assert server.clients == []
        tracker.assert_each_closed_once(1001)
        assert "late" not in tracker.ctxs

        reader.wait_for(lambda: all(c.eof for c in raw) and ignorer.eof,
                        what="every raw client to see the end of TCP")
        assert all(c.received_close is not None and c.received_close[0] == 1001 for c in raw)
        handshakes_done = max(c.eof_at for c in raw) - started
        dropped = tracker.closes["ignorer"][0][2] - started
        # The ignoring client was given a fair part of the timeout, and was
        # dropped (its on_close run) before shutdown() returned.
        assert dropped >= TIMEOUT / 2, dropped
        assert tracker.closes["ignorer"][0][2] <= result["end"]
        assert handshakes_done < dropped
        for ws in ws_clients:
            with pytest.raises(ConnectionClosedOK) as info:
                ws.recv(timeout=WAIT)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1001
        with capsys.disabled():
            print(f"\n[shutdown, 500 clients] {handshakes_done:.2f} s until 499 close "
                  f"handshakes were done; the ignoring client dropped at {dropped:.2f} s; "
                  f"shutdown() returned after {elapsed:.2f} s (timeout {TIMEOUT} s)")
    finally:
        reader.stop()
        stack.close()


@pytest.mark.parametrize("callback", ["on_message", "on_close", "on_open"])
def test_shutdown_from_a_callback(make_server, callback):
    before = set(server_threads())
    calls: List[tuple] = []

    def stop(ctx, cid, *message):
        # In the on_close case every on_close calls shutdown, those that the
        # shutdown itself causes included: each call must return at once.
        if callback == "on_close":
            wanted = True
        elif callback == "on_message":
            wanted = cid == "trigger" and message == ("stop",)
        else:
            wanted = cid == "trigger"
        if wanted:
            began = time.monotonic()
            ctx.server.root.shutdown(TIMEOUT)
            calls.append((cid, time.monotonic() - began, threading.current_thread().name))

    tracker = Tracker(**{callback: stop})
    server = make_server(tracker.block, ping_interval=None)
    reader = MultiReader()
    clients = connect_many("127.0.0.1", server.port, (f"/?cid=c{i}" for i in range(20)))
    reader.add(clients)
    tracker.wait(lambda: len(tracker.ctxs) == 20, what="clients to open")
    trigger = RawPeer.open("127.0.0.1", server.port, "/?cid=trigger")
    if callback == "on_message":
        trigger.send_text("stop")
    elif callback == "on_close":
        trigger.send_close(1000, "bye")
    reader.add([trigger])
    tracker.wait(lambda: len(tracker.closes) == 21, TIMEOUT + WAIT, "every on_close")
    assert calls, "the callback never ran"
    for cid, took, thread_name in calls:
        assert took < 0.5, f"shutdown() from {callback} of {cid} blocked for {took:.2f} s"
        assert thread_name.startswith("gaman_sync-conn-")
    began = time.monotonic()
    server.shutdown(TIMEOUT)  # waits for the shutdown under way to finish
    assert time.monotonic() - began <= TIMEOUT + 2
    join_shutdown_threads()
    assert not new_server_threads(before), new_server_threads(before)
    tracker.assert_each_closed_once(1001, {"trigger": 1000} if callback == "on_close" else {})
    reader.wait_for(lambda: all(c.eof for c in [*clients, trigger]), what="EOF everywhere")
    assert all(c.received_close is not None and c.received_close[0] == 1001 for c in clients)
    reader.stop()


@pytest.fixture
def main_thread_only():
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers run in the main thread only")


def test_shutdown_from_a_signal_handler(make_server, main_thread_only):
    before = set(server_threads())
    tracker = Tracker()
    server = make_server(tracker.block, ping_interval=None)
    reader = MultiReader()
    clients = connect_many("127.0.0.1", server.port, (f"/?cid=c{i}" for i in range(30)))
    reader.add(clients)
    tracker.wait(lambda: len(tracker.ctxs) == 30, what="clients to open")
    result = {}

    def on_signal(signum, frame):
        began = time.monotonic()
        server.shutdown(TIMEOUT)
        result["elapsed"] = time.monotonic() - began

    finished = threading.Event()
    previous = signal.signal(signal.SIGUSR1, lambda *args: (on_signal(*args), finished.set()))
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert finished.wait(TIMEOUT + WAIT)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert result["elapsed"] <= TIMEOUT
    assert not new_server_threads(before), new_server_threads(before)
    tracker.assert_each_closed_once(1001)
    reader.wait_for(lambda: all(c.eof for c in clients), what="EOF everywhere")
    reader.stop()


class Deadlock(Exception):
    pass


def test_shutdown_from_a_signal_handler_that_interrupts_a_broadcast(make_server,
                                                                   main_thread_only):
    """The main thread is broadcasting when the signal comes, so the handler
    may run while this thread is inside a connection's write. shutdown()
    must still finish instead of waiting on a lock its own thread holds.

    A watchdog breaks a deadlock with a second signal, whose handler raises
    out of the stuck lock acquire, so a failure fails the test instead of
    hanging the run.
    """
    before = set(server_threads())
    tracker = Tracker()
    server = make_server(tracker.block, ping_interval=None)
    received = []
    reader = MultiReader(lambda client, opcode, data: received.append(1))
    clients = connect_many("127.0.0.1", server.port, (f"/?cid=c{i}" for i in range(20)))
    reader.add(clients)
    tracker.wait(lambda: len(tracker.ctxs) == 20, what="clients to open")
    finished = threading.Event()
    result = {}

    def on_signal(signum, frame):
        began = time.monotonic()
        server.shutdown(TIMEOUT)
        result["elapsed"] = time.monotonic() - began
        # Seen from here, where the interrupted broadcast cannot go on yet.
        result["left_running"] = [t.name for t in new_server_threads(before)]
        finished.set()

    def on_watchdog(signum, frame):
        raise Deadlock()

    def send_signals():
        reader.wait_for(lambda: len(received) >= 2000, what="broadcasts to flow")
        os.kill(os.getpid(), signal.SIGUSR1)
        if not finished.wait(TIMEOUT + 3):
            result["deadlock"] = True
            os.kill(os.getpid(), signal.SIGUSR2)

    try:
        previous = (signal.signal(signal.SIGUSR1, on_signal),
                    signal.signal(signal.SIGUSR2, on_watchdog))
        signaller = threading.Thread(target=send_signals)
        try:
            signaller.start()
            deadline = time.monotonic() + TIMEOUT + WAIT
            try:
                while not finished.is_set() and time.monotonic() < deadline:
                    server.broadcast("tick " * 20)
            except Deadlock:
                pass
            signaller.join(WAIT)
        finally:
            signal.signal(signal.SIGUSR1, previous[0])
            signal.signal(signal.SIGUSR2, previous[1])
        if result.get("deadlock"):
            # What the stuck shutdown left behind, so that the next tests run.
            for ctx in list(tracker.ctxs.values()):
                ctx.terminate()
            tracker.wait(lambda: len(tracker.closes) == 20, what="the cleanup")
            server.runtime.timers.stop(WAIT)
            server.runtime.flusher.stop(WAIT)
        assert not result.get("deadlock"), \
            "shutdown() from a signal handler deadlocked: the handler interrupted a broadcast " \
            "holding a connection's lock, and shutdown waited for that lock"
        assert finished.is_set()
        assert result["elapsed"] <= TIMEOUT
        # shutdown() may finish the work itself, or leave it to a thread of
        # its own as from a callback; returning with the server's threads
        # still running and no shutdown under way is neither.
        left = result["left_running"]
        assert not left or "gaman_sync-shutdown" in left, \
            f"shutdown() returned with threads running and no shutdown under way: {left}"
        # If it was left to a thread, this call waits for that thread.
        server.shutdown(TIMEOUT)
        join_shutdown_threads()
        assert not new_server_threads(before), new_server_threads(before)
        tracker.assert_each_closed_once(1001)
    finally:
        reader.stop()


def test_concurrent_shutdown_calls_all_return_once_it_is_done(make_server):
    before = set(server_threads())
    tracker = Tracker()
    server = make_server(tracker.block, ping_interval=None)
    reader = MultiReader()
    clients = connect_many("127.0.0.1", server.port, (f"/?cid=c{i}" for i in range(40)))
    reader.add(clients)
    tracker.wait(lambda: len(tracker.ctxs) == 40, what="clients to open")
    go = threading.Barrier(4, timeout=WAIT)
    seen = []

    def call():
        go.wait()
        server.shutdown(TIMEOUT)
        # Whichever call returns, it returns once everything is done.
        with tracker.cond:
            seen.append((len(tracker.closes), [t.name for t in new_server_threads(before)]))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT + WAIT)
        assert not thread.is_alive()
    assert len(seen) == 4
    for closed, alive in seen:
        assert closed == 40
        assert alive == []
    tracker.assert_each_closed_once(1001)
    reader.stop()


def test_shutdown_while_clients_keep_connecting(make_server):
    before = set(server_threads())
    tracker = Tracker(on_message=lambda ctx, cid, message: ctx.send(message))
    server = make_server(tracker.block, ping_interval=None)
    port = server.port
    outcomes: Dict[int, list] = {}
    kept: List[RawPeer] = []

    def churn(worker: int) -> None:
        log = outcomes.setdefault(worker, [])
        for i in range(10_000):
            try:
                client = RawPeer.open("127.0.0.1", port, f"/?cid={worker}-{i}", timeout=TIMEOUT + 2)
            except OSError as exc:
                log.append(("refused", exc))
                return
            log.append(("opened", i))
            try:
                client.send_text("hi")
                if i % 3 == 0:
                    client.abort()
                elif i % 3 == 1:
                    client.send_close(1000)
                    client.read_to_eof(timeout=TIMEOUT + 2)
                    client.close()
                else:
                    kept.append(client)  # open until the shutdown closes it
            except OSError:
                client.close()

    workers = [threading.Thread(target=churn, args=(w,)) for w in range(4)]
    for worker in workers:
        worker.start()
    tracker.wait(lambda: len(tracker.ctxs) >= 150, what="clients to come and go")
    began = time.monotonic()
    server.shutdown(TIMEOUT)
    elapsed = time.monotonic() - began
    for worker in workers:
        worker.join(TIMEOUT + WAIT)
        assert not worker.is_alive()
    assert elapsed <= TIMEOUT
    assert not new_server_threads(before)
    assert server.clients == []
    for worker, log in outcomes.items():
        assert log[-1][0] == "refused", (worker, log[-3:])
    with tracker.cond:
        assert set(tracker.closes) == set(tracker.ctxs)
        assert all(len(c) == 1 for c in tracker.closes.values())
        # Those still open when shutdown began were closed by it.
        assert sum(c[0][0] == 1001 for c in tracker.closes.values()) >= 1
    for client in kept:
        client.close()
