"""Minimal WebSocket clients on raw sockets, for tests that need many peers
or peers that misbehave (never read, never answer a ping or a close).

A real client library hides exactly what these tests must see: how frames
are laid out on the wire, and what a peer that stops reading does to the
server. So the frames are parsed here, strictly: anything but whole,
unmasked, unfragmented frames is a :class:`ProtocolViolation`, which is how
interleaved writes on the server side show up.

:class:`MultiReader` reads hundreds of these clients from one thread with a
selector, since one thread per client would compete for two cores with the
server under test.
"""

from __future__ import annotations

import base64
import hashlib
import os
import resource
import selectors
import socket
import struct
import threading
import time
from typing import Callable, Iterable, List, Optional, Tuple

WAIT = 10.0  # seconds: the longest any single wait lasts

KEY = base64.b64encode(b"gaman-sync-tests")  # a fixed 16-byte key
ACCEPT = base64.b64encode(hashlib.sha1(KEY + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())

TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA
_DATA = (TEXT, BINARY)
_CONTROL = (CLOSE, PING, PONG)

Frame = Tuple[int, bytes]  # (opcode, payload)


class ProtocolViolation(AssertionError):
    """The server put something on the wire that is not a whole, valid frame."""


def raise_nofile(needed: int) -> None:
    """Raise the soft descriptor limit toward the hard one if ``needed`` asks for it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    assert target >= needed, f"this test needs {needed} descriptors; the hard limit is {hard}"


class FrameParser:
    """Cuts a server's byte stream into frames, checking each one.

    The server sends every message as one frame, so a frame without FIN or a
    continuation frame can only come from two writes mixing on the wire.
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        """Bytes received that do not make a whole frame yet."""
        return len(self._buf)

    def feed(self, data: bytes) -> List[Frame]:
        buf = self._buf
        buf += data
        frames: List[Frame] = []
        pos = 0
        end_of_data = len(buf)
        while end_of_data - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            length = b1 & 0x7F
            start = pos + 2
            if length == 126:
                if end_of_data - pos < 4:
                    break
                length = (buf[pos + 2] << 8) | buf[pos + 3]
                start = pos + 4
            elif length == 127:
                if end_of_data - pos < 10:
                    break
                length = struct.unpack_from("!Q", buf, pos + 2)[0]
                start = pos + 10
            end = start + length
            if end > end_of_data:
                # Checked before waiting for the payload: a corrupt header
                # must fail now, not look like a message that never comes.
                self._check(b0, b1, length)
                break
            self._check(b0, b1, length)
            opcode = b0 & 0x0F
            payload = bytes(buf[start:end])
            if opcode == TEXT:
                try:
                    payload.decode("utf-8")
                except UnicodeDecodeError:
                    raise ProtocolViolation(f"text frame with invalid UTF-8: {payload[:60]!r}")
            frames.append((opcode, payload))
            pos = end
        if pos:
            del buf[:pos]
        return frames

    @staticmethod
    def _check(b0: int, b1: int, length: int) -> None:
        opcode = b0 & 0x0F
        if b1 & 0x80:
            raise ProtocolViolation("the server sent a masked frame")
        if b0 & 0x70:
            raise ProtocolViolation(f"reserved bits set in frame header byte {b0:#04x}")
        if not b0 & 0x80:
            raise ProtocolViolation(f"fragment without FIN (opcode {opcode:#x}): the server "
                                    "sends whole frames, so writes have mixed")
        if opcode not in _DATA and opcode not in _CONTROL:
            raise ProtocolViolation(f"frame with opcode {opcode:#x}")
        if opcode in _CONTROL and length > 125:
            raise ProtocolViolation(f"control frame {opcode:#x} of {length} bytes")


def encode_frame(opcode: int, payload: bytes = b"") -> bytes:
    """A masked client frame, as RFC 6455 requires of clients."""
    mask = os.urandom(4)
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    elif length < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
    if length:
        # One big-integer XOR is far faster in Python than a byte loop.
        repeated = (mask * (length // 4 + 1))[:length]
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")) \
            .to_bytes(length, "big")
    else:
        masked = b""
    return header + mask + masked


def close_payload(code: int, reason: str = "") -> bytes:
    return struct.pack("!H", code) + reason.encode("utf-8")


def parse_close(payload: bytes) -> Tuple[Optional[int], str]:
    if len(payload) < 2:
        return None, ""
    return struct.unpack("!H", payload[:2])[0], payload[2:].decode("utf-8")


def request_bytes(port: int, path: str) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY.decode()}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n").encode("ascii")


class RawClient:
    """One client connection on a plain socket (blocking, with timeouts)."""

    def __init__(self, sock: socket.socket, name: str = "") -> None:
        self.sock = sock
        self.name = name
        self.parser = FrameParser()
        self.write_lock = threading.Lock()
        # Filled in by MultiReader or by the recv_* methods.
        self.close_frame: Optional[Tuple[Optional[int], str]] = None
        self.eof = False
        self.reset = False
        self.eof_at: Optional[float] = None
        self.answer_pings = True
        self.answer_close = True
        self.close_sent = False
        self.early: List[Frame] = []  # frames that came with the 101 response
        self.user: dict = {}

    # -- Opening ------------------------------------------------------------

    @staticmethod
    def new_socket(rcvbuf: Optional[int] = None, mss: Optional[int] = None) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Both before connect(): the window scale and the MSS are agreed on
        # in the SYN.
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if mss is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
        return sock

    @classmethod
    def connect(cls, port: int, path: str = "/", rcvbuf: Optional[int] = None,
                name: str = "", timeout: float = WAIT, mss: Optional[int] = None) -> "RawClient":
        sock = cls.new_socket(rcvbuf, mss)
        sock.settimeout(timeout)
        sock.connect(("127.0.0.1", port))
        sock.sendall(request_bytes(port, path))
        client = cls(sock, name or path)
        client.finish_handshake(timeout)
        return client

    def finish_handshake(self, timeout: float = WAIT) -> None:
        """Read the 101 response, byte-exact up to its blank line."""
        sock = self.sock
        sock.settimeout(timeout)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"{self.name}: closed during the handshake: {data!r}")
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0]
        if not status.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(f"{self.name}: handshake refused: {head!r}")
        accept = None
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"sec-websocket-accept":
                accept = value.strip()
        if accept != ACCEPT:
            raise ProtocolViolation(f"{self.name}: wrong Sec-WebSocket-Accept in {head!r}")
        self.early = self.parser.feed(rest)

    # -- Writing --------------------------------------------------------------

    def send_frame(self, opcode: int, payload: bytes = b"") -> None:
        data = encode_frame(opcode, payload)
        with self.write_lock:
            self.sock.sendall(data)

    def send_text(self, text: str) -> None:
        self.send_frame(TEXT, text.encode("utf-8"))

    def send_close(self, code: int = 1000, reason: str = "") -> None:
        with self.write_lock:
            if self.close_sent:
                return
            self.close_sent = True
            self.sock.sendall(encode_frame(CLOSE, close_payload(code, reason)))

    def abort(self) -> None:
        """Drop the connection with a TCP reset: no close frame, no FIN."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.sock.close()

    def close(self) -> None:
        self.sock.close()

    # -- Reading synchronously (when no MultiReader owns the socket) ------------

    def recv_frames(self, timeout: float = WAIT) -> List[Frame]:
        """The frames of one read (empty at EOF, which sets ``eof``)."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(262144)
        except ConnectionResetError:
            self.reset = True
            data = b""
        if not data:
            self.eof = True
            self.eof_at = time.monotonic()
            return []
        return self.parser.feed(data)

    def read_until(self, done: Callable[[], bool], on_frame: Callable[[Frame], None],
                   timeout: float = WAIT) -> None:
        """Read frames until ``done()``, feeding each to ``on_frame``; answer
        pings and closes as configured. Raises on timeout."""
        deadline = time.monotonic() + timeout
        early, self.early = self.early, []
        for frame in early:
            self._handle_control(frame)
            on_frame(frame)
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.name}: timed out reading")
            if self.eof:
                raise ConnectionError(f"{self.name}: connection closed while reading")
            try:
                frames = self.recv_frames(remaining)
            except socket.timeout:
                raise TimeoutError(f"{self.name}: timed out reading") from None
            for frame in frames:
                self._handle_control(frame)
                on_frame(frame)

    def _handle_control(self, frame: Frame) -> None:
        opcode, payload = frame
        if opcode == PING and self.answer_pings and not self.close_sent:
            try:
                self.send_frame(PONG, payload)
            except OSError:
                pass
        elif opcode == CLOSE:
            self.close_frame = parse_close(payload)
            if self.answer_close:
                code = self.close_frame[0]
                try:
                    self.send_close(1000 if code is None else code)
                except OSError:
                    pass

    def read_to_eof(self, on_frame: Callable[[Frame], None] = lambda f: None,
                    timeout: float = WAIT) -> None:
        """Read (answering as configured) until the server closes TCP."""
        try:
            self.read_until(lambda: self.eof, on_frame, timeout)
        except ConnectionError:
            if not self.eof:
                raise


def connect_many(port: int, paths: Iterable[str], rcvbuf: Optional[int] = None,
                 timeout: float = WAIT) -> List[RawClient]:
    """Open many clients at once: every request is sent before any answer is
    read, so the server handshakes them in parallel."""
    clients = []
    for path in paths:
        sock = RawClient.new_socket(rcvbuf)
        sock.settimeout(timeout)
        sock.connect(("127.0.0.1", port))
        sock.sendall(request_bytes(port, path))
        clients.append(RawClient(sock, path))
    for client in clients:
        client.finish_handshake(timeout)
    return clients


class MultiReader:
    """One thread that reads many RawClients with a selector.

    Data frames go to ``on_data(client, opcode, payload)`` in the reader
    thread. Pings are answered and close frames echoed, as each client's
    ``answer_pings``/``answer_close`` say. Tests wait on ``cond`` (notified
    after each round of reads) through :meth:`wait_for`.
    """

    def __init__(self, on_data: Optional[Callable[[RawClient, int, bytes], None]] = None) -> None:
        self.on_data = on_data or (lambda client, opcode, payload: None)
        self.cond = threading.Condition()
        self.errors: List[str] = []
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._todo: List[RawClient] = []
        self._todo_lock = threading.Lock()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="test-multireader", daemon=True)
        self._thread.start()

    def add(self, clients: Iterable[RawClient]) -> None:
        clients = list(clients)
        for client in clients:
            client.sock.setblocking(False)
        with self._todo_lock:
            self._todo.extend(clients)
        self._wake_w.send(b"\0")

    def wait_for(self, predicate: Callable[[], bool], timeout: float = WAIT,
                 what: str = "condition") -> None:
        with self.cond:
            ok = self.cond.wait_for(lambda: predicate() or self.errors, timeout)
            if self.errors:
                raise AssertionError(f"reader errors: {self.errors[:5]}")
            if not ok:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    def stop(self) -> None:
        """End the thread and close every client socket (a second call does nothing)."""
        if self._stopped:
            return
        self._stopped = True
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass
        self._thread.join(WAIT)
        assert not self._thread.is_alive(), "the test's reader thread did not stop"
        for key in list(self._selector.get_map().values()):
            if key.fileobj is not self._wake_r:
                key.fileobj.close()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def _run(self) -> None:
        selector = self._selector
        try:
            while not self._stopped:
                events = selector.select()
                for key, _ in events:
                    if key.fileobj is self._wake_r:
                        try:
                            while self._wake_r.recv(4096):
                                pass
                        except BlockingIOError:
                            pass
                        continue
                    self._read(key.data)
                with self._todo_lock:
                    todo, self._todo = self._todo, []
                for client in todo:
                    selector.register(client.sock, selectors.EVENT_READ, client)
                    if client.early:
                        self._deliver(client, client.early)
                        client.early = []
                with self.cond:
                    self.cond.notify_all()
        except BaseException as exc:  # surface it to the waiting test, never hang it
            with self.cond:
                self.errors.append(f"reader crashed: {exc!r}")
                self.cond.notify_all()
            raise

    def _read(self, client: RawClient) -> None:
        try:
            data = client.sock.recv(262144)
        except BlockingIOError:
            return
        except ConnectionResetError:
            client.reset = True
            data = b""
        except OSError as exc:
            self.errors.append(f"{client.name}: recv failed: {exc!r}")
            data = b""
        if not data:
            client.eof = True
            client.eof_at = time.monotonic()
            self._selector.unregister(client.sock)
            client.sock.close()
            return
        try:
            frames = client.parser.feed(data)
        except ProtocolViolation as exc:
            self.errors.append(f"{client.name}: {exc}")
            self._selector.unregister(client.sock)
            client.sock.close()
            return
        self._deliver(client, frames)

    def _deliver(self, client: RawClient, frames: List[Frame]) -> None:
        on_data = self.on_data
        for opcode, payload in frames:
            if opcode <= BINARY:
                try:
                    on_data(client, opcode, payload)
                except Exception as exc:
                    self.errors.append(f"{client.name}: check failed: {exc!r}")
            else:
                client._handle_control((opcode, payload))


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

    def on_data(client: RawClient, opcode: int, data: bytes) -> None:
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
        clients = connect_many(port, (f"{path}?cid={i}" for i in range(n_clients)))
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
                        reader.wait_for(lambda: client.user["next"][index] > low,
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


__all__ = ["WAIT", "RawClient", "MultiReader", "RoomClients", "FrameParser",
           "ProtocolViolation", "connect_many", "encode_frame", "parse_close", "raise_nofile",
           "request_bytes", "room_payload", "server_threads",
           "TEXT", "BINARY", "CLOSE", "PING", "PONG"]
