"""Behaviour a review found wrong once: each test failed before its fix."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosedError
from websockets.sync.client import connect

from examples import chat
from gaman_sync import ReadyState, WebSocketServer, define_block

from .conftest import WAIT, Recorder

ROOT = Path(__file__).resolve().parent.parent


def test_a_client_that_has_its_101_gets_the_next_broadcast(make_server):
    """The 101 goes out only once the connection is in its block's clients."""
    server = make_server(chat.block)
    url = f"ws://127.0.0.1:{server.port}/chat"

    def said(ws):  # the room's next message, past who joined or left
        while True:
            event = json.loads(ws.recv(timeout=WAIT))
            if event["type"] == "message":
                return event["text"]

    for i in range(200):
        with connect(url) as alice, connect(url) as bob:
            alice.send(f"m{i}")
            assert said(alice) == f"m{i}"
            assert said(bob) == f"m{i}"


def test_a_connection_joins_clients_once_its_handler_returned(make_server):
    """The handler runs before the 101 (CONNECTING) and sees the others;
    on_open runs after it, with the connection among the clients."""
    seen = Recorder()

    def handler(ctx):
        seen.add("handler", ctx in ctx.server.clients, ctx.ready_state)
        return {"on_open": lambda: seen.add("open", ctx in ctx.server.clients, ctx.ready_state)}

    server = make_server(define_block("/", handler))
    with connect(f"ws://127.0.0.1:{server.port}/"):
        assert seen.wait_kind("open") == [("handler", False, ReadyState.CONNECTING),
                                          ("open", True, ReadyState.OPEN)]


def test_async_functions_are_refused_clearly(make_server):
    async def handler(ctx):
        return {}

    with pytest.raises(TypeError, match="async"):
        define_block("/", handler)

    async def on_message(message):
        pass

    server = make_server(define_block("/", lambda ctx: {"on_message": on_message}))
    with connect(f"ws://127.0.0.1:{server.port}/") as ws:
        with pytest.raises(ConnectionClosedError):  # the handler's 1011
            ws.recv(timeout=WAIT)
        assert ws.close_code == 1011


@pytest.mark.parametrize("work", [0.6, 1.0, 1.4])
def test_a_slow_callback_does_not_make_keepalive_drop_a_live_peer(make_server, work):
    """The work takes longer than ping_timeout and ends about when the
    keepalive judges the peer again (every 0.4 s once the thread is seen
    busy): the pong, unread meanwhile, is read then and counts, even when
    the judging comes while the thread's first read is still returning."""
    done = Recorder()

    def handler(ctx):
        def on_message(message):
            time.sleep(work)  # the work itself: longer than ping_timeout
            ctx.send("done")
        return {"on_message": on_message, "on_close": lambda c, r: done.add("close", c)}

    server = make_server(define_block("/", handler), ping_interval=0.2, ping_timeout=0.4)
    with connect(f"ws://127.0.0.1:{server.port}/", ping_interval=None) as ws:
        ws.send("work")
        assert ws.recv(timeout=WAIT) == "done"
        ws.send("more work")
        assert ws.recv(timeout=WAIT) == "done"
    assert done.wait_kind("close")[-1][1] == 1000


def test_a_stopped_server_cannot_be_restarted_and_still_describes_itself():
    server = WebSocketServer(define_block("/", lambda ctx: None), port=0).start()
    port = server.port
    server.shutdown(timeout=WAIT)
    assert server.port == port and str(port) in repr(server)
    with pytest.raises(RuntimeError, match="shut down"):
        server.start()


def test_a_peer_gone_with_data_queued_does_not_raise_sigpipe():
    """A program that restored SIGPIPE's default action must survive writes
    to a connection we already shut down."""
    script = textwrap.dedent("""
        import signal, socket, sys
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        from gaman_sync import WebSocketServer, define_block
        from tests.conftest import Recorder
        rec = Recorder()
        server = WebSocketServer(define_block("/", lambda ctx: {
            "on_open": lambda: rec.add("open", ctx),
            "on_close": lambda c, r: rec.add("close", c)}), port=0).start()
        s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(b"GET / HTTP/1.1\\r\\nHost: x\\r\\nUpgrade: websocket\\r\\n"
                  b"Connection: Upgrade\\r\\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\\r\\n"
                  b"Sec-WebSocket-Version: 13\\r\\n\\r\\n")
        ctx = rec.wait_kind("open")[0][1]
        while ctx.buffered_amount == 0:
            ctx.send(b"x" * 100_000)
        ctx.terminate()
        rec.wait_kind("close")
        server.shutdown(timeout=5)
        print("survived")
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert "survived" in out.stdout


def test_cli_reports_a_port_in_use_without_a_traceback():
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        out = subprocess.run([sys.executable, "-m", "gaman_sync", "examples.chat:block",
                              "--port", str(taken.getsockname()[1])], cwd=ROOT,
                             capture_output=True, text=True, timeout=WAIT,
                             stdin=subprocess.DEVNULL)
    finally:
        taken.close()
    assert out.returncode == 2
    assert "cannot listen" in out.stderr and "Traceback" not in out.stderr


def test_second_shutdown_waits_for_the_first(make_server):
    """``with server:`` must not return while another thread's shutdown runs."""
    release = threading.Event()
    closed = Recorder()

    def handler(ctx):
        def on_close(code, reason):
            release.wait(WAIT)  # a slow on_close keeps the first shutdown busy
            closed.add("close", code)
        return {"on_close": on_close}

    server = make_server(define_block("/", handler))
    with connect(f"ws://127.0.0.1:{server.port}/"):
        first = threading.Thread(target=server.shutdown, args=(WAIT,))
        first.start()
        timer = threading.Timer(0.5, release.set)
        timer.start()
        server.shutdown(0.1)  # returns only when the first one is done
        assert closed.kinds() == ["close"]
        first.join(WAIT)
        timer.join(WAIT)


def test_socket_setdefaulttimeout_does_not_reach_connections(make_server):
    """The accept thread reads handshakes without changing a socket's mode; a
    program-wide default timeout must still not make idle connections fail."""
    from gaman_sync.testing import TEXT, RawPeer

    closed = Recorder()
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(0.2)
    try:
        server = make_server(define_block("/echo", lambda ctx: {
            "on_message": ctx.send, "on_close": lambda code, reason: closed.add("close", code)}))
        with RawPeer.open("127.0.0.1", server.port, "/echo", timeout=WAIT) as client:
            time.sleep(0.6)  # idle for three default timeouts: nothing may happen
            client.send_frame(TEXT, "still here")
            assert client.recv_frame().payload == b"still here"
            assert closed.kinds() == []
    finally:
        socket.setdefaulttimeout(previous)
