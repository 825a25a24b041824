"""Run gaman_sync and its peers through the same scenarios; print a markdown table.

    pip install -e .[bench]
    npm install --prefix benchmarks
    python benchmarks/run.py [--rounds N] [--duration S] [--servers a,b]
                             [--scenarios x,y] [--quick] [--json FILE] [--readme]

Every server runs in its own process (benchmarks/servers.py), every scenario
run gets a fresh one, and the load comes from a Node process
(benchmarks/load.js, the ``ws`` client). Servers are interleaved: each round
runs every scenario against every server, in an order that rotates from round
to round, and the table reports the median over the rounds. Only ratios
measured in the same run compare, so each value also appears as a ratio to
websockets' threaded server.

CPU is read from /proc/PID/stat (utime + stime) for the server and the load
generator over each measured phase; a load generator near 100 % of a core
is the bottleneck and the note column says so.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import queue
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
SERVERS_PY = os.path.join(HERE, "servers.py")
LOAD_JS = os.path.join(HERE, "load.js")
README = os.path.join(HERE, "README.rst")
REFERENCE = "websockets-sync"
TICK = os.sysconf("SC_CLK_TCK")
# Past this share of one core, the single-threaded load generator is what
# limits the result rather than the server.
SATURATED = 0.90
# CPU (in cores) spent outside the server, the load generator and this
# script, above which a measurement is flagged as taken on a shared machine.
BACKGROUND = 0.3
# How long a new client may take to be served while connections are held,
# and how long the held connections' simultaneous echoes may take: servers
# that need longer are reported as such, not waited for.
PROBE_TIMEOUT = 5
STAMPEDE_TIMEOUT = 5
# The scenarios whose measured phase is all load: the ones where the load
# generator's share of a core says whether it was the bottleneck.
TIMED = ("echo-1", "echo-16", "echo-100", "echo-1mib", "handshakes", "broadcast",
         "wss-echo-16", "wss-echo-1mib", "wss-handshakes", "broadcast-room",
         "broadcast-redis", "broadcast-4k", "broadcast-4k-deflate")
# The wss scenarios' certificate (made at start with trustme): the servers
# load it, the load generator checks it against the CA.
CERTS: Dict[str, str] = {}
# How long the mass disconnect may take before the server counts as stuck.
CLEANUP_LIMIT = 10


# -- The servers -----------------------------------------------------------------

@dataclass(frozen=True)
class ServerSpec:
    name: str
    label: str
    module: Optional[str]  # what must be importable; None for tcp-echo
    optional: bool = False
    proto: str = "ws"
    cannot: Dict[str, str] = field(default_factory=dict)  # scenario -> why not
    # servers.py's name for it (default: name), and a tree put first on the
    # import path: --baseline runs another checkout's gaman_sync.
    script: Optional[str] = None
    pythonpath: Optional[str] = None
    tls: bool = False  # serves wss:// (servers.py's tls_context)


_SMALL_ECHO_ONLY = {key: "small-message echo only" for key in (
    "echo-1mib", "handshakes", "broadcast", "broadcast-4k", "broadcast-4k-deflate", "memory",
    "memory-deflate", "idle", "mass-disconnect")}
# Several processes: the scenarios that read one process's threads, memory
# or descriptors do not apply, nor do broadcasts (without a broker each
# worker reaches its own clients only).
_WORKERS_CANNOT = {key: "one process only" for key in (
    "memory", "memory-deflate", "idle", "mass-disconnect")}
_WORKERS_CANNOT.update((key, "no broker: a worker's broadcast reaches its own clients only")
                       for key in ("broadcast", "broadcast-4k", "broadcast-4k-deflate"))

SERVER_SPECS = [
    ServerSpec("gaman_sync", "gaman_sync", "gaman_sync", tls=True),
    # serve(workers=2): two processes on one port (SO_REUSEPORT); the
    # server's CPU is the supervisor's and its workers' together.
    ServerSpec("gaman_sync-workers2", "gaman_sync, 2 workers", "gaman_sync",
               cannot=_WORKERS_CANNOT),
    ServerSpec("websockets-sync", "websockets sync", "websockets", tls=True),
    ServerSpec("websockets-asyncio", "websockets asyncio", "websockets", tls=True),
    ServerSpec("simple-websocket", "simple-websocket", "simple_websocket"),
    ServerSpec("websocket-server", "websocket-server", "websocket_server", optional=True,
               cannot={"echo-1mib": "binary frames unsupported"}),
    ServerSpec("tcp-echo", "TCP echo (ceiling)", None, proto="tcp",
               cannot={"broadcast-4k-deflate": "no permessage-deflate",
                       "memory-deflate": "no permessage-deflate"}),
    # Not WebSocket servers: a TCP echo that also does wsproto's work for one
    # small message per message echoed, with threads and with asyncio. What
    # the two designs come to on wsproto before any code of their own.
    ServerSpec("tcp-echo-wsproto", "TCP echo + wsproto, threads", "wsproto", proto="tcp",
               cannot=_SMALL_ECHO_ONLY),
    ServerSpec("tcp-echo-wsproto-asyncio", "TCP echo + wsproto, asyncio", "wsproto",
               proto="tcp", cannot=_SMALL_ECHO_ONLY),
]


# -- Reading /proc ---------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of the process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name may hold spaces; the fields after it may not.
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def proc_status(pid: int) -> Dict[str, int]:
    """VmRSS (KiB) and Threads from /proc/PID/status."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "Threads"):
                out[key] = int(value.split()[0])
    return out


def process_tree(pid: int) -> List[int]:
    """``pid`` and its descendants (the children its main thread forked, as
    a supervisor of worker processes does, and theirs)."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        try:
            with open(f"/proc/{current}/task/{current}/children") as f:
                todo.extend(int(child) for child in f.read().split())
        except OSError:
            pass
    return pids


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# -- Processes -------------------------------------------------------------------

class BenchError(Exception):
    pass


class Server:
    """A server under test in its own process; stderr goes to a log file."""

    def __init__(self, spec: ServerSpec, log_dir: str, tls: bool = False,
                 env_extra: Optional[Dict[str, str]] = None) -> None:
        self.spec = spec
        self.log_path = os.path.join(log_dir, f"{spec.name}.log")
        log = open(self.log_path, "ab")  # noqa: SIM115 (closed after Popen)
        env = dict(os.environ, **(env_extra or {}))
        env.pop("BENCH_CERTFILE", None)
        if tls:
            env.update(BENCH_CERTFILE=CERTS["cert"], BENCH_KEYFILE=CERTS["key"])
        if spec.pythonpath:
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (spec.pythonpath, os.environ.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, SERVERS_PY, spec.script or spec.name], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=log, start_new_session=True, env=env)
        log.close()
        self.pid = self.proc.pid
        line = _readline_with_timeout(self.proc.stdout, 30.0)
        if not line or not line.startswith(b"READY "):
            self.stop()
            raise BenchError(f"{spec.name} did not start (see {self.log_path})")
        self.port = int(line.split()[1])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cpu(self) -> float:
        """The CPU time of the server's processes (one, or a supervisor and
        its workers); a worker that ended takes its time with it."""
        total = 0.0
        for pid in process_tree(self.pid):
            try:
                total += cpu_seconds(pid)
            except OSError:  # ended meanwhile
                pass
        return total

    def status(self) -> Dict[str, int]:
        totals: Dict[str, int] = {}
        for pid in process_tree(self.pid):
            try:
                for key, value in proc_status(pid).items():
                    totals[key] = totals.get(key, 0) + value
            except OSError:
                pass
        return totals

    def wait_quiet(self, settle: float = 0.3, limit: float = 10.0) -> None:
        """Wait until threads and CPU time stop changing for ``settle`` s."""
        deadline = time.monotonic() + limit
        last = None
        since = time.monotonic()
        while time.monotonic() < deadline:
            sample = (self.status()["Threads"], round(self.cpu() * TICK))
            if sample != last:
                last, since = sample, time.monotonic()
            elif time.monotonic() - since >= settle:
                return
            time.sleep(0.05)

    def stop(self) -> None:
        try:  # its process group, workers included (start_new_session)
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()


class Cluster:
    """Two server processes of one spec sharing a redis-server started here
    (127.0.0.1, a free port, nothing saved): the broadcast-redis scenario.
    Its CPU is the two servers' and Redis's."""

    def __init__(self, spec: ServerSpec, log_dir: str) -> None:
        if shutil.which("redis-server") is None:
            raise BenchError("redis-server is not installed (apt-get install redis-server)")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.redis = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--logfile", ""], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self.servers: List[Server] = []
        try:
            deadline = time.monotonic() + 10
            while b"Ready to accept connections" not in _readline_with_timeout(
                    self.redis.stdout, max(deadline - time.monotonic(), 0.1)):
                if time.monotonic() > deadline or self.redis.poll() is not None:
                    raise BenchError("redis-server did not start")
            threading.Thread(target=self.redis.stdout.read, daemon=True).start()
            url = f"redis://127.0.0.1:{port}/0"
            for _ in range(2):
                self.servers.append(Server(spec, log_dir, env_extra={"GAMAN_BENCH_REDIS": url}))
        except BaseException:
            self.stop()
            raise
        self.ports = [server.port for server in self.servers]
        self.port = self.ports[0]

    def alive(self) -> bool:
        return all(server.alive() for server in self.servers) and self.redis.poll() is None

    def cpu(self) -> float:
        return sum(server.cpu() for server in self.servers) + self.redis_cpu()

    def redis_cpu(self) -> float:
        return cpu_seconds(self.redis.pid)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
        if self.redis.poll() is None:
            self.redis.kill()
        self.redis.wait()


class JsonLineProcess:
    """A child process that takes one command a line on stdin and answers
    with JSON lines on stdout; those arrive through a queue, so that every
    wait for one has a time limit. ``name`` begins the error messages."""

    name = "process"

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.events: queue.Queue[Optional[dict]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                pass  # a library printing to stdout: not ours
        self.events.put(None)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def _exit_detail(self) -> str:
        """What the process left on stderr, for when it exits too early."""
        return ""

    def _error_text(self, message: str) -> str:
        """The BenchError text for an ``error`` event with ``message``."""
        return f"{self.name}: " + message.splitlines()[0]

    def wait(self, event: str, timeout: float) -> dict:
        try:
            got = self.events.get(timeout=timeout)
        except queue.Empty:
            raise BenchError(f"{self.name}: no '{event}' in {timeout:.0f} s") from None
        if got is None:
            raise BenchError(f"{self.name} exited before '{event}': {self._exit_detail()}")
        if got.get("event") == "error":
            raise BenchError(self._error_text(got.get("message", "")))
        if got.get("event") != event:
            raise BenchError(f"{self.name}: expected '{event}', got {got}")
        return got

    def command(self, command: str, event: str, timeout: float) -> dict:
        self.send(command)
        return self.wait(event, timeout)

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()

    def _close_streams(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass


class LoadGen(JsonLineProcess):
    """A load.js process; its JSON-line events arrive through a queue."""

    name = "load generator"

    def __init__(self, config: dict) -> None:
        self._stderr: List[bytes] = []
        super().__init__(subprocess.Popen(
            ["node", LOAD_JS, json.dumps(config)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=HERE,
            start_new_session=True))
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            if len(self._stderr) < 50:
                self._stderr.append(line)

    def _exit_detail(self) -> str:
        err = b"".join(self._stderr).decode(errors="replace").strip()
        return err[-300:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("exit")
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
        self.proc.wait()
        self._close_streams()


def _readline_with_timeout(stream, timeout: float) -> bytes:
    box: List[bytes] = []
    reader = threading.Thread(target=lambda: box.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return box[0] if box else b""


# -- Scenarios --------------------------------------------------------------------

@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    lower_is_better: bool = False


@dataclass
class Outcome:
    """One scenario run against one server."""
    values: Dict[str, float] = field(default_factory=dict)
    server_cpu: Optional[float] = None
    gen_cpu: Optional[float] = None
    wall: Optional[float] = None
    background: Optional[float] = None  # cores used by other processes meanwhile
    notes: List[str] = field(default_factory=list)
    metric_notes: Dict[str, List[str]] = field(default_factory=dict)
    error: Optional[str] = None
    # Metrics whose value is a time limit that was reached: "more than".
    atleast: List[str] = field(default_factory=list)

    def censor(self, key: str, limit: float) -> None:
        self.values[key] = limit
        self.atleast.append(key)

    def note(self, key: str, text: str) -> None:
        """A note about one metric rather than the whole run."""
        self.metric_notes.setdefault(key, []).append(text)


@dataclass(frozen=True)
class Scenario:
    key: str
    metrics: Sequence[Metric]
    run: Callable[[Context, Any], Outcome]
    tls: bool = False  # wss://: the servers serve TLS, the load generator speaks it
    cluster: bool = False  # two processes of the server and a Redis (gaman_sync only)
    env: Optional[Dict[str, str]] = None  # for the server process (gaman_sync only)


@dataclass
class Context:
    duration: float
    idle_conns: int
    mass_conns: int
    memory_conns: int
    broadcast_conns: int
    proto: str = "ws"
    tls: bool = False

    def loadgen(self, port: int, **config) -> LoadGen:
        config.setdefault("lifetime", 600)
        if self.tls:
            config["tls"] = {"ca": CERTS["ca"]}
        return LoadGen({"port": port, "proto": self.proto, **config})


def machine_busy() -> float:
    """CPU seconds the whole machine has spent not idle, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = map(int, f.readline().split()[1:9])
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / TICK


class Window:
    """CPU of the server, the load generator(s) and everything else over one
    measured phase. The rest (other processes, and the kernel's work that no
    process is charged for) shows whether the machine was shared."""

    def __init__(self, server: Server, *gens: LoadGen) -> None:
        self.server, self.gens = server, gens
        self.start = self._sample()

    def _sample(self) -> tuple:
        return (time.monotonic(), self.server.cpu(), sum(g.cpu() for g in self.gens),
                machine_busy(), cpu_seconds(os.getpid()))

    def close(self, out: Outcome) -> Outcome:
        end = self._sample()
        wall, server, gen, busy, own = (b - a for a, b in zip(self.start, end))
        out.wall, out.server_cpu, out.gen_cpu = wall, server, gen
        out.background = (busy - server - gen - own) / wall if wall > 0 else 0.0
        return out


def _timed(ctx: Context, server: Server, config: dict, per_count: float = 1.0) -> Outcome:
    """Run a load.js mode whose result is a count over an elapsed time."""
    gen = ctx.loadgen(server.port, duration=ctx.duration, lifetime=ctx.duration + 180, **config)
    try:
        gen.wait("warm", 30)
        gen.command("setup", "ready", 120)
        window = Window(server, gen)
        result = gen.command("go", "result", ctx.duration + 60)
        out = window.close(Outcome())
    finally:
        gen.stop()
    out.values["rate"] = result["count"] * per_count / result["elapsed"]
    if result.get("errors"):
        out.notes.append(f"{result['errors']} failed attempts ({result.get('firstError')})")
    if result.get("closed"):
        out.notes.append(f"{result['closed']} connections closed by the server")
    if result.get("stalled"):
        out.notes.append("deliveries stalled")
    return out


def run_echo(conns: int, size: int, binary: bool) -> Callable[[Context, Server], Outcome]:
    per_count = size / 2**20 if binary else 1.0
    return lambda ctx, server: _timed(
        ctx, server, {"mode": "echo", "conns": conns, "size": size, "binary": binary},
        per_count)


def run_handshakes(ctx: Context, server: Server) -> Outcome:
    return _timed(ctx, server, {"mode": "handshake", "parallel": 16})


def run_broadcast(ctx: Context, server: Server) -> Outcome:
    return _timed(ctx, server, {"mode": "broadcast", "conns": ctx.broadcast_conns,
                                "size": 64, "window": 16})


def run_broadcast_json(deflate: bool) -> Callable[[Context, Server], Outcome]:
    """A 4 KiB JSON text broadcast; with ``deflate``, every client offers
    permessage-deflate (a server that refuses it has no figure)."""
    return lambda ctx, server: _timed(ctx, server, {
        "mode": "broadcast", "conns": ctx.broadcast_conns, "size": 4096, "json": True,
        "deflate": deflate, "window": 16})


def run_broadcast_redis(ctx: Context, cluster: Cluster) -> Outcome:
    """The broadcast scenario with the clients spread over two processes
    that share a Redis: the sender's process delivers to its half at once,
    the other gets each message through Redis."""
    redis_before = cluster.redis_cpu()
    out = _timed(ctx, cluster, {"mode": "broadcast", "conns": ctx.broadcast_conns,
                                "size": 64, "window": 16, "ports": cluster.ports})
    if out.wall:
        out.notes.append(f"server CPU includes Redis's "
                         f"{(cluster.redis_cpu() - redis_before) / out.wall:.2f} cores")
    return out


class Hold:
    """A load.js holding ``conns`` idle connections, with the server's state
    from before they opened (after the warm-up, once the server is quiet)."""

    def __init__(self, ctx: Context, server: Server, conns: int, max_failures: int,
                 deflate: bool = False) -> None:
        self.requested = conns
        # A few failures are a result worth reporting (fds or threads running
        # out); many mean the server stopped accepting, and waiting for each
        # remaining connection to time out would teach nothing more.
        self.gen = ctx.loadgen(server.port, mode="hold", conns=conns, parallel=100, rtts=20,
                               maxFailures=max_failures, connectTimeout=10,
                               echoTimeout=STAMPEDE_TIMEOUT, probeTimeout=PROBE_TIMEOUT,
                               deflate=deflate)
        try:
            self.gen.wait("warm", 30)
            server.wait_quiet()
            self.base = dict(server.status(), fds=fd_count(server.pid))
            self.window = Window(server, self.gen)
            self.ready = self.gen.command("setup", "ready", 300)
        except BaseException:
            self.gen.stop()
            raise
        self.held = self.ready["held"]
        if self.held == 0:
            self.gen.stop()
            raise BenchError(f"no connection opened ({self.ready.get('firstError')})")

    def shortfall(self) -> Optional[str]:
        if self.held == self.requested:
            return None
        return (f"held {self.held:,} of {self.requested:,}: "
                f"{self.ready['failed']} failed ({self.ready.get('firstError')})")


def run_memory_deflate(ctx: Context, server: Server) -> Outcome:
    return run_memory(ctx, server, deflate=True)


def run_memory(ctx: Context, server: Server, deflate: bool = False) -> Outcome:
    hold = Hold(ctx, server, ctx.memory_conns, max_failures=0, deflate=deflate)
    try:
        if hold.shortfall():
            raise BenchError(hold.shortfall())
        # Let each connection's thread (or task) finish starting up.
        time.sleep(0.5)
        server.wait_quiet()
        status, fds = server.status(), fd_count(server.pid)
        out = hold.window.close(Outcome())
    finally:
        hold.gen.stop()
    n = hold.held
    out.values["kib"] = (status["VmRSS"] - hold.base["VmRSS"]) / n
    out.notes.append(f"per connection: {(status['Threads'] - hold.base['Threads']) / n:g} "
                     f"threads, {(fds - hold.base['fds']) / n:g} fds")
    return out


def run_idle(ctx: Context, server: Server) -> Outcome:
    hold = Hold(ctx, server, ctx.idle_conns, max_failures=10)
    try:
        time.sleep(0.5)
        status = server.status()
        result = hold.gen.command("go", "result", 120)
        out = hold.window.close(Outcome())
    finally:
        hold.gen.stop()
    if hold.shortfall():
        out.notes.append(hold.shortfall())
    else:
        out.values["open"] = hold.held / hold.ready["openSeconds"]
    if result["echoAllSeconds"] is not None:
        out.values["echo_all"] = result["echoAllSeconds"]
    else:
        out.censor("echo_all", STAMPEDE_TIMEOUT)
        out.note("echo_all", f"{result['replies']:,} of {result['held']:,} replies "
                             f"in {STAMPEDE_TIMEOUT} s")
    if result["ok"]:
        out.values["rtt"] = result["rttMs"]
    else:
        out.note("rtt", f"a new client was not served: {result['error']}")
    if result["lost"]:
        out.notes.append(f"{result['lost']} held connections closed by the server")
    out.notes.append(f"{status['Threads']:,} threads, "
                     f"{(status['VmRSS'] - hold.base['VmRSS']) / 1024:.0f} MiB more RSS")
    return out


def run_mass_disconnect(ctx: Context, server: Server) -> Outcome:
    """Hold connections, kill the client process that holds them, and time
    the server until its thread count is back to where it was before the
    clients came and its CPU has been quiet for ``quiet`` s. A new client,
    started right after the kill, checks that the server keeps serving."""
    quiet, limit = 0.5, CLEANUP_LIMIT
    hold = Hold(ctx, server, ctx.mass_conns, max_failures=10)
    probe = None
    try:
        probe = ctx.loadgen(server.port, mode="probe", warm=False, lifetime=120,
                            probeTimeout=limit)
        probe.wait("warm", 30)
        probe.command("setup", "ready", 30)
        peak = server.status()
        setup = hold.window.close(Outcome())
        window = Window(server, probe)
        hold.gen.kill()
        t0 = time.monotonic()
        probe.send("go")
        last_ticks, last_busy = server.cpu(), t0
        back_at = idle_at = None
        while time.monotonic() - t0 < limit:
            # Coarse enough to leave the server the CPU it needs.
            time.sleep(0.02)
            now = time.monotonic()
            ticks = server.cpu()
            if ticks != last_ticks:
                last_ticks, last_busy = ticks, now
            if back_at is None and server.status()["Threads"] <= hold.base["Threads"]:
                back_at = now
            if back_at is not None and now - last_busy >= quiet:
                idle_at = max(back_at, last_busy)
                break
        fds = fd_count(server.pid)
        out = window.close(Outcome())
        served = probe.wait("result", limit + 5)
    finally:
        hold.gen.stop()
        if probe is not None:
            probe.stop()
    # The load generator's work was opening the connections.
    out.gen_cpu = setup.gen_cpu
    if hold.shortfall():
        out.notes.append(hold.shortfall())
    if idle_at is None:
        out.censor("idle", limit)
        out.note("idle", f"{server.status()['Threads']:,} threads left after {limit:.0f} s "
                         f"({hold.base['Threads']} before)")
    else:
        out.values["idle"] = idle_at - t0
        if fds > hold.base["fds"]:
            out.note("idle", f"{fds - hold.base['fds']:,} fds still open when idle")
    if served["ok"]:
        out.values["probe"] = served["servedMs"]
        if idle_at is not None and served["servedMs"] / 1000 > idle_at - t0:
            out.note("probe", "served only after the cleanup")
    elif served.get("timedOut"):
        out.censor("probe", limit * 1000)
        out.note("probe", f"not served in {limit:.0f} s")
    else:
        out.note("probe", f"not served: {served['error']}")
    out.notes.append(f"{peak['Threads']:,} threads with the clients")
    return out


def scenarios(ctx: Context) -> List[Scenario]:
    idle, mass, mem, bc = ctx.idle_conns, ctx.mass_conns, ctx.memory_conns, ctx.broadcast_conns
    return [
        Scenario("echo-1", [Metric("rate", "echo 32 B text, 1 connection", "msg/s")],
                 run_echo(1, 32, False)),
        Scenario("echo-16", [Metric("rate", "echo 32 B text, 16 connections", "msg/s")],
                 run_echo(16, 32, False)),
        Scenario("echo-100", [Metric("rate", "echo 32 B text, 100 connections", "msg/s")],
                 run_echo(100, 32, False)),
        Scenario("echo-1mib", [Metric("rate", "echo 1 MiB binary, 1 connection", "MiB/s")],
                 run_echo(1, 2**20, True)),
        Scenario("handshakes", [Metric("rate", "handshakes (connect, handshake, close), "
                                               "16 in parallel", "/s")], run_handshakes),
        Scenario("wss-echo-16", [Metric("rate", "wss: echo 32 B text, 16 connections",
                                        "msg/s")], run_echo(16, 32, False), tls=True),
        Scenario("wss-echo-1mib", [Metric("rate", "wss: echo 1 MiB binary, 1 connection",
                                          "MiB/s")], run_echo(1, 2**20, True), tls=True),
        Scenario("wss-handshakes", [Metric("rate", "wss: handshakes (TCP, TLS, WebSocket, "
                                                   "close), 16 in parallel", "/s")],
                 run_handshakes, tls=True),
        Scenario("broadcast", [Metric("rate", f"broadcast 64 B to {bc:,} clients",
                                      "deliveries/s")], run_broadcast),
        Scenario("broadcast-4k", [Metric("rate", f"broadcast 4 KiB JSON to {bc:,} clients",
                                         "deliveries/s")], run_broadcast_json(False)),
        Scenario("broadcast-4k-deflate", [Metric(
            "rate", f"broadcast 4 KiB JSON to {bc:,} clients, permessage-deflate",
            "deliveries/s")], run_broadcast_json(True)),
        Scenario("broadcast-room", [Metric("rate", f"broadcast 64 B to a room of {bc:,}",
                                           "deliveries/s")], run_broadcast,
                 env={"GAMAN_BENCH_ROOM": "1"}),
        Scenario("broadcast-redis", [Metric("rate", f"broadcast 64 B to {bc:,} clients, "
                                            "2 processes through Redis", "deliveries/s")],
                 run_broadcast_redis, cluster=True),
        Scenario("memory", [Metric("kib", f"memory per idle connection, {mem:,} open",
                                   "KiB", True)], run_memory),
        Scenario("memory-deflate", [Metric(
            "kib", f"memory per connection, {mem:,} open, permessage-deflate, after one "
                   "compressed message each", "KiB", True)], run_memory_deflate),
        Scenario("idle", [
            Metric("open", f"{idle:,} idle connections: opening rate", "conn/s"),
            Metric("rtt", f"{idle:,} idle: echo RTT of a new client", "ms", True),
            Metric("echo_all", f"{idle:,} idle: all echo at once, time until every reply",
                   "s", True),
        ], run_idle),
        Scenario("mass-disconnect", [
            Metric("idle", f"{mass:,} clients drop at once: time until idle", "s", True),
            Metric("probe", f"{mass:,} drop: a new client served (connect + echo) after",
                   "ms", True),
        ], run_mass_disconnect),
    ]


# -- Running ----------------------------------------------------------------------

def run_one(ctx: Context, spec: ServerSpec, scenario: Scenario, log_dir: str) -> Outcome:
    if scenario.key in spec.cannot:
        return Outcome(error="n/a: " + spec.cannot[scenario.key])
    if scenario.tls and not spec.tls:
        return Outcome(error="n/a: no TLS in this adapter")
    if scenario.cluster and spec.name != "gaman_sync":
        return Outcome(error="n/a: gaman_sync's Redis broker only")
    if scenario.env and spec.name != "gaman_sync":
        return Outcome(error="n/a: gaman_sync only")
    ctx.proto = spec.proto
    ctx.tls = scenario.tls
    server: Any = None
    try:
        server = (Cluster(spec, log_dir) if scenario.cluster
                  else Server(spec, log_dir, tls=scenario.tls, env_extra=scenario.env))
        outcome = scenario.run(ctx, server)
        if not server.alive():
            outcome.notes.append("the server process died")
        return outcome
    except Exception as exc:
        died = server is not None and not server.alive()
        what = str(exc) if isinstance(exc, BenchError) else f"{type(exc).__name__}: {exc}"
        return Outcome(error=("server died: " if died else "") + what)
    finally:
        if server is not None:
            server.stop()


def available(spec: ServerSpec) -> Optional[str]:
    if spec.module is None:
        return None
    try:
        importlib.import_module(spec.module)
    except ImportError as exc:
        return str(exc)
    return None


HOST_IP = "127.0.0.1"


def _has_tls(checkout: str) -> bool:
    """Does the gaman_sync of ``checkout`` serve wss:// (ssl_context=)?"""
    try:
        with open(os.path.join(checkout, "gaman_sync", "server", "server.py")) as f:
            return "ssl_context" in f.read()
    except OSError:
        return False


def fmt_value(value: Optional[float]) -> str:
    if value is None:
        return "—"
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def fmt_ratio(ratio: float) -> str:
    return f"{ratio:.2f}" if ratio >= 0.1 else f"{ratio:.2g}"


def median_or_none(values: Sequence[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def bounded_median(pairs: Sequence[tuple]) -> tuple:
    """The median of (value, bound) pairs, where bound is "" for an exact
    value, ">" for "at least" (a time limit reached) and "<" for "at most".
    The median carries the bound of the value(s) in the middle; "?" if they
    disagree."""
    pairs = sorted(pairs)
    if not pairs:
        return None, ""
    mid = len(pairs) // 2
    middle = pairs[mid:mid + 1] if len(pairs) % 2 else pairs[mid - 1:mid + 1]
    bounds = {bound for _, bound in middle if bound}
    value = sum(v for v, _ in middle) / len(middle)
    return value, (bounds.pop() if len(bounds) == 1 else "?" if bounds else "")


def value_of(run: Outcome, key: str) -> Optional[tuple]:
    if key not in run.values:
        return None
    return run.values[key], ">" if key in run.atleast else ""


def round_ratios(runs: Sequence[Outcome], refs: Sequence[Outcome], key: str) -> List[tuple]:
    """Each round's value over the reference's value in the same round.
    Neighbours in time share the machine's state (clock, idle states, other
    load) far better than rounds do, so pairing them cancels most of it."""
    ratios = []
    for run, ref in zip(runs, refs):
        mine, theirs = value_of(run, key), value_of(ref, key)
        if mine is None or theirs is None or theirs[0] <= 0:
            continue
        if mine[1] and theirs[1]:
            continue  # both hit their limit: the ratio is unknown
        ratios.append((mine[0] / theirs[0], mine[1] or ("<" if theirs[1] else "")))
    return ratios


def versions() -> Dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("gaman_sync", "websockets", "simple-websocket", "websocket-server", "wsproto"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    try:
        out["node"] = subprocess.run(["node", "--version"], capture_output=True, text=True,
                                     timeout=10).stdout.strip()
        with open(os.path.join(HERE, "node_modules", "ws", "package.json")) as f:
            out["ws"] = json.load(f)["version"]
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    return out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def render(results, specs: List[ServerSpec], scens: List[Scenario], header: str,
           reference: str = REFERENCE) -> str:
    """The markdown report: the full table, then the ratios at a glance,
    each value over ``reference``'s in the same round."""
    names = [s.name for s in specs]
    label = {s.name: s.label for s in specs}
    rounds = max((len(runs) for runs in results.values()), default=0)
    spread = rounds > 1
    ref_label = label.get(reference, reference)
    lines = [header, "",
             "| scenario | server | median | " + ("min–max | " if spread else "")
             + f"× {ref_label} | server CPU s | load-gen CPU s | notes |",
             "|---|---|--:|" + ("--:|" if spread else "") + "--:|--:|--:|---|"]
    glance = {}
    for scen in scens:
        for m_index, metric in enumerate(scen.metrics):
            key, first = metric.key, m_index == 0
            refs = results.get((scen.key, reference), [])
            unit = metric.unit + (", lower is better" if metric.lower_is_better else "")
            for i, name in enumerate(names):
                runs = results.get((scen.key, name), [])
                values = [v for v in (value_of(r, key) for r in runs) if v is not None]
                value, bound = bounded_median(values)
                shown = "—" if value is None else bound.strip("?") + fmt_value(value)
                ends = [f"{bound}{fmt_value(v)}" for v, bound in (min(values), max(values))] \
                    if values else ["—"]
                range_text = "–".join(dict.fromkeys(ends))
                ratio, rbound = bounded_median(round_ratios(runs, refs, key))
                ratio_text = "—" if ratio is None or rbound == "?" else rbound + fmt_ratio(ratio)
                glance[(scen.key, key, name)] = ratio_text
                notes = _notes(scen, metric, first, runs)
                lines.append(
                    f"| {f'{metric.label} ({unit})' if i == 0 else ''} | {label[name]} | "
                    f"{shown} | " + (f"{range_text} | " if spread else "")
                    + f"{ratio_text} | {fmt_value(median_or_none([r.server_cpu for r in runs]))} | "
                    f"{fmt_value(median_or_none([r.gen_cpu for r in runs]))} | "
                    f"{'; '.join(notes)} |")
    others = [n for n in names if n != reference]
    if reference in names and others:
        lines += ["", f"Ratios to {ref_label} at a glance (medians of each round's ratio; "
                      "above 1 is more, not necessarily better: see the units):", "",
                  "| scenario | " + " | ".join(label[n] for n in others) + " |",
                  "|---|" + "--:|" * len(others)]
        for scen in scens:
            for metric in scen.metrics:
                cells = [glance.get((scen.key, metric.key, n), "—") for n in others]
                lines.append(f"| {metric.label} ({metric.unit}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _notes(scen: Scenario, metric: Metric, first: bool, runs: Sequence[Outcome]) -> List[str]:
    """What a row of the table needs said: failures, the load generator's
    share of a core (saturated or not) or a busy machine (on the scenario's first
    row), then the notes of the run nearest the median, since their numbers vary from round to
    round (every run's are in --json)."""
    notes: List[str] = []
    n = len(runs)
    errors = [r.error for r in runs if r.error]
    if first and errors:
        notes.append(errors[0] if errors[0].startswith("n/a") else
                     f"{len(errors)}/{n} runs failed: {errors[0]}")
    shares = [r.gen_cpu / r.wall for r in runs
              if r.gen_cpu is not None and r.wall and scen.key in TIMED]
    if first and shares and max(shares) >= SATURATED:
        notes.append(f"load generator saturated ({max(shares):.0%} of a core)")
    elif first and shares:
        notes.append(f"load generator at {statistics.median(shares):.0%} of a core")
    busy = [r.background for r in runs if r.background is not None and r.background > BACKGROUND]
    if first and busy:
        notes.append(f"machine busy elsewhere in {len(busy)}/{n} runs "
                     f"(up to {max(busy):.1f} cores)")
    done = [r for r in runs if not r.error]
    if not done:
        return notes
    key = metric.key
    mid, _ = bounded_median([v for v in (value_of(r, key) for r in done) if v is not None])
    typical = min(done, key=lambda r: abs(r.values[key] - mid)
                  if mid is not None and key in r.values else float("inf"))
    mine = (typical.notes if first else []) + typical.metric_notes.get(key, [])
    notes += [note for note in mine if note not in notes]
    # Runs that, unlike the typical one, gave no value or hit a limit.
    if value_of(typical, key) is not None and not value_of(typical, key)[1]:
        odd = [r for r in done if value_of(r, key) is None or value_of(r, key)[1]]
        if odd:
            said = odd[0].metric_notes.get(key) or ["no value"]
            notes.append(f"in {len(odd)}/{n} runs: {said[0]}")
    return notes


def rerender(path: str) -> tuple:
    """The report and command of an earlier run saved with --json."""
    with open(path) as f:
        saved = json.load(f)
    ctx = Context(**saved["context"])
    specs = [s for s in SERVER_SPECS if s.name in saved["servers"]]
    scens = [s for s in scenarios(ctx) if s.key in saved["scenarios"]]
    results: Dict[tuple, List[Outcome]] = {}
    for run in sorted(saved["runs"], key=lambda r: r["round"]):
        fields = {k: v for k, v in run.items() if k not in ("scenario", "server", "round")}
        results.setdefault((run["scenario"], run["server"]), []).append(Outcome(**fields))
    return (render(results, specs, scens, saved["header"],
                   saved.get("reference", REFERENCE)), saved["command"])


def bench_parser(doc: str, option: str, names: Sequence[str]) -> argparse.ArgumentParser:
    """A parser with the options both benchmarks begin with: --rounds,
    --duration and ``option``, a comma-separated choice among ``names``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, help="rounds (default 3, --quick 1)")
    parser.add_argument("--duration", type=float,
                        help="seconds per timed measurement (default 2, --quick 1)")
    parser.add_argument(option, help="comma-separated, from: " + ", ".join(names))
    return parser


def pick(parser: argparse.ArgumentParser, what: str, names: Optional[str],
         items: Sequence, key: Callable) -> list:
    """The ``items`` whose ``key`` is in the comma-separated ``names``, in
    their own order (all of them without ``names``); an unknown name is a
    usage error."""
    if not names:
        return list(items)
    wanted = names.split(",")
    unknown = set(wanted) - {key(i) for i in items}
    if unknown:
        parser.error(f"unknown {what}: {', '.join(sorted(unknown))}")
    return [i for i in items if key(i) in wanted]


def busy_note(background: Optional[float]) -> str:
    """The progress line's note on a machine busy with other work."""
    if background is not None and background > BACKGROUND:
        return f" [machine busy elsewhere: {background:.1f} cores]"
    return ""


def tidy_logs(log_dir: str, what: str) -> None:
    """Name the logs in ``log_dir`` that are not empty, as ``what``; remove
    the folder when all are."""
    logs = [(p, os.path.getsize(os.path.join(log_dir, p))) for p in sorted(os.listdir(log_dir))]
    noisy = [f"{p} ({size} bytes)" for p, size in logs if size]
    if noisy:
        print(f"\n{what} in {log_dir}: " + ", ".join(noisy), file=sys.stderr)
    else:
        shutil.rmtree(log_dir, ignore_errors=True)


def update_readme(report: str, command: str) -> None:
    with open(README) as f:
        text = f.read()
    start, end = ".. results-start", ".. results-end"
    if start not in text or end not in text:
        raise SystemExit(f"{README} has no '{start}' / '{end}' markers")
    before, rest = text.split(start, 1)
    _, after = rest.split(end, 1)
    block = "\n".join("    " + line if line else "" for line in report.splitlines())
    new = (f"{start}\n\nMeasured with ``{command}``:\n\n.. code-block:: text\n\n"
           f"{block}\n\n{end}")
    with open(README, "w") as f:
        f.write(before + new + after)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = bench_parser(__doc__, "--servers", [s.name for s in SERVER_SPECS])
    parser.add_argument("--scenarios", help="comma-separated, from: echo-1, echo-16, "
                        "echo-100, echo-1mib, handshakes, wss-echo-16, wss-echo-1mib, "
                        "wss-handshakes, broadcast, broadcast-room, broadcast-redis (needs "
                        "redis-server), memory, idle, mass-disconnect")
    parser.add_argument("--quick", action="store_true",
                        help="one short round, 5,000 idle connections, 2,000 dropped")
    parser.add_argument("--idle-conns", type=int, help="default 10000 (--quick 5000)")
    parser.add_argument("--mass-conns", type=int, help="default 5000 (--quick 2000)")
    parser.add_argument("--reference", default=REFERENCE, metavar="SERVER",
                        help="the server of the ratio column (default %(default)s; e.g. "
                             "gaman_sync against gaman_sync-workers2)")
    parser.add_argument("--json", metavar="FILE", help="also write every run's numbers here")
    parser.add_argument("--baseline", metavar="DIR",
                        help="also run the gaman_sync of another checkout (e.g. a git "
                             "worktree of the previous commit, with its C helper built), as "
                             "'gaman_sync-baseline': before and after in the same run")
    parser.add_argument("--readme", action="store_true",
                        help="put the table into benchmarks/README.rst")
    parser.add_argument("--from-json", metavar="FILE",
                        help="measure nothing: print the table of an earlier --json")
    args = parser.parse_args(argv)
    if args.from_json:
        report, command = rerender(args.from_json)
        print(report)
        if args.readme:
            update_readme(report, command)
        return 0
    rounds = args.rounds or (1 if args.quick else 3)
    duration = args.duration or (1.0 if args.quick else 2.0)
    ctx = Context(duration=duration,
                  idle_conns=args.idle_conns or (5000 if args.quick else 10000),
                  mass_conns=args.mass_conns or (2000 if args.quick else 5000),
                  memory_conns=1000, broadcast_conns=1000)

    hard = raise_fd_limit()
    # Server and client ends of every idle connection are on this machine,
    # but in different processes, so each needs one fd per connection.
    if hard < max(ctx.idle_conns, ctx.mass_conns) + 200:
        parser.error(f"RLIMIT_NOFILE hard limit {hard} is too low for "
                     f"{ctx.idle_conns} idle connections")
    if shutil.which("node") is None or not os.path.isdir(os.path.join(HERE, "node_modules", "ws")):
        parser.error("the load generator needs Node and ws: npm install --prefix benchmarks")

    specs = list(SERVER_SPECS)
    if args.baseline:
        if not os.path.isdir(os.path.join(args.baseline, "gaman_sync")):
            parser.error(f"--baseline: no gaman_sync package in {args.baseline}")
        specs.insert(1, ServerSpec("gaman_sync-baseline", "gaman_sync (baseline)", "gaman_sync",
                                   script="gaman_sync",
                                   pythonpath=os.path.abspath(args.baseline),
                                   tls=_has_tls(args.baseline)))
    specs = pick(parser, "servers", args.servers, specs, lambda s: s.name)
    for spec in list(specs):
        missing = available(spec)
        if missing:
            if not spec.optional and args.servers:
                parser.error(f"{spec.name} is not installed: {missing}")
            print(f"skipping {spec.name}: {missing} (pip install -e .[bench])", file=sys.stderr)
            specs.remove(spec)
    if args.reference not in {s.name for s in specs}:
        print(f"{args.reference} is not in this run: no ratios", file=sys.stderr)
    scens = pick(parser, "scenarios", args.scenarios, scenarios(ctx), lambda s: s.key)

    cert_dir = None
    if any(scen.tls for scen in scens):
        try:
            import trustme
        except ImportError:
            parser.error("the wss scenarios need trustme: pip install -e .[bench]")
        cert_dir = tempfile.mkdtemp(prefix="gaman-bench-certs-")
        ca = trustme.CA()
        cert = ca.issue_cert(HOST_IP)
        CERTS.update(ca=os.path.join(cert_dir, "ca.pem"), cert=os.path.join(cert_dir, "cert.pem"),
                     key=os.path.join(cert_dir, "key.pem"))
        ca.cert_pem.write_to_path(CERTS["ca"])
        cert.cert_chain_pems[0].write_to_path(CERTS["cert"])
        cert.private_key_pem.write_to_path(CERTS["key"])
    log_dir = tempfile.mkdtemp(prefix="gaman-bench-")
    results: Dict[tuple, List[Outcome]] = {}
    started = time.monotonic()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    for rnd in range(rounds):
        for scen in scens:
            # Rotating the order from round to round spreads any drift of the
            # machine (thermal, background work) over all the servers.
            shift = rnd % len(specs)
            for spec in specs[shift:] + specs[:shift]:
                outcome = run_one(ctx, spec, scen, log_dir)
                results.setdefault((scen.key, spec.name), []).append(outcome)
                shown = ", ".join(
                    f"{m.key}={'>' if m.key in outcome.atleast else ''}"
                    f"{fmt_value(outcome.values.get(m.key))}" for m in scen.metrics)
                extra = (outcome.error or "; ".join(outcome.notes)) + busy_note(outcome.background)
                print(f"[{time.monotonic() - started:6.0f} s] round {rnd + 1}/{rounds} "
                      f"{scen.key:<15} {spec.name:<18} {shown}  "
                      f"cpu server={fmt_value(outcome.server_cpu)} "
                      f"gen={fmt_value(outcome.gen_cpu)}  {extra}", file=sys.stderr, flush=True)

    ver = versions()
    command = "python benchmarks/run.py" + (" " + " ".join(argv if argv is not None
                                                           else sys.argv[1:])).rstrip()
    header = (f"{datetime.date.today()}: {rounds} round(s) of {duration:g} s, "
              f"{os.cpu_count()} × {cpu_model()}, Linux {platform.release()}, "
              + ", ".join(f"{k} {v}" for k, v in ver.items())
              + f"; {time.monotonic() - started:.0f} s in all")
    report = render(results, specs, scens, header, args.reference)
    print(report)
    tidy_logs(log_dir, "server stderr")
    if cert_dir is not None:
        shutil.rmtree(cert_dir, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "command": command, "versions": ver,
                       "reference": args.reference,
                       "context": {k: v for k, v in vars(ctx).items()
                                   if k not in ("proto", "tls")},
                       "servers": [s.name for s in specs], "scenarios": [s.key for s in scens],
                       "runs": [
                {"scenario": k[0], "server": k[1], "round": i + 1, **vars(o)}
                for k, runs in results.items() for i, o in enumerate(runs)]}, f, indent=1)
    if args.readme:
        update_readme(report, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
