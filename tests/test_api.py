"""The user contract on real sockets: every callback, every ctx and server method."""

from __future__ import annotations

import logging
import socket
import threading

import pytest
from websockets.exceptions import ConnectionClosed as ClientClosed
from websockets.sync.client import connect

from gaman_sync import ConnectionClosed, ReadyState, WebSocketHandler, WebSocketServer, define_block
from gaman_sync import connect as gaman_connect

from .conftest import WAIT, Recorder


def url(server, path="/"):
    return f"ws://127.0.0.1:{server.port}{path}"


def recording_block(path="/", recorder=None, **extra):
    """A block whose callbacks record everything; extra callbacks override."""
    rec = recorder if recorder is not None else Recorder()
    contexts = []

    def handler(ctx):
        contexts.append(ctx)
        rec.add("handler", ctx.ready_state)
        callbacks = {
            "on_open": lambda: rec.add("open", ctx.ready_state, ctx in ctx.server.clients),
            "on_message": lambda m: rec.add("message", m),
            "on_close": lambda code, reason: rec.add("close", code, reason, ctx.ready_state,
                                                     ctx in ctx.server.clients),
            "on_pong": lambda data: rec.add("pong", data),
            "on_error": lambda exc: rec.add("error", exc),
        }
        callbacks.update({k: (v(ctx) if callable(v) else v) for k, v in extra.items()})
        return callbacks

    return define_block(path, handler), rec, contexts


# -- Lifecycle and callbacks -------------------------------------------------

def test_open_message_close_in_order(make_server):
    block, rec, ctxs = recording_block()
    server = make_server(block)
    with connect(url(server)) as ws:
        ws.send("text")
        ws.send(b"\x00binary")
        rec.wait_kind("message", 2)
    events = rec.wait_kind("close")
    assert [e[0] for e in events] == ["handler", "open", "message", "message", "close"]
    assert events[0][1] is ReadyState.CONNECTING  # the 101 goes out once it returned
    assert events[1] == ("open", ReadyState.OPEN, True)  # in clients before on_open
    assert events[2] == ("message", "text") and type(events[2][1]) is str
    assert events[3] == ("message", b"\x00binary") and type(events[3][1]) is bytes
    assert events[4] == ("close", 1000, "", ReadyState.CLOSED, False)  # out before on_close
    assert ctxs[0].ready_state is ReadyState.CLOSED


@pytest.mark.parametrize("code, reason", [(1000, "bye"), (4001, "custom"), (1001, "")])
def test_client_close_code_and_reason_reach_on_close(make_server, code, reason):
    block, rec, _ = recording_block()
    server = make_server(block)
    with connect(url(server)) as ws:
        rec.wait_kind("open")
        ws.close(code, reason)
        assert ws.close_code == code  # the server echoed the code
    assert rec.wait_kind("close")[-1][1:3] == (code, reason)


def test_close_without_code_is_1005(make_server):
    block, rec, _ = recording_block()
    server = make_server(block)
    sock = raw_handshake(server)
    sock.sendall(bytes([0x88, 0x80]) + b"\x00\x00\x00\x00")  # masked empty close
    reply = recv_exactly(sock, 2)
    assert reply == b"\x88\x00"  # answered with an empty close: 1005 never goes on the wire
    assert rec.wait_kind("close")[-1][1] == 1005
    sock.close()


def test_dropped_tcp_is_1006(make_server):
    block, rec, _ = recording_block()
    server = make_server(block)
    sock = raw_handshake(server)
    rec.wait_kind("open")
    sock.close()
    assert rec.wait_kind("close")[-1][1:3] == (1006, "")


def test_server_close_code_reaches_client_and_on_close(make_server):
    block, rec, ctxs = recording_block()
    server = make_server(block)
    with connect(url(server)) as ws:
        rec.wait_kind("open")
        ctxs[0].close(4000, "done")
        assert ctxs[0].ready_state in (ReadyState.CLOSING, ReadyState.CLOSED)
        with pytest.raises(ClientClosed):
            ws.recv(timeout=WAIT)
        assert (ws.close_code, ws.close_reason) == (4000, "done")
    assert rec.wait_kind("close")[-1][1:3] == (4000, "done")
    with pytest.raises(ConnectionClosed) as info:
        ctxs[0].send("too late")
    assert info.value.code == 4000


def test_close_twice_is_harmless_and_bad_codes_are_refused(make_server):
    block, rec, ctxs = recording_block()
    server = make_server(block)
    with connect(url(server)) as ws:
        rec.wait_kind("open")
        for bad in (999, 1005, 1006, 1015, 2000, 5000):
            with pytest.raises(ValueError):
                ctxs[0].close(bad)
        ctxs[0].close(1000)
        ctxs[0].close(4000)  # already closing: nothing more is sent
        with pytest.raises(ClientClosed):
            ws.recv(timeout=WAIT)
        assert ws.close_code == 1000
    assert [e[1] for e in rec.wait_kind("close") if e[0] == "close"] == [1000]


def test_terminate_drops_tcp_and_reports_1006(make_server):
    block, rec, ctxs = recording_block()
    server = make_server(block)
    sock = raw_handshake(server)
    rec.wait_kind("open")
    ctxs[0].terminate()
    sock.settimeout(WAIT)
    assert sock.recv(10) == b""  # no close frame, just the end of the stream
    assert rec.wait_kind("close")[-1][1] == 1006
    sock.close()


def test_shutdown_reports_1001(make_server):
    block, rec, _ = recording_block()
    server = make_server(block)
    with connect(url(server)) as ws:
        rec.wait_kind("open")
        server.shutdown(timeout=WAIT)
        with pytest.raises(ClientClosed):
            ws.recv(timeout=WAIT)
        assert ws.close_code == 1001
    assert rec.wait_kind("close")[-1][1] == 1001


def test_ping_and_pong(make_server):
    block, rec, ctxs = recording_block()
    server = make_server(block)
    with connect(url(server)) as ws:
        rec.wait_kind("open")
        ctxs[0].ping(b"abc")  # the client answers: on_pong gets the payload
        rec.wait_kind("pong")
        assert ws.ping(b"from client").wait(WAIT)  # server answers pings by itself
        ws.pong(b"unsolicited")
        events = rec.wait_kind("pong", 2)
        with pytest.raises(ValueError):
            ctxs[0].ping(b"x" * 126)
    assert [e[1] for e in events if e[0] == "pong"] == [b"abc", b"unsolicited"]


# -- Errors in user code --------------------------------------------------------

def test_callback_error_goes_to_on_error_and_connection_stays_open(make_server, caplog):
    def on_message(ctx):
        def handle(message):
            if message == "boom":
                raise RuntimeError("boom")
            ctx.send(message)
        return handle

    block, rec, _ = recording_block(on_message=on_message)
    server = make_server(block)
    with caplog.at_level(logging.ERROR, logger="gaman_sync"):
        with connect(url(server)) as ws:
            ws.send("boom")
            ws.send("still here")
            assert ws.recv(timeout=WAIT) == "still here"
    errors = [e[1] for e in rec.wait_kind("close") if e[0] == "error"]
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError)
    # on_error handled it: the library does not report it a second time.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_failing_on_error_closes_with_1011(make_server):
    def on_message(ctx):
        def handle(message):
            raise ValueError("first")
        return handle

    def on_error(ctx):
        def handle(exc):
            raise RuntimeError("second")
        return handle

    block, rec, _ = recording_block(on_message=on_message, on_error=on_error)
    server = make_server(block)
    with connect(url(server)) as ws:
        ws.send("x")
        with pytest.raises(ClientClosed):
            ws.recv(timeout=WAIT)
        assert ws.close_code == 1011
    assert rec.wait_kind("close")[-1][1] == 1011


def test_error_without_on_error_keeps_connection_open(make_server):
    def handler(ctx):
        def on_message(message):
            if message == "boom":
                raise KeyError(message)
            ctx.send(message)
        return {"on_message": on_message}

    server = make_server(define_block("/", handler))
    with connect(url(server)) as ws:
        ws.send("boom")
        ws.send("ok")
        assert ws.recv(timeout=WAIT) == "ok"


@pytest.mark.parametrize("result", ["raise", "not callbacks", "unknown key"])
def test_bad_handler_closes_with_1011_and_server_lives(make_server, result):
    def handler(ctx):
        if result == "raise":
            raise RuntimeError("handler failed")
        if result == "not callbacks":
            return 42
        return {"on_mesage": print}

    server = make_server([define_block("/bad", handler),
                          define_block("/echo", lambda ctx: {"on_message": ctx.send})])
    with connect(url(server, "/bad")) as ws:
        with pytest.raises(ClientClosed):
            ws.recv(timeout=WAIT)
        assert ws.close_code == 1011
    with connect(url(server, "/echo")) as ws:
        ws.send("alive")
        assert ws.recv(timeout=WAIT) == "alive"


@pytest.mark.parametrize("style", ["class", "dict", "camel", "none"])
def test_handler_return_styles(make_server, style):
    got = Recorder()

    def handler(ctx):
        if style == "class":
            return WebSocketHandler(on_message=lambda m: got.add("m", m))
        if style == "dict":
            return {"on_message": lambda m: got.add("m", m)}
        if style == "camel":
            return {"onMessage": lambda m: got.add("m", m)}
        got.add("m", "none")
        return None

    server = make_server(define_block("/", handler))
    with connect(url(server)) as ws:
        ws.send("hi")
        assert got.wait_kind("m")[0][1] in ("hi", "none")


# -- Sending ------------------------------------------------------------------

def test_send_from_foreign_thread_while_callback_runs(make_server):
    in_callback = threading.Event()
    sent = threading.Event()
    contexts = []

    def handler(ctx):
        contexts.append(ctx)

        def on_message(message):
            in_callback.set()
            assert sent.wait(WAIT)  # the foreign send must not need this thread
            ctx.send("from callback")
        return {"on_message": on_message}

    server = make_server(define_block("/", handler))
    with connect(url(server)) as ws:
        ws.send("go")
        assert in_callback.wait(WAIT)
        contexts[0].send("from foreign thread")
        contexts[0].send(b"bytes too")
        sent.set()
        assert ws.recv(timeout=WAIT) == "from foreign thread"
        assert ws.recv(timeout=WAIT) == b"bytes too"
        assert ws.recv(timeout=WAIT) == "from callback"


def test_send_rejects_other_types(make_server):
    block, rec, ctxs = recording_block()
    server = make_server(block)
    with connect(url(server)):
        rec.wait_kind("open")
        with pytest.raises(TypeError):
            ctxs[0].send(123)


def test_send_after_peer_closed_raises(make_server):
    block, rec, ctxs = recording_block()
    server = make_server(block)
    with connect(url(server)):
        rec.wait_kind("open")
    rec.wait_kind("close")
    with pytest.raises(ConnectionClosed):
        ctxs[0].send("nobody there")
    with pytest.raises(ConnectionClosed):
        ctxs[0].ping()


# -- ctx attributes -----------------------------------------------------------------

def test_request_attributes_and_ids(make_server):
    block, rec, ctxs = recording_block("/room")
    server = make_server(block)
    with connect(url(server, "/room?name=ada&x=1&x=2"),
                 additional_headers={"X-Token": "secret"}) as ws1, \
            connect(url(server, "/room")) as ws2:
        rec.wait_kind("open", 2)
        ctx = ctxs[0]
        assert ctx.request.method == "GET"
        assert ctx.request.path == "/room"
        assert ctx.request.query == {"name": "ada", "x": "2"}
        assert ctx.request.query_string == "name=ada&x=1&x=2"
        assert ctx.request.headers["x-token"] == "secret"
        assert ctx.request.headers["X-TOKEN"] == "secret"
        assert ctx.request.remote_address == ws1.local_address
        assert ctx.remote_address == ws1.local_address
        assert ctx.subprotocol is None
        assert ctxs[0].id != ctxs[1].id
        assert ws2.local_address == ctxs[1].request.remote_address


def test_subprotocol_selection(make_server):
    block = define_block("/", lambda ctx: {"on_message": lambda m: ctx.send(ctx.subprotocol)},
                         subprotocols=["chat.v2", "chat.v1"])
    server = make_server(block)
    with connect(url(server), subprotocols=["chat.v1", "other"]) as ws:
        assert ws.subprotocol == "chat.v1"
        ws.send("which?")
        assert ws.recv(timeout=WAIT) == "chat.v1"
    with connect(url(server)) as ws:
        assert ws.subprotocol is None


# -- The server -------------------------------------------------------------------

def test_clients_per_block_and_broadcast(make_server):
    chat, rec_chat, chat_ctxs = recording_block("/chat")
    news, rec_news, _ = recording_block("/news")
    server = make_server([chat, news])
    with connect(url(server, "/chat")) as a, connect(url(server, "/chat")) as b, \
            connect(url(server, "/news")) as c:
        rec_chat.wait_kind("open", 2)
        rec_news.wait_kind("open")
        view = chat_ctxs[0].server
        assert view.path == "/chat"
        assert view.root is server
        assert set(view.clients) == set(chat_ctxs)
        assert len(server.clients) == 3
        assert view.port == server.port
        assert view.broadcast("to chat") == 2
        assert a.recv(timeout=WAIT) == "to chat"
        assert b.recv(timeout=WAIT) == "to chat"
        assert view.broadcast(b"not a", exclude=chat_ctxs[0]) == 1
        assert b.recv(timeout=WAIT) == b"not a"
        assert server.broadcast("everyone") == 3
        for ws in (a, b, c):
            assert ws.recv(timeout=WAIT) == "everyone"
        with pytest.raises(TimeoutError):
            a.recv(timeout=0.2)  # "not a" was excluded for a
    rec_chat.wait_kind("close", 2)
    rec_news.wait_kind("close")
    assert server.clients == [] and view.clients == []


def test_routing_404_and_plain_http_426(make_server):
    block, _, _ = recording_block("/ws")
    server = make_server(block)
    status, body = http_get(server, "/nope", upgrade=True)
    assert status.startswith(b"HTTP/1.1 404")
    assert b"/nope" in body
    status, body = http_get(server, "/ws", upgrade=False)
    assert status.startswith(b"HTTP/1.1 426")
    assert body  # a short text body says what to do


def test_start_port_zero_context_manager_and_serve_forever():
    block = define_block("/", lambda ctx: {"on_message": ctx.send})
    with WebSocketServer(block, port=0) as server:
        assert server.port > 0
        assert server.address[0] == "127.0.0.1"
        with connect(url(server)) as ws:
            ws.send("x")
            assert ws.recv(timeout=WAIT) == "x"
    server = WebSocketServer(block, port=0)
    runner = threading.Thread(target=server.serve_forever)
    runner.start()
    try:
        deadline = threading.Event()
        while not server.listening and not deadline.wait(0.01):
            pass
        with connect(url(server)) as ws:
            ws.send("y")
            assert ws.recv(timeout=WAIT) == "y"
    finally:
        server.shutdown(timeout=WAIT)
        runner.join(WAIT)
    assert not runner.is_alive()
    # The server's threads are gone. (The client runtime's, "gaman_sync-client-*",
    # are shared by every client of the program and stay: earlier tests in the
    # same process may have started them.)
    assert not [t for t in threading.enumerate() if t.name.startswith("gaman_sync")
                and not t.name.startswith("gaman_sync-client")]


def test_bad_configuration_is_refused():
    block = define_block("/", lambda ctx: None)
    with pytest.raises(TypeError):
        WebSocketServer(block, port=0, max_mesage_size=10)
    with pytest.raises(ValueError):
        WebSocketServer([block, define_block("/", lambda ctx: None)], port=0)
    with pytest.raises(ValueError):
        define_block("no-slash", lambda ctx: None)
    with pytest.raises(ValueError):
        WebSocketServer(block, port=0, write_limit=0)


def test_limits_close_codes(make_server):
    block, rec, _ = recording_block()
    server = make_server(block, max_message_size=1000)
    with connect(url(server)) as ws:
        ws.send(b"x" * 1000)
        ws.send(b"x" * 1001)
        with pytest.raises(ClientClosed):
            ws.recv(timeout=WAIT)
        assert ws.close_code == 1009
    events = rec.wait_kind("close")
    assert [e[0] for e in events].count("message") == 1
    assert events[-1][1] == 1009


def test_nothing_is_printed(make_server, capsys):
    block, rec, _ = recording_block("/x")
    server = make_server(block)
    http_get(server, "/missing", upgrade=True)
    with connect(url(server, "/x")) as ws:
        ws.send("hi")
        rec.wait_kind("message")
    rec.wait_kind("close")
    out, err = capsys.readouterr()
    assert out == "" and err == ""


# -- Raw socket helpers ------------------------------------------------------------

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def raw_handshake(server, path="/"):
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=WAIT)
    sock.sendall((f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = sock.recv(4096)
        assert chunk, "server closed during the handshake"
        response += chunk
    assert response.startswith(b"HTTP/1.1 101")
    assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in response  # RFC 6455's own example
    return sock


def recv_exactly(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, f"stream ended after {data!r}"
        data += chunk
    return data


def http_get(server, path, upgrade):
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=WAIT)
    headers = f"GET {path} HTTP/1.1\r\nHost: x\r\n"
    if upgrade:
        headers += (f"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                    f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n")
    sock.sendall((headers + "\r\n").encode())
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0], body


def test_a_server_that_only_adopts_sockets_sleeps_while_idle():
    """A server that never listened (adopt() only) has an accept thread that
    waits for work; it once spun on a zero timeout, taking a core."""
    import resource

    server = WebSocketServer(define_block("/echo", lambda ctx: {"on_message": ctx.send}))
    a, b = socket.socketpair()
    try:
        server.adopt(a)
        with gaman_connect("ws://local/echo", sock=b, ping_interval=None) as client:
            client.send("x")
            assert client.recv(timeout=WAIT) == "x"
            before = resource.getrusage(resource.RUSAGE_SELF)
            threading.Event().wait(0.5)  # idle on purpose: the CPU it costs is measured
            after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        assert cpu < 0.15, f"{cpu:.2f} s of CPU in 0.5 s idle"
    finally:
        server.shutdown(timeout=WAIT)


@pytest.mark.parametrize("timeout", ["5", -1, True, float("nan")])
def test_shutdown_timeout_of_the_wrong_type_or_value_is_one_clear_error(timeout):
    server = WebSocketServer(define_block("/", lambda ctx: {}), port=0)
    try:
        with pytest.raises(ValueError, match="timeout must be a number of seconds"):
            server.shutdown(timeout)
    finally:
        server.shutdown()
