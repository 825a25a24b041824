"""Worker processes: ``serve(workers=N)`` and ``gaman-sync --workers N``.

Each test runs the command line in a subprocess, on 127.0.0.1 port 0, with
the blocks of ``tests/process_app.py``, whose ``/pid`` block says which
process serves a connection. The supervisor logs the port once every worker
listens; the tests wait for that line, then connect.
(``tests/test_workers.py`` is about the pool of connection threads.)
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, NoReturn, Optional, Set

import pytest

from gaman_sync import ConnectionClosed, connect, define_block, serve
from gaman_sync.client.client import ClientConnection

from .conftest import WAIT
from .test_redis import RedisServer
from .test_redis import missing as redis_missing

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="workers need Linux (SO_REUSEPORT)")


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Cluster:
    """A supervisor (the command ``argv``) in a subprocess, its stderr lines
    collected by a thread so that a test can wait for one."""

    def __init__(self, argv: List[str], cwd: Path = ROOT) -> None:
        self.proc = subprocess.Popen(
            argv, cwd=cwd, env=_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True)
        self.lines: List[str] = []
        self.cond = threading.Condition()
        self.ended = False
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.port = 0
        self.seen: Set[int] = set()  # worker pids seen serving

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self.cond:
                self.lines.append(line)
                self.cond.notify_all()
        with self.cond:
            self.ended = True
            self.cond.notify_all()

    def wait_line(self, pattern: str, timeout: float = WAIT, start: int = 0) -> re.Match:
        """The first match of ``pattern`` in the lines from ``start`` on."""
        found: List[re.Match] = []

        def look() -> bool:
            for line in self.lines[start:]:
                match = re.search(pattern, line)
                if match:
                    found.append(match)
                    return True
            return self.ended

        with self.cond:
            self.cond.wait_for(look, timeout)
            if not found:
                raise AssertionError(f"no line matching {pattern!r} in {timeout} s; "
                                     f"stderr so far: {''.join(self.lines)!r}")
            return found[0]

    def text(self) -> str:
        with self.cond:
            return "".join(self.lines)

    def listening(self) -> int:
        match = self.wait_line(r"(\d+) worker\(s\) listening on 127\.0\.0\.1:(\d+)")
        self.port = int(match.group(2))
        return self.port

    def open(self, path: str = "/pid", ssl_context: Optional[ssl.SSLContext] = None) -> Client:
        scheme = "ws" if ssl_context is None else "wss"
        ws = connect(f"{scheme}://127.0.0.1:{self.port}{path}", open_timeout=WAIT,
                     ssl_context=ssl_context)
        pid = int(ws.recv(timeout=WAIT))
        self.seen.add(pid)
        return Client(ws, pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(WAIT)
        for pid in self.seen:  # never leave a worker behind, whatever happened
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.reader.join(WAIT)
        assert self.proc.stderr is not None
        self.proc.stderr.close()


def program(tmp_path: Path, source: str) -> Cluster:
    """A Python program of ours (``source``) in a subprocess, in place of the
    command line."""
    path = tmp_path / "program.py"
    path.write_text(textwrap.dedent(source))
    return Cluster([sys.executable, str(path)], cwd=tmp_path)


class Client:
    def __init__(self, ws: ClientConnection, pid: int) -> None:
        self.ws, self.pid = ws, pid


@contextlib.contextmanager
def cluster(*args: str, app: str = "tests.process_app:blocks",
            cwd: Path = ROOT) -> Iterator[Cluster]:
    """``python -m gaman_sync APP --port 0 ARGS``, stopped at the end."""
    running = Cluster([sys.executable, "-m", "gaman_sync", app, "--port", "0", *args], cwd)
    try:
        yield running
    finally:
        running.stop()


def clients_on_every_worker(running: Cluster, workers: int, limit: int = 40) -> List[Client]:
    """Clients, kept open, until there is one on each of ``workers`` pids
    (failing after ``limit`` connections)."""
    clients: List[Client] = []
    while len({c.pid for c in clients}) < workers:
        assert len(clients) < limit, f"{limit} connections reached only pids " \
                                     f"{sorted({c.pid for c in clients})}"
        clients.append(running.open())
    return clients


def missing_peer(reason: str) -> NoReturn:
    """Skip for a missing outside tool, or fail under GAMAN_SYNC_REQUIRE_PEERS=1."""
    if os.environ.get("GAMAN_SYNC_REQUIRE_PEERS") == "1":
        pytest.fail(f"{reason} (GAMAN_SYNC_REQUIRE_PEERS=1 forbids skipping)", pytrace=False)
    pytest.skip(reason)


def gone(pid: int) -> bool:
    """Has process ``pid`` ended (exited, or a zombie no one reaped)?"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_until(predicate, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def threads_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("Threads:")).split()[1])


def close_code(client: Client) -> Optional[int]:
    """The code that closed ``client`` (waiting for the close)."""
    try:
        while True:
            client.ws.recv(timeout=WAIT)
    except ConnectionClosed as exc:
        return exc.code


# -- Spreading, restarting, stopping ------------------------------------------


def test_connections_spread_over_both_workers_of_a_threadless_parent():
    with cluster("--workers", "2") as running:
        running.listening()
        clients = [running.open() for _ in range(40)]
        pids = {c.pid for c in clients}
        assert len(pids) == 2, pids
        assert running.proc.pid not in pids
        for pid in pids:
            assert parent_of(pid) == running.proc.pid
        # Each worker serves: an echo from a client of each.
        for pid in pids:
            client = next(c for c in clients if c.pid == pid)
            client.ws.send("ping")
            assert client.ws.recv(timeout=WAIT) == "ping"
        # The supervisor forks again on a crash: it must never have started
        # a thread of its own.
        assert threads_of(running.proc.pid) == 1
        for client in clients:
            client.ws.close()


def test_the_supervisor_logs_each_url_once_every_worker_listens():
    with cluster("--workers", "2") as running:
        port = running.listening()
        running.wait_line(rf"serving ws://127\.0\.0\.1:{port}/pid$")
        running.wait_line(rf"serving ws://127\.0\.0\.1:{port}/broadcast$")
        # Once each, by the supervisor (its pid on the line), not by each worker.
        lines = [line for line in running.text().splitlines() if "serving ws://" in line]
        assert len(lines) == 2, lines
        assert all(f"[{running.proc.pid}]" in line for line in lines), lines


def test_workers_share_an_ipv6_loopback_port():
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    with cluster("--workers", "2", "--host", "::1") as running:
        port = int(running.wait_line(r"worker\(s\) listening on \[::1\]:(\d+)").group(1))
        pids = set()
        for _ in range(40):
            with connect(f"ws://[::1]:{port}/pid", open_timeout=WAIT) as ws:
                pids.add(int(ws.recv(timeout=WAIT)))
        running.seen |= pids
        assert len(pids) == 2, pids


def test_a_killed_worker_is_started_again_and_serves():
    with cluster("--workers", "2") as running:
        running.listening()
        first = clients_on_every_worker(running, 2)
        victim = first[0].pid
        survivor = next(c.pid for c in first if c.pid != victim)
        mark = len(running.lines)
        os.kill(victim, signal.SIGKILL)
        running.wait_line(rf"\(pid {victim}\) killed by SIGKILL; starting it again", start=mark)
        running.wait_line(rf"worker \d listening \(pid (?!{survivor}\))\d+\)", start=mark)
        assert close_code(next(c for c in first if c.pid == victim)) == 1006
        # New connections reach a new pid (the kernel spreads them over both
        # listening workers again), which echoes; the survivor still serves.
        fresh: Set[int] = set()
        deadline = time.monotonic() + WAIT
        while not fresh - {victim, survivor}:
            assert time.monotonic() < deadline, f"no new worker seen, only {fresh}"
            client = running.open()
            fresh.add(client.pid)
            client.ws.send("again")
            assert client.ws.recv(timeout=WAIT) == "again"
            client.ws.close()
        assert victim not in fresh
        assert gone(victim)
        new = (fresh - {victim, survivor}).pop()
        assert parent_of(new) == running.proc.pid
        kept = next(c for c in first if c.pid == survivor)
        kept.ws.send("still here")
        assert kept.ws.recv(timeout=WAIT) == "still here"


def test_a_worker_that_keeps_crashing_waits_longer_each_time():
    with cluster("--workers", "1") as running:
        running.listening()
        pid = running.open().pid
        delays = []
        for _ in range(3):
            mark = len(running.lines)
            os.kill(pid, signal.SIGKILL)
            again = running.wait_line(rf"worker 1 \(pid {pid}\) killed by SIGKILL; "
                                      r"starting it again in ([\d.]+) s", start=mark)
            delays.append(float(again.group(1)))
            pid = int(running.wait_line(r"worker 1 listening \(pid (\d+)\)",
                                        start=mark).group(1))
            running.seen.add(pid)
        assert delays == [0.1, 0.2, 0.4]
        client = running.open()
        assert client.pid == pid


def test_sigterm_closes_every_client_with_1001_and_the_parent_exits_0():
    with cluster("--workers", "2") as running:
        running.listening()
        clients = clients_on_every_worker(running, 2)
        pids = {c.pid for c in clients}
        started = time.monotonic()
        running.proc.send_signal(signal.SIGTERM)
        assert [close_code(c) for c in clients] == [1001] * len(clients)
        assert running.proc.wait(WAIT) == 0
        assert time.monotonic() - started < WAIT
        for pid in pids:
            assert gone(pid), pid
        running.wait_line(r"exited with status 0")
        assert "Traceback" not in running.text()


def test_ctrl_c_to_the_process_group_shuts_down_once():
    # A terminal's Ctrl-C reaches the supervisor and every worker: the
    # workers leave it to the supervisor, and the clients get 1001 once.
    with cluster("--workers", "2") as running:
        running.listening()
        clients = clients_on_every_worker(running, 2)
        os.kill(running.proc.pid, signal.SIGINT)
        for client in clients:
            os.kill(client.pid, signal.SIGINT)
        assert [close_code(c) for c in clients] == [1001] * len(clients)
        assert running.proc.wait(WAIT) == 0
        assert "killing" not in running.text()


def test_workers_of_a_killed_supervisor_shut_down_by_themselves():
    with cluster("--workers", "2") as running:
        running.listening()
        clients = clients_on_every_worker(running, 2)
        running.proc.kill()
        assert [close_code(c) for c in clients] == [1001] * len(clients)
        for pid in {c.pid for c in clients}:
            wait_until(lambda pid=pid: gone(pid), f"worker {pid} to end")


def test_a_second_sigterm_kills_workers_that_are_still_shutting_down():
    with cluster("--workers", "2", "--shutdown-timeout", "60") as running:
        port = running.listening()
        # A raw client that completes its handshake and never answers the
        # close: its worker waits out the shutdown timeout.
        sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        sock.sendall(b"GET /pid HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     b"Sec-WebSocket-Version: 13\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 101")
        mark = len(running.lines)
        running.proc.send_signal(signal.SIGTERM)
        running.wait_line(r"SIGTERM received: shutting down", start=mark)
        running.proc.send_signal(signal.SIGTERM)
        assert running.proc.wait(WAIT) == 130
        assert "second SIGTERM" in running.text()
        sock.close()


def test_workers_serve_wss_with_the_certificate_loaded_once(tmp_path):
    try:
        import trustme
    except ImportError:
        missing_peer("trustme is not installed (pip install -e '.[test]')")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(context)
    with cluster("--workers", "2", "--certfile", str(certfile), "--keyfile",
                 str(keyfile)) as running:
        running.listening()
        clients = [running.open(ssl_context=context) for _ in range(40)]
        assert len({c.pid for c in clients}) == 2
        for client in clients[:2]:
            client.ws.send("over TLS")
            assert client.ws.recv(timeout=WAIT) == "over TLS"


# -- Through Redis -------------------------------------------------------------


@contextlib.contextmanager
def redis_server() -> Iterator[RedisServer]:
    """A redis-server on 127.0.0.1 (tests/test_redis.py's); skipped without
    one, failed instead under GAMAN_SYNC_REQUIRE_PEERS=1."""
    reason = redis_missing()
    if reason is not None:
        missing_peer(reason)
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.kill()


def test_a_broadcast_through_redis_reaches_the_clients_of_every_worker():
    with redis_server() as redis, cluster("--workers", "2", "--redis", redis.url) as running:
        running.listening()
        clients: List[Client] = []
        while len({c.pid for c in clients}) < 2 or len(clients) < 6:
            assert len(clients) < 40, f"40 connections reached only {running.seen}"
            clients.append(running.open("/broadcast"))
        first = clients[0]
        other = next(c for c in clients if c.pid != first.pid)
        first.ws.send("from the first worker")
        assert [c.ws.recv(timeout=WAIT) for c in clients] == \
            ["from the first worker"] * len(clients)
        # Once each: what comes next is the other worker's message, binary
        # as sent, not a second copy of the first.
        other.ws.send(b"from the other\x00")
        assert [c.ws.recv(timeout=WAIT) for c in clients] == \
            [b"from the other\x00"] * len(clients)
        assert "no broker" not in running.text()


def test_workers_that_cannot_reach_redis_at_start_make_the_supervisor_give_up():
    with redis_server() as redis:
        url = redis.url
    # The same port, Redis gone: nothing listens there.
    with cluster("--workers", "2", "--redis", url) as running:
        assert running.proc.wait(WAIT) == 1
        running.reader.join(WAIT)
        last = running.text().strip().splitlines()[-1]
        assert "before it listened: BrokerUnavailable" in last, last
        assert "Traceback" not in running.text()


# -- Warnings and errors --------------------------------------------------------


def test_several_workers_without_a_broker_warn_that_broadcast_stays_local():
    with cluster("--workers", "2") as running:
        running.listening()
        warning = running.wait_line(r"WARNING .*2 workers and no broker: .*")
        assert "only the clients of the worker it runs in" in warning.group(0)
    with cluster("--workers", "1") as running:
        running.listening()
        assert "no broker" not in running.text()


def test_serve_with_workers_in_a_program_that_started_a_thread_warns_and_serves(tmp_path):
    running = program(tmp_path, """
        import logging, threading, time
        from gaman_sync import serve
        from tests.process_app import blocks

        logging.basicConfig(level=logging.INFO)
        threading.Thread(target=time.sleep, args=(60,), name="busy-thread", daemon=True).start()
        serve(blocks, port=0, workers=2)
        print("serve returned", file=__import__("sys").stderr)
    """)
    try:
        warning = running.wait_line(r"WARNING.*forks while 1 other thread\(s\) run \((.*?)\)")
        assert warning.group(1) == "busy-thread"
        running.listening()
        assert len({running.open().pid for _ in range(40)}) == 2
        running.proc.send_signal(signal.SIGTERM)
        assert running.proc.wait(WAIT) == 0
        running.wait_line("serve returned")
    finally:
        running.stop()


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_bad_workers_values_are_one_usage_line_and_exit_2(value):
    result = subprocess.run([sys.executable, "-m", "gaman_sync", "tests.process_app:blocks",
                             "--port", "0", "--workers", value], cwd=ROOT, env=_env(),
                            capture_output=True, text=True, timeout=WAIT)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "--workers" in last and "a positive whole number" in last and value in last, last


def test_a_port_in_use_is_one_line_and_exit_2():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "gaman_sync", "tests.process_app:blocks",
                                 "--port", str(port), "--workers", "2"], cwd=ROOT, env=_env(),
                                capture_output=True, text=True, timeout=WAIT)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert f"cannot listen on 127.0.0.1:{port}" in last and "in use" in last, last


def test_workers_that_keep_failing_at_start_make_the_supervisor_give_up(tmp_path):
    # Every worker dies right after the fork, before it can listen, as one
    # whose start fails would: the supervisor tries a few times, then ends
    # with one line and status 1 instead of restarting forever.
    (tmp_path / "dies_at_fork.py").write_text(textwrap.dedent("""
        import os
        from gaman_sync import define_block

        os.register_at_fork(after_in_child=lambda: os._exit(3))
        block = define_block("/", lambda ctx: {})
    """))
    with cluster("--workers", "2", app="dies_at_fork:block", cwd=tmp_path) as running:
        assert running.proc.wait(WAIT) == 1
        running.reader.join(WAIT)
        last = running.text().strip().splitlines()[-1]
        assert last.startswith("gaman-sync: worker "), last
        assert "exited with status 3 before it listened" in last, last
        assert "3 failures at start in a row" in last, last
        assert "Traceback" not in running.text()


def test_serve_checks_workers_before_anything_starts(monkeypatch):
    block = define_block("/", lambda ctx: {})
    for bad, error in ((0, ValueError), (-2, ValueError), (True, TypeError),
                       ("2", TypeError), (1.0, TypeError)):
        with pytest.raises(error, match="workers"):
            serve(block, port=0, workers=bad)
    monkeypatch.setattr(sys, "platform", "darwin")
    with pytest.raises(ValueError, match="workers needs Linux"):
        serve(block, port=0, workers=2)
