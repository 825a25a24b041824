"""The public testing toolkit, tested: ``run_server``, ``TestClient`` (in
memory and over loopback), the raw peer's additions and the pytest plugin."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, List, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gaman_sync import ConnectionClosed, define_block
from gaman_sync.testing import (
    PING,
    PONG,
    TEXT,
    RawPeer,
    ReceiveTimeout,
    TestClient,
    fragmented,
    frame,
    run_server,
)

from .conftest import WAIT, Recorder
from .test_hostile import open_fds, wait_until

ROOT = Path(__file__).resolve().parent.parent


# -- A handler with a little of everything a test observes ----------------------

def make_block(log: Recorder) -> Any:
    """Echo with rules: ``close:CODE`` closes with CODE, ``boom`` raises (its
    on_error answers), ``twice:X`` answers X twice, binary comes back reversed.
    Every callback is recorded in ``log``."""

    def handler(ctx):
        def on_message(message):
            log.add("message", message)
            if isinstance(message, bytes):
                ctx.send(message[::-1])
            elif message.startswith("close:"):
                ctx.close(int(message[6:]), "asked")
            elif message == "boom":
                raise ValueError("boom")
            elif message.startswith("twice:"):
                ctx.send(message[6:])
                ctx.send(message[6:])
            else:
                ctx.send(message.upper())

        def on_error(error):
            log.add("error", repr(error))
            ctx.send(f"error: {error}")

        return {"on_open": lambda: log.add("open"), "on_message": on_message,
                "on_error": on_error,
                "on_close": lambda code, reason: log.add("close", code, reason)}

    return define_block("/rules", handler)


def answers(message: Any) -> int:
    """How many messages the block sends back for ``message``."""
    if isinstance(message, str) and message.startswith("close:"):
        return 0
    return 2 if isinstance(message, str) and message.startswith("twice:") else 1


def drive(client: TestClient, messages: List[Any]) -> List[Tuple[Any, ...]]:
    """What the client observes for ``messages``, then its own close."""
    seen: List[Tuple[Any, ...]] = []
    for message in messages:
        try:
            client.send(message)
        except ConnectionClosed as exc:
            seen.append(("send refused", exc.code))
            continue
        for _ in range(answers(message)):
            seen.append(("got", client.recv()))
        if answers(message) == 0:
            seen.append(("closed", client.expect_close()))
    client.close()
    seen.append(("final", client.expect_close()))
    return seen


messages = st.lists(st.one_of(
    st.text(max_size=20), st.binary(max_size=20),
    st.sampled_from(["boom", "close:1000", "close:4001", "close:3999"]),
    st.text(max_size=5).map(lambda s: "twice:" + s)), max_size=8)


@pytest.fixture(scope="module")
def loopback_rules():
    log = Recorder()
    with run_server(make_block(log)) as server:
        yield server, log


@settings(max_examples=60)
@given(messages)
def test_in_memory_and_loopback_clients_observe_the_same(loopback_rules, sequence):
    server, remote_log = loopback_rules
    with remote_log.cond:
        remote_log.events.clear()
    with TestClient(server, "/rules", timeout=WAIT) as client:
        over_tcp = drive(client, sequence)
    remote_log.wait_kind("close")

    local_log = Recorder()
    with TestClient.local(make_block(local_log), "/rules", timeout=WAIT) as client:
        in_memory = drive(client, sequence)
    local_log.wait_kind("close")

    assert in_memory == over_tcp
    assert local_log.events == remote_log.events  # same callbacks, same close codes


# -- TestClient's failures are clear and bounded --------------------------------

def test_expect_shows_kind_and_first_difference():
    log = Recorder()
    with TestClient.local(make_block(log), "/rules") as client:
        client.send("abcdef")
        with pytest.raises(AssertionError) as info:
            client.expect("ABCxEF")
        assert "expected text of 6: 'ABCxEF'" in str(info.value)
        assert "got text of 6: 'ABCDEF'" in str(info.value)
        assert "first difference at index 3" in str(info.value)
        client.send(b"ab")
        with pytest.raises(AssertionError, match=r"(?s)expected text of 2: 'ba'.*got binary"):
            client.expect("ba")


def test_recv_times_out_quickly_and_expect_close_checks_the_code():
    log = Recorder()
    with TestClient.local(make_block(log), "/rules", timeout=0.2) as client:
        start = time.monotonic()
        with pytest.raises(ReceiveTimeout, match=r"no message within 0\.2 s"):
            client.recv()
        assert time.monotonic() - start < 2.0
        assert client.ping(b"p", timeout=WAIT) < WAIT
        client.send("twice:x")
        client.send("close:4001")
        with pytest.raises(AssertionError, match="after 2 unread message"):
            client.expect_close(4001, timeout=WAIT)
        client.expect("x")
        client.expect("x")
        with pytest.raises(AssertionError, match="expected close code 1000, got 4001"):
            client.expect_close(1000, timeout=WAIT)
        assert client.expect_close(4001) == (4001, "asked")
        with pytest.raises(ConnectionClosed):
            client.recv()


def server_side_threads() -> set:
    return {t for t in threading.enumerate() if t.name.startswith("gaman_sync-")
            and not t.name.startswith("gaman_sync-client")}


def test_local_client_refused_by_the_handshake_leaves_nothing():
    before = server_side_threads()
    with pytest.raises(Exception, match="404"):
        TestClient.local(make_block(Recorder()), "/nowhere")
    assert wait_until(lambda: server_side_threads() <= before), server_side_threads() - before


# -- run_server ----------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts fds in /proc")
def test_run_server_leaks_no_thread_and_no_port_over_200_uses():
    block = define_block("/echo", lambda ctx: {"on_message": ctx.send})
    with run_server(block) as server:  # warm up the client runtime
        with TestClient(server, "/echo") as client:
            client.send("warm")
            client.expect("warm")
    wait_until(lambda: threading.active_count() <= 3)
    threads, fds = threading.active_count(), open_fds()
    ports = set()
    for i in range(200):
        with run_server(block) as server:
            ports.add(server.port)
            with TestClient(server, "/echo") as client:
                client.send(str(i))
                client.expect(str(i))
        with pytest.raises(ConnectionRefusedError):  # the port is closed, not just idle
            socket.create_connection(("127.0.0.1", server.port), timeout=WAIT).close()
    assert wait_until(lambda: threading.active_count() <= threads), threading.enumerate()
    assert wait_until(lambda: not open_fds() - fds), sorted(open_fds() - fds)[:20]
    assert len(ports) > 1


def test_run_server_fails_clearly_when_a_callback_never_returns():
    release = threading.Event()
    block = define_block("/", lambda ctx: {"on_message": lambda m: release.wait(WAIT)})
    try:
        with pytest.raises(AssertionError) as info:
            with run_server(block, shutdown_timeout=0.3) as server:
                client = TestClient(server)
                client.send("hang")
                time.sleep(0.1)
        text = str(info.value)
        assert "left 1 thing(s) behind" in text
        assert "thread 'gaman_sync-conn-1' is still running" in text
        assert "release.wait" in text  # where it is stuck
    finally:
        release.set()
        client.close()


# -- RawPeer: pings inside a fragmented message, chunked writes, timing -----------

def test_raw_peer_fragments_with_pings_chunked_and_timed():
    with run_server(define_block("/e", lambda ctx: {"on_message": ctx.send})) as server:
        with RawPeer.open("127.0.0.1", server.port, "/e") as peer:
            data = fragmented(TEXT, ["he", "", "llo"], [(1, frame(PING, b"a")),
                                                         (3, frame(PING, b"b"))])
            start = time.monotonic()
            peer.send_chunks(data, range(1, len(data), 3), pause=0.001)
            got = [peer.recv_timed(WAIT) for _ in range(3)]
            assert [(f.opcode, f.payload) for _, f in got] == \
                [(PONG, b"a"), (TEXT, b"hello"), (PONG, b"b")]
            times = [t for t, _ in got]
            assert start <= times[0] <= times[1] <= times[2] <= time.monotonic()
            assert peer.close_handshake(1000).close_code() == 1000


# -- The pytest plugin, in a pytest run of its own --------------------------------

PLUGIN_TESTS = '''
import threading

from gaman_sync import define_block

release = threading.Event()


def test_echo(ws_server, ws_client):
    server = ws_server(define_block("/echo", lambda ctx: {"on_message": ctx.send}))
    client = ws_client(server, "/echo")
    client.send("hi")
    client.expect("hi")
    other = ws_client(server.url("/echo"))
    other.send(b"x")
    other.expect(b"x")


def test_leaks_a_server_thread(ws_server, ws_client):
    block = define_block("/", lambda ctx: {"on_message": lambda m: release.wait(8)})
    client = ws_client(ws_server(block, shutdown_timeout=0.3))
    client.send("hang")
'''


def run_pytest(tmp_path: Path, source: str, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_user.py").write_text(textwrap.dedent(source))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *args, "test_user.py"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)


def test_plugin_fixtures_work_and_a_leaked_thread_fails_the_run(tmp_path):
    out = run_pytest(tmp_path, PLUGIN_TESTS)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "2 passed, 1 error" in out.stdout, out.stdout  # the error: its teardown
    assert "ERROR at teardown of test_leaks_a_server_thread" in out.stdout
    assert "the ws_server fixture's server" in out.stdout
    assert "thread 'gaman_sync-conn-1' is still running" in out.stdout


def test_plugin_loads_with_p_and_is_inert_unless_used(tmp_path):
    source = '''
        import sys

        def test_nothing_loaded():
            assert "gaman_sync.server" not in sys.modules
            assert "gaman_sync.client" not in sys.modules
    '''
    out = run_pytest(tmp_path, source, "-p", "no:gaman_sync", "-p", "gaman_sync.testing.plugin")
    assert out.returncode == 0, out.stdout + out.stderr
    out = run_pytest(tmp_path, source)  # through the pytest11 entry point
    assert out.returncode == 0, out.stdout + out.stderr
    out = run_pytest(tmp_path, source, "--fixtures")
    assert "ws_server" in out.stdout and "ws_client" in out.stdout


def test_the_testing_package_does_not_import_pytest():
    code = ("import sys, gaman_sync.testing as t; t.TestClient, t.run_server; "
            "import gaman_sync.testing.client, gaman_sync.testing.server; "
            "print('pytest' in sys.modules, 'hypothesis' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True, cwd=ROOT).stdout
    assert out.split() == ["False", "False"]
