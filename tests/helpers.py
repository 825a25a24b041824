"""Test helpers about this project's own server; the raw peer they drive is
:mod:`gaman_sync.testing.raw`.

- :class:`RecordingBlock`: a block whose connections record what user code sees;
- :func:`utf8_error_at`: an independent UTF-8 validator;
- :class:`RoomClients`: a crowd of raw peers in a broadcast room, in a process
  of its own;
- :func:`server_threads`: the server's live threads.
"""

from __future__ import annotations

import threading
import time
from typing import List, Optional, Tuple

from gaman_sync import ConnectionClosed, define_block
from gaman_sync.testing import TEXT, MultiReader, RawPeer, connect_many, raise_nofile

from .conftest import WAIT, Recorder

# -- The server side of a test: a block that records what user code sees ----

class RecordingBlock:
    """An echo block whose connections each get a ``Recorder`` of their callbacks.

    Events: ("open",), ("message", msg), ("pong", data), ("close", code, reason),
    ("error", exc). A connection is found by the ``id`` query parameter of its
    request (``/path?id=...``), or as the latest one. A text message
    ``"\\x00cmd:close:CODE"`` makes the server start the closing handshake.
    """

    COMMAND = "\x00cmd:"

    def __init__(self, path: str = "/echo", echo: bool = True) -> None:
        self.echo = echo
        self.by_id: dict = {}
        self.all: list = []
        self._cond = threading.Condition()
        self.block = define_block(path, websocket=self._websocket)

    def _websocket(self, ctx):
        rec = Recorder()
        rec.ctx = ctx
        with self._cond:
            self.all.append(rec)
            self.by_id[ctx.request.query.get("id")] = rec
            self._cond.notify_all()

        def on_message(msg):
            rec.add("message", msg)
            if isinstance(msg, str) and msg.startswith(self.COMMAND):
                _, _, arg = msg[len(self.COMMAND):].partition("close:")
                ctx.close(int(arg))
                return
            if self.echo:
                try:
                    ctx.send(msg)
                except ConnectionClosed:
                    # The peer's close crossed this message: no echo is due.
                    rec.add("send-after-close")

        return {"on_open": lambda: rec.add("open"), "on_message": on_message,
                "on_pong": lambda data: rec.add("pong", data),
                "on_close": lambda code, reason: rec.add("close", code, reason),
                "on_error": lambda exc: rec.add("error", exc)}

    def recorder(self, conn_id: Optional[str] = None, timeout: float = WAIT):
        """The recorder of connection ``conn_id`` (default: the latest), once it exists."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: (conn_id in self.by_id) if conn_id is not None else bool(self.all),
                timeout)
            assert ok, f"no connection {conn_id!r} reached the handler"
            return self.by_id[conn_id] if conn_id is not None else self.all[-1]

    def messages(self) -> list:
        """Every message any connection delivered to on_message."""
        with self._cond:
            recs = list(self.all)
        return [e[1] for r in recs for e in list(r.events) if e[0] == "message"]


# -- An independent UTF-8 validator (RFC 3629, table 3-7 of Unicode) ----------

def _utf8_lead(b: int) -> Optional[Tuple[int, int, int]]:
    """(continuation bytes, range of the first one) for a lead byte, None if invalid."""
    if 0xC2 <= b <= 0xDF:
        return 1, 0x80, 0xBF
    if b == 0xE0:
        return 2, 0xA0, 0xBF
    if 0xE1 <= b <= 0xEC or b in (0xEE, 0xEF):
        return 2, 0x80, 0xBF
    if b == 0xED:  # no surrogates
        return 2, 0x80, 0x9F
    if b == 0xF0:
        return 3, 0x90, 0xBF
    if 0xF1 <= b <= 0xF3:
        return 3, 0x80, 0xBF
    if b == 0xF4:  # nothing past U+10FFFF
        return 3, 0x80, 0x8F
    return None


def utf8_error_at(data: bytes, final: bool = True) -> Optional[int]:
    """Index of the first byte after which ``data`` can no longer be (the
    start of) valid UTF-8; ``len(data)`` if ``final`` and it stops inside a
    character; None if it is valid (or, not final, a valid prefix)."""
    i, n = 0, len(data)
    while i < n:
        b = data[i]
        if b < 0x80:
            i += 1
            continue
        lead = _utf8_lead(b)
        if lead is None:
            return i
        need, lo, hi = lead
        for k in range(1, need + 1):
            j = i + k
            if j >= n:
                return n if final else None
            c = data[j]
            if not (lo <= c <= hi if k == 1 else 0x80 <= c <= 0xBF):
                return j
        i += need + 1
    return None


# -- A crowd of clients in a process of its own ------------------------------------

def room_payload(sender: int, seq: int, sizes: Tuple[int, ...]) -> bytes:
    """Message ``seq`` of ``sender``: its identity, then filler up to its size."""
    head = f"{sender:02d}:{seq:05d}:"
    size = sizes[seq % len(sizes)]
    filler = f"<{sender}.{seq}>" * (size // 4 + 1)
    return (head + filler)[:max(size, len(head))].encode()


def _room_clients(port: int, path: str, n_clients: int, n_senders: int, n_messages: int,
                  sizes: Tuple[int, ...], window: int, pipe) -> None:
    """The body of :class:`RoomClients`' process."""
    try:
        _room_clients_run(port, path, n_clients, n_senders, n_messages, sizes, window, pipe)
    except BaseException:
        import traceback
        pipe.send(("error", traceback.format_exc()))


def _room_clients_run(port, path, n_clients, n_senders, n_messages, sizes, window, pipe):
    expected = [[room_payload(s, i, sizes) for i in range(n_messages)]
                for s in range(n_senders)]

    def on_data(client: RawPeer, opcode: int, data: bytes) -> None:
        if opcode != TEXT:
            raise AssertionError(f"opcode {opcode} for a text message")
        sender = int(data[:2])
        seq = int(data[3:8])
        nxt = client.user["next"]
        if seq != nxt[sender]:
            raise AssertionError(f"from sender {sender}: got #{seq}, expected #{nxt[sender]}"
                                 " (lost, repeated or reordered)")
        if data != expected[sender][seq]:
            raise AssertionError(f"message {sender}/{seq} corrupted: {data[:80]!r}")
        nxt[sender] = seq + 1
        client.user["count"] += 1

    raise_nofile(n_clients + 100)
    reader = MultiReader(on_data)
    try:
        clients = connect_many("127.0.0.1", port, (f"{path}?cid={i}" for i in range(n_clients)))
        for client in clients:
            client.user.update(next=[0] * n_senders, count=0)
        reader.add(clients)
        pipe.send(("connected",))
        assert pipe.poll(4 * WAIT), "the test never said go"
        assert pipe.recv() == ("go",)
        senders = clients[:n_senders]
        failures: List[str] = []
        go = threading.Barrier(n_senders + 1, timeout=WAIT)

        def send_all(index: int) -> None:
            client = senders[index]
            try:
                go.wait()
                for seq in range(n_messages):
                    if seq >= window:
                        low = seq - window
                        reader.wait_for(lambda: client.user["next"][index] > low,  # noqa: B023 (called now)
                                        what=f"sender {index} to get its message {low} back")
                    client.send_text(expected[index][seq].decode())
            except BaseException as exc:
                failures.append(repr(exc))

        threads = [threading.Thread(target=send_all, args=(i,), name=f"test-sender-{i}")
                   for i in range(n_senders)]
        for thread in threads:
            thread.start()
        go.wait()
        started = time.monotonic()
        for thread in threads:
            thread.join(120)
            if thread.is_alive():
                failures.append("a sender thread is stuck")
        total = n_senders * n_messages
        if not failures:
            try:
                reader.wait_for(lambda: all(c.user["count"] >= total for c in clients),
                                timeout=30, what="every client to get every message")
            except AssertionError as exc:
                failures.append(str(exc))
        finished = time.monotonic()
        with reader.cond:
            pipe.send(("done", {
                "next": [c.user["next"] for c in clients],
                "count": [c.user["count"] for c in clients],
                "eof": [c.name for c in clients if c.eof],
                "errors": reader.errors[:20] + failures,
                "started": started, "finished": finished}))
        # Stay connected until the test has looked at the server (bounded:
        # a test that died must not leave this process behind).
        pipe.poll(4 * WAIT)
    finally:
        reader.stop()


class RoomClients:
    """Clients of a broadcast room, in a separate process.

    Client ``i`` connects to ``path?cid=i``; clients ``0..n_senders-1`` each
    send ``n_messages`` messages, never more than ``window`` ahead of what
    they received back themselves; every client checks that it receives
    every message exactly once, each sender's in order. In a process of its
    own, the clients' Python work does not compete with the server's threads
    for the interpreter lock, so what the server's threads measure is theirs.
    (``time.monotonic`` is the same clock in both processes.)
    """

    def __init__(self, port: int, path: str, n_clients: int, n_senders: int,
                 n_messages: int, sizes: Tuple[int, ...], window: int) -> None:
        import multiprocessing
        context = multiprocessing.get_context("spawn")  # no fork of a threaded process
        self._pipe, child = context.Pipe()
        self.process = context.Process(
            target=_room_clients, name="test-room-clients", daemon=True,
            args=(port, path, n_clients, n_senders, n_messages, sizes, window, child))
        self.process.start()
        child.close()

    def expect(self, kind: str, timeout: float, abort: Optional[threading.Event] = None):
        """The next report of the clients' process, which must be ``kind``.
        Gives up early once ``abort`` is set (the test has already failed)."""
        deadline = time.monotonic() + timeout
        while not self._pipe.poll(0.1 if abort is not None else timeout):
            if abort is not None and abort.is_set():
                raise AssertionError(f"given up waiting for {kind!r}: the test failed")
            if time.monotonic() >= deadline:
                raise AssertionError(f"the clients' process sent nothing in {timeout} s "
                                     f"(waiting for {kind!r})")
        message = self._pipe.recv()
        if message[0] == "error":
            raise AssertionError(f"the clients' process failed:\n{message[1]}")
        assert message[0] == kind, message
        return message[1] if len(message) > 1 else None

    def go(self) -> None:
        self._pipe.send(("go",))

    def close(self) -> None:
        try:
            self._pipe.send(("stop",))
        except OSError:
            pass
        self.process.join(WAIT)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(WAIT)
        self._pipe.close()


def server_threads(prefix: str = "gaman_sync-") -> List[threading.Thread]:
    """The live threads whose name starts with ``prefix``."""
    return [t for t in threading.enumerate() if t.name.startswith(prefix) and t.is_alive()]
