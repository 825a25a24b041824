"""Every example, exercised: in process, through the CLI, and as a script."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import websockets.version
from websockets.sync.client import connect

from examples import advanced, basic, chat, echo

from .conftest import WAIT

ROOT = Path(__file__).resolve().parent.parent


def test_echo(make_server):
    server = make_server(echo.block)
    with connect(f"ws://127.0.0.1:{server.port}/echo") as ws:
        ws.send("hello")
        assert ws.recv(timeout=WAIT) == "hello"
        ws.send(b"\x01\x02")
        assert ws.recv(timeout=WAIT) == b"\x01\x02"


def chat_said(ws):
    """The next message of the chat room (examples/chat.py) that ``ws``
    receives, as (sender's name, text); who joined or left is skipped."""
    while True:
        event = json.loads(ws.recv(timeout=WAIT))
        if event["type"] == "message":
            return event["name"], event["text"]


def test_chat_clients_see_each_other(make_server):
    server = make_server(chat.block)
    address = f"ws://127.0.0.1:{server.port}/chat"
    with connect(address + "?name=alice") as alice, connect(address + "?name=bob") as bob:
        # A client that has its 101 is already in the room: no waiting.
        alice.send("hi from alice")
        assert chat_said(bob) == ("alice", "hi from alice")
        assert chat_said(alice) == ("alice", "hi from alice")
        bob.send("hi from bob")
        assert chat_said(alice) == ("bob", "hi from bob")
        assert chat_said(bob) == ("bob", "hi from bob")


def test_chat_tells_who_is_in_the_room_and_serves_its_page(make_server):
    server = make_server(chat.block)
    address = f"ws://127.0.0.1:{server.port}/chat"
    with connect(address + "?name=alice") as alice:
        me = json.loads(alice.recv(timeout=WAIT))
        assert me == {"type": "welcome", "id": me["id"], "name": "alice"}
        with connect(address) as guest:
            you = json.loads(guest.recv(timeout=WAIT))
            assert you["name"] == f"guest {you['id']}"
            names = []
            while names != ["alice", you["name"]]:  # alice's own join first, then the guest's
                names = [m["name"] for m in json.loads(alice.recv(timeout=WAIT))["members"]]
        event = json.loads(alice.recv(timeout=WAIT))
        while "joined" in event:  # alice's own join, announced after the guest's
            event = json.loads(alice.recv(timeout=WAIT))
        assert event["left"]["id"] == you["id"] and event["members"] == [
            {"id": me["id"], "name": "alice"}]
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/", timeout=WAIT) as page:
        assert page.headers["Content-Type"] == "text/html; charset=utf-8"
        assert page.read() == (ROOT / "examples" / "chat.html").read_bytes()


def test_basic_block_from_the_gamanjs_page(make_server, caplog):
    server = make_server(basic.block)
    with caplog.at_level("INFO", logger="examples.basic"):
        with connect(f"ws://127.0.0.1:{server.port}/") as ws:
            ws.send("hello")
            assert ws.recv(timeout=WAIT) == "Echo: hello"
        wait_for(lambda: any("Connection closed. Code: 1000" in r.getMessage()
                             for r in caplog.records))
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("Connected clients:") for m in messages)
    assert "Connection opened" in messages
    assert "Received message: hello" in messages


def test_advanced_block_from_the_gamanjs_page(make_server, caplog):
    server = make_server(advanced.block)
    with caplog.at_level("INFO", logger="examples.advanced"):
        with connect(f"ws://127.0.0.1:{server.port}/") as ws:
            ws.send("ping")
            assert ws.recv(timeout=WAIT) == "pong"
            ws.send("anything")
            assert ws.recv(timeout=WAIT) == "Unknown message"
            ws.pong(b"hb")
            wait_for(lambda: any("Pong received: b'hb'" in r.getMessage()
                                 for r in caplog.records))


def wait_for(predicate, timeout=WAIT):
    """Poll a condition that no event announces (log records, client counts)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("command, stop", [
    ([sys.executable, "-m", "gaman_sync", "examples.chat:block", "--port", "0"], signal.SIGINT),
    ([sys.executable, "examples/chat.py"], signal.SIGTERM),
], ids=["python -m gaman_sync, Ctrl-C", "python examples/chat.py, SIGTERM"])
def test_chat_runs_from_the_command_line(command, stop):
    env = dict(os.environ, PORT="0", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = read_port(proc)
        address = f"ws://127.0.0.1:{port}/chat"
        with connect(address) as alice, connect(address) as bob:
            alice.send("across processes")
            assert chat_said(bob)[1] == "across processes"
        proc.send_signal(stop)  # either shuts it down cleanly
        _, err = proc.communicate(timeout=WAIT)
        assert proc.returncode == 0
        assert "shut down" in err
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def read_port(proc):
    """The port from the 'listening on' log line (the server picked it)."""
    lines = []
    result = {}

    def reader():
        for line in proc.stderr:
            lines.append(line)
            match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
            if match:
                result["port"] = int(match.group(1))
                return

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    thread.join(WAIT)
    assert "port" in result, f"no 'listening on' line; stderr so far: {lines!r}"
    return result["port"]


def test_cli_help_and_bad_target():
    out = subprocess.run([sys.executable, "-m", "gaman_sync", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=WAIT)
    assert out.returncode == 0 and "MODULE:BLOCK" in out.stdout
    out = subprocess.run([sys.executable, "-m", "gaman_sync", "examples.chat:nothing"],
                         cwd=ROOT, capture_output=True, text=True, timeout=WAIT)
    assert out.returncode == 2 and "cannot load" in out.stderr


def test_command_line_client_sends_lines_and_prints_answers(make_server):
    """examples/client.py in a subprocess against an echo server: each line
    of stdin goes out, each answer is printed, EOF closes with 1000; no URL
    is a usage error."""
    import queue

    from gaman_sync import define_block

    from .conftest import Recorder

    closes = Recorder()
    block = define_block("/echo", lambda ctx: {
        "on_message": ctx.send,
        "on_close": lambda code, reason: closes.add("close", code, reason)})
    server = make_server(block)

    out = subprocess.run([sys.executable, "examples/client.py"], cwd=ROOT, stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=WAIT)
    assert out.returncode == 2 and "usage:" in out.stderr and "url" in out.stderr
    assert "Traceback" not in out.stderr

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "examples/client.py",
                             f"ws://127.0.0.1:{server.port}/echo"],
                            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, encoding="utf-8")
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout],
                              daemon=True)
    reader.start()
    try:
        for sent in ["hello", "second line", "ünïcode ✓"]:
            proc.stdin.write(sent + "\n")
            proc.stdin.flush()
            assert lines.get(timeout=WAIT) == sent + "\n"
        proc.stdin.close()  # EOF: the client closes with 1000 and exits
        assert proc.wait(timeout=WAIT) == 0
        reader.join(WAIT)
        assert lines.empty()
        err = proc.stderr.read()
        assert "Traceback" not in err, err
        assert closes.wait_kind("close")[0][1] == 1000
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)
        reader.join(WAIT)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()


def test_legacy_loop_broadcasts_readings_and_stops_on_ctrl_c():
    """examples/legacy_loop.py in a subprocess: its blocking loop's readings
    reach a client; a real SIGINT makes it exit 0, the client closed with 1001."""
    import json
    import queue

    from gaman_sync import ConnectionClosed
    from gaman_sync.testing import TestClient

    env = dict(os.environ, PORT="0", INTERVAL="0.05", PYTHONUNBUFFERED="1")
    # SIGINT to its default in the child: Python raises KeyboardInterrupt only
    # if it was not ignored at startup, and a job started in the background
    # (`.ci/run &`) passes SIGINT on ignored.
    proc = subprocess.Popen([sys.executable, "examples/legacy_loop.py"], cwd=ROOT, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout],
                         daemon=True).start()
        first = lines.get(timeout=WAIT)
        match = re.fullmatch(r"listening on port (\d+)\n", first)
        assert match, f"unexpected first line: {first!r}"
        with TestClient(f"ws://127.0.0.1:{match.group(1)}/readings", timeout=WAIT) as client:
            readings = [json.loads(client.recv()) for _ in range(2)]
            assert readings[1]["count"] == readings[0]["count"] + 1
            assert readings[0]["time"] <= readings[1]["time"]
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=WAIT)
            assert proc.returncode == 0, err
            assert "Traceback" not in err
            while True:  # the readings sent before the close, then the close
                try:
                    json.loads(client.recv())
                except ConnectionClosed:
                    break
            client.expect_close(1001)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_redirect_example_follows_the_old_path(make_server):
    """examples/redirect.py: /chat/:room is redirected (308) to /rooms/:room
    with the room and the query; our client follows and reports each hop."""
    from examples import redirect
    from gaman_sync import InvalidStatus
    from gaman_sync import connect as our_connect

    server = make_server(redirect.blocks)
    base = f"ws://127.0.0.1:{server.port}"
    with pytest.raises(InvalidStatus) as info:
        our_connect(base + "/chat/hall?x=1", follow_redirects=False, open_timeout=WAIT)
    assert info.value.status == 308
    assert info.value.headers.get("location") == "/rooms/hall?x=1"
    hops = []
    with our_connect(base + "/chat/hall?x=1", open_timeout=WAIT,
                     on_redirect=lambda url, request: hops.append((url, request.target))) as ws:
        assert ws.url == base + "/rooms/hall?x=1"
        assert ws.recv(timeout=WAIT) == "welcome to hall"
        ws.send("echo")
        assert ws.recv(timeout=WAIT) == "echo"
    assert hops == [(base + "/rooms/hall?x=1", "/rooms/hall?x=1")]
    if int(websockets.version.version.split(".")[0]) < 17:
        pytest.skip("websockets' sync client follows redirects from websockets 17 on "
                    "(Python 3.11 and later)")
    with connect(base + "/chat/porch") as ws:  # websockets' client follows it too
        assert ws.recv(timeout=WAIT) == "welcome to porch"


def test_redirect_example_runs_as_a_script():
    out = subprocess.run([sys.executable, "examples/redirect.py"], cwd=ROOT,
                         capture_output=True, text=True, timeout=WAIT)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    match = re.fullmatch(r"connecting to (ws://127\.0\.0\.1:\d+)/chat/kitchen\?lang=en", lines[0])
    assert match, lines
    base = match.group(1)
    assert lines[1:] == [f"redirected to {base}/rooms/kitchen?lang=en "
                         "(GET /rooms/kitchen?lang=en)",
                         f"connected to {base}/rooms/kitchen?lang=en",
                         "welcome to kitchen"]
    assert "Traceback" not in out.stderr
    assert "redirected /chat/kitchen?lang=en to" in out.stderr  # the server's on_redirect


def test_auth_example_refuses_without_a_token_and_names_the_user(make_server):
    """examples/auth.py: 401 without a valid token (both clients); with one,
    in the query or a header, the user's name is on ctx."""
    from websockets.exceptions import InvalidStatus as WsInvalidStatus

    from examples import auth
    from gaman_sync import InvalidStatus
    from gaman_sync import connect as our_connect

    server = make_server(auth.block)
    url = f"ws://127.0.0.1:{server.port}/private"
    for target, headers in [(url, None), (url + "?token=nope", None),
                            (url, {"Authorization": "Bearer nope"}),
                            (url, {"Authorization": "Basic alice-secret"})]:
        with pytest.raises(InvalidStatus) as info:
            our_connect(target, headers=headers, open_timeout=WAIT)
        assert info.value.status == 401
        assert info.value.headers.get("www-authenticate") == 'Bearer realm="private"'
        with pytest.raises(WsInvalidStatus) as ws_info:
            connect(target, additional_headers=headers)
        assert ws_info.value.response.status_code == 401
    assert server.clients == []  # the handler never ran

    with our_connect(url + "?token=alice-secret", open_timeout=WAIT) as ws:
        assert ws.recv(timeout=WAIT) == "hello alice"
        ws.send("hi")
        assert ws.recv(timeout=WAIT) == "alice: hi"
        assert [ctx.user for ctx in server.clients] == ["alice"]
    with connect(url, additional_headers={"Authorization": "Bearer bob-secret"}) as ws:
        assert ws.recv(timeout=WAIT) == "hello bob"


def test_auth_example_runs_as_a_script():
    out = subprocess.run([sys.executable, "examples/auth.py"], cwd=ROOT,
                         capture_output=True, text=True, timeout=WAIT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        'without a token: 401 (Bearer realm="private")',
        "with a token in the query: hello alice",
        "with a token in a header: hello bob",
        "bob: hi",
    ]
    assert "Traceback" not in out.stderr
