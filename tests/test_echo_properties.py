"""Properties of the core: any message sequence echoes back unchanged and in
order, and every connection sees its events in order, whichever way it ends."""

from __future__ import annotations

import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed as ClientClosed
from websockets.sync.client import connect

from gaman_sync import define_block
from gaman_sync.strategies import binary_messages, text_messages

from .conftest import WAIT, Recorder

MAX_SIZE = 400 * 1024


@st.composite
def fragmented(draw, data):
    """``data`` cut at random points: how the client sends one message."""
    if len(data) <= 1 or not draw(st.booleans()):
        return [data]
    cuts = sorted(draw(st.lists(st.integers(1, len(data) - 1), max_size=6, unique=True)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


texts = text_messages(max_size=MAX_SIZE)
blobs = binary_messages(max_size=MAX_SIZE)
messages = st.lists(st.one_of(texts, blobs).flatmap(
    lambda m: fragmented(m).map(lambda parts: (m, parts))), max_size=12)


@pytest.fixture(scope="module")
def shared_echo():
    from gaman_sync import WebSocketServer
    server = WebSocketServer(define_block("/", lambda ctx: {"on_message": ctx.send}),
                             port=0, max_message_size=1 << 20).start()
    yield server
    server.shutdown(timeout=2)


@settings(max_examples=60)
@given(sequence=messages)
def test_any_message_sequence_echoes_unchanged_in_order(shared_echo, sequence):
    with connect(f"ws://127.0.0.1:{shared_echo.port}/", max_size=None) as ws:
        for _, parts in sequence:
            ws.send(parts if len(parts) > 1 else parts[0])
        for message, _ in sequence:
            echoed = ws.recv(timeout=WAIT)
            assert type(echoed) is type(message)
            assert echoed == message


ENDINGS = ["client close", "client close with code", "server close", "client drops tcp",
           "server terminates", "handler error", "shutdown"]


@pytest.fixture(scope="module")
def ordering_server():
    """One server for all examples; each connection records its own events."""
    from gaman_sync import WebSocketServer
    recorders = {}

    def handler(ctx):
        rec = recorders[ctx.request.query["id"]]
        rec.add("handler")

        def on_message(message):
            rec.add("message", message)
            if message == "server close":
                ctx.close(4002, "asked")
            elif message == "server terminates":
                ctx.terminate()
            elif message == "handler error":
                raise RuntimeError("deliberate")
            else:
                ctx.send(message)

        def on_error(exc):
            rec.add("error")
            raise exc  # on_error failing closes with 1011

        return {"on_open": lambda: rec.add("open"), "on_message": on_message,
                "on_close": lambda code, reason: rec.add("close", code),
                "on_error": on_error}

    server = WebSocketServer(define_block("/", handler), port=0).start()
    yield server, recorders
    server.shutdown(timeout=2)


@settings(max_examples=40)
@given(count=st.integers(0, 5), ending=st.sampled_from(ENDINGS[:-1]), ident=st.uuids())
def test_event_order_holds_whichever_way_it_ends(ordering_server, count, ending, ident):
    server, recorders = ordering_server
    rec = recorders[str(ident)] = Recorder()
    with connect(f"ws://127.0.0.1:{server.port}/?id={ident}") as ws:
        for i in range(count):
            ws.send(f"m{i}")
            assert ws.recv(timeout=WAIT) == f"m{i}"
        if ending == "client close":
            ws.close()
        elif ending == "client close with code":
            ws.close(4001, "bye")
        elif ending == "client drops tcp":
            ws.socket.shutdown(socket.SHUT_RDWR)
        else:
            ws.send(ending)
            with pytest.raises(ClientClosed):
                ws.recv(timeout=WAIT)
    events = rec.wait_kind("close")
    expected_code = {"client close": 1000, "client close with code": 4001,
                     "server close": 4002, "client drops tcp": 1006,
                     "server terminates": 1006, "handler error": 1011}[ending]
    kinds = [e[0] for e in events]
    assert kinds[:2] == ["handler", "open"]
    assert kinds.count("open") == 1 and kinds.count("close") == 1
    assert kinds[-1] == "close" and events[-1][1] == expected_code
    sent = [e[1] for e in events if e[0] == "message"]
    assert sent[:count] == [f"m{i}" for i in range(count)]


def test_shutdown_ending_order(make_server):
    rec = Recorder()
    server = make_server(define_block("/", lambda ctx: {
        "on_open": lambda: rec.add("open"), "on_message": lambda m: rec.add("message", m),
        "on_close": lambda code, reason: rec.add("close", code)}))
    with connect(f"ws://127.0.0.1:{server.port}/") as ws:
        ws.send("before")
        rec.wait_kind("message")
        server.shutdown(timeout=WAIT)
    assert rec.wait_kind("close") == [("open",), ("message", "before"), ("close", 1001)]
