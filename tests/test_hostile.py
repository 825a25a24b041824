"""Hostile input: nothing from the network may crash, hang or leak.

- thousands of abusive connections (garbage, truncated frames, abandoned
  handshakes, resets) leave no thread and no descriptor behind, never reach
  user code as a message, and a normal client is still served;
- running out of file descriptors makes accept() fail: the server logs once,
  does not spin, keeps listening and serves again once descriptors are free;
- a client that floods pings without reading cannot make the server buffer
  without bound.
"""

from __future__ import annotations

import os
import queue
import random
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Set, Tuple

import pytest

from gaman_sync import define_block
from gaman_sync.testing import BINARY, PING, TEXT, RawPeer, close_frame, frame, handshake_request

from .conftest import WAIT
from .helpers import RecordingBlock

CLIENT_TIMEOUT = 5.0


def open_fds() -> Set[Tuple[str, str]]:
    """This process's descriptors, as (number, what it points to): a number
    reused for something else counts as a new descriptor."""
    table = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            table.add((fd, os.readlink(f"/proc/self/fd/{fd}")))
        except FileNotFoundError:
            pass  # the descriptor of the listing itself, closed by now
    return table


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def reset(sock: socket.socket) -> None:
    """Close with a TCP reset instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def read_to_eof(sock: socket.socket) -> bytes:
    data = b""
    deadline = time.monotonic() + CLIENT_TIMEOUT
    while True:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


# Garbage that can never parse as a valid frame: RSV bits and a reserved opcode.
def garbage(rng: random.Random, n: int = 64) -> bytes:
    return b"\xf3" + bytes(rng.randrange(256) for _ in range(n))


# -- The abusive clients: each returns the messages it made the server deliver.

def silent_close(port, rng):
    connect(port).close()
    return []


def garbage_request(port, rng):
    with connect(port) as s:
        s.sendall(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))) + b"\r\n\r\n")
        s.shutdown(socket.SHUT_WR)
        data = read_to_eof(s)
        assert data == b"" or data.startswith(b"HTTP/1.1 4"), data[:100]
    return []


def partial_request(port, rng):
    s = connect(port)
    request = handshake_request("/echo")
    s.sendall(request[:rng.randrange(1, len(request) - 4)])
    if rng.random() < 0.5:
        reset(s)
    else:
        s.close()
    return []


def stalled_handshake(port, rng):
    # Waits out the server's handshake_timeout.
    with connect(port) as s:
        s.sendall(b"GET /echo HTTP/1.1\r\n")
        assert read_to_eof(s) == b""
    return []


def opened(port) -> RawPeer:
    return RawPeer.open("127.0.0.1", port, "/echo", timeout=CLIENT_TIMEOUT)


def garbage_frames(port, rng):
    with opened(port) as c:
        c.send(garbage(rng))
        assert c.expect_close().close_code() == 1002
    return []


def truncated_frame(port, rng):
    c = opened(port)
    c.send(frame(BINARY, os.urandom(1000))[:rng.randrange(1, 200)])
    if rng.random() < 0.5:
        reset(c.sock)
    else:
        c.close()
    return []


def message_then_garbage(port, rng):
    with opened(port) as c:
        c.send(frame(TEXT, "ok") + garbage(rng))
        f = c.recv_frame()
        assert (f.opcode, f.payload) == (TEXT, b"ok")
        assert c.expect_close().close_code() == 1002
    return ["ok"]


def unfinished_fragment(port, rng):
    with opened(port) as c:
        c.send(frame(TEXT, "frag", fin=False) + frame(PING, b"x"))
        c.recv_frame()
    return []


def invalid_utf8(port, rng):
    with opened(port) as c:
        c.send(frame(TEXT, b"\xce\xba\xff"))
        assert c.expect_close().close_code() == 1007
    return []


def oversized(port, rng):
    with opened(port) as c:
        c.send(frame(BINARY, b"", length=1 << 40))
        assert c.expect_close().close_code() == 1009
    return []


def close_and_run(port, rng):
    c = opened(port)
    c.send(close_frame(1000) + garbage(rng))
    if rng.random() < 0.5:
        reset(c.sock)
    else:
        c.close()
    return []


def abandon_open(port, rng):
    c = opened(port)
    if rng.random() < 0.5:
        reset(c.sock)
    else:
        c.close()
    return []


KINDS = [silent_close, garbage_request, partial_request, garbage_frames, truncated_frame,
         message_then_garbage, unfinished_fragment, invalid_utf8, oversized, close_and_run,
         abandon_open]


def big_on_open(ctx):
    return {"on_open": lambda: ctx.send(b"\0" * (16 << 20))}


def start_lazy_helpers(server) -> None:
    """Start what the server only starts on first use (the timer thread, the
    writer thread and its descriptors), so that the baseline includes them."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(WAIT)
        s.connect(("127.0.0.1", server.port))
        s.sendall(handshake_request("/big"))
        assert wait_until(lambda: server.runtime.flusher.thread is not None)
        got = 0
        while got < (16 << 20):
            chunk = s.recv(1 << 20)
            assert chunk
            got += len(chunk)
        s.sendall(close_frame(1000))
        read_to_eof(s)
    assert server.runtime.timers.thread is not None


def test_2000_hostile_connections_leave_nothing_behind(make_server, caplog):
    rb = RecordingBlock("/echo")
    server = make_server([rb.block, define_block("/big", big_on_open)],
                         handshake_timeout=0.5, close_timeout=0.5, ping_interval=5.0)
    start_lazy_helpers(server)
    # Wait for the warm-up connection to be gone too.
    assert wait_until(lambda: not server.clients)
    # Compared as sets, not counts: other tests' leftovers may end meanwhile.
    threads, fds = set(threading.enumerate()), open_fds()

    rng = random.Random(6455)
    plan = [KINDS[i % len(KINDS)] for i in range(1980)] + [stalled_handshake] * 20
    rng.shuffle(plan)
    seeds = [rng.randrange(1 << 30) for _ in plan]
    began = time.monotonic()
    with ThreadPoolExecutor(max_workers=24) as pool:
        results = list(pool.map(lambda ks: ks[0](server.port, random.Random(ks[1])),
                                zip(plan, seeds)))
    expected_messages = [m for r in results for m in r]

    # Every connection that opened is closed, and reported closed once.
    assert wait_until(lambda: not server.clients)
    for rec in rb.all:
        rec.wait_kind("close")
    assert wait_until(lambda: not set(threading.enumerate()) - threads), \
        [t.name for t in set(threading.enumerate()) - threads]
    assert wait_until(lambda: not open_fds() - fds), sorted(open_fds() - fds)[:20]
    print(f"\n[hostile] {len(plan)} connections ({len(KINDS)} kinds of abuse) in "
          f"{time.monotonic() - began:.1f} s; {len(rb.all)} reached a handler; threads "
          f"{len(threads)} -> {len(threading.enumerate())}, descriptors {len(fds)} -> "
          f"{len(open_fds())}")

    # Garbage never became a message, nor an exception in user code.
    assert sorted(rb.messages()) == sorted(expected_messages)
    for rec in rb.all:
        kinds = rec.kinds()
        assert kinds[0] == "open" and kinds[-1] == "close" and kinds.count("close") == 1, kinds
        assert "error" not in kinds
    bad = [r for r in caplog.records if r.exc_info or r.levelname in ("ERROR", "CRITICAL")]
    assert not bad, [r.getMessage() for r in bad[:5]]

    # And a normal client is served as before.
    with RawPeer.open("127.0.0.1", server.port, "/echo") as client:
        client.send_frame(TEXT, "still here")
        f = client.recv_frame()
        assert (f.opcode, f.payload) == (TEXT, b"still here")


def test_ping_flood_without_reading_keeps_the_server_buffer_bounded(make_server):
    """A client that sends pings and never reads the pongs: the server must
    stop reading (backpressure) or drop it, not queue pongs without end."""
    write_limit = 64 * 1024
    rb = RecordingBlock("/echo")
    server = make_server(rb.block, write_limit=write_limit, ping_interval=None,
                         close_timeout=1.0)
    client = RawPeer.open("127.0.0.1", server.port, "/echo")
    conn = rb.recorder().ctx
    chunk = b"".join(frame(PING, b"p" * 125) for _ in range(2000))  # ~260 KB
    total = 16 << 20  # far more than the kernel buffers of both ends hold
    client.sock.settimeout(3.0)
    sent, blocked, dropped = 0, False, False
    try:
        while sent < total:
            client.sock.sendall(chunk)
            sent += len(chunk)
    except socket.timeout:
        blocked = True  # the server stopped reading: backpressure
    except (BrokenPipeError, ConnectionResetError):
        dropped = True
    try:
        # What one read of the server can turn into pongs is fine on top of
        # write_limit; megabytes are not.
        bound = write_limit + (1 << 20)
        if not blocked and not dropped:
            # Everything was read: the pongs are queued somewhere. Give the
            # server the time to parse the rest of what it read.
            wait_until(lambda: conn.buffered_amount > bound, timeout=5.0)
        assert conn.buffered_amount <= bound, \
            f"{conn.buffered_amount} bytes of pongs queued for a client that does not read"
    finally:
        client.close()


# -- Out of file descriptors ---------------------------------------------------------

EMFILE_SERVER = textwrap.dedent("""
    import ctypes, logging, os, resource, sys
    try:
        # glibc loads libgcc_s when a thread first exits; with no descriptor
        # free that load fails and aborts the process, which is not the bug
        # under test.
        ctypes.CDLL("libgcc_s.so.1")
    except OSError:
        pass
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s",
                        stream=sys.stderr)
    from gaman_sync import WebSocketServer, define_block
    server = WebSocketServer(define_block("/echo", lambda ctx: {"on_message": ctx.send}),
                             host="127.0.0.1", port=0, ping_interval=None).start()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 32, hard))
    hog = []
    try:
        while True:
            hog.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass
    print("PORT", server.port, flush=True)
    sys.stdin.readline()
    for fd in hog:
        os.close(fd)
    print("FREED", flush=True)
    sys.stdin.readline()
    server.shutdown(2)
    print("DONE", flush=True)
""")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_out_of_descriptors_backs_off_and_recovers():
    proc = subprocess.Popen([sys.executable, "-c", EMFILE_SERVER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    stderr_lines: queue.Queue[str] = queue.Queue()
    all_stderr: List[str] = []

    def pump():
        for line in proc.stderr:
            all_stderr.append(line)
            stderr_lines.put(line)

    pump_thread = threading.Thread(target=pump, daemon=True)
    pump_thread.start()

    def wait_stderr(text: str) -> str:
        deadline = time.monotonic() + WAIT
        while True:
            try:
                line = stderr_lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"no {text!r} in the server's log: {all_stderr}") from None
            if text in line:
                return line

    client = None
    try:
        line = proc.stdout.readline()
        assert line.startswith("PORT "), (line, all_stderr)
        port = int(line.split()[1])
        # The server process has no descriptor left: this connection waits in
        # the backlog while accept() fails.
        client = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        client.sendall(handshake_request("/echo"))
        wait_stderr("accept() failed")
        # For one second: no answer may come, and the server must not spin.
        before = cpu_seconds(proc.pid)
        client.settimeout(1.0)
        with pytest.raises(socket.timeout):
            client.recv(100)
        spent = cpu_seconds(proc.pid) - before
        assert spent < 0.3, f"the server used {spent:.2f} s of CPU in 1 s: spinning"

        proc.stdin.write("free\n")
        proc.stdin.flush()
        assert proc.stdout.readline().startswith("FREED")
        # The waiting connection is accepted and served.
        raw = RawPeer(client, timeout=WAIT)
        response = raw.read_http_response(body=False)
        assert response.status == 101
        raw.send_frame(TEXT, "after EMFILE")
        f = raw.recv_frame()
        assert (f.opcode, f.payload) == (TEXT, b"after EMFILE")
        # And a new one too.
        with RawPeer.open("127.0.0.1", port, "/echo") as fresh:
            fresh.send_frame(BINARY, b"new")
            assert fresh.recv_frame().payload == b"new"
        proc.stdin.write("stop\n")
        proc.stdin.flush()
        assert proc.stdout.readline().startswith("DONE")
        assert proc.wait(WAIT) == 0
    finally:
        if client is not None:
            client.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)
        pump_thread.join(WAIT)
    log = "".join(all_stderr)
    assert log.count("accept() failed") == 1, log
    assert "Traceback" not in log and "accept loop failed" not in log, log
