"""The command line, run as users run it: ``python -m gaman_sync`` in a
subprocess, on 127.0.0.1 port 0 (or a port a test holds, for "in use").

Every mistake is exactly one line on stderr and exit status 2; a server
logs the URL of each block it serves, its access log and stats lines have
the right fields, and a signal shuts it down gracefully.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

from gaman_sync import ConnectionClosedOK, connect

from .conftest import WAIT

# The checkout: examples/ and README.rst are there (the package under test
# may be installed elsewhere: .ci/test-installed).
ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cli(*args: str, cwd: Path = ROOT, stdin: Optional[str] = None,
            timeout: float = WAIT) -> subprocess.CompletedProcess:
    """``python -m gaman_sync ARGS`` to its end; one that does not end in
    ``timeout`` (a server that started when it should have refused) fails."""
    try:
        return subprocess.run([PYTHON, "-m", "gaman_sync", *args], cwd=cwd, env=_env(),
                              input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"gaman-sync {' '.join(args)} did not end ({exc.stderr!r})") \
            from None


def frame_size(payload: int, masked: bool) -> int:
    """Bytes on the wire of one frame (RFC 6455 5.2)."""
    extended = 0 if payload < 126 else 2 if payload < 65536 else 8
    return 2 + extended + (4 if masked else 0) + payload


class Running:
    """A ``python -m gaman_sync`` server in a subprocess; its stderr lines are
    read by a thread, so a test can wait for one with a timeout."""

    def __init__(self, *args: str, cwd: Path = ROOT) -> None:
        self.proc = subprocess.Popen([PYTHON, "-m", "gaman_sync", *args, "--port", "0"],
                                     cwd=cwd, env=_env(), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        self.lines: List[str] = []
        self._queue: queue.Queue[Optional[str]] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = int(self.wait_line(r"listening on 127\.0\.0\.1:(\d+)").group(1))

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_line(self, pattern: str, timeout: float = WAIT) -> re.Match[str]:
        """The next stderr line that matches ``pattern`` (earlier ones are kept
        in :attr:`lines`)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self._queue.get(timeout=max(remaining, 0))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} in {timeout} s; "
                                     f"stderr so far: {self.lines!r}") from None
            if line is None:
                raise AssertionError(f"the server ended (status {self.proc.wait()}) "
                                     f"without a line matching {pattern!r}: {self.lines!r}")
            self.lines.append(line)
            match = re.search(pattern, line)
            if match:
                return match

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send ``sig``; the exit status, once every stderr line is read."""
        self.proc.send_signal(sig)
        status = self.proc.wait(WAIT)
        self._reader.join(WAIT)
        while True:
            line = self._queue.get_nowait() if not self._queue.empty() else None
            if line is None:
                return status
            self.lines.append(line)

    def url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(WAIT)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture
def running() -> Iterator:
    """``running(*args)``: a server started from the command line, killed at
    the end of the test if it is still running."""
    started: List[Running] = []

    def start(*args: str, cwd: Path = ROOT) -> Running:
        server = Running(*args, cwd=cwd)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


# -- Mistakes: one line, status 2 -------------------------------------------

def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {result.stderr!r}"
    line = lines[0]
    assert line.startswith("gaman-sync: error: "), line
    for word in words:
        assert word in line, f"{word!r} not in {line!r}"
    assert result.stdout == ""
    return line


@pytest.mark.parametrize("args, words", [
    (["nosuch_module_zq:block"], ["nosuch_module_zq", "No module named"]),
    (["examples.echo:nothing"], ["examples.echo", "nothing"]),
    (["examples.echo:echo"], ["examples.echo:echo", "a function, not a Block"]),
    (["examples.echo:logging"], ["examples.echo:logging", "a module, not a Block"]),
    (["examples.echo"], ["MODULE:BLOCK", "'examples.echo'"]),
    (["examples.echo:block", "examples.echo:block"], ["two blocks share the path '/echo'"]),
    ([], ["MODULE:BLOCK"]),
    (["examples.echo:block", "--bogus"], ["unrecognized", "--bogus"]),
], ids=["missing module", "no such name", "a function", "a module", "no colon",
        "same path twice", "no block", "unknown flag"])
def test_a_block_that_cannot_be_served_is_one_line_and_status_2(args, words):
    assert_one_line_error(run_cli(*args), *words)


@pytest.mark.parametrize("flag, value, accepts", [
    ("--port", "99999", "a port from 0 to 65535"),
    ("--port", "eighty", "a port from 0 to 65535"),
    ("--max-message-size", "0", "a positive number of bytes"),
    ("--max-message-size", "1.5", "a positive number of bytes"),
    ("--max-connections", "-5", "a positive whole number"),
    ("--ping-interval", "0", "a positive number of seconds or 'off'"),
    ("--ping-timeout", "soon", "a positive number of seconds or 'off'"),
    ("--close-timeout", "inf", "a positive number of seconds"),
    ("--shutdown-timeout", "nan", "a positive number of seconds"),
    ("--stats-interval", "0", "a positive number of seconds"),
    ("--stats-interval", "-1", "a positive number of seconds"),
    ("--health-path", "health", "a path starting with '/'"),
    ("--log-level", "loud", "invalid choice"),
])
def test_a_bad_value_is_one_line_naming_the_flag_and_status_2(flag, value, accepts):
    line = assert_one_line_error(run_cli("examples.echo:block", f"{flag}={value}"),
                                 flag, accepts)
    assert repr(value) in line or value in line


def test_a_module_that_fails_to_import_is_one_line_without_a_traceback(tmp_path):
    (tmp_path / "broken_on_import.py").write_text(
        "raise RuntimeError('the database is down')\n")
    (tmp_path / "bad_syntax.py").write_text("def block(:\n")
    assert_one_line_error(run_cli("broken_on_import:block", cwd=tmp_path),
                          "broken_on_import:block", "RuntimeError", "the database is down")
    assert_one_line_error(run_cli("bad_syntax:block", cwd=tmp_path),
                          "bad_syntax:block", "SyntaxError")
    # A module that imports something missing names the missing one.
    (tmp_path / "needs_more.py").write_text("import nosuch_dependency_zq\n")
    assert_one_line_error(run_cli("needs_more:block", cwd=tmp_path),
                          "needs_more", "nosuch_dependency_zq")


def test_a_port_in_use_is_one_line_and_status_2():
    taken = socket.socket()
    try:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = assert_one_line_error(run_cli("examples.echo:block", "--port", str(port)),
                                     "cannot listen", f"127.0.0.1:{port}")
    finally:
        taken.close()
    assert "in use" in line.lower(), line


# -- Serving ----------------------------------------------------------------

def test_several_blocks_are_served_and_each_url_is_logged(running):
    server = running("examples.echo:block", "examples.redirect:blocks", "examples.chat:block",
                     "--health-path", "/health")
    base = f"127.0.0.1:{server.port}"
    expected = [f"http://{base}/health (health check)",
                f"ws://{base}/echo", f"ws://{base}/chat/:room (redirects to /rooms/:room)",
                f"ws://{base}/rooms/:room", f"http://{base}/ (HTTP)", f"ws://{base}/chat"]
    served = set()
    while len(served) < len(expected):
        served.add(server.wait_line(r"INFO gaman_sync: serving (.*)$").group(1))
    assert served == set(expected)
    # Each is really served, in the one process.
    with connect(server.url("/echo")) as ws:
        ws.send("echo?")
        assert ws.recv(timeout=WAIT) == "echo?"
    with connect(server.url("/chat/lobby")) as ws:  # redirected to /rooms/lobby
        assert ws.url.endswith("/rooms/lobby")
        assert ws.recv(timeout=WAIT) == "welcome to lobby"
    with connect(server.url("/chat?name=Alice")) as ws:
        assert "Alice" in ws.recv(timeout=WAIT)
    assert server.stop() == 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_shuts_down_gracefully(running, sig):
    """Every open client gets 1001, and the program exits 0."""
    server = running("examples.echo:block")
    ws = connect(server.url("/echo"))
    try:
        status = server.stop(sig)
        with pytest.raises(ConnectionClosedOK):
            ws.recv(timeout=WAIT)
        assert ws.close_code == 1001
    finally:
        ws.close()
    assert status == 0, server.lines
    # Said when it starts (the wait for clients may take shutdown_timeout) and ends.
    assert any("shutting down: 1 connection(s) closing with 1001" in line
               for line in server.lines), server.lines
    assert any(line.endswith("shut down") for line in server.lines)
    assert not any("Traceback" in line for line in server.lines), server.lines


def test_access_log_has_one_line_per_connection_with_its_fields(running):
    server = running("examples.echo:block", "--access-log")
    ws = connect(server.url("/echo?token=secret"))
    local = ws.transport.sock.getsockname()
    for message in ("hi", "there"):
        ws.send(message)
        assert ws.recv(timeout=WAIT) == message
    ws.close(4001, "bye")
    match = server.wait_line(
        r"INFO gaman_sync\.access: peer=(\S+) path=(\S+) code=(\d+) duration=([\d.]+)s "
        r"messages_in=(\d+) bytes_in=(\d+) messages_out=(\d+) bytes_out=(\d+)$")
    peer, path, code, duration, m_in, b_in, m_out, b_out = match.groups()
    assert peer == f"{local[0]}:{local[1]}"
    assert path == "/echo"
    assert int(code) == 4001
    assert 0 <= float(duration) < WAIT
    close_in = frame_size(2 + len("bye"), masked=True)
    close_out = frame_size(2 + len("bye"), masked=False)
    assert (int(m_in), int(b_in)) == (2, frame_size(2, True) + frame_size(5, True) + close_in)
    assert (int(m_out), int(b_out)) == (2, frame_size(2, False) + frame_size(5, False)
                                        + close_out)
    assert server.stop() == 0
    assert sum("gaman_sync.access" in line for line in server.lines) == 1


def test_stats_interval_logs_the_stats_on_one_line(running):
    server = running("examples.echo:block", "--stats-interval", "0.1")
    server.wait_line(r"INFO gaman_sync\.stats: stats: open=0 accepted=0 rejected=- ")
    with connect(server.url("/echo")) as ws:
        ws.send("x")
        assert ws.recv(timeout=WAIT) == "x"
        line = server.wait_line(r"gaman_sync\.stats: stats: open=1 accepted=1 ").string
        assert re.search(r"messages_in=[01] bytes_in=\d+ messages_out=[01] bytes_out=\d+ "
                         r"closes=-$", line), line
    server.wait_line(r"gaman_sync\.stats: stats: open=0 accepted=1 .* closes=1000:1$")
    assert server.stop() == 0


# -- connect ------------------------------------------------------------------

def test_connect_subcommand_sends_stdin_lines_and_prints_messages(echo_server):
    result = run_cli("connect", "--wait", "0.5", echo_server.url("/echo"),
                     stdin="hello\nworld\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["hello", "world"]


def test_a_module_named_connect_is_still_served(running, tmp_path):
    (tmp_path / "connect.py").write_text(
        "from gaman_sync import define_block\n"
        "block = define_block('/c', lambda ctx: {'on_message': ctx.send})\n")
    server = running("connect:block", cwd=tmp_path)
    with connect(server.url("/c")) as ws:
        ws.send("served")
        assert ws.recv(timeout=WAIT) == "served"
    assert server.stop() == 0


# -- --help and the README ----------------------------------------------------

def help_entries(*args: str) -> Dict[str, str]:
    """Each flag of ``ARGS --help`` (every alias) with the text of its entry."""
    result = run_cli(*args, "--help")
    assert result.returncode == 0, result.stderr
    entries: Dict[str, str] = {}
    current: List[str] = []
    for line in result.stdout.splitlines():
        match = re.match(r"  (-.*?)(?:  |$)", line)
        if match:
            current = re.findall(r"(?:^|, )(-{1,2}[a-z][a-z-]*)", match.group(1))
            for flag in current:
                entries[flag] = line
        elif line.startswith("   ") and current:
            for flag in current:
                entries[flag] += " " + line.strip()
        else:
            current = []
    return entries


def test_help_lists_every_flag_with_its_default():
    entries = help_entries()
    flags = set(entries) - {"-h", "--help", "--version"}
    assert {"--host", "--port", "--max-message-size", "--ping-interval", "--ping-timeout",
            "--max-connections", "--log-level", "--access-log", "--stats-interval"} <= flags
    for flag in flags:
        assert "default" in entries[flag], entries[flag]
    assert "connect URL" in run_cli("--help").stdout


def readme_section(title: str) -> str:
    """The text of the README's section ``title`` (up to the next section of
    the same level)."""
    lines = (ROOT / "README.rst").read_text().splitlines()
    start = next(i for i, line in enumerate(lines[:-1])
                 if line == title and lines[i + 1] == "-" * len(title))
    end = next((i for i in range(start + 2, len(lines) - 1)
                if lines[i] and lines[i + 1] == "-" * len(lines[i])), len(lines))
    return "\n".join(lines[start:end])


def test_readme_command_line_section_lists_exactly_the_flags_of_help():
    in_readme = set(re.findall(r"``(--[a-z][a-z-]*)", readme_section("Command line")))
    # The section documents the server's flags and those of ``connect``.
    in_help = {flag for flag in {*help_entries(), *help_entries("connect")}
               if flag.startswith("--")}
    assert in_readme == in_help, (f"only in README: {sorted(in_readme - in_help)}; "
                                  f"only in --help: {sorted(in_help - in_readme)}")


@pytest.mark.parametrize("value, words", [
    ("3", "is an int, not a Block"),
    ("[]", "is an empty list, not a Block"),
    ("'x'", "is a str, not a Block"),
])
def test_what_is_not_a_block_is_named_in_good_english(tmp_path, monkeypatch, value, words):
    from gaman_sync.cli import load_blocks
    name = f"not_blocks_zq{abs(hash(value))}"  # a module of its own per case
    (tmp_path / f"{name}.py").write_text(f"thing = {value}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TypeError, match=words):
        load_blocks(f"{name}:thing")
