"""A model of the clients of one block, checked against the server while
connections open and close, threads send and broadcasts go out.

The model knows which clients are open and what each must have received
from each source (a sending thread, or one broadcasting thread), in order.
After every step: server.clients is exactly the open clients, in the order
they opened, and every open client has received exactly what the model says.
"""

from __future__ import annotations

import socket
import threading
from typing import Dict, List, Optional

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gaman_sync import ConnectionClosed, ReadyState, WebSocketServer, define_block
from gaman_sync.testing import CLOSE, TEXT, RawPeer, connect_many, handshake_request

from .conftest import WAIT
from .helpers import server_threads

MAX_OPEN = 8


class Model:
    """What one client should have seen."""

    def __init__(self, cid: str, raw: RawPeer, ctx, batch: int) -> None:
        self.cid = cid
        self.batch = batch  # which connect() opened it
        self.raw = raw
        self.ctx = ctx
        self.open = True
        self.expected: Dict[str, List[str]] = {}
        self.received: Dict[str, List[str]] = {}
        # Sources of which this client may have missed the beginning: it
        # joined while they were being broadcast.
        self.joined_during: Dict[str, List[str]] = {}

    def expect(self, source: str, messages: List[str]) -> None:
        self.expected.setdefault(source, []).extend(messages)

    def on_frame(self, frame) -> None:
        opcode, data = frame.opcode, frame.payload
        if opcode == CLOSE:
            return  # the raw client has answered it
        assert opcode == TEXT, frame
        text = data.decode()
        self.received.setdefault(text.rsplit(":", 1)[0], []).append(text)


class Tracker:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.ctxs: Dict[str, object] = {}
        self.closes: Dict[str, List[tuple]] = {}
        self.block = define_block("/", self.handler)

    def handler(self, ctx):
        cid = ctx.request.query["cid"]

        def on_open():
            with self.cond:
                self.ctxs[cid] = ctx
                self.cond.notify_all()

        def on_close(code, reason):
            with self.cond:
                self.closes.setdefault(cid, []).append((code, reason))
                self.cond.notify_all()

        return {"on_open": on_open, "on_close": on_close}

    def wait(self, predicate, what: str) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, WAIT), f"timed out waiting for {what}"


def run_threads(targets) -> None:
    """Run callables in foreign threads at once; re-raise the first failure."""
    failures: List[BaseException] = []
    go = threading.Barrier(len(targets), timeout=WAIT)

    def wrap(target):
        try:
            go.wait()
            target()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=wrap, args=(t,)) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
        assert not thread.is_alive(), "a sending thread is stuck"
    if failures:
        raise failures[0]


class ClientsMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.before = set(server_threads())
        self.tracker = Tracker()
        self.server = WebSocketServer(self.tracker.block, port=0, ping_interval=None,
                                      close_timeout=2).start()
        self.view = self.server.blocks[0]
        self.models: Dict[str, Model] = {}
        self.next_id = 0
        self.batches = 0
        self.step = 0

    # -- helpers --------------------------------------------------------------

    def open_models(self) -> List[Model]:
        return [m for m in self.models.values() if m.open]

    def connect(self, n: int) -> List[Model]:
        cids = [f"c{self.next_id + i}" for i in range(n)]
        self.next_id += n
        raws = connect_many("127.0.0.1", self.server.port, (f"/?cid={cid}" for cid in cids))
        self.tracker.wait(lambda: all(cid in self.tracker.ctxs for cid in cids), "on_open")
        self.batches += 1
        models = []
        for cid, raw in zip(cids, raws):
            model = Model(cid, raw, self.tracker.ctxs[cid], self.batches)
            self.models[cid] = model
            models.append(model)
        return models

    def close(self, model: Model, how: str) -> Optional[int]:
        """Close one client; returns the close code on_close must report."""
        model.open = False
        if how == "client_close":
            model.raw.send_close(4000, "client leaves")
            model.raw.read_to_eof(model.on_frame)
            expected = 4000
        elif how == "abort":
            model.raw.abort()
            expected = 1006
        elif how == "server_close":
            model.ctx.close(4001, "server says bye")
            model.raw.read_to_eof(model.on_frame)
            expected = 4001
        else:
            model.ctx.terminate()
            expected = 1006
        return expected

    def new_source(self, kind: str) -> str:
        self.step += 1
        return f"{kind}{self.step}"

    # -- rules ----------------------------------------------------------------

    @precondition(lambda self: len(self.open_models()) < MAX_OPEN)
    @rule(n=st.integers(1, 3))
    def connect_clients(self, n):
        self.connect(min(n, MAX_OPEN - len(self.open_models())))

    @precondition(lambda self: self.open_models())
    @rule(data=st.data(),
          how=st.sampled_from(["client_close", "abort", "server_close", "terminate"]))
    def disconnect(self, data, how):
        model = data.draw(st.sampled_from(self.open_models()))
        code = self.close(model, how)
        self.tracker.wait(lambda: model.cid in self.tracker.closes, f"on_close of {model.cid}")
        assert self.tracker.closes[model.cid][0][0] == code
        assert model.ctx.ready_state is ReadyState.CLOSED

    @precondition(lambda self: self.open_models())
    @rule(data=st.data(), threads=st.integers(1, 4), n=st.integers(1, 15))
    def send_from_threads(self, data, threads, n):
        model = data.draw(st.sampled_from(self.open_models()))
        sources = [self.new_source("s") for _ in range(threads)]
        batches = [[f"{source}:{i}" for i in range(n)] for source in sources]

        def sender(batch):
            def send():
                for message in batch:
                    model.ctx.send(message)
            return send

        run_threads([sender(batch) for batch in batches])
        for source, batch in zip(sources, batches):
            model.expect(source, batch)

    @rule(n=st.integers(1, 6))
    def broadcast_from_thread(self, n):
        source = self.new_source("b")
        batch = [f"{source}:{i}" for i in range(n)]
        counts = []
        run_threads([lambda: counts.extend(self.view.broadcast(m) for m in batch)])
        assert counts == [len(self.open_models())] * n
        for model in self.open_models():
            model.expect(source, batch)

    @rule(threads=st.integers(2, 3), n=st.integers(1, 10))
    def concurrent_broadcasts(self, threads, n):
        sources = [self.new_source("b") for _ in range(threads)]
        batches = [[f"{source}:{i}" for i in range(n)] for source in sources]

        def broadcaster(batch):
            return lambda: [self.view.broadcast(m) for m in batch]

        run_threads([broadcaster(batch) for batch in batches])
        for model in self.open_models():
            for source, batch in zip(sources, batches):
                model.expect(source, batch)

    @precondition(lambda self: self.open_models() and len(self.open_models()) < MAX_OPEN)
    @rule(data=st.data(), n=st.integers(5, 40))
    def come_and_go_during_a_broadcast(self, data, n):
        """One client joins and another drops while a thread broadcasts."""
        leaving = data.draw(st.sampled_from(self.open_models()))
        staying = [m for m in self.open_models() if m is not leaving]
        source = self.new_source("b")
        batch = [f"{source}:{i}" for i in range(n)]
        joined: List[Model] = []
        run_threads([
            lambda: [self.view.broadcast(m) for m in batch],
            lambda: joined.extend(self.connect(1)),
            lambda: self.close(leaving, "abort"),
        ])
        self.tracker.wait(lambda: leaving.cid in self.tracker.closes, "on_close")
        for model in staying:
            model.expect(source, batch)
        joined[0].joined_during[source] = batch

    @precondition(lambda self: any(not m.open for m in self.models.values()))
    @rule(data=st.data())
    def send_to_a_closed_client_raises(self, data):
        model = data.draw(st.sampled_from([m for m in self.models.values() if not m.open]))
        outcome = []

        def send():
            try:
                model.ctx.send("too late")
                outcome.append("returned")
            except ConnectionClosed:
                outcome.append("raised")

        run_threads([send])
        assert outcome == ["raised"], f"send to closed {model.cid}: {outcome}"

    # -- invariants -------------------------------------------------------------

    @invariant()
    def clients_are_the_open_connections(self):
        open_models = self.open_models()
        expected = {model.ctx for model in open_models}
        # Order is only checked where it is defined: clients that opened
        # together (from concurrent handshakes) may be listed either way.
        for clients in (self.view.clients, self.server.clients):
            assert len(clients) == len(set(clients)), "a client is listed twice"
            assert set(clients) == expected
        batches = [self.models[c.request.query["cid"]].batch for c in self.view.clients]
        assert batches == sorted(batches), "clients are not listed in the order they opened"
        for model in open_models:
            assert model.ctx.ready_state is ReadyState.OPEN, model.cid
            assert model.cid not in self.tracker.closes, model.cid

    @invariant()
    def open_clients_got_everything_in_order(self):
        for model in self.open_models():
            # Everything sent to it so far is on the wire ahead of this
            # marker, so once the marker is read, nothing is left to wait for:
            # a missing message fails the check at once, with no timeout.
            self.step += 1
            marker = f"sync:{self.step}".encode()
            model.ctx.send(marker.decode())
            seen = []

            def on_frame(frame, model=model, marker=marker, seen=seen):
                if (frame.opcode, frame.payload) == (TEXT, marker):
                    seen.append(frame)
                else:
                    model.on_frame(frame)

            model.raw.read_until(lambda: bool(seen), on_frame)  # noqa: B023 (called now)
            # A source it joined in the middle of: it got a tail of it, in order.
            for source, batch in model.joined_during.items():
                got = model.received.get(source, [])
                assert got == batch[len(batch) - len(got):], (model.cid, source, got)
            got = {k: v for k, v in model.received.items() if k not in model.joined_during}
            assert got == model.expected, model.cid

    def teardown(self) -> None:
        for model in self.models.values():
            if model.open:
                model.raw.abort()
            else:
                model.raw.close()
        self.server.shutdown(2)
        leftover = [t for t in server_threads() if t not in self.before]
        assert not leftover, leftover
        with self.tracker.cond:
            assert set(self.tracker.closes) == set(self.tracker.ctxs)
            assert all(len(c) == 1 for c in self.tracker.closes.values()), self.tracker.closes


def test_refused_clients_do_not_hold_capacity(make_server):
    """max_connections counts connections (and handshakes under way), not
    clients that were already refused and are slow to hang up."""
    tracker = Tracker()
    server = make_server(tracker.block, max_connections=3, ping_interval=None)
    port = server.port
    members = connect_many("127.0.0.1", port, (f"/?cid=m{i}" for i in range(3)))
    tracker.wait(lambda: len(tracker.ctxs) == 3, "three clients to open")
    refused = []
    try:
        for path in ("/?cid=extra1", "/?cid=extra2"):
            # Each reads its answer, then keeps its socket open for a while,
            # as a client on a slow network would.
            sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
            refused.append(sock)
            sock.sendall(handshake_request(path, host=f"127.0.0.1:{port}"))
            answer = b""
            while b"\r\n\r\n" not in answer:
                chunk = sock.recv(4096)
                assert chunk, answer
                answer += chunk
            status = answer.split(b"\r\n", 1)[0]
            assert status.startswith(b"HTTP/1.1 503"), status  # full
        leaving = tracker.ctxs["m0"]
        members[0].abort()
        tracker.wait(lambda: "m0" in tracker.closes, "on_close")
        leaving.thread.join(WAIT)  # the server is done with it
        assert len(server.clients) == 2
        # Two connections are open out of three allowed: there is room.
        try:
            newcomer = RawPeer.open("127.0.0.1", port, "/?cid=newcomer")
        except ConnectionError as exc:
            pytest.fail(f"refused with 2 of 3 connections open, as if the clients refused "
                        f"before still counted: {exc}")
        tracker.wait(lambda: "newcomer" in tracker.ctxs, "the newcomer to open")
        assert len(server.clients) == 3
        newcomer.close()
    finally:
        for sock in refused:
            sock.close()
        for member in members:
            member.close()


ClientsMachine.TestCase.settings = settings(settings.default, max_examples=150,
                                            stateful_step_count=50)
TestClients = pytest.mark.slow(ClientsMachine.TestCase)  # a long property run
