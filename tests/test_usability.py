"""Issue 9, "What a new user hits": one test per item, each failing before
the fix, on real sockets on 127.0.0.1 (port 0).

The clients are the raw peer of :mod:`gaman_sync.testing.raw`. Programs that
must exit, or be signalled, run in a subprocess with the package under test
(the one this file imports).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, List, Optional

import pytest

import gaman_sync
from gaman_sync import ConnectionClosed, WebSocketServer, define_block
from gaman_sync.testing.raw import BINARY, CLOSE, TEXT, Frame, RawPeer, frame, parse_close

from .conftest import WAIT

# The checkout: examples/ and README.rst are there (the package under test
# may be installed elsewhere: .ci/test-installed).
ROOT = Path(__file__).resolve().parent.parent
PACKAGE = Path(gaman_sync.__file__).resolve().parent
PYTHON = sys.executable


def _connect(port: int, path: str = "/") -> RawPeer:
    return RawPeer.open("127.0.0.1", port, path, timeout=WAIT)


def _wait(predicate, timeout: float = WAIT, what: str = "a condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _frames_until_close(peer: RawPeer, timeout: float = WAIT) -> List[Frame]:
    """Every frame up to and including the endpoint's close frame, answering
    pings and echoing the close (unless the peer's ``answer_close`` is off)."""
    frames: List[Frame] = []
    peer.read_until(lambda: any(f.opcode == CLOSE for f in frames), frames.append, timeout)
    return frames


def _data(got: List[tuple]):
    """An ``on_frame`` that appends each frame to ``got`` as (opcode, payload)."""
    return lambda f: got.append((f.opcode, f.payload))


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


def test_serious_1_clients_holds_only_open_connections(make_server):
    """A connection leaves ``clients`` the moment its close starts (here a
    ``close(4000)`` the peer never answers); a loop over ``clients`` then
    reaches every open client, and ``broadcast`` agrees with ``clients``.
    A client that starts closing *during* a loop makes its ``send`` raise
    ConnectionClosed (the documented decision); ``broadcast`` never raises."""
    conns = {}

    def handler(ctx):
        conns[ctx.id] = ctx
        return {}

    server = make_server(define_block("/", handler))
    view = server.blocks[0]
    clients = [_connect(server.port, "/") for _ in range(3)]
    try:
        _wait(lambda: len(view.clients) == 3, what="three clients")
        _first, middle, _last = sorted(conns)
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
            client.read_until(lambda: len(got) >= 2, _data(got))  # noqa: B023 (called now)
            assert got == [(TEXT, b"to the open ones"), (TEXT, b"broadcast")]
    finally:
        for client in clients:
            client.close()


def test_serious_2_a_client_closed_by_its_handler_receives_no_broadcast(make_server):
    """A handler that checks a token (0.1 s) and refuses with 4001: the
    broadcasts sent meanwhile never reach that client."""
    def handler(ctx):
        time.sleep(0.1)
        ctx.close(4001, "bad token")
        return {}

    server = make_server(define_block("/", handler))
    client = RawPeer.start("127.0.0.1", server.port, "/", timeout=WAIT, name="refused")
    try:
        deadline = time.monotonic() + 0.4
        while time.monotonic() < deadline:  # broadcasts all through the handler
            server.broadcast("for authenticated clients")
            time.sleep(0.01)
        client.finish_handshake()
        client.answer_close = False
        frames = _frames_until_close(client)
        assert [f.opcode for f in frames] == [CLOSE], frames
        assert parse_close(frames[-1].payload) == (4001, "bad token")
    finally:
        client.close()


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
    built = any(PACKAGE.glob("_speedups*.so"))
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
    with pytest.raises(TypeError, match=r"ping_interval.*seconds"):
        WebSocketServer(block, port=0, ping_interval="5")
    with pytest.raises(TypeError, match=r"max_message_size.*int"):
        WebSocketServer(block, port=0, max_message_size=2.5)


def test_errors_2a_close_with_a_bytes_reason_is_a_clear_type_error(make_server):
    errors: List[BaseException] = []

    def handler(ctx):
        def on_open():
            try:
                ctx.close(1000, b"x")
            except Exception as exc:
                errors.append(exc)
            ctx.close(1000, "done")
        return {"on_open": on_open}

    server = make_server(define_block("/", handler))
    client = _connect(server.port, "/")
    try:
        _frames_until_close(client)
    finally:
        client.close()
    assert len(errors) == 1 and isinstance(errors[0], TypeError), errors
    assert "reason" in str(errors[0]) and "str" in str(errors[0])


def test_errors_2b_broadcast_excludes_a_connection_by_id(make_server):
    errors: List[BaseException] = []

    def handler(ctx):
        def on_message(message):
            try:
                ctx.server.broadcast(message, exclude=ctx.id)
            except Exception as exc:
                errors.append(exc)
                ctx.server.broadcast("failed")
        return {"on_message": on_message}

    server = make_server(define_block("/", handler))
    sender = _connect(server.port, "/")
    other = _connect(server.port, "/")
    try:
        _wait(lambda: len(server.clients) == 2, what="two clients")
        sender.send_text("hello")
        got: List[tuple] = []
        other.read_until(lambda: bool(got), _data(got))
        assert got == [(TEXT, b"hello")]
        sender.send_close(1000)
        frames = _frames_until_close(sender)
        assert [f.opcode for f in frames] == [CLOSE]  # the sender was excluded
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
    # One line, no usage block: the error is all a user needs to read.
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("gaman-sync: error: "), result.stderr
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
        client = _connect(port, "/")
        time.sleep(0.2)                  # the loop runs meanwhile
        proc.send_signal(signal.SIGTERM)
        frames = _frames_until_close(client)
        assert parse_close(frames[-1].payload)[0] == 1001
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
        client = _connect(port, "/")
        proc.stdin.write("go\n")
        proc.stdin.flush()
        frames: List[Frame] = []
        client.read_to_eof(frames.append)
        closes = [parse_close(f.payload) for f in frames if f.opcode == CLOSE]
        assert closes and closes[0][0] == 1001, (frames, proc.stderr.read())
        code, _, err = _finish(proc)
        assert code == 0, err
    finally:
        if client is not None:
            client.close()
        proc.kill()
        _finish(proc)


def test_embedding_3a_shutdown_timeout_is_an_option_and_on_close_still_runs():
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
    stuck = _connect(server.port, "/")
    idle = _connect(server.port, "/")
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
        client = _connect(port, "/")
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


def test_noise_1_a_user_on_error_silences_the_library_traceback(make_server, caplog):
    caplog.set_level(logging.DEBUG, logger="gaman_sync")
    errors: List[BaseException] = []

    def handler(ctx):
        def on_message(message):
            raise ValueError("bad input")
        return {"on_message": on_message, "on_error": errors.append}

    server = make_server(define_block("/", handler))
    client = _connect(server.port, "/")
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


def test_noise_2_messages_after_our_close_are_not_delivered(make_server, caplog):
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

    server = make_server(define_block("/", handler))
    client = _connect(server.port, "/")
    try:
        client.send(frame(TEXT, b"boom") + frame(TEXT, b"after"))
        frames = _frames_until_close(client)
        assert parse_close(frames[-1].payload)[0] == 1011
    finally:
        client.close()
    _wait(lambda: not server.clients, what="the connection to end")
    assert delivered == ["boom"]
    errors = [r for r in _records(caplog) if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]


def test_noise_3_debug_lines_for_open_and_close_and_info_stays_quiet(make_server, caplog):
    caplog.set_level(logging.DEBUG, logger="gaman_sync")
    server = make_server(define_block("/room", lambda ctx: {}))
    caplog.clear()
    client = _connect(server.port, "/room")
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


def test_noise_4_the_basic_example_handles_binary_messages(make_server):
    from examples import basic

    server = make_server(basic.block)
    client = _connect(server.port, "/")
    try:
        client.send_frame(BINARY, b"\x00\xff")
        client.send_text("hi")
        got: List[tuple] = []
        client.read_until(lambda: len(got) >= 2, _data(got))
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


def test_cli_health_path_answers_load_balancers():
    """``--health-path /health``: a plain GET of it gets 200 on the server's
    port; a path that is not one is a usage error."""
    import http.client

    proc = subprocess.Popen([PYTHON, "-m", "gaman_sync", "examples.echo:block", "--port", "0",
                             "--log-level", "info", "--health-path", "/health"],
                            cwd=ROOT, env=_env(), stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    try:
        line = _read_line(proc.stderr, r"listening on")
        port = int(re.search(r":(\d+)", line.split("listening on", 1)[1]).group(1))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
        conn.request("GET", "/health")
        response = conn.getresponse()
        assert (response.status, response.read().strip()) == (200, b"ok")
        conn.close()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(WAIT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(WAIT)
        proc.stderr.close()
    refused = _cli("examples.echo:block", "--health-path", "health")
    assert refused.returncode == 2 and "--health-path" in refused.stderr
