"""The frames the client sends, as they arrive on a real socket, and the C
helper's pieces of the client's round trip (client_frame, recv_for).

With the C helper built, a client's data frame is made whole in one call
(header, a masking key taken from a pool of os.urandom bytes, the masked
payload) and each message is read with one poll-and-recv call. A raw server
here reads the bytes as they come off the wire and checks every frame: FIN,
opcode, the mask bit, a key of its own for every frame (across refills of
the pool too) and a payload that unmasks to the message sent.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any, Iterator, List, Tuple

import pytest

import gaman_sync
from gaman_sync.io import nonblocking
from gaman_sync.protocol import Protocol, Side, frames
from gaman_sync.protocol.handshake import accept_response

from .conftest import WAIT

WITHOUT_HELPER = os.environ.get("GAMAN_SYNC_WITHOUT_HELPER") == "1"
needs_helper = pytest.mark.skipif(frames.client_frame is None,
                                  reason="the C helper is not built here")

Received = Tuple[int, bytes, bytes]  # (first byte, masking key, unmasked payload)


def unmask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    pad = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(pad, "big")).to_bytes(n, "big") \
        if n else b""


class RawServer:
    """Accepts one client on 127.0.0.1, answers its handshake, then records
    every frame it sends (unmasked) until it has ``expected`` of them."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.frames: List[Received] = []
        self.error: List[BaseException] = []
        self.done = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.listener.settimeout(WAIT)
            sock, _ = self.listener.accept()
            sock.settimeout(WAIT)
            with sock:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = sock.recv(65536)
                    assert chunk, "the client closed during its handshake"
                    data += chunk
                head, _, data = data.partition(b"\r\n\r\n")
                key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                           if line.lower().startswith(b"sec-websocket-key:"))
                sock.sendall(accept_response(key))
                buf = bytearray(data)
                while len(self.frames) < self.expected:
                    frame = self._take(buf)
                    if frame is None:
                        chunk = sock.recv(1 << 20)
                        assert chunk, "the client closed before its last frame"
                        buf += chunk
                        continue
                    self.frames.append(frame)
                self.done.set()
                # Until the client leaves (its close frame, then TCP).
                while sock.recv(65536):
                    pass
        except BaseException as exc:  # reported by the test
            self.error.append(exc)
            self.done.set()
        finally:
            self.listener.close()

    @staticmethod
    def _take(buf: bytearray) -> Any:
        if len(buf) < 2:
            return None
        first, second = buf[0], buf[1]
        assert second & 0x80, f"an unmasked frame from a client: {bytes(buf[:2])!r}"
        length, at = second & 0x7F, 2
        if length == 126:
            if len(buf) < 4:
                return None
            length, at = int.from_bytes(buf[2:4], "big"), 4
            assert length >= 126, "a 2-byte length for a short payload"
        elif length == 127:
            if len(buf) < 10:
                return None
            length, at = int.from_bytes(buf[2:10], "big"), 10
            assert length >= 65536, "an 8-byte length for a 2-byte one"
        if len(buf) < at + 4 + length:
            return None
        key = bytes(buf[at:at + 4])
        payload = unmask(bytes(buf[at + 4:at + 4 + length]), key)
        del buf[:at + 4 + length]
        return first, key, payload

    def wait(self) -> List[Received]:
        assert self.done.wait(WAIT), f"{len(self.frames)} of {self.expected} frames came"
        if self.error:
            raise self.error[0]
        return self.frames


def send_all(messages: List[Any]) -> List[Received]:
    server = RawServer(len(messages))
    conn = gaman_sync.connect(f"ws://127.0.0.1:{server.port}/", open_timeout=WAIT,
                              compression=None, close_timeout=1)
    try:
        for message in messages:
            conn.send(message)
        return server.wait()
    finally:
        conn.terminate()
        conn.wait_closed(WAIT)


def test_every_frame_is_masked_whole_and_unmasks_to_the_message():
    sizes = [0, 1, 3, 4, 7, 8, 9, 125, 126, 127, 65535, 65536, 65537, 2**20 + 3]
    messages: List[Any] = []
    for size in sizes:
        messages.append(bytes((i * 7 + size) & 0xFF for i in range(size)))
        messages.append("x" * size)
    messages += ["é€😀" * 50, "", bytearray(b"a bytearray"),
                 memoryview(b"0123456789")[::2], memoryview(bytearray(b"mv"))]
    received = send_all(messages)
    assert len(received) == len(messages)
    for message, (first, _, payload) in zip(messages, received):
        if isinstance(message, str):
            assert first == 0x81 and payload.decode("utf-8") == message
        else:
            assert first == 0x82 and payload == bytes(message)
    keys = [key for _, key, _ in received]
    assert len(set(keys)) == len(keys), "a masking key used twice"


def test_keys_stay_fresh_across_refills_of_the_pool():
    # 1,024 keys per refill of the C helper's pool: these go through three.
    count = 2600
    received = send_all([f"{i}" for i in range(count)])
    assert [payload for _, _, payload in received] == [f"{i}".encode() for i in range(count)]
    keys = [key for _, key, _ in received]
    # Random 32-bit keys: a few may collide by chance (about 0.0008 expected
    # pairs here), never a run of them.
    assert len(set(keys)) >= count - 3
    assert all(keys[i] != keys[i + 1024] for i in range(count - 1024))


def test_frames_sent_from_several_threads_arrive_whole():
    threads, each = 4, 300
    server = RawServer(threads * each)
    conn = gaman_sync.connect(f"ws://127.0.0.1:{server.port}/", open_timeout=WAIT,
                              compression=None, close_timeout=1)
    try:
        def sender(n: int) -> None:
            for i in range(each):
                conn.send(f"{n}:{i}" if i % 2 else f"{n}:{i}".encode() * 40)

        workers = [threading.Thread(target=sender, args=(n,)) for n in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(WAIT)
        received = server.wait()
    finally:
        conn.terminate()
        conn.wait_closed(WAIT)
    for n in range(threads):
        # Each thread's frames whole and in its own order.
        mine = [payload for _, _, payload in received
                if payload.startswith(f"{n}:".encode())]
        assert mine == [f"{n}:{i}".encode() if i % 2 else f"{n}:{i}".encode() * 40
                        for i in range(each)]
    assert len({key for _, key, _ in received}) >= threads * each - 3


def test_a_send_of_something_else_says_what_a_message_is():
    server = RawServer(1)
    conn = gaman_sync.connect(f"ws://127.0.0.1:{server.port}/", open_timeout=WAIT,
                              compression=None, close_timeout=1)
    try:
        with pytest.raises(TypeError, match="a message is str or bytes, not int"):
            conn.send(42)  # type: ignore[arg-type]
        with pytest.raises(UnicodeEncodeError):
            conn.send("\udc80")  # a lone surrogate has no UTF-8
        conn.send("still open")
        ((first, _, payload),) = server.wait()
        assert (first, payload) == (0x81, b"still open")
    finally:
        conn.terminate()
        conn.wait_closed(WAIT)


@needs_helper
def test_the_client_encodes_with_the_c_helper_unless_compressing():
    assert Protocol(Side.CLIENT).encode_whole is frames.client_frame
    assert Protocol(Side.SERVER).encode_whole is None


@needs_helper
@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() here")
def test_a_forked_child_does_not_reuse_its_parents_keys():
    client_frame = frames.client_frame
    client_frame(b"")  # the pool is full of keys not used yet
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next keys, then out at once
        try:
            os.write(write_end, b"".join(client_frame(b"")[2:6] for _ in range(8)))
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        child = b""
        deadline = time.monotonic() + WAIT
        while len(child) < 32 and time.monotonic() < deadline:
            chunk = os.read(read_end, 32)
            if not chunk:
                break
            child += chunk
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    parent = b"".join(client_frame(b"")[2:6] for _ in range(8))
    assert len(child) == 32
    assert child != parent


@pytest.fixture
def tcp_pair() -> Iterator[Tuple[socket.socket, socket.socket]]:
    listener = socket.create_server(("127.0.0.1", 0))
    with listener:
        left = socket.create_connection(listener.getsockname(), timeout=WAIT)
        right, _ = listener.accept()
    left.settimeout(None)
    right.settimeout(None)
    with left, right:
        yield left, right


@pytest.mark.skipif(nonblocking.recv_for is None, reason="the C helper is not built here")
def test_recv_for_waits_reads_and_times_out(tcp_pair):
    left, right = tcp_pair
    recv_for = nonblocking.recv_for
    start = time.monotonic()
    with pytest.raises(socket.timeout):
        recv_for(left.fileno(), 100, 0.05)
    assert time.monotonic() - start >= 0.05
    threading.Timer(0.05, right.sendall, (b"late",)).start()
    assert recv_for(left.fileno(), 100, WAIT) == b"late"
    right.sendall(b"0123456789")
    assert recv_for(left.fileno(), 4, WAIT) == b"0123"
    assert recv_for(left.fileno(), 100, 0) == b"456789"  # there already: no wait
    right.shutdown(socket.SHUT_WR)
    assert recv_for(left.fileno(), 100, WAIT) == b""  # the end of the stream
    assert left.gettimeout() is None  # the socket stays as it was: blocking


def test_a_plain_transport_reads_with_a_timeout_either_way(tcp_pair):
    from gaman_sync.io import PlainTransport

    left, right = tcp_pair
    transport = PlainTransport(left)
    uses_c = nonblocking.recv_for is not None and not WITHOUT_HELPER
    assert (transport.recv_for.__class__.__name__ == "partial") == uses_c
    with pytest.raises(socket.timeout):
        transport.recv_for(100, 0.02)
    right.sendall(b"abc")
    assert transport.recv_for(100, WAIT) == b"abc"


def test_next_event_with_bytes_is_receive_data_then_next_event():
    wire = frames.encode_frame("hello", mask=False)
    one, two = Protocol(Side.CLIENT), Protocol(Side.CLIENT)
    data = b"".join(wire) * 2
    _, first = one.next_event(data)
    two.receive_data(data)
    _, second = two.next_event()
    assert type(first) is type(second) and first.data == second.data == "hello"  # type: ignore
    assert one.unparsed and one.has_buffered_input()  # the second frame waits
    _, again = one.next_event()
    assert again.data == "hello" and not one.unparsed  # type: ignore[union-attr]
    assert one.next_event() == (b"", None)

