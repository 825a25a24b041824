"""WebSockets inside a WSGI application, through gunicorn's gthread worker:
gaman_sync's middleware (gaman_sync.wsgi) against flask-sock (on
simple-websocket), on the same gunicorn, in the same run, beside the
standalone gaman_sync server.

    .venv/bin/python benchmarks/wsgi.py [--duration 5] [--rounds 3]

Scenarios, measured by the Node load generator of run.py (load.js, the ``ws``
client) in its ``echo`` mode on ``/echo``: 32-byte text echo over 16
connections (messages/s), and 1 MiB binary echo over one connection (MiB/s).
Each server is its own process (gunicorn: one worker, ``-k gthread
--threads 32``); the servers take turns within each round, and the table
gives the median of the rounds. The gunicorn applications are the module
attributes below (``gunicorn --chdir benchmarks wsgi:gaman_app``).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
MiB = 2 ** 20
SCENARIOS = [("32 B echo, 16 connections (msg/s)", 16, 32, False),
             ("1 MiB echo, 1 connection (MiB/s)", 1, MiB, True)]


# -- The applications (imported by gunicorn in its worker) ----------------------------

def _page(environ: dict, start_response: Callable) -> List[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok\n"]


def _gaman_app() -> Any:
    from gaman_sync import define_block
    from gaman_sync.wsgi import WebSocketMiddleware

    echo = define_block("/echo", lambda ctx: {"on_message": ctx.send})
    # As standalone in servers.py: messages up to 16 MiB, no keepalive pings.
    return WebSocketMiddleware(_page, echo, max_message_size=16 * MiB, ping_interval=None)


def _flask_sock_app() -> Any:
    from flask import Flask
    from flask_sock import Sock

    app = Flask(__name__)
    app.config["SOCK_SERVER_OPTIONS"] = {"max_message_size": 16 * MiB, "ping_interval": None}
    sock = Sock(app)

    @sock.route("/echo")
    def echo(ws: Any) -> None:
        while True:
            ws.send(ws.receive())

    return app


def __getattr__(name: str) -> Any:  # built only in the process that serves it
    if name == "gaman_app":
        return _gaman_app()
    if name == "flask_sock_app":
        return _flask_sock_app()
    raise AttributeError(name)


# -- The run -------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(proc: subprocess.Popen, port: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class Process:
    """A server under test in a process of its own, on ``port``."""

    def __init__(self, name: str, args: Callable[[int], List[str]], log_dir: str) -> None:
        self.name = name
        for _ in range(5):  # another process may take the free port first
            self.port = _free_port()
            with open(os.path.join(log_dir, f"{name}.log"), "ab") as log:
                self.proc = subprocess.Popen(args(self.port), cwd=HERE, stdout=log, stderr=log,
                                             stdin=subprocess.DEVNULL, start_new_session=True)
            if _wait_port(self.proc, self.port):
                return
            self.stop()
        raise RuntimeError(f"{name} did not start (see {log_dir}/{name}.log)")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait(15)


def _gunicorn(app: str) -> Callable[[int], List[str]]:
    return lambda port: [sys.executable, "-m", "gunicorn", "-k", "gthread", "--threads", "32",
                         "-w", "1", "-b", f"127.0.0.1:{port}", "--no-control-socket",
                         "--log-level", "warning", f"wsgi:{app}"]


STANDALONE = """
import sys
from gaman_sync import WebSocketServer, define_block
server = WebSocketServer(define_block("/echo", lambda ctx: {"on_message": ctx.send}),
                         port=int(sys.argv[1]), max_message_size=16 * 2**20, ping_interval=None)
server.serve_forever()
"""

SERVERS = {
    "gaman_sync middleware (gunicorn gthread)": _gunicorn("gaman_app"),
    "flask-sock (gunicorn gthread)": _gunicorn("flask_sock_app"),
    "gaman_sync standalone": lambda port: [sys.executable, "-c", STANDALONE, str(port)],
}


def measure(port: int, conns: int, size: int, binary: bool, duration: float) -> float:
    """messages/s (text) or MiB/s (binary) of one load.js echo run."""
    sys.path.insert(0, HERE)
    from run import LoadGen  # the Node load generator's driver

    gen = LoadGen({"port": port, "proto": "ws", "mode": "echo", "conns": conns, "size": size,
                   "binary": binary, "duration": duration, "lifetime": duration + 120})
    try:
        gen.wait("warm", 30)
        gen.command("setup", "ready", 60)
        result = gen.command("go", "result", duration + 60)
    finally:
        gen.stop()
    if result.get("errors"):
        print(f"    ({result['errors']} errors: {result.get('firstError')})", file=sys.stderr)
    return result["count"] * (size / MiB if binary else 1.0) / result["elapsed"]


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measure")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--logs", default=None, help="the servers' logs (default: a new "
                        "temporary folder)")
    args = parser.parse_args(argv)
    args.logs = args.logs or tempfile.mkdtemp(prefix="gaman_sync-wsgi-bench-")
    os.makedirs(args.logs, exist_ok=True)
    results: Dict[str, Dict[str, List[float]]] = {s[0]: {n: [] for n in SERVERS}
                                                  for s in SCENARIOS}
    for r in range(args.rounds):
        for name, command in SERVERS.items():
            server = Process(name.split()[0] + str(abs(hash(name)) % 1000), command, args.logs)
            try:
                for label, conns, size, binary in SCENARIOS:
                    value = measure(server.port, conns, size, binary, args.duration)
                    results[label][name].append(value)
                    print(f"round {r + 1}: {name}: {label}: {value:,.1f}", file=sys.stderr)
            finally:
                server.stop()
    width = max(len(n) for n in SERVERS)
    print(f"\nmedian of {args.rounds} rounds, {args.duration:g} s each, "
          f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}\n")
    for label, *_ in SCENARIOS:
        print(label)
        flask = statistics.median(results[label]["flask-sock (gunicorn gthread)"])
        for name in SERVERS:
            value = statistics.median(results[label][name])
            print(f"  {name:<{width}}  {value:>12,.1f}   {value / flask:5.2f}x flask-sock")
        print()


if __name__ == "__main__":
    main()
