"""The client, ``gaman_sync.connect``, on real sockets on 127.0.0.1.

Most tests run twice: against our server (``WebSocketServer``) and against a
server this project did not write (websockets' threaded server), so that the
client is not only checked against the code it shares its engine with. Both
servers run the same small script: every message is echoed, except the
commands ``!close CODE REASON`` (the server closes), ``!ping`` (the server
pings with ``srv``; it answers ``pong srv`` once the client's pong came
back), ``!big N`` (N bytes back) and ``!frag`` (websockets only: a
fragmented text and a fragmented binary message). Each server records the
close code and reason it saw.

A few raw TCP servers, written here, check what neither library would do:
the masking of every frame, a wrong ``Sec-WebSocket-Accept``, a subprotocol
that was not offered, a server that never answers.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import sys
import threading
import time
from contextlib import contextmanager
from http import HTTPStatus
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
from websockets.exceptions import ConnectionClosed as WsClosed
from websockets.sync.server import serve as ws_serve

import gaman_sync
from gaman_sync import (
    ConnectionClosed,
    ConnectionClosedError,
    HandshakeTimeout,
    InvalidHandshake,
    InvalidHeader,
    InvalidStatus,
    InvalidURI,
    define_block,
)
from gaman_sync.protocol.handshake import accept_token

from .conftest import WAIT, Recorder, child

MiB = 1024 * 1024
BIG = 8 * MiB
LIMIT = 16 * MiB  # max_message_size on both sides where BIG goes through


# -- The two servers ----------------------------------------------------------


class Peer:
    """A running server: ``url(path)`` and what it recorded (``events``)."""

    def __init__(self, name: str, port: int, events: Recorder) -> None:
        self.name = name
        self.port = port
        self.events = events

    def url(self, path: str = "/") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def close_seen(self) -> Tuple[int, str]:
        """The code and reason the server's side of the connection ended with."""
        events = self.events.wait_kind("close")
        return next(e[1:] for e in events if e[0] == "close")


def _command(message: Any) -> Optional[Tuple[str, str]]:
    if isinstance(message, str) and message.startswith("!"):
        name, _, argument = message[1:].partition(" ")
        return name, argument
    return None


def gaman_block(events: Recorder, path: str = "/", **block_options: Any):
    def handler(ctx):
        def on_message(message):
            command = _command(message)
            if command is None:
                ctx.send(message)
            elif command[0] == "close":
                code, _, reason = command[1].partition(" ")
                ctx.close(int(code), reason)
            elif command[0] == "ping":
                ctx.ping(b"srv")
            elif command[0] == "big":
                ctx.send(b"\x5a" * int(command[1]))
            else:
                ctx.send(f"unknown command {message}")

        return {"on_message": on_message,
                "on_pong": lambda data: ctx.send("pong " + data.decode()),
                "on_close": lambda code, reason: events.add("close", code, reason)}

    return define_block(path, handler, **block_options)


def websockets_handler(events: Recorder) -> Callable[[Any], None]:
    def handler(ws):
        try:
            for message in ws:
                command = _command(message)
                if command is None:
                    ws.send(message)
                elif command[0] == "close":
                    code, _, reason = command[1].partition(" ")
                    ws.close(int(code), reason)
                elif command[0] == "ping":
                    if ws.ping(b"srv").wait(WAIT):
                        ws.send("pong srv")
                elif command[0] == "big":
                    ws.send(b"\x5a" * int(command[1]))
                elif command[0] == "frag":
                    ws.send(["fra", "gmen", "ted ", "τέξτ"])
                    ws.send([b"\x00\x01", b"", b"\x02" * 70000])
                else:
                    ws.send(f"unknown command {message}")
        except WsClosed:
            pass
        events.add("close", ws.close_code, ws.close_reason)

    return handler


@contextmanager
def websockets_server(handler: Callable[[Any], None], **options: Any) -> Iterator[int]:
    """websockets' threaded server on 127.0.0.1, port 0; yields its port."""
    options.setdefault("compression", None)
    options.setdefault("ping_interval", None)
    server = ws_serve(handler, "127.0.0.1", 0, **options)
    thread = threading.Thread(target=server.serve_forever, name="websockets-server",
                              daemon=True)
    thread.start()
    try:
        yield server.socket.getsockname()[1]
    finally:
        server.shutdown()
        thread.join(WAIT)
        assert not thread.is_alive(), "websockets' server did not stop"


@pytest.fixture(params=["gaman_sync", "websockets"])
def peer(request, make_server) -> Iterator[Peer]:
    """Each test that takes it runs against both servers."""
    events = Recorder()
    if request.param == "gaman_sync":
        server = make_server(gaman_block(events), max_message_size=LIMIT, ping_interval=None)
        yield Peer("gaman_sync", server.port, events)
    else:
        with websockets_server(websockets_handler(events), max_size=LIMIT) as port:
            yield Peer("websockets", port, events)


@pytest.fixture
def ws_peer() -> Iterator[Peer]:
    """websockets' server alone (what ours cannot do: fragmented messages)."""
    events = Recorder()
    with websockets_server(websockets_handler(events), max_size=LIMIT) as port:
        yield Peer("websockets", port, events)


@contextmanager
def connected(url: str, **kwargs: Any) -> Iterator[gaman_sync.ClientConnection]:
    conn = gaman_sync.connect(url, open_timeout=WAIT, **kwargs)
    try:
        yield conn
    finally:
        if conn.is_open:
            conn.close()
        assert conn.wait_closed(WAIT), f"{conn!r} did not close"


def in_thread(function: Callable[[], Any], timeout: float = WAIT) -> Any:
    """``function()`` in a thread, within ``timeout``: its result, or what it raised."""
    result: Dict[str, Any] = {}

    def run():
        try:
            result["value"] = function()
        except BaseException as exc:  # handed to the test below
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"still running after {timeout} s"
    if "error" in result:
        raise result["error"]
    return result["value"]


# -- Messages -----------------------------------------------------------------


def test_text_and_binary_round_trip(peer):
    with connected(peer.url()) as conn:
        assert conn.response.status == 101 and conn.subprotocol is None
        for message in ["hello", "", "é€😀 unicode", b"\x00\x01\xfe\xff", b"", b"x" * 70000,
                        "y" * 200]:
            conn.send(message)
            back = conn.recv(timeout=WAIT)
            assert type(back) is type(message) and back == message
        conn.send(bytearray(b"ba"))  # bytes-like is binary too
        assert conn.recv(timeout=WAIT) == b"ba"


def test_8_mib_each_way(peer):
    message = os.urandom(BIG)
    with connected(peer.url(), max_message_size=LIMIT) as conn:
        conn.send(message)
        assert conn.recv(timeout=WAIT) == message
        text = "ab€" * (BIG // 5)
        conn.send(text)
        assert conn.recv(timeout=WAIT) == text


def test_too_big_for_the_client_closes_with_1009(peer):
    with connected(peer.url()) as conn:  # the default limit: 1 MiB
        conn.send(f"!big {2 * MiB}")
        with pytest.raises(ConnectionClosedError) as caught:
            conn.recv(timeout=WAIT)
        assert caught.value.code == 1009
    assert peer.close_seen()[0] == 1009


def test_fragmented_messages_are_joined(ws_peer):
    with connected(ws_peer.url()) as conn:
        conn.send("!frag")
        assert conn.recv(timeout=WAIT) == "fragmented τέξτ"
        assert conn.recv(timeout=WAIT) == b"\x00\x01" + b"\x02" * 70000


def test_subprotocol_is_negotiated(make_server):
    server = make_server(gaman_block(Recorder(), subprotocols=("chat",)))
    with connected(f"ws://127.0.0.1:{server.port}/", subprotocols=["superchat", "chat"]) as conn:
        assert conn.subprotocol == "chat"
    with websockets_server(lambda ws: ws.send(ws.subprotocol), subprotocols=["chat"]) as port:
        with connected(f"ws://127.0.0.1:{port}/", subprotocols=("chat",)) as conn:
            assert conn.subprotocol == "chat"
            assert conn.recv(timeout=WAIT) == "chat"


def test_request_carries_headers_and_origin():
    seen = {}

    def script(sock, request, rest):
        seen.update(request)
        sock.sendall(switching(request))
        read_to_eof(sock)

    with RawServer(script) as raw:
        conn = gaman_sync.connect(f"ws://127.0.0.1:{raw.port}/path?q=1", open_timeout=WAIT,
                                  origin="http://example.test",
                                  headers={"X-Token": "t1", "User-Agent": "test/1"})
        conn.terminate()
        assert conn.wait_closed(WAIT)
    assert seen["request-line"] == "GET /path?q=1 HTTP/1.1"
    assert seen["host"] == f"127.0.0.1:{raw.port}"
    assert seen["origin"] == "http://example.test"
    assert seen["x-token"] == "t1" and seen["user-agent"] == "test/1"
    assert seen["sec-websocket-version"] == "13"
    assert "sec-websocket-protocol" not in seen


# -- Ping and pong ---------------------------------------------------------------


def test_client_ping_reaches_on_pong(peer):
    pongs = Recorder()
    with connected(peer.url(), handler={"on_pong": lambda data: pongs.add("pong", data)}) as conn:
        conn.ping(b"x")
        conn.ping("yz")
        events = pongs.wait_kind("pong", 2)
        assert [e[1] for e in events] == [b"x", b"yz"]


def test_server_pings_are_answered(peer):
    with connected(peer.url(), ping_interval=None) as conn:
        conn.send("!ping")
        assert conn.recv(timeout=WAIT) == "pong srv"


# -- Closing ---------------------------------------------------------------------


def test_client_closes_with_code_and_reason(peer):
    conn = gaman_sync.connect(peer.url(), open_timeout=WAIT)
    conn.send("before")
    assert conn.recv(timeout=WAIT) == "before"
    started = time.monotonic()
    conn.close(4001, "bye")  # waits for the closing handshake
    assert time.monotonic() - started < WAIT
    assert conn.wait_closed(0)
    assert peer.close_seen() == (4001, "bye")
    assert (conn.close_code, conn.close_reason) == (4001, "bye")
    assert not conn.is_open and conn.ready_state == gaman_sync.ReadyState.CLOSED
    with pytest.raises(ConnectionClosedError):
        conn.send("after")
    conn.close()  # a second close does nothing


def test_server_closes_with_code_and_reason(peer):
    with connected(peer.url()) as conn:
        conn.send("!close 4002 go away")
        with pytest.raises(ConnectionClosedError) as caught:
            conn.recv(timeout=WAIT)
        assert (caught.value.code, caught.value.reason) == (4002, "go away")
        assert (conn.close_code, conn.close_reason) == (4002, "go away")
        with pytest.raises(ConnectionClosedError):
            conn.send("after")
        with pytest.raises(ConnectionClosedError):  # and again: it stays closed
            conn.recv(timeout=WAIT)
    assert peer.close_seen() == (4002, "go away")


def test_iteration_ends_cleanly_on_1000(peer):
    with connected(peer.url()) as conn:
        for message in ["one", b"two", "!close 1000 done"]:
            conn.send(message)
        assert in_thread(lambda: list(conn)) == ["one", b"two"]
        assert conn.close_code == 1000


@pytest.mark.parametrize("code", [1011, 4002])
def test_iteration_raises_on_other_codes(peer, code):
    received: List[Any] = []

    def iterate():
        for message in conn:
            received.append(message)

    with connected(peer.url()) as conn:
        conn.send("one")
        conn.send(f"!close {code} broken")
        with pytest.raises(ConnectionClosedError) as caught:
            in_thread(iterate)
        assert (caught.value.code, caught.value.reason) == (code, "broken")
        assert received == ["one"]


def test_messages_before_the_close_are_all_received(peer):
    with connected(peer.url()) as conn:
        for i in range(50):
            conn.send(f"m{i}")
        conn.send("!close 1000 ")
        assert in_thread(lambda: list(conn)) == [f"m{i}" for i in range(50)]


def test_context_manager_closes_with_1000(peer):
    with gaman_sync.connect(peer.url(), open_timeout=WAIT) as conn:
        conn.send("x")
        assert conn.recv(timeout=WAIT) == "x"
    assert conn.close_code == 1000
    assert peer.close_seen()[0] == 1000


# -- recv ------------------------------------------------------------------------


def test_recv_timeout_leaves_the_connection_usable(peer):
    with connected(peer.url()) as conn:
        started = time.monotonic()
        with pytest.raises(TimeoutError) as caught:
            conn.recv(timeout=0.2)
        elapsed = time.monotonic() - started
        assert not isinstance(caught.value, ConnectionClosed)
        assert 0.15 <= elapsed < WAIT
        assert conn.is_open
        conn.send("still here")
        assert conn.recv(timeout=WAIT) == "still here"
        with pytest.raises(TimeoutError):
            conn.recv(timeout=0)


def test_a_full_queue_holds_the_server_back_without_losing_anything(peer):
    count = 100
    with connected(peer.url(), max_queue=2) as conn:
        for i in range(count):
            conn.send(f"{i:03} " + "z" * 1000)
        got = [conn.recv(timeout=WAIT)[:3] for _ in range(count)]
        assert got == [f"{i:03}" for i in range(count)]


def test_recv_keeps_up_with_messages_that_arrive_one_by_one():
    """Each message reaches a waiting recv(), and coming back to recv() lets
    the connection's thread go on at once (not after a hand-off timeout)."""
    count = 20

    def paced(ws):
        for i in range(count):
            ws.send(f"m{i}")
            time.sleep(0.01)  # so that each arrives alone, to a waiting recv()
        ws.close(1000, "done")

    with websockets_server(paced) as port:
        with connected(f"ws://127.0.0.1:{port}/") as conn:
            started = time.monotonic()
            got = in_thread(lambda: list(conn))
            elapsed = time.monotonic() - started
    assert got == [f"m{i}" for i in range(count)]
    assert elapsed < 5, f"{count} messages took {elapsed:.1f} s"


# -- A handler instead of recv ------------------------------------------------------


@pytest.mark.parametrize("closer", ["client", "server"])
def test_handler_callbacks_run_in_the_connections_thread(peer, closer):
    events = Recorder()

    def record(kind):
        return lambda *args: events.add(kind, threading.current_thread(), *args)

    handler = {"on_open": record("open"), "on_message": record("message"),
               "onPong": record("pong"),  # GamanJS's spelling is accepted too
               "on_close": record("close")}
    conn = gaman_sync.connect(peer.url(), open_timeout=WAIT, handler=handler)
    try:
        events.wait_kind("open")
        conn.send("hi")
        events.wait_kind("message")
        conn.ping(b"p")
        events.wait_kind("pong")
        with pytest.raises(RuntimeError, match="handler"):
            conn.recv(timeout=0)
        if closer == "client":
            conn.close(4001, "bye")
        else:
            conn.send("!close 4002 go")
        got = events.wait_kind("close")
    finally:
        conn.close()
        assert conn.wait_closed(WAIT)
    assert [e[0] for e in got] == ["open", "message", "pong", "close"]
    assert got[1][2:] == ("hi",) and got[2][2:] == (b"p",)
    assert got[3][2:] == ((4001, "bye") if closer == "client" else (4002, "go"))
    threads = {e[1] for e in got}
    assert threads == {conn.thread} and conn.thread is not threading.current_thread()


def test_handler_can_answer_from_on_message():
    received = Recorder()
    with websockets_server(lambda ws: [ws.send(m.upper()) for m in ws]) as port:
        holder: Dict[str, Any] = {}

        def on_message(message):
            received.add("message", message)
            if message == "A":
                holder["conn"].send("b")

        conn = gaman_sync.connect(f"ws://127.0.0.1:{port}/", open_timeout=WAIT,
                                  handler={"on_message": on_message})
        holder["conn"] = conn
        conn.send("a")
        assert [e[1] for e in received.wait_kind("message", 2)] == ["A", "B"]
        conn.close()
        assert conn.wait_closed(WAIT)


def test_an_answer_goes_out_before_the_close_of_a_protocol_error():
    """A message, then a frame with a reserved bit, in one write: the answer
    the application sends to the message reaches the server before the close
    frame (1002) that the bad frame causes, as with a handler (Autobahn 3.2)."""
    frames: List[Tuple[int, int, bool, bytes, bytes]] = []

    def script(sock, request, rest):
        sock.sendall(switching(request) + b"\x81\x05hello" + b"\xa1\x05world")
        reader = FrameReader(sock, rest)
        while not frames or frames[-1][1] != 0x8:
            frames.append(reader.read())

    with RawServer(script) as raw:
        conn = gaman_sync.connect(f"ws://127.0.0.1:{raw.port}/", open_timeout=WAIT)
        message = conn.recv(timeout=WAIT)
        assert message == "hello"
        conn.send(message)
        with pytest.raises(ConnectionClosedError) as caught:
            conn.recv(timeout=WAIT)
        assert caught.value.code == 1002
        raw.finish()
    got = [(opcode, unmask(data, key)) for _, opcode, _, key, data in frames]
    assert got[0] == (0x1, b"hello"), got
    assert got[1][0] == 0x8 and got[1][1][:2] == struct.pack("!H", 1002), got


# -- Many threads sending on one connection ------------------------------------------


def test_sends_from_many_threads_arrive_whole(peer):
    threads_count, per_thread = 8, 25
    barrier = threading.Barrier(threads_count)
    errors: List[BaseException] = []

    def message(t: int, i: int) -> Any:
        if i % 5 == 0:  # large enough for partial writes and the writer thread
            return bytes([t, i]) + bytes([t]) * (256 * 1024)
        return f"t{t}-m{i}-" + "x" * (t * 100 + i)

    def sender(t: int) -> None:
        try:
            barrier.wait(WAIT)
            for i in range(per_thread):
                conn.send(message(t, i))
        except BaseException as exc:  # reported below
            errors.append(exc)

    with connected(peer.url()) as conn:
        senders = [threading.Thread(target=sender, args=(t,)) for t in range(threads_count)]
        for thread in senders:
            thread.start()
        received = [conn.recv(timeout=WAIT) for _ in range(threads_count * per_thread)]
        for thread in senders:
            thread.join(WAIT)
        assert not errors, errors
        assert conn.is_open
    # Every message whole, and each thread's in the order it sent them.
    for t in range(threads_count):
        mine = [m for m in received
                if (m[0] == t if isinstance(m, bytes) else m.startswith(f"t{t}-"))]
        assert mine == [message(t, i) for i in range(per_thread)]


# -- Masking, seen on the wire --------------------------------------------------------


def test_every_frame_is_masked_with_a_fresh_key():
    frames: List[Tuple[int, int, bool, bytes, bytes]] = []

    def script(sock, request, rest):
        sock.sendall(switching(request))
        reader = FrameReader(sock, rest)
        frames.extend(reader.read() for _ in range(3))

    with RawServer(script) as raw:
        conn = gaman_sync.connect(f"ws://127.0.0.1:{raw.port}/", open_timeout=WAIT)
        conn.send("hello")
        conn.send("hello")
        conn.send(b"\x00\xff" * 100)
        raw.finish()  # the three frames read; the server closes TCP
        assert conn.wait_closed(WAIT)
        assert conn.close_code == 1006
    payloads = [b"hello", b"hello", b"\x00\xff" * 100]
    for (fin, opcode, masked, key, data), payload, expected_opcode in zip(frames, payloads,
                                                                         [1, 1, 2]):
        assert fin and opcode == expected_opcode
        assert masked, "a client frame without the mask bit"
        assert len(key) == 4
        assert unmask(data, key) == payload
    keys = [f[3] for f in frames]
    assert len(set(keys)) == 3, f"masking keys reused: {keys}"
    assert frames[0][4] != frames[1][4]  # the same message, masked differently


# -- Handshake failures ------------------------------------------------------------------


def test_refused_connection_names_the_address():
    with socket.socket() as bound:  # bound, not listening: connecting is refused
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        with pytest.raises(ConnectionRefusedError) as caught:
            gaman_sync.connect(f"ws://127.0.0.1:{port}/", open_timeout=WAIT)
    assert caught.value.errno == errno.ECONNREFUSED
    assert f"127.0.0.1:{port}" in str(caught.value)


def test_silent_server_times_out_within_open_timeout():
    with socket.create_server(("127.0.0.1", 0)) as listener:  # TCP accepted by the kernel
        port = listener.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(HandshakeTimeout) as caught:
            gaman_sync.connect(f"ws://127.0.0.1:{port}/", open_timeout=0.5)
        elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < WAIT
    assert isinstance(caught.value, TimeoutError) and "0.5" in str(caught.value)


def test_server_closing_before_answering_is_invalid_message():
    def script(sock, request, rest):
        pass  # closes TCP without a word

    with RawServer(script) as raw:
        with pytest.raises(gaman_sync.InvalidMessage, match="closed"):
            gaman_sync.connect(f"ws://127.0.0.1:{raw.port}/", open_timeout=WAIT)


def test_refusal_with_its_body_cut_short_is_invalid_status():
    def script(sock, request, rest):
        sock.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 100\r\n\r\nnot you")

    with RawServer(script) as raw:
        with pytest.raises(InvalidStatus) as caught:
            gaman_sync.connect(f"ws://127.0.0.1:{raw.port}/", open_timeout=WAIT)
    assert caught.value.status == 403 and "not you" in str(caught.value)


def test_non_101_from_our_server(make_server):
    server = make_server(gaman_block(Recorder(), path="/echo"))
    with pytest.raises(InvalidStatus) as caught:
        gaman_sync.connect(f"ws://127.0.0.1:{server.port}/nope", open_timeout=WAIT)
    error = caught.value
    assert error.status == 404 and error.response.status == 404
    assert error.response.body.startswith(b"404 Not Found")
    assert "404" in str(error) and "no WebSocket endpoint at /nope" in str(error)


def test_non_101_from_websockets():
    def refuse(connection, request):
        return connection.respond(HTTPStatus.FORBIDDEN, "go away, says websockets\n")

    with websockets_server(lambda ws: None, process_request=refuse) as port:
        with pytest.raises(InvalidStatus) as caught:
            gaman_sync.connect(f"ws://127.0.0.1:{port}/", open_timeout=WAIT)
    assert caught.value.status == 403
    assert "go away, says websockets" in str(caught.value)


def test_wrong_accept_is_invalid_header():
    def script(sock, request, rest):
        sock.sendall(switching(request, accept=accept_token(b"not the key")))
        read_to_eof(sock)  # the client must close TCP

    with RawServer(script) as raw:
        with pytest.raises(InvalidHeader) as caught:
            gaman_sync.connect(f"ws://127.0.0.1:{raw.port}/", open_timeout=WAIT)
        raw.finish()
    assert caught.value.name == "Sec-WebSocket-Accept"
    assert isinstance(caught.value, InvalidHandshake)


@pytest.mark.parametrize("offered", [[], ["superchat"]])
def test_subprotocol_not_offered_is_invalid_header(offered):
    def script(sock, request, rest):
        sock.sendall(switching(request, extra=[("Sec-WebSocket-Protocol", "chat")]))
        read_to_eof(sock)

    with RawServer(script) as raw:
        with pytest.raises(InvalidHeader) as caught:
            gaman_sync.connect(f"ws://127.0.0.1:{raw.port}/", open_timeout=WAIT,
                               subprotocols=offered)
        raw.finish()
    assert caught.value.name == "Sec-WebSocket-Protocol"
    assert "chat" in str(caught.value)


@pytest.mark.parametrize("url, words", [
    ("http://127.0.0.1:8000/", "not a ws:// URL"),
    ("https://127.0.0.1/", "not a ws:// URL"),
    ("127.0.0.1:8000", "not a ws:// URL"),
    ("ws://", "no host"),
    ("ws:///path", "no host"),
    ("ws://:8000/path", "no host"),
    ("ws://127.0.0.1:port/", "not a valid URL"),
    ("ws://127.0.0.1:99999/", "not a valid URL"),
    ("ws://user:pw@127.0.0.1/", "user information"),
    ("ws://127.0.0.1/a path", "spaces"),
    ("wss://127.0.0.1/a path", "spaces"),
])
def test_bad_urls_are_invalid_uri(url, words):
    with pytest.raises(InvalidURI, match=words) as caught:
        gaman_sync.connect(url, open_timeout=WAIT)
    assert isinstance(caught.value, ValueError)


async def _coroutine(message):  # pragma: no cover - never called
    pass


# Each is refused before any I/O: the URL's port is not listened on, so a
# check made only after connecting would raise ConnectionRefusedError instead.
@pytest.mark.parametrize("kwargs, error, words", [
    (dict(url=123), TypeError, "url"),
    (dict(url=b"ws://127.0.0.1/"), TypeError, "url"),
    (dict(subprotocols="chat"), TypeError, "subprotocols"),
    (dict(subprotocols=[1]), TypeError, "subprotocols"),
    (dict(subprotocols=["two words"]), ValueError, "subprotocols"),
    (dict(headers=42), TypeError, "headers"),
    (dict(headers={"X-A": 1}), TypeError, "headers"),
    (dict(headers=[("X-A",)]), TypeError, "headers"),
    (dict(headers=[("bad name", "v")]), ValueError, "headers"),
    (dict(headers={"X-A": "a\r\nInjected: yes"}), ValueError, "headers"),
    (dict(origin=5), TypeError, "origin"),
    (dict(open_timeout="5"), TypeError, "open_timeout"),
    (dict(open_timeout=0), ValueError, "open_timeout"),
    (dict(max_queue=0), ValueError, "max_queue"),
    (dict(max_queue="2"), TypeError, "max_queue"),
    (dict(max_message_size="big"), TypeError, "max_message_size"),
    (dict(ping_interval=-1), ValueError, "ping_interval"),
    (dict(write_limit=1.5), TypeError, "write_limit"),
    (dict(bogus=1), TypeError, "bogus"),
    (dict(max_connections=5), TypeError, "max_connections"),
    (dict(handler=42), TypeError, "handler"),
    (dict(handler={"on_mesage": print}), TypeError, "on_mesage"),
    (dict(handler={"on_message": 5}), TypeError, "on_message"),
    (dict(handler={"on_message": _coroutine}), TypeError, "async"),
], ids=lambda value: repr(value) if isinstance(value, dict) else None)
def test_wrong_arguments_are_one_clear_error(kwargs, error, words):
    with socket.socket() as bound:  # a port nothing listens on
        bound.bind(("127.0.0.1", 0))
        url = kwargs.pop("url", f"ws://127.0.0.1:{bound.getsockname()[1]}/")
        with pytest.raises(error, match=words) as caught:
            gaman_sync.connect(url, **kwargs)
    assert not isinstance(caught.value, OSError)


# -- The command line ------------------------------------------------------------


def test_python_m_gaman_sync_client_against_websockets(ws_peer):
    """``python -m gaman_sync.client URL`` against websockets' server: each
    line of stdin is sent and its answer printed (binary as a repr); a 1000
    from the server ends it with status 0, another code is said on stderr,
    status 1. (Its stdin stays open here; the end of stdin is the next test.)"""
    def run(lines: str) -> Tuple[int, str, str]:
        with child([sys.executable, "-m", "gaman_sync.client", ws_peer.url()]) as proc:
            proc.stdin.write(lines)
            proc.stdin.flush()
            return proc.wait(WAIT), proc.stdout.read(), proc.stderr.read()

    assert run("hello\nünïcode ✓\n!big 3\n!close 1000 done\n") == (
        0, "hello\nünïcode ✓\nb'ZZZ'\n", "")
    assert run("!close 4005 not today\n") == (1, "", "closed by the server: 4005 not today\n")


def test_python_m_gaman_sync_client_waits_for_answers_at_the_end_of_stdin(ws_peer):
    """``echo hi | python -m gaman_sync.client URL`` prints the echo: at the
    end of stdin it waits until no answer has come for ``--wait`` seconds,
    then closes with 1000 and exits 0."""
    with child([sys.executable, "-m", "gaman_sync.client", "--wait", "0.5",
                ws_peer.url()]) as proc:
        out, err = proc.communicate("one\ntwo\n", timeout=WAIT)
    assert (proc.returncode, out, err) == (0, "one\ntwo\n", "")


# -- Raw TCP servers ---------------------------------------------------------------------


class RawServer:
    """Accepts one connection on 127.0.0.1, reads the opening request and runs
    ``script(sock, request, rest)``, where ``request`` maps lower-case header
    names (and ``request-line``) to values and ``rest`` is what came after it.
    ``finish()`` waits for the script and raises what it raised."""

    def __init__(self, script: Callable[[socket.socket, Dict[str, str], bytes], None]) -> None:
        self.script = script
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(WAIT)
        self.port = self.listener.getsockname()[1]
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, name="raw-server", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            sock, _ = self.listener.accept()
            with sock:
                sock.settimeout(WAIT)
                buffer = b""
                while b"\r\n\r\n" not in buffer:
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise EOFError("the client closed before its whole request")
                    buffer += chunk
                head, _, rest = buffer.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                request = {"request-line": lines[0]}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    request[name.strip().lower()] = value.strip()
                self.script(sock, request, rest)
        except BaseException as exc:  # raised again by finish()
            self.error = exc

    def finish(self) -> None:
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "the raw server's script did not end"
        if self.error is not None:
            raise self.error

    def __enter__(self) -> RawServer:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        try:
            if exc_info[0] is None:
                self.finish()
        finally:
            self.listener.close()


def switching(request: Dict[str, str], accept: Optional[bytes] = None,
              extra: List[Tuple[str, str]] = ()) -> bytes:
    """A 101 for ``request`` (with the right accept unless told otherwise)."""
    if accept is None:
        accept = accept_token(request["sec-websocket-key"].encode())
    lines = ["HTTP/1.1 101 Switching Protocols", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Accept: {accept.decode()}"] + [f"{k}: {v}" for k, v in extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def read_to_eof(sock: socket.socket) -> None:
    """Read until the client closes TCP (or fail after WAIT)."""
    while True:
        try:
            if not sock.recv(65536):
                return
        except ConnectionResetError:
            return


def unmask(data: bytes, key: bytes) -> bytes:
    return bytes(b ^ key[i % 4] for i, b in enumerate(data))


class FrameReader:
    """Reads frames as they are on the wire: (fin, opcode, masked, key, raw payload)."""

    def __init__(self, sock: socket.socket, buffer: bytes = b"") -> None:
        self.sock = sock
        self.buffer = bytearray(buffer)

    def _take(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the client closed TCP in the middle of a frame")
            self.buffer += chunk
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    def read(self) -> Tuple[int, int, bool, bytes, bytes]:
        b0, b1 = self._take(2)
        length = b1 & 0x7F
        if length == 126:
            length = struct.unpack("!H", self._take(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", self._take(8))[0]
        masked = bool(b1 & 0x80)
        key = self._take(4) if masked else b""
        return bool(b0 & 0x80), b0 & 0x0F, masked, key, self._take(length)
