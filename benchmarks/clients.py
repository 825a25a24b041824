"""Three synchronous Python WebSocket clients, and two ceilings, against the same
server; print a markdown table.

    pip install -e .[bench]
    python benchmarks/clients.py [--rounds N] [--duration S] [--clients a,b]
                                 [--server NAME] [--quick] [--json FILE]
                                 [--baseline DIR]

The clients are gaman_sync's (``gaman_sync.connect``), websockets' threaded
one (``websockets.sync.client.connect``, the reference of the ratio column)
and websocket-client (``websocket.create_connection``); two rows marked
"(ceiling)" are not clients but what a client design comes to on wsproto
before any code of its own, with a reader thread and without. Each measurement
sends one message on one connection, waits for its echo and sends the next,
for a fixed duration: 32 B text (round trips per second), then 1 MiB binary
(MiB per second, each MiB counted once although it crosses loopback twice).

One server serves the whole run, in its own process (benchmarks/servers.py,
started by run.py's ``Server``): by default websockets' asyncio server,
which is no part of gaman_sync, so that a change in gaman_sync moves only
gaman_sync's client rows, and which answers from a single thread.
Every measurement gets a fresh process of this script (``--worker``) that
imports one client library only, connects, warms up, and then waits for
"go" on stdin before its timed loop. Client and server thus never share a
GIL, nor do two clients, and the parent samples CPU (/proc/PID/stat) around
the timed loop alone: not the imports, the handshake or the close.

Clients are interleaved like run.py's servers: each round runs every
scenario with every client, in an order that rotates from round to round,
and the table gives the median over the rounds and the median of each
round's ratio to websockets sync in the same round.

Nothing leaves 127.0.0.1: the server binds there with port 0, the workers
connect only there, and their environment has no proxy settings (both
websockets and websocket-client would otherwise honour ``http_proxy``).
Every wait has a time limit, and each worker kills itself (SIGALRM) if the
parent never tells it to finish.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import importlib
import importlib.metadata
import inspect
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple, Union

# Small helpers shared with run.py: the server process and its READY line,
# /proc readers and the number formats of the table. Importing run.py starts
# nothing.
from run import (
    BACKGROUND,
    SERVER_SPECS,
    BenchError,
    JsonLineProcess,
    Server,
    bench_parser,
    busy_note,
    cpu_model,
    cpu_seconds,
    fmt_ratio,
    fmt_value,
    machine_busy,
    pick,
    tidy_logs,
)

HOST = "127.0.0.1"
REFERENCE = "websockets-sync"
DEFAULT_SERVER = "websockets-asyncio"
# Timeouts of the clients themselves (connect, each recv, the closing
# handshake): generous, since they only matter when something is broken.
CLIENT_TIMEOUT = 10.0
# How long the parent waits for a worker to start, connect and warm up; to
# finish its timed loop past the duration; to close and exit.
READY_TIMEOUT = 30.0
RESULT_SLACK = 30.0
EXIT_TIMEOUT = CLIENT_TIMEOUT + 5
# How long the server may take to settle before each timed loop.
QUIET_LIMIT = 5.0
# Round trips before the timed loop, so that the first ones (lazy imports,
# caches, the server's first messages on a connection) are not counted.
WARMUP_SECONDS = 0.2
WARMUP_MIN = 3
# A server busier than this share of a core over the timed loop was the
# limit, rather than the client: the note column says so.
SERVER_SATURATED = 0.90

Message = Union[str, bytes]
Send = Callable[[Message], object]
Recv = Callable[[], Message]
Close = Callable[[], object]


# -- The clients (run in the worker) -------------------------------------------
#
# Each opener connects to ``url`` and returns the connection's send, recv and
# close as plain callables. All three get the same settings: no size limit on
# messages, no compression, no keepalive pings, CLIENT_TIMEOUT on connect and
# on every recv. Everything else is each library's default (all three set
# TCP_NODELAY; websocket-client validates UTF-8 in pure Python unless wsaccel
# is installed; websockets' client reads in a background thread).

def open_gaman_sync(url: str, binary: bool) -> Tuple[Send, Recv, Close]:
    from gaman_sync import connect

    conn = connect(url, max_message_size=None, ping_interval=None)
    # A partial (C) rather than a lambda, as for websockets: the same small
    # cost per call for both.
    return conn.send, functools.partial(conn.recv, timeout=CLIENT_TIMEOUT), conn.close


def open_websockets_sync(url: str, binary: bool) -> Tuple[Send, Recv, Close]:
    from websockets.sync.client import connect

    options: Dict[str, Any] = dict(
        compression=None, max_size=None, open_timeout=CLIENT_TIMEOUT,
        close_timeout=CLIENT_TIMEOUT)
    # Keepalive and proxies came to the threaded client in websockets 15;
    # before, it neither pinged nor used proxies, and would hand these
    # arguments on to socket.create_connection. Since, it reads proxy
    # settings from the environment unless told not to.
    accepted = inspect.signature(connect).parameters
    for name in ("ping_interval", "proxy"):
        if name in accepted:
            options[name] = None
    # As its documentation says to since 17.1 (the direct call warns): the
    # context manager, whose exit closes the connection. Versions before
    # 17.1 return the connection itself, a context manager too.
    stack = contextlib.ExitStack()
    ws = stack.enter_context(connect(url, **options))
    return ws.send, functools.partial(ws.recv, timeout=CLIENT_TIMEOUT), stack.close


def open_websocket_client(url: str, binary: bool) -> Tuple[Send, Recv, Close]:
    import websocket

    # The timeout is the socket's: it applies to connect and to every recv,
    # at no cost per call. websocket-client neither compresses nor pings
    # unless asked, and has no message size limit.
    ws = websocket.create_connection(url, timeout=CLIENT_TIMEOUT)
    # Its send() sends text whatever the payload's type.
    return (ws.send_binary if binary else ws.send), ws.recv, ws.close


# -- Two ceilings on wsproto, not clients ------------------------------------------
#
# What a client design comes to on wsproto before any code of its own, as
# run.py's "TCP echo + wsproto" rows do for servers: a fixed handshake
# request (only the 101 checked), frames masked by wsproto's
# FrameProtocol(client=True), messages put together from its frames, plain
# socket calls, and nothing else (no validation, no pings; closing sends a
# close frame and waits for the end of the stream). ThreadedReaderCeiling reads in a
# thread of its own and hands each message to recv() through a Condition and
# a deque, as gaman_sync's client does; CallerReadsCeiling reads and parses
# in recv()'s caller, as websocket-client does.

CEILING_READ = 65536  # bytes per socket recv


class _WsprotoCeiling:
    def __init__(self, url: str) -> None:
        from wsproto.frame_protocol import FrameProtocol, Opcode

        parts = urllib.parse.urlsplit(url)
        sock = socket.create_connection((parts.hostname, parts.port), timeout=CLIENT_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                     "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     "Sec-WebSocket-Version: 13\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            data = sock.recv(CEILING_READ)
            if not data:
                raise BenchError("handshake: the server closed the connection")
            head += data
        head, _, rest = head.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101 "):
            raise BenchError(f"handshake: {head.splitlines()[0]!r}")
        self.sock = sock
        self.proto = FrameProtocol(client=True, extensions=[])
        self.close_opcode = Opcode.CLOSE
        self.parts: List[Message] = []  # the frames of a message not yet complete
        self.queue: Deque[Message] = deque(self.parse(rest))
        self.sendall = sock.sendall
        self.send_data = self.proto.send_data

    def send(self, message: Message) -> None:
        self.sendall(self.send_data(message))

    def parse(self, data: bytes) -> List[Message]:
        """The messages ``data`` completes."""
        self.proto.receive_bytes(data)
        done: List[Message] = []
        for frame in self.proto.received_frames():
            if frame.opcode is self.close_opcode or frame.opcode.iscontrol():
                continue  # wsproto stops parsing after a close frame
            self.parts.append(frame.payload)
            if frame.message_finished:
                parts, self.parts = self.parts, []
                done.append("".join(parts) if isinstance(parts[0], str) else b"".join(parts))
        return done

    def close(self) -> None:
        self.sendall(self.proto.close(1000))
        self.wait_closed()
        self.sock.close()

    def wait_closed(self) -> None:
        raise NotImplementedError


class ThreadedReaderCeiling(_WsprotoCeiling):
    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.sock.settimeout(None)  # the reader blocks; recv() times out on the Condition
        self.ended = False
        self.arrived = threading.Condition(threading.Lock())
        self.reader = threading.Thread(target=self.read, daemon=True)
        self.reader.start()

    def read(self) -> None:
        recv, parse, arrived, queue = self.sock.recv, self.parse, self.arrived, self.queue
        try:
            while True:
                data = recv(CEILING_READ)
                if not data:
                    break
                messages = parse(data)
                if messages:
                    with arrived:
                        queue.extend(messages)
                        arrived.notify()
        except OSError:
            pass
        finally:
            with arrived:
                self.ended = True
                arrived.notify_all()

    def recv(self) -> Message:
        with self.arrived:
            while not self.queue:
                if self.ended:
                    raise ConnectionError("the connection ended")
                if not self.arrived.wait(CLIENT_TIMEOUT):
                    raise TimeoutError("no message")
            return self.queue.popleft()

    def wait_closed(self) -> None:
        self.reader.join(CLIENT_TIMEOUT)


class CallerReadsCeiling(_WsprotoCeiling):
    # The socket keeps CLIENT_TIMEOUT, as websocket-client's does.
    def recv(self) -> Message:
        queue = self.queue
        while not queue:
            data = self.sock.recv(CEILING_READ)
            if not data:
                raise ConnectionError("the connection ended")
            queue.extend(self.parse(data))
        return queue.popleft()

    def wait_closed(self) -> None:
        while self.sock.recv(CEILING_READ):
            pass


def open_ceiling(cls: type) -> Callable[[str, bool], Tuple[Send, Recv, Close]]:
    def opener(url: str, binary: bool) -> Tuple[Send, Recv, Close]:
        conn = cls(url)
        return conn.send, conn.recv, conn.close
    return opener


def _check_gaman_sync() -> Optional[str]:
    try:
        module = importlib.import_module("gaman_sync")
    except Exception as exc:  # the package may be mid-change: say what broke
        return f"gaman_sync does not import ({type(exc).__name__}: {exc})"
    if not callable(getattr(module, "connect", None)):
        return "gaman_sync.connect is missing: this version of gaman_sync has no client yet"
    return None


def _check_baseline(directory: str) -> Callable[[], Optional[str]]:
    def check() -> Optional[str]:
        if not os.path.isfile(os.path.join(directory, "gaman_sync", "__init__.py")):
            return f"--baseline: no gaman_sync package in {directory}"
        return None
    return check


def baseline_spec(directory: str) -> ClientSpec:
    """gaman_sync's client from another checkout (``--baseline DIR``, its C
    helper built in place): before and after a change in the same run."""
    return ClientSpec(BASELINE, "gaman_sync (baseline)", open_gaman_sync,
                      _check_baseline(directory), pythonpath=os.path.abspath(directory))


BASELINE = "gaman_sync-baseline"


def _check_module(module: str, attribute: str, dist: str) -> Callable[[], Optional[str]]:
    def check() -> Optional[str]:
        try:
            found = importlib.import_module(module)
        except Exception as exc:
            return f"{module} does not import ({exc}): pip install {dist}"
        if not callable(getattr(found, attribute, None)):
            # Another distribution also installs a module named 'websocket'.
            return f"{module}.{attribute} is missing: pip install {dist}"
        return None
    return check


@dataclass(frozen=True)
class ClientSpec:
    name: str
    label: str
    opener: Callable[[str, bool], Tuple[Send, Recv, Close]]
    check: Callable[[], Optional[str]]  # why it cannot run here, or None
    pythonpath: Optional[str] = None  # put first on the worker's import path


CLIENT_SPECS = [
    ClientSpec("gaman_sync", "gaman_sync", open_gaman_sync, _check_gaman_sync),
    ClientSpec("websockets-sync", "websockets sync", open_websockets_sync,
               _check_module("websockets.sync.client", "connect", "websockets")),
    ClientSpec("websocket-client", "websocket-client", open_websocket_client,
               _check_module("websocket", "create_connection", "websocket-client")),
    ClientSpec("ceiling-threaded", "threaded reader + wsproto (ceiling)",
               open_ceiling(ThreadedReaderCeiling),
               _check_module("wsproto.frame_protocol", "FrameProtocol", "wsproto")),
    ClientSpec("ceiling-caller-reads", "caller reads + wsproto (ceiling)",
               open_ceiling(CallerReadsCeiling),
               _check_module("wsproto.frame_protocol", "FrameProtocol", "wsproto")),
]


# -- The scenarios ---------------------------------------------------------------

@dataclass(frozen=True)
class Scenario:
    key: str
    label: str
    unit: str
    binary: bool
    size: int
    per_count: float  # what one round trip adds to the value

    def message(self) -> Message:
        if self.binary:
            # Not all zeros or one byte repeated, as in inmemory.py.
            return (bytes(range(256)) * (self.size // 256 + 1))[:self.size]
        return "x" * self.size


SCENARIOS = [
    Scenario("echo-32", "echo 32 B text, 1 connection", "round trips/s", False, 32, 1.0),
    # The echo rather than a server that discards: the same round trip as
    # the small messages, the client's receive path measured as well as its
    # send path (masking), and the end of the timed loop is the end of the
    # work (a sender to a discarding server would stop with its last
    # messages still in the socket buffers).
    Scenario("echo-1mib", "echo 1 MiB binary, 1 connection",
             "MiB/s echoed, each MiB counted once", True, 2**20, 1.0),
]


# -- The worker: one client, one scenario, one connection -------------------------

def _emit(event: str, **fields: object) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def worker_main(config_text: str) -> int:
    """Connect, warm up, say "ready"; on "go", echo for the duration and
    report; on the next line, close. stdout carries JSON lines only."""
    config = json.loads(config_text)
    # The watchdog: if the parent died or never says "close", SIGALRM's
    # default action ends this process.
    signal.alarm(int(config["lifetime"]))
    name = config["client"]
    spec = baseline_spec(".") if name == BASELINE else {c.name: c for c in CLIENT_SPECS}[name]
    scenario = {s.key: s for s in SCENARIOS}[config["scenario"]]
    message = scenario.message()
    duration = float(config["duration"])
    url = f"ws://{HOST}:{int(config['port'])}/echo"
    try:
        send, recv, close = spec.opener(url, scenario.binary)
        warm_until = time.perf_counter() + WARMUP_SECONDS
        warm = 0
        while warm < WARMUP_MIN or time.perf_counter() < warm_until:
            send(message)
            reply = recv()
            if reply != message:
                raise BenchError(_wrong_echo(reply, message))
            warm += 1
        _emit("ready", warmup=warm)
        if sys.stdin.readline().strip() != "go":
            return 1
        count = 0
        start = time.perf_counter()
        deadline = start + duration
        while True:
            send(message)
            reply = recv()
            # Every echo is checked (a comparison of 32 B, or a memcmp of
            # 1 MiB, some 25 µs), the same work for every client.
            if reply != message:
                raise BenchError(_wrong_echo(reply, message))
            count += 1
            if time.perf_counter() >= deadline:
                break
        elapsed = time.perf_counter() - start
        _emit("result", count=count, elapsed=elapsed)
        # The parent samples CPU before it lets the closing handshake start.
        sys.stdin.readline()
        close()
        _emit("closed")
        return 0
    except Exception as exc:
        text = str(exc) if isinstance(exc, BenchError) else f"{type(exc).__name__}: {exc}"
        _emit("error", message=text)
        return 1


def _wrong_echo(reply: object, message: Message) -> str:
    size = len(reply) if isinstance(reply, (str, bytes, bytearray)) else "?"
    return (f"wrong echo: {type(reply).__name__} of {size}, "
            f"sent {type(message).__name__} of {len(message)}")


# -- The parent: processes -------------------------------------------------------

def worker_env() -> Dict[str, str]:
    """This environment without proxy settings: the clients must connect to
    127.0.0.1 directly, never through anything else."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["no_proxy"] = env["NO_PROXY"] = "*"
    return env


class Worker(JsonLineProcess):
    """A ``clients.py --worker`` process; its JSON lines arrive through a
    queue, so that every wait for one has a time limit."""

    name = "client"

    def __init__(self, config: dict, log_path: str, pythonpath: Optional[str] = None) -> None:
        self.log_path = log_path
        env = worker_env()
        if pythonpath:
            env["PYTHONPATH"] = os.pathsep.join(
                [pythonpath] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        log = open(log_path, "ab")  # noqa: SIM115 (closed after Popen)
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env,
            start_new_session=True)
        log.close()
        super().__init__(proc)

    def _exit_detail(self) -> str:
        return self._log_tail()

    def _error_text(self, message: str) -> str:
        lines = str(message).splitlines() or ["(no message)"]
        return lines[0][:300]

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.log_path) - 300))
                return f.read().decode(errors="replace").strip() or "(no stderr)"
        except OSError:
            return "(no stderr)"

    def stop(self) -> None:
        try:
            self.proc.wait(EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._close_streams()


@dataclass
class Run:
    """One scenario run with one client."""
    value: Optional[float] = None
    count: int = 0
    elapsed: Optional[float] = None
    wall: Optional[float] = None
    client_cpu: Optional[float] = None
    server_cpu: Optional[float] = None
    background: Optional[float] = None  # cores used by other processes meanwhile
    error: Optional[str] = None
    notes: List[str] = field(default_factory=list)

    def per_trip(self, cpu: Optional[float]) -> Optional[float]:
        """CPU µs per round trip."""
        return cpu / self.count * 1e6 if cpu is not None and self.count else None


def sample(server: Server, worker: Worker) -> Tuple[float, ...]:
    return (time.monotonic(), server.cpu(), worker.cpu(), machine_busy(),
            cpu_seconds(os.getpid()))


def measure(spec: ClientSpec, scenario: Scenario, server: Server, duration: float,
            log_dir: str, rnd: int) -> Run:
    config = {"client": spec.name, "scenario": scenario.key, "port": server.port,
              "duration": duration,
              "lifetime": READY_TIMEOUT + QUIET_LIMIT + duration + RESULT_SLACK + EXIT_TIMEOUT}
    worker = Worker(config, os.path.join(
        log_dir, f"client-{spec.name}-{scenario.key}-round{rnd + 1}.log"), spec.pythonpath)
    out = Run()
    try:
        worker.wait("ready", READY_TIMEOUT)
        # Whatever the previous client left the server doing (its close) and
        # this one's warm-up are over before the CPU counts.
        server.wait_quiet(limit=QUIET_LIMIT)
        start = sample(server, worker)
        worker.send("go")
        result = worker.wait("result", duration + RESULT_SLACK)
        end = sample(server, worker)
        worker.send("close")
        try:
            worker.wait("closed", EXIT_TIMEOUT)
        except BenchError as exc:
            out.notes.append(f"close: {exc}")
            worker.kill()
    except (BenchError, OSError) as exc:
        out.error = str(exc)
        worker.kill()
        return out
    except BaseException:  # Ctrl-C or SIGTERM: no waiting for the worker
        worker.kill()
        raise
    finally:
        worker.stop()
    wall, server_cpu, client_cpu, busy, own = (b - a for a, b in zip(start, end))
    out.count, out.elapsed = result["count"], result["elapsed"]
    out.value = out.count * scenario.per_count / out.elapsed
    out.wall, out.server_cpu, out.client_cpu = wall, server_cpu, client_cpu
    out.background = (busy - server_cpu - client_cpu - own) / wall if wall > 0 else 0.0
    return out


# -- The report ------------------------------------------------------------------

def round_ratios(runs: Sequence[Run], refs: Sequence[Run]) -> List[float]:
    """Each round's value over the reference's in the same round: neighbours
    in time share the machine's state far better than rounds do."""
    return [run.value / ref.value for run, ref in zip(runs, refs)
            if run.value is not None and ref.value]


def median_of(values: Sequence[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def row_notes(runs: Sequence[Run], skipped: Optional[str]) -> List[str]:
    if skipped:
        return [f"skipped: {skipped}"]
    if not runs:
        return ["not measured (the run stopped first)"]
    notes: List[str] = []
    n = len(runs)
    errors = [r.error for r in runs if r.error]
    if errors:
        notes.append(f"{len(errors)}/{n} runs failed: {errors[0]}")
    shares = [r.server_cpu / r.wall for r in runs if r.server_cpu is not None and r.wall]
    if shares and max(shares) >= SERVER_SATURATED:
        notes.append(f"server saturated ({max(shares):.0%} of a core)")
    busy = [r.background for r in runs if r.background is not None and r.background > BACKGROUND]
    if busy:
        notes.append(f"machine busy elsewhere in {len(busy)}/{n} runs "
                     f"(up to {max(busy):.1f} cores)")
    for run in runs:
        notes += [note for note in run.notes if note not in notes]
    return notes


def render(results: Dict[Tuple[str, str], List[Run]], specs: Sequence[ClientSpec],
           skipped: Dict[str, str], scenarios: Sequence[Scenario], header: str) -> str:
    rounds = max((len(runs) for runs in results.values()), default=0)
    spread = rounds > 1
    label = {s.name: s.label for s in specs}
    ref_label = label.get(REFERENCE, REFERENCE)
    lines = [header, "",
             "| scenario | client | median | " + ("min–max | " if spread else "")
             + f"× {ref_label} | client CPU µs/round trip | server CPU µs/round trip | notes |",
             "|---|---|--:|" + ("--:|" if spread else "") + "--:|--:|--:|---|"]
    for scenario in scenarios:
        refs = results.get((scenario.key, REFERENCE), [])
        for i, spec in enumerate(specs):
            runs = results.get((scenario.key, spec.name), [])
            values = [r.value for r in runs if r.value is not None]
            ratios = round_ratios(runs, refs)
            # The ends of the range, once if they are the same.
            ends = dict.fromkeys(fmt_value(v) for v in (min(values), max(values))) \
                if values else {"—": None}
            ratio = median_of(ratios)
            notes = row_notes(runs, skipped.get(spec.name))
            lines.append(
                f"| {f'{scenario.label} ({scenario.unit})' if i == 0 else ''} "
                f"| {spec.label} | {fmt_value(median_of(values))} | "
                + (f"{'–'.join(ends)} | " if spread else "")
                + f"{'—' if ratio is None else fmt_ratio(ratio)} | "
                f"{fmt_value(median_of([r.per_trip(r.client_cpu) for r in runs]))} | "
                f"{fmt_value(median_of([r.per_trip(r.server_cpu) for r in runs]))} | "
                f"{'; '.join(notes)} |")
    return "\n".join(lines)


def versions() -> Dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("gaman_sync", "websockets", "websocket-client", "wsproto"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


# -- Running ----------------------------------------------------------------------

def start_server(name: str, log_dir: str) -> Server:
    spec = {s.name: s for s in SERVER_SPECS}[name]
    server = Server(spec, log_dir)
    warm_up(server)
    return server


def warm_up(server: Server) -> None:
    """Open the server's first connection, echo a few messages and close it,
    before any client is measured. A server's first connection can stay
    slower than the next ones for its whole life: with websockets' asyncio
    server here, 46 to 50 µs of server CPU per 32 B round trip on the first
    connection against 26 to 30 on the next ones (all with websocket-client,
    client and server pinned to one core). Without this, the first client of
    round 1 (always the same one) was measured against a slower server."""
    conn = CallerReadsCeiling(f"ws://{HOST}:{server.port}/echo")
    try:
        for i in range(20):
            conn.send(f"warm-up {i}")
            if conn.recv() != f"warm-up {i}":
                raise BenchError("the server's warm-up echo came back wrong")
    finally:
        conn.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The worker's entry point; not an option for people, so not in --help.
    if len(argv) == 2 and argv[0] == "--worker":
        return worker_main(argv[1])

    ws_servers = [s.name for s in SERVER_SPECS if s.proto == "ws" and "echo-1mib" not in s.cannot]
    parser = bench_parser(__doc__, "--clients", [c.name for c in CLIENT_SPECS])
    parser.add_argument("--server", default=DEFAULT_SERVER, choices=ws_servers,
                        help=f"the one server of the run (default {DEFAULT_SERVER})")
    parser.add_argument("--quick", action="store_true", help="one round of 1 s")
    parser.add_argument("--json", metavar="FILE", help="also write every run's numbers here")
    parser.add_argument("--baseline", metavar="DIR",
                        help="also run the gaman_sync of this checkout (its C helper built "
                             "in place) as 'gaman_sync-baseline': before and after in the "
                             "same run")
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    duration = args.duration or (1.0 if args.quick else 2.0)
    if rounds < 1 or duration <= 0:
        parser.error("--rounds and --duration must be positive")

    specs = pick(parser, "clients", args.clients, CLIENT_SPECS, lambda c: c.name)
    if args.baseline:
        specs.insert(1, baseline_spec(args.baseline))
    skipped: Dict[str, str] = {}
    for spec in specs:
        why = spec.check()
        if why:
            skipped[spec.name] = why
            print(f"skipping {spec.name}: {why}", file=sys.stderr)
    running = [c for c in specs if c.name not in skipped]
    if not running:
        parser.error("no client to run")
    if REFERENCE not in {c.name for c in running}:
        print(f"{REFERENCE} is not in this run: no ratios", file=sys.stderr)

    log_dir = tempfile.mkdtemp(prefix="gaman-bench-clients-")
    results: Dict[Tuple[str, str], List[Run]] = {}
    started = time.monotonic()
    # SystemExit unwinds through the finally below, which stops the server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    server: Optional[Server] = None
    try:
        server = start_server(args.server, log_dir)
        for rnd in range(rounds):
            for scenario in SCENARIOS:
                # Rotating the order spreads any drift of the machine over
                # all the clients.
                shift = rnd % len(running)
                for spec in running[shift:] + running[:shift]:
                    if not server.alive():
                        print(f"the server died (see {server.log_path}); starting another",
                              file=sys.stderr)
                        server.stop()
                        server = start_server(args.server, log_dir)
                    run = measure(spec, scenario, server, duration, log_dir, rnd)
                    results.setdefault((scenario.key, spec.name), []).append(run)
                    extra = (run.error or "; ".join(run.notes)) + busy_note(run.background)
                    print(f"[{time.monotonic() - started:5.0f} s] round {rnd + 1}/{rounds} "
                          f"{scenario.key:<10} {spec.name:<20} {fmt_value(run.value)}  "
                          f"cpu client={fmt_value(run.client_cpu)} "
                          f"server={fmt_value(run.server_cpu)}  {extra}",
                          file=sys.stderr, flush=True)
    except BenchError as exc:
        # A server that does not start: the table shows what was measured.
        print(f"stopping: {exc}", file=sys.stderr)
    finally:
        if server is not None:
            server.stop()

    ver = versions()
    command = "python benchmarks/clients.py" + (" " + " ".join(argv)).rstrip()
    header = (f"{datetime.date.today()}: {rounds} round(s) of {duration:g} s, "
              f"server {args.server}, {os.cpu_count()} × {cpu_model()}, "
              f"Linux {platform.release()}, "
              + ", ".join(f"{k} {v}" for k, v in ver.items())
              + f"; {time.monotonic() - started:.0f} s in all")
    print(render(results, specs, skipped, SCENARIOS, header))
    tidy_logs(log_dir, "stderr of the server and clients")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "command": command, "versions": ver,
                       "server": args.server, "duration": duration, "rounds": rounds,
                       "clients": [c.name for c in specs], "skipped": skipped,
                       "scenarios": [s.key for s in SCENARIOS],
                       "runs": [{"scenario": k[0], "client": k[1], "round": i + 1, **vars(r)}
                                for k, runs in results.items() for i, r in enumerate(runs)]},
                      f, indent=1)
    # Nothing measured at all is a failure for whoever runs this in a script.
    return 0 if any(r.value is not None for runs in results.values() for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
