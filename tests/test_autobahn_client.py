"""The Autobahn|Testsuite fuzzing server against our client, strict verdict.

The client connects to the suite's fuzzing server for each case and echoes
back every message it receives (same type) until the connection closes; the
suite then judges what it saw. Needs the suite installed by
``bash .ci/install-autobahn`` (Python 2.7 only). Without it the test is
skipped, except on CI (``CI`` set), where it fails, as in test_autobahn.py.
Deselect it with ``-m "not autobahn"``.

Until ``gaman_sync.connect`` exists, websockets' sync client stands in for it
(see ``open_client``), so that the flow itself stays tested. The fuzzing
server runs on 127.0.0.1 only (see ``LOOPBACK_WSTEST``).
"""

from __future__ import annotations

import inspect
import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple, Type

import pytest

import gaman_sync

from .test_autobahn import (
    CASES,
    DEFLATE_CASES,
    INFORMATIONAL,
    MAX_MESSAGE_SIZE,
    ROOT,
    case_key,
    describe,
    tail,
    wstest_or_skip,
)

# Until gaman_sync has connect, websockets stands in (see open_client). Only
# the missing name falls back: a gaman_sync that fails to import fails here
# rather than quietly leaving the stand-in under test.
gaman_connect = getattr(gaman_sync, "connect", None)

pytestmark = [pytest.mark.autobahn, pytest.mark.slow]

AGENT = "gaman_sync"

# Sections 1 to 10 and the permessage-deflate sample of test_autobahn.py.
EXCLUDED: List[str] = []

# What the pinned suite (autobahntestsuite 25.10.1) runs for CASES: fewer
# reported means the run stopped early and the report is incomplete.
EXPECTED_CASES = 301 + len(DEFLATE_CASES)

OPEN_TIMEOUT = 10    # seconds: each opening handshake
START_TIMEOUT = 30   # for the fuzzing server to accept TCP
CASE_TIMEOUT = 60    # for one case to run to its close; the slowest takes about 2
RUN_TIMEOUT = 600    # for all of them; the run takes about 85
STOP_TIMEOUT = 10    # for the fuzzing server to exit once told to


def compression_for(case_id: str) -> Any:
    """What the client offers for a case: 13.* accept only offers that allow
    client_no_context_takeover and client_max_window_bits (13.2, 13.3...),
    and the other cases run with context takeover, the client's default."""
    from gaman_sync import Deflate
    if case_id.startswith("13."):
        return Deflate(client_no_context_takeover=True, client_max_window_bits=15, min_size=0)
    return Deflate(client_max_window_bits=15, min_size=0)


def open_client(url: str, compression: Any = "deflate"
                ) -> Tuple[Any, Tuple[Type[BaseException], ...]]:
    """The client under test, connected to ``url``, and the exceptions that
    mean its connection is closed."""
    if gaman_connect is not None:
        from gaman_sync import ConnectionClosed
        return (gaman_connect(url, max_message_size=MAX_MESSAGE_SIZE, ping_interval=None,
                              open_timeout=OPEN_TIMEOUT, compression=compression),
                (ConnectionClosed,))
    # The stand-in: the same iteration, recv(timeout=...) and ConnectionClosed.
    from websockets.exceptions import ConnectionClosed as StandInClosed
    from websockets.sync.client import connect
    options: Dict[str, Any] = dict(max_size=MAX_MESSAGE_SIZE, compression=None,
                                   ping_interval=None, open_timeout=OPEN_TIMEOUT)
    accepted = inspect.signature(connect).parameters
    if "proxy" in accepted:   # else it may take a proxy from the environment
        options["proxy"] = None
    if "legacy" in accepted:  # 17.1+ warns unless told a connection, not a context manager
        options["legacy"] = True
    return connect(url, **options), (StandInClosed,)


def client_name() -> str:
    if gaman_connect is not None:
        return "gaman_sync.connect"
    import websockets
    return f"websockets {websockets.__version__} (stand-in for gaman_sync.connect)"


def echo_until_closed(url: str, timeout: float, compression: Any = "deflate") -> None:
    """One case: echo every message back until the server closes, or fail the
    case with ``TimeoutError`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    conn, closed = open_client(url, compression)
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"still open after {timeout} s")
            try:
                message = conn.recv(timeout=remaining)
            except closed:
                return
            try:
                conn.send(message)
            except closed:  # the server started closing: stop echoing
                return
    finally:
        conn.close()


def receive_all(url: str, timeout: float) -> List[Any]:
    """Every message the server sends on ``url`` before it closes."""
    deadline = time.monotonic() + timeout
    conn, closed = open_client(url)
    messages: List[Any] = []
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{url} still open after {timeout} s")
            try:
                messages.append(conn.recv(timeout=remaining))
            except closed:
                return messages
    finally:
        conn.close()


def free_port() -> int:
    """A port free on 127.0.0.1 now; the fuzzing server needs it up front."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# wstest's fuzzing server listens on every interface (autobahn's listenWS
# calls Twisted's listenTCP with interface ''), whatever host the spec's url
# names. This runs the same wstest, on the interpreter and packages that
# .ci/autobahn/wstest uses, with every listening socket pinned to 127.0.0.1.
LOOPBACK_WSTEST = """\
from autobahntestsuite import wstest  # first: it installs the reactor
from twisted.internet import reactor
listen_tcp = reactor.listenTCP
def listen_loopback(port, factory, backlog=50, interface=''):
    return listen_tcp(port, factory, backlog, interface or '127.0.0.1')
reactor.listenTCP = listen_loopback
wstest.run()
"""


def wstest_command(wstest: Path) -> Tuple[List[str], Dict[str, str]]:
    """``wstest`` as its wrapper runs it (the Python 2.7 that
    .ci/install-autobahn names in its stamp), listening on 127.0.0.1 only."""
    stamp = wstest.parent / ".stamp"
    try:
        python = stamp.read_text().splitlines()[0].split("=", 1)[1]
    except (OSError, IndexError) as error:
        reason = (f"{stamp.relative_to(ROOT)} names no Python ({error!r}); "
                  f"run 'bash .ci/install-autobahn'")
        if os.environ.get("CI"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    env = dict(os.environ, PYTHONPATH=str(wstest.parent), PYTHONUNBUFFERED="1")
    env.pop("PYTHONHOME", None)
    return [python, "-s", "-c", LOOPBACK_WSTEST], env


def wait_listening(port: int, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if process.poll() is not None:
            pytest.fail(f"wstest exited {process.returncode} before listening:\n{tail(log)}",
                        pytrace=False)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                pass
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"wstest not listening on 127.0.0.1:{port} after "
                            f"{START_TIMEOUT} s:\n{tail(log)}", pytrace=False)
            time.sleep(0.1)
            continue
        if process.poll() is None:  # ours, not another program's on that port
            return


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)


def run_with_timeout(what: str, step: Callable[[], Any], log: Path) -> Any:
    try:
        return step()
    except TimeoutError as error:
        pytest.fail(f"{what}: {error}\nwstest's output ends:\n{tail(log)}", pytrace=False)


@pytest.mark.timeout(RUN_TIMEOUT + START_TIMEOUT + 2 * STOP_TIMEOUT + 60)
def test_fuzzingserver_all_cases_pass(tmp_path, monkeypatch):
    wstest = wstest_or_skip()
    if gaman_connect is None:
        # websockets fails a message of more than 4096 frames with 1009 (its
        # MAX_FRAGMENTS, read once from WEBSOCKETS_MAX_FRAGMENTS), and 9.3.*
        # and 9.4.* send 4 MiB in frames of 64 B to 1 KiB; the client under
        # test has no such cap, only max_message_size.
        monkeypatch.setattr("websockets.sync.messages.MAX_FRAGMENTS", 1 << 30, raising=False)
    command, env = wstest_command(wstest)
    port = free_port()
    base = f"ws://127.0.0.1:{port}"
    report_dir = tmp_path / "reports"
    spec = tmp_path / "fuzzingserver.json"
    spec.write_text(json.dumps({
        "url": base,
        "outdir": str(report_dir),
        "cases": CASES,
        "exclude-cases": EXCLUDED,
        "exclude-agent-cases": {},
    }))

    log = tmp_path / "wstest.log"
    started = time.monotonic()
    with log.open("wb") as out:
        # cwd: wstest writes a default spec into the current directory when it
        # cannot find the one it is given. -u 0: no web server for the reports.
        process = subprocess.Popen([*command, "-m", "fuzzingserver", "-s", str(spec), "-u", "0"],
                                   cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT)
        try:
            wait_listening(port, process, log)

            count_messages = run_with_timeout(
                "getCaseCount", lambda: receive_all(f"{base}/getCaseCount", CASE_TIMEOUT), log)
            assert len(count_messages) == 1, f"getCaseCount sent {count_messages!r}"
            count = json.loads(count_messages[0])
            assert count == EXPECTED_CASES, (
                f"the fuzzing server runs {count} cases, {EXPECTED_CASES} expected:\n{tail(log)}")

            run_deadline = started + RUN_TIMEOUT
            errors: List[Tuple[int, str]] = []  # (case number, what the client raised)
            for case in range(1, count + 1):
                remaining = run_deadline - time.monotonic()
                if remaining <= 0:
                    pytest.fail(f"{case - 1} of {count} cases run in {RUN_TIMEOUT} s "
                                f"with {client_name()}:\n{tail(log)}", pytrace=False)
                if process.poll() is not None:
                    pytest.fail(f"wstest exited {process.returncode} after {case - 1} of "
                                f"{count} cases:\n{tail(log)}", pytrace=False)
                url = f"{base}/runCase?case={case}&agent={AGENT}"
                (info,) = receive_all(f"{base}/getCaseInfo?case={case}", CASE_TIMEOUT)
                try:
                    echo_until_closed(url, min(CASE_TIMEOUT, remaining),
                                      compression_for(json.loads(info)["id"]))
                except Exception as error:  # a client that breaks on fuzzed input
                    errors.append((case, repr(error)))

            run_with_timeout(
                "updateReports",
                lambda: receive_all(f"{base}/updateReports?agent={AGENT}", CASE_TIMEOUT), log)
            elapsed = time.monotonic() - started
        finally:
            stop(process)

    index = json.loads((report_dir / "index.json").read_text())
    cases = index.get(AGENT, {})
    assert len(cases) == EXPECTED_CASES, (
        f"{len(cases)} cases reported, {EXPECTED_CASES} expected:\n{tail(log)}")

    # Strict: NON-STRICT is not a pass, and INFORMATIONAL (for behavior as for
    # behaviorClose) only from the cases that always say so.
    ordered = sorted(cases.items(), key=lambda item: case_key(item[0]))
    failing: List[str] = []
    for case_id, summary in ordered:
        allowed = {"OK", "INFORMATIONAL"} if case_id in INFORMATIONAL else {"OK"}
        if summary.get("behavior") not in allowed or summary.get("behaviorClose") not in allowed:
            failing.append(describe(case_id, summary, report_dir))
    # What the client raised other than ConnectionClosed, by case id: the
    # server numbers its cases in that same order.
    raised = [f"{ordered[case - 1][0]} (#{case}): {error}" for case, error in errors]
    if failing or raised:
        pytest.fail(f"with {client_name()}, in {elapsed:.0f} s: {len(failing)} of {len(cases)} "
                    f"Autobahn cases not OK (reports in {report_dir}):\n" + "\n".join(failing)
                    + (f"\nthe client raised in {len(raised)} cases:\n" + "\n".join(raised)
                       if raised else ""), pytrace=False)
