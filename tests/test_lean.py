"""What an open connection keeps: nothing it does not need.

The memory per idle connection is measured by ``benchmarks/`` (RSS over a
thousand connections); these tests pin the mechanisms behind it, on real
connections where there is one: a server's request keeps its header lines
as one string and splits them when read, callbacks are checked without
giving each one an empty ``__dict__``, the fields that few connections set
take no room in those that do not, and connection threads are known as the
server's without a weak reference each.
"""

from __future__ import annotations

import gc
import inspect
import sys
import threading

import pytest

from gaman_sync import connect, define_block
from gaman_sync.connection.handler import as_handler
from gaman_sync.protocol.handshake import RequestParser
from gaman_sync.protocol.http import Headers

from .conftest import WAIT

HEAD = (b"GET /chat?room=1 HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\n"
        b"Connection: keep-alive, Upgrade\r\nX-Twice: a\r\nx-twice:  b c \r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
PAIRS = [("Host", "example.com"), ("Upgrade", "websocket"),
         ("Connection", "keep-alive, Upgrade"), ("X-Twice", "a"), ("x-twice", "b c"),
         ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="), ("Sec-WebSocket-Version", "13")]


def test_parsed_headers_read_as_the_pairs_they_were_sent_as():
    request = RequestParser(16384).feed(HEAD)
    assert request is not None
    made = Headers(PAIRS)
    for headers in (request.headers, made):
        assert headers.raw_items() == tuple(PAIRS)
        assert headers.get_all("X-TWICE") == ["a", "b c"]
        assert headers["x-twice"] == "a, b c"
        assert headers.get("host") == "example.com"
        assert "sec-websocket-key" in headers and "nope" not in headers
        assert list(headers) == ["Host", "Upgrade", "Connection", "X-Twice",
                                 "Sec-WebSocket-Key", "Sec-WebSocket-Version"]
        assert len(headers) == 6
    assert dict(request.headers) == dict(made)
    assert repr(request.headers) == repr(made)


def test_parsed_headers_keep_one_string_not_a_pair_per_header():
    request = RequestParser(16384).feed(HEAD)
    assert request is not None
    kept = [r for r in gc.get_referents(request.headers) if isinstance(r, (str, tuple))]
    assert len(kept) == 1 and isinstance(kept[0], str), kept
    pairs = Headers(PAIRS)
    assert sys.getsizeof(kept[0]) < sum(
        sys.getsizeof(name) + sys.getsizeof(value) + sys.getsizeof((name, value))
        for name, value in PAIRS)
    # Reading them does not make them kept.
    request.headers.get_all("host")
    assert [r for r in gc.get_referents(request.headers) if isinstance(r, (str, tuple))] == kept
    assert [r for r in gc.get_referents(pairs) if isinstance(r, tuple)]


def test_checking_callbacks_gives_them_no_dict():
    def on_message(message):
        pass

    seen_before = gc.get_referents(on_message)
    handler = as_handler({"on_message": on_message, "on_close": lambda code, reason: None})
    assert handler.on_message is on_message
    # A function's __dict__, once made, is among what it refers to.
    assert gc.get_referents(on_message) == seen_before


def test_coroutine_callbacks_are_still_refused():
    async def on_message(message):
        pass

    with pytest.raises(TypeError, match="async function"):
        as_handler({"on_message": on_message})
    marked = getattr(inspect, "markcoroutinefunction", None)
    if marked is not None:  # Python 3.12+: a plain def marked as a coroutine function
        def on_open():
            pass

        with pytest.raises(TypeError, match="async function"):
            as_handler({"on_open": marked(on_open)})


def test_an_idle_connection_sets_none_of_the_rare_fields(make_server):
    contexts = []
    opened = threading.Event()

    def chat(ctx):
        contexts.append(ctx)
        return {"on_open": opened.set, "on_message": ctx.send}

    server = make_server(define_block(path="/", websocket=chat), ping_interval=None)
    with connect(server.url("/"), ping_interval=None, compression=None) as client:
        assert opened.wait(WAIT)
        client.send("hello")
        assert client.recv(timeout=WAIT) == "hello"
        ctx = contexts[0]
        # Nothing of the connection went to its __dict__: slots only.
        assert vars(ctx) == {}
        assert ctx.deflate_agreement is None
    # With compression, what it agreed is the protocol's: nothing kept twice.
    with connect(server.url("/"), ping_interval=None) as client:
        client.send("hello")
        assert client.recv(timeout=WAIT) == "hello"
        assert contexts[1].deflate_agreement is not None
        assert vars(contexts[1]) == {}
        thread = ctx.thread
        assert thread is not None and server.runtime.owns(thread)
        assert thread in server.threads
        assert not server.runtime.owns(threading.current_thread())
