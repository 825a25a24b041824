"""Issue 9, "What a new user hits": one test per item, each failing before
the fix, on real sockets on 127.0.0.1 (port 0).

The tests use only the public names of ``gaman_sync`` (and the raw client of
``tests/wsclient.py``), so that they run unchanged against the code of
before the restructure. Programs that must exit, or be signalled, run in a
subprocess with the package under test (the one this file imports).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import struct
import base64
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, List, Optional

import pytest

import gaman_sync
from gaman_sync import (ConnectionClosed, WebSocketHandler, WebSocketServer, define_block)


WAIT = 10.0
TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA
# The checkout of the package under test: examples/ and README.rst are there.
ROOT = Path(gaman_sync.__file__).resolve().parent.parent
PYTHON = sys.executable


# -- A raw client of its own (the shared test clients move between versions) ---


def request_bytes(port: int, path: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n").encode("ascii")


def encode_frame(opcode: int, payload: bytes = b"") -> bytes:
    """A masked client frame (payloads under 64 KiB)."""
    mask = os.urandom(4)
    length = len(payload)
    header = (struct.pack("!BB", 0x80 | opcode, 0x80 | length) if length < 126
              else struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length))
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def parse_close(payload: bytes) -> tuple:
    if len(payload) < 2:
        return None, ""
    return struct.unpack("!H", payload[:2])[0], payload[2:].decode("utf-8")


class RawClient:
    """One client on a blocking socket: whole frames in, (opcode, payload) out."""

    def __init__(self, sock: socket.socket, name: str = "") -> None:
        self.sock = sock
        self.name = name
        self.buf = b""
        self.eof = False
        self.answer_close = True
        self.close_sent = False

    @classmethod
    def connect(cls, port: int, path: str = "/") -> "RawClient":
        sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        sock.sendall(request_bytes(port, path))
        client = cls(sock, path)
        client.finish_handshake()
        return client

    def finish_handshake(self) -> None:
        self.sock.settimeout(WAIT)
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"{self.name}: closed during the handshake: {self.buf!r}")
            self.buf += chunk
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(f"{self.name}: handshake refused: {head!r}")

    def send_frame(self, opcode: int, payload: bytes = b"") -> None:
        self.sock.sendall(encode_frame(opcode, payload))

    def send_text(self, text: str) -> None:
        self.send_frame(TEXT, text.encode("utf-8"))

    def send_close(self, code: int = 1000, reason: str = "") -> None:
        if not self.close_sent:
            self.close_sent = True
            self.send_frame(CLOSE, struct.pack("!H", code) + reason.encode("utf-8"))

    def _frames(self) -> List[tuple]:
        frames = []
        while len(self.buf) >= 2:
            length, start = self.buf[1] & 0x7F, 2
            if length == 126:
                if len(self.buf) < 4:
                    break
                length, start = struct.unpack("!H", self.buf[2:4])[0], 4
            elif length == 127:
                if len(self.buf) < 10:
                    break
                length, start = struct.unpack("!Q", self.buf[2:10])[0], 10
            if len(self.buf) < start + length:
                break
            frames.append((self.buf[0] & 0x0F, self.buf[start:start + length]))
            self.buf = self.buf[start + length:]
        return frames

    def read_until(self, done, on_frame, timeout: float = WAIT) -> None:
        """Read frames into ``on_frame`` until ``done()``; answer pings and closes."""
        deadline = time.monotonic() + timeout
        while True:
            for opcode, payload in self._frames():
                if opcode == PING:
                    self.send_frame(PONG, payload)
                elif opcode == CLOSE and self.answer_close:
                    code = parse_close(payload)[0]
                    self.send_close(1000 if code is None else code)
                on_frame((opcode, payload))
            if done():
                return
            if self.eof:
                raise ConnectionError(f"{self.name}: closed while reading")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.name}: timed out reading")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                raise TimeoutError(f"{self.name}: timed out reading") from None
            except ConnectionResetError:
                data = b""
            if not data:
                self.eof = True
            self.buf += data

    def read_to_eof(self, on_frame=lambda f: None, timeout: float = WAIT) -> None:
        try:
            self.read_until(lambda: self.eof, on_frame, timeout)
        except ConnectionError:
            if not self.eof:
                raise

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def servers():
    """``servers(blocks, **options)``: a started server on port 0, shut down after."""
    made: List[WebSocketServer] = []

    def factory(blocks: Any, **options: Any) -> WebSocketServer:
        server = WebSocketServer(blocks, host="127.0.0.1", port=0, **options)
        made.append(server)
        server.start()
        return server

    yield factory
    for server in made:
        server.shutdown(timeout=2)


def _wait(predicate, timeout: float = WAIT, what: str = "a condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _frames_until_close(client: RawClient, timeout: float = WAIT) -> List[tuple]:
    """Every frame up to and including the server's close frame."""
    frames: List[tuple] = []
    client.read_until(lambda: any(op == CLOSE for op, _ in frames), frames.append, timeout)
    return frames


def _env() -> dict:
    """The environment of a subprocess that imports the package under test."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _cli(*args: str, timeout: float = WAIT) -> subprocess.CompletedProcess:
    """``python -m gaman_sync ARGS`` from the checkout; a run that does not end
    in ``timeout`` (a server that started when it should have refused) fails."""
    try:
        return subprocess.run([PYTHON, "-m", "gaman_sync", *args], cwd=ROOT, env=_env(),
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"gaman_sync {' '.join(args)} did not end: it was not refused "
                             f"({exc.stderr!r})") from None


def _read_line(stream, pattern: str, timeout: float = WAIT) -> str:
    """The first line of ``stream`` (a subprocess pipe) matching ``pattern``."""
    found: List[Optional[str]] = []
    seen: List[str] = []

    def reader() -> None:
        for line in stream:
            seen.append(line)
            if re.search(pattern, line):
                found.append(line)
                return
        found.append(None)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    thread.join(timeout)
    if not found or found[0] is None:
        raise AssertionError(f"no line matching {pattern!r}; got {''.join(seen)!r}")
    return found[0]


# -- Serious ------------------------------------------------------------------


def test_serious_1_clients_holds_only_open_connections(servers):
    """A connection leaves ``clients`` the moment its close starts (here a
    ``close(4000)`` the peer never answers); a loop over ``clients`` then
    reaches every open client, and ``broadcast`` agrees with ``clients``.
    A client that starts closing *during* a loop makes its ``send`` raise
    ConnectionClosed (the documented decision); ``broadcast`` never raises."""
    conns = {}

    def handler(ctx):
        conns[ctx.id] = ctx
        return {}

    server = servers(define_block("/", handler))
    view = server.blocks[0]
    clients = [RawClient.connect(server.port, "/") for _ in range(3)]
    try:
        _wait(lambda: len(view.clients) == 3, what="three clients")
        first, middle, last = sorted(conns)
        clients[1].answer_close = False  # never answers: stays closing for close_timeout
        conns[middle].close(4000)
        assert middle not in [c.id for c in view.clients]
        assert middle not in [c.id for c in server.clients]
        # The loop of the GamanJS page, on the clients that are open.
        for c in view.clients:
            c.send("to the open ones")
        # A snapshot that still holds the closing client meets ConnectionClosed there.
        with pytest.raises(ConnectionClosed):
            conns[middle].send("too late")
        assert view.broadcast("broadcast") == 2  # no raise; the closing client skipped
        for client in (clients[0], clients[2]):
            got: List[tuple] = []
            client.read_until(lambda: len(got) >= 2, got.append)
            assert got == [(TEXT, b"to the open ones"), (TEXT, b"broadcast")]
    finally:
        for client in clients:
            client.close()


def test_serious_2_a_client_closed_by_its_handler_receives_no_broadcast(servers):
    """A handler that checks a token (0.1 s) and refuses with 4001: the
    broadcasts sent meanwhile never reach that client."""
    def handler(ctx):
        time.sleep(0.1)
        ctx.close(4001, "bad token")
        return {}

    server = servers(define_block("/", handler))
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=WAIT)
    try:
        sock.sendall(request_bytes(server.port, "/"))
        deadline = time.monotonic() + 0.4
        while time.monotonic() < deadline:  # broadcasts all through the handler
            server.broadcast("for authenticated clients")
            time.sleep(0.01)
        client = RawClient(sock, "refused")
        client.finish_handshake()
        client.answer_close = False
        frames = _frames_until_close(client)
        assert [op for op, _ in frames] == [CLOSE], frames
        assert parse_close(frames[-1][1]) == (4001, "bad token")
    finally:
        sock.close()


def test_serious_3_ports_above_65535_are_refused():
    """``WebSocketServer(b, port=70000)`` and ``--port 99999`` are refused
    with an error naming the port, instead of wrapping around."""
    block = define_block("/", lambda ctx: {})
    server = None
    try:
        with pytest.raises((ValueError, OverflowError), match="port"):
            server = WebSocketServer(block, host="127.0.0.1", port=70000)
            server.start()
    finally:
        if server is not None:
            server.shutdown(timeout=1)
    result = _cli("examples.chat:block", "--port", "99999")
    assert result.returncode == 2, result.stderr
    assert "--port" in result.stderr and "65535" in result.stderr
    assert "Traceback" not in result.stderr


def test_serious_4_readme_run_command_uses_the_c_helper_and_says_so():
    """The README's run command installs in place (``pip install -e .``), so
    ``python -m gaman_sync`` from the checkout finds the C helper built there;
    the start line says whether it is in use (and why not)."""
    readme = (ROOT / "README.rst").read_text()
    assert (".venv/bin/pip install -q -e . && .venv/bin/python -m gaman_sync "
            "examples.chat:block") in readme
    built = any((ROOT / "gaman_sync").glob("_speedups*.so"))
    proc = subprocess.Popen([PYTHON, "-m", "gaman_sync", "examples.chat:block", "--port", "0",
                             "--log-level", "info"], cwd=ROOT, env=_env(),
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        line = _read_line(proc.stderr, r"C helper|listening")
        if built:
            assert "C helper in use" in line, line
        else:
            assert re.search(r"C helper not in use: \S", line), line
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(WAIT)
        finally:
            proc.kill()
            proc.stderr.close()


# -- Clearer errors ------------------------------------------------------------


def test_errors_1_options_of_the_wrong_type_name_the_option():
    block = define_block("/", lambda ctx: {})
    with pytest.raises(TypeError, match="ping_interval.*seconds"):
        WebSocketServer(block, port=0, ping_interval="5")
    with pytest.raises(TypeError, match="max_message_size.*int"):
        WebSocketServer(block, port=0, max_message_size=2.5)


def test_errors_2a_close_with_a_bytes_reason_is_a_clear_type_error(servers):
    errors: List[BaseException] = []

    def handler(ctx):
        def on_open():
            try:
                ctx.close(1000, b"x")
            except Exception as exc:
                errors.append(exc)
            ctx.close(1000, "done")
        return {"on_open": on_open}

    server = servers(define_block("/", handler))
    client = RawClient.connect(server.port, "/")
    try:
        _frames_until_close(client)
    finally:
        client.close()
    assert len(errors) == 1 and isinstance(errors[0], TypeError), errors
    assert "reason" in str(errors[0]) and "str" in str(errors[0])


def test_errors_2b_broadcast_excludes_a_connection_by_id(servers):
    errors: List[BaseException] = []

    def handler(ctx):
        def on_message(message):
            try:
                ctx.server.broadcast(message, exclude=ctx.id)
            except Exception as exc:
                errors.append(exc)
                ctx.server.broadcast("failed")
        return {"on_message": on_message}

    server = servers(define_block("/", handler))
    sender = RawClient.connect(server.port, "/")
    other = RawClient.connect(server.port, "/")
    try:
        _wait(lambda: len(server.clients) == 2, what="two clients")
        sender.send_text("hello")
        got: List[tuple] = []
        other.read_until(lambda: bool(got), got.append)
        assert got == [(TEXT, b"hello")]
        sender.send_close(1000)
        frames = _frames_until_close(sender)
        assert [op for op, _ in frames] == [CLOSE]  # the sender was excluded
    finally:
        sender.close()
        other.close()
    assert not errors
    with pytest.raises(TypeError, match="exclude"):
        server.broadcast("x", exclude="everyone")


def test_errors_3_subprotocols_and_paths_that_could_never_match_are_refused():
    def handler(ctx):
        return {}
    with pytest.raises(TypeError, match="subprotocols"):
        define_block("/", handler, subprotocols="chat")
    for path in ("chat", "/chat?room=1", "/chat#top"):
        with pytest.raises(ValueError, match="path"):
            define_block(path, handler)


@pytest.mark.parametrize("args, names", [
    (["examples.chat:block", "--port", "0", "--ping-interval", "0"], ["--ping-interval"]),
    (["examples.chat:block", "--port", "0", "--max-message-size", "-5"],
     ["--max-message-size"]),
    (["examples.chat:block", "--port", "99999"], ["--port", "65535"]),
    (["examples.chat:chat", "--port", "0"], ["examples.chat:chat", "a function", "Block"]),
    (["examples.chat:__doc__", "--port", "0"], ["examples.chat:__doc__", "a str", "Block"]),
], ids=["ping-interval-0", "max-message-size-negative", "port-99999", "a-function",
        "a-docstring"])
def test_errors_4_cli_usage_errors_exit_2_naming_what_was_expected(args, names):
    result = _cli(*args)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("usage:"), result.stderr
    last = result.stderr.strip().splitlines()[-1]
    for name in names:
        assert name in last, last


def test_errors_4_cli_version():
    result = _cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"gaman_sync {gaman_sync.__version__}"


# -- Embedding and shutdown ----------------------------------------------------


def _program(tmp_path: Path, source: str) -> subprocess.Popen:
    path = tmp_path / "program.py"
    path.write_text(textwrap.dedent(source))
    return subprocess.Popen([PYTHON, str(path)], cwd=tmp_path, env=_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = WAIT) -> tuple:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"the program did not end in {timeout} s: {err!r}") from None
    return proc.returncode, out, err


def test_embedding_1_wait_for_shutdown_request_ends_a_loop_on_sigterm(tmp_path):
    """The README's pattern for a program with its own ``while True``: the
    signal handler calls ``request_shutdown()``, the loop polls
    ``wait_for_shutdown_request(timeout)``, then ``shutdown()``."""
    proc = _program(tmp_path, """
        import signal
        from gaman_sync import WebSocketServer, define_block

        server = WebSocketServer(define_block("/", lambda ctx: {}), port=0)
        server.start()
        signal.signal(signal.SIGTERM, lambda signum, frame: server.request_shutdown())
        print(server.port, flush=True)
        ticks = 0
        while not server.wait_for_shutdown_request(timeout=0.05):
            ticks += 1                   # the program's own work
        server.shutdown()
        print("done", ticks > 0, flush=True)
    """)
    client = None
    try:
        port = int(proc.stdout.readline())
        client = RawClient.connect(port, "/")
        time.sleep(0.2)                  # the loop runs meanwhile
        proc.send_signal(signal.SIGTERM)
        frames = _frames_until_close(client)
        assert parse_close(frames[-1][1])[0] == 1001
        code, out, err = _finish(proc)
        assert (code, out.strip()) == (0, "done True"), err
    finally:
        if client is not None:
            client.close()
        proc.kill()
        _finish(proc)


def test_embedding_2_exit_hook_closes_clients_with_1001(tmp_path):
    """A program that exits without ``shutdown()`` still closes its clients
    with 1001 (the exit hook), not with a dropped connection (1006)."""
    proc = _program(tmp_path, """
        import sys
        from gaman_sync import WebSocketServer, define_block

        server = WebSocketServer(define_block("/", lambda ctx: {}), port=0)
        server.start()
        print(server.port, flush=True)
        sys.stdin.readline()             # a client is connected
        # ... and the program ends, without server.shutdown()
    """)
    client = None
    try:
        port = int(proc.stdout.readline())
        client = RawClient.connect(port, "/")
        proc.stdin.write("go\n")
        proc.stdin.flush()
        frames: List[tuple] = []
        client.read_to_eof(frames.append)
        closes = [parse_close(p) for op, p in frames if op == CLOSE]
        assert closes and closes[0][0] == 1001, (frames, proc.stderr.read())
        code, _, err = _finish(proc)
        assert code == 0, err
    finally:
        if client is not None:
            client.close()
        proc.kill()
        _finish(proc)


def test_embedding_3a_shutdown_timeout_is_an_option_and_on_close_still_runs(servers):
    """``shutdown_timeout`` bounds ``shutdown()`` with a callback stuck in a
    connection; that connection's ``on_close`` runs once the callback
    returns, the others' during the shutdown."""
    closed: dict = {}
    release = threading.Event()
    started = threading.Event()

    def handler(ctx):
        def on_message(message):
            started.set()
            release.wait(WAIT)
        return {"on_message": on_message,
                "on_close": lambda code, reason: closed.__setitem__(ctx.id, code)}

    server = WebSocketServer(define_block("/", handler), host="127.0.0.1", port=0,
                             shutdown_timeout=0.5)
    server.start()
    stuck = RawClient.connect(server.port, "/")
    idle = RawClient.connect(server.port, "/")
    try:
        _wait(lambda: len(server.clients) == 2, what="two clients")
        stuck.send_text("block")
        assert started.wait(WAIT)
        t0 = time.monotonic()
        server.shutdown()
        assert time.monotonic() - t0 < 1.5
        assert len(closed) == 1 and list(closed.values()) == [1001]  # the idle one
        release.set()
        _wait(lambda: len(closed) == 2, what="the stuck connection's on_close")
        assert sorted(closed.values()) == [1001, 1001]
    finally:
        release.set()
        server.shutdown(timeout=1)
        stuck.close()
        idle.close()


def test_embedding_3b_a_second_sigint_ends_at_once_with_status_130(tmp_path):
    """``python -m gaman_sync`` with a callback stuck for 30 s and a 30 s
    ``--shutdown-timeout``: the first Ctrl-C starts the shutdown, the second
    ends the program at once, with status 130."""
    (tmp_path / "sleepy.py").write_text(textwrap.dedent("""
        import sys, time
        from gaman_sync import define_block

        def handler(ctx):
            def on_message(message):
                print("sleeping", file=sys.stderr, flush=True)
                time.sleep(30)
            return {"on_message": on_message}

        block = define_block("/", handler)
    """))
    proc = subprocess.Popen([PYTHON, "-m", "gaman_sync", "sleepy:block", "--port", "0",
                             "--log-level", "info", "--shutdown-timeout", "30"],
                            cwd=tmp_path, env=_env(), stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    client = None
    try:
        line = _read_line(proc.stderr, r"listening on")
        port = int(re.search(r":(\d+)", line.split("listening on", 1)[1]).group(1))
        client = RawClient.connect(port, "/")
        client.send_text("sleep")
        _read_line(proc.stderr, "sleeping")
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert proc.poll() is None, "the first SIGINT should start a shutdown, not end it"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(WAIT)
        assert time.monotonic() - t0 < 3
        assert code == 130
    finally:
        if client is not None:
            client.close()
        proc.kill()
        proc.wait()
        proc.stderr.close()


# -- Noise -----------------------------------------------------------------------


def _records(caplog) -> List[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("gaman_sync")]


def test_noise_1_a_user_on_error_silences_the_library_traceback(servers, caplog):
    caplog.set_level(logging.DEBUG, logger="gaman_sync")
    errors: List[BaseException] = []

    def handler(ctx):
        def on_message(message):
            raise ValueError("bad input")
        return {"on_message": on_message, "on_error": errors.append}

    server = servers(define_block("/", handler))
    client = RawClient.connect(server.port, "/")
    try:
        client.send_text("x")
        _wait(lambda: errors, what="on_error")
        client.send_close(1000)
        _frames_until_close(client)
    finally:
        client.close()
    assert [type(e) for e in errors] == [ValueError]
    loud = [r for r in _records(caplog) if r.levelno >= logging.WARNING or r.exc_info]
    assert not loud, [r.getMessage() for r in loud]


def test_noise_2_messages_after_our_close_are_not_delivered(servers, caplog):
    """``on_error`` raises: the close with 1011 starts, and the message that
    already arrived (in the same TCP segment) is not delivered; the log has
    one line for the event."""
    caplog.set_level(logging.DEBUG, logger="gaman_sync")
    delivered: List[Any] = []

    def handler(ctx):
        def on_message(message):
            delivered.append(message)
            if message == "boom":
                raise ValueError("boom")
            ctx.send("echo " + message)

        def on_error(error):
            raise RuntimeError("on_error gives up")
        return {"on_message": on_message, "on_error": on_error}

    server = servers(define_block("/", handler))
    client = RawClient.connect(server.port, "/")
    try:
        client.sock.sendall(encode_frame(TEXT, b"boom") + encode_frame(TEXT, b"after"))
        frames = _frames_until_close(client)
        assert parse_close(frames[-1][1])[0] == 1011
    finally:
        client.close()
    _wait(lambda: not server.clients, what="the connection to end")
    assert delivered == ["boom"]
    errors = [r for r in _records(caplog) if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]


def test_noise_3_debug_lines_for_open_and_close_and_info_stays_quiet(servers, caplog):
    caplog.set_level(logging.DEBUG, logger="gaman_sync")
    server = servers(define_block("/room", lambda ctx: {}))
    caplog.clear()
    client = RawClient.connect(server.port, "/room")
    try:
        client.send_close(4000, "bye")
        client.read_to_eof()
    finally:
        client.close()
    _wait(lambda: any("closed" in r.getMessage() for r in _records(caplog)),
          what="the close line")
    records = _records(caplog)
    assert all(r.levelno == logging.DEBUG for r in records), \
        [(r.levelname, r.getMessage()) for r in records]
    text = [r.getMessage() for r in records]
    opened = [t for t in text if "opened" in t]
    closed = [t for t in text if "closed" in t]
    assert len(opened) == 1 and "127.0.0.1" in opened[0] and "/room" in opened[0], text
    assert len(closed) == 1 and "4000" in closed[0] and "/room" in closed[0], text
    assert re.search(r"\d+\.\d+ s", closed[0]), closed[0]  # the duration


def test_noise_4_the_basic_example_handles_binary_messages(servers):
    from examples import basic

    server = servers(basic.block)
    client = RawClient.connect(server.port, "/")
    try:
        client.send_frame(BINARY, b"\x00\xff")
        client.send_text("hi")
        got: List[tuple] = []
        client.read_until(lambda: len(got) >= 2, got.append)
        assert got == [(BINARY, b"Echo: \x00\xff"), (TEXT, b"Echo: hi")]
    finally:
        client.close()


# -- Must show ---------------------------------------------------------------------


def test_must_show_readme_documents_the_changes():
    """The README says what a loop over ``clients`` meets, that ``broadcast``
    never raises, and has an "Upgrading" section for the change to
    ``clients``; the test command is the one CI runs."""
    readme = (ROOT / "README.rst").read_text()
    flat = " ".join(readme.split())
    assert re.search(r"^Upgrading from 0\.1\n-+$", readme, re.M)
    assert "ConnectionClosed" in flat and "never raises" in flat
    assert "wait_for_shutdown_request" in flat and "shutdown_timeout" in flat
    test_command = ("python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && "
                    ".venv/bin/python -m pytest")
    assert test_command in readme
    ci = ROOT / ".ci" / "run"
    if ci.exists():
        assert test_command in ci.read_text()
