"""permessage-deflate (RFC 7692): negotiation, both ends, against websockets
and raw peers; bounded inflation (a zip bomb costs the limit, not its size);
one compressed frame per window for a broadcast."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import zlib
from typing import Any, Dict, Iterator, List, Optional

import pytest
from websockets.extensions.permessage_deflate import (
    ClientPerMessageDeflateFactory,
    ServerPerMessageDeflateFactory,
)
from websockets.sync.client import connect as ws_connect
from websockets.sync.server import serve as ws_serve

from gaman_sync import Deflate, InvalidHeader, Options, connect, define_block
from gaman_sync.protocol import Side
from gaman_sync.protocol.deflate import (
    Agreement,
    NegotiationError,
    client_agreement,
    client_offer,
    parse_extensions,
    server_answer,
)
from gaman_sync.protocol.state import Protocol
from gaman_sync.server import blocks as blocks_module
from gaman_sync.testing.raw import BINARY, TEXT, RawPeer, frame
from gaman_sync.testing.raw import CONT as CONTINUATION

from .conftest import WAIT

OFFER = ("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits")
JSON_4K = json.dumps([{"id": i, "name": f"user {i}", "online": i % 3 == 0, "score": i * 7}
                      for i in range(80)])[:4096]


def deflate(data: bytes, bits: int = 15) -> bytes:
    """``data`` compressed as one message (RFC 7692 7.2.1)."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, -bits)
    out = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


def inflate(data: bytes, bits: int = 15) -> bytes:
    return zlib.decompressobj(-bits).decompress(data + b"\x00\x00\xff\xff")


def echo_block(path: str = "/echo") -> Any:
    return define_block(path, lambda ctx: {"on_message": ctx.send})


# -- Negotiation, sans-IO --------------------------------------------------------------

def test_the_server_always_answers_server_no_context_takeover():
    answer, agreement = server_answer(["permessage-deflate"], Deflate())
    assert answer == "permessage-deflate; server_no_context_takeover"
    assert agreement.server_no_context_takeover and not agreement.client_no_context_takeover
    assert (agreement.server_max_window_bits, agreement.client_max_window_bits) == (15, 15)


@pytest.mark.parametrize("offer, expected", [
    # The client's requests are honoured, and capped by our settings.
    ("permessage-deflate; server_max_window_bits=10",
     "permessage-deflate; server_no_context_takeover; server_max_window_bits=10"),
    ("permessage-deflate; client_max_window_bits",
     "permessage-deflate; server_no_context_takeover; client_max_window_bits=12"),
    ('permessage-deflate; client_max_window_bits="10"',
     "permessage-deflate; server_no_context_takeover; client_max_window_bits=10"),
    ("permessage-deflate; client_no_context_takeover",
     "permessage-deflate; server_no_context_takeover; client_no_context_takeover"),
    ("permessage-deflate; server_no_context_takeover; server_max_window_bits=8",
     "permessage-deflate; server_no_context_takeover; server_max_window_bits=8"),
    # Invalid offers are declined, and the next one taken (RFC 7692 5).
    ("permessage-deflate; foo, permessage-deflate",
     "permessage-deflate; server_no_context_takeover"),
    ("permessage-deflate; server_max_window_bits=16, x-other, permessage-deflate; "
     "client_no_context_takeover",
     "permessage-deflate; server_no_context_takeover; client_no_context_takeover"),
    ("permessage-deflate; server_max_window_bits",  # needs a value
     None),
    ("permessage-deflate; client_no_context_takeover=1", None),
    ("permessage-deflate; server_max_window_bits=09", None),  # no leading zero
    ("permessage-deflate; client_max_window_bits; client_max_window_bits", None),
    ("x-webkit-deflate-frame", None),
    ("permessage-deflate; bad value", None),  # does not parse: no compression
])
def test_server_answer(offer, expected):
    result = server_answer([offer], Deflate())
    assert (result[0] if result else None) == expected


def test_server_settings_shape_the_answer():
    options = Deflate(server_max_window_bits=11, client_max_window_bits=9,
                      client_no_context_takeover=True)
    answer, agreement = server_answer(["permessage-deflate; client_max_window_bits"], options)
    assert answer == ("permessage-deflate; server_no_context_takeover; "
                      "client_no_context_takeover; server_max_window_bits=11; "
                      "client_max_window_bits=9")
    assert agreement == Agreement(11, 9, True, True, options)
    # Without client_max_window_bits in the offer, the answer may not limit it.
    answer, agreement = server_answer(["permessage-deflate"], options)
    assert "client_max_window_bits" not in answer and agreement.client_max_window_bits == 15


def test_client_offer_and_agreement():
    options = Deflate(server_max_window_bits=10, client_max_window_bits=15,
                      server_no_context_takeover=True, client_no_context_takeover=True)
    offer = client_offer(options)
    assert offer == ("permessage-deflate; server_no_context_takeover; client_no_context_takeover;"
                     " server_max_window_bits=10; client_max_window_bits")
    answer, server_side = server_answer([offer], Deflate())
    client_side = client_agreement([answer], options)
    assert client_side.sending(True) == server_side.receiving(False)
    assert client_side.receiving(True) == server_side.sending(False) == (10, True)


@pytest.mark.parametrize("answer, options, complaint", [
    ("x-other", Deflate(), "selected x-other"),
    ("permessage-deflate, permessage-deflate", Deflate(), "once"),
    ("permessage-deflate; foo", Deflate(), "unknown parameter foo"),
    ("permessage-deflate; client_max_window_bits", Deflate(), "needs a value"),
    ("permessage-deflate; server_max_window_bits=7", Deflate(), "not 8 to 15"),
    ("permessage-deflate", Deflate(server_no_context_takeover=True),
     "lacks the server_no_context_takeover"),
    ("permessage-deflate", Deflate(server_max_window_bits=10),
     "lacks the server_max_window_bits"),
    ("permessage-deflate; server_max_window_bits=12", Deflate(server_max_window_bits=10),
     "more than the 10"),
    ("permessage-deflate; =", Deflate(), "does not parse"),
])
def test_client_refuses_an_invalid_answer(answer, options, complaint):
    with pytest.raises(NegotiationError, match=complaint):
        client_agreement([answer], options)


def test_extension_header_parsing():
    assert parse_extensions(['a; x=1; y="2", b', "c"]) == [
        ("a", [("x", "1"), ("y", "2")]), ("b", []), ("c", [])]
    # Spaces and tabs are HTTP's whitespace; what str.strip() also takes
    # (NBSP, NEL, 0x1c-0x1f: latin-1 bytes of the header) is not.
    assert parse_extensions([" \ta ;\tx = 1 \t, b\t"]) == [("a", [("x", "1")]), ("b", [])]
    for odd in ("\xa0", "\x85", "\x1f"):
        with pytest.raises(ValueError):
            parse_extensions([f"permessage-deflate{odd}"])
        with pytest.raises(ValueError):
            parse_extensions([f"permessage-deflate; client_max_window_bits=10{odd}"])


def test_options_are_checked():
    assert Options(compression="deflate").compression == Deflate()
    assert Options(compression=None).compression is None
    with pytest.raises(ValueError, match="compression must be 'deflate', None"):
        Options(compression="gzip")
    with pytest.raises(ValueError, match="server_max_window_bits must be an int from 9 to 15"):
        Deflate(server_max_window_bits=8)
    with pytest.raises(TypeError, match="client_no_context_takeover must be True or False"):
        Deflate(client_no_context_takeover=1)
    with pytest.raises(ValueError, match="level"):
        Deflate(level=0)


# -- Bounded inflation, sans-IO ------------------------------------------------------------

def server_protocol(max_size: Optional[int], offer: str = "permessage-deflate") -> Protocol:
    answer = server_answer([offer], Deflate())
    assert answer is not None
    return Protocol(Side.SERVER, max_size, deflate=answer[1])


def events_of(proto: Protocol, data: bytes) -> List[Any]:
    proto.receive_data(data)
    events = []
    while True:
        _, event = proto.next_event()
        if event is None:
            return events
        events.append(event)
        if type(event).__name__ in ("Failed", "Closed"):
            return events


def test_a_compressed_message_over_the_limit_fails_with_1009_unbuffered():
    proto = server_protocol(64 * 1024)
    # 64 KiB + 1 of zeros: a few hundred compressed bytes.
    events = events_of(proto, frame(BINARY, deflate(b"\0" * (64 * 1024 + 1)), rsv=4))
    assert [(type(e).__name__, getattr(e, "code", None)) for e in events] == [("Failed", 1009)]
    # At the limit exactly, it passes.
    proto = server_protocol(64 * 1024)
    (event,) = events_of(proto, frame(BINARY, deflate(b"\0" * 64 * 1024), rsv=4))
    assert event.data == b"\0" * 64 * 1024


def test_compressed_fragments_with_a_ping_between_and_context_takeover():
    proto = server_protocol(None)
    text = "caf\u00e9 " * 300
    first, second = deflate(text.encode()), deflate(text.encode())
    data = (frame(TEXT, first[:10], fin=False, rsv=4) + frame(0x9, b"ping")
            + frame(CONTINUATION, first[10:]) + frame(TEXT, second, rsv=4))
    assert [e.data for e in events_of(proto, data)] == [text, text]


@pytest.mark.parametrize("data, code", [
    (frame(BINARY, b"\xff\xff\xff\xff", rsv=4), 1007),                 # not deflate
    (frame(BINARY, b"x", fin=False, rsv=4) + frame(CONTINUATION, b"y", rsv=4), 1002),
    (frame(0x9, b"", rsv=4), 1002),                                    # RSV1 on a ping
    (frame(TEXT, deflate(b"\xff\xfe"), rsv=4), 1007),                  # invalid UTF-8 inside
    (frame(BINARY, b"", rsv=2), 1002),                                 # RSV2: no extension
])
def test_bad_compressed_frames_fail_with_the_right_code(data, code):
    events = events_of(server_protocol(1 << 20), data)
    assert type(events[-1]).__name__ == "Failed" and events[-1].code == code, events


def test_rsv1_without_the_extension_is_a_protocol_error():
    proto = Protocol(Side.SERVER, 1 << 20)
    events = events_of(proto, frame(BINARY, deflate(b"abc"), rsv=4))
    assert events[-1].code == 1002


# -- On the wire: our server ---------------------------------------------------------------

def test_raw_client_sees_compressed_frames_above_the_threshold(make_server):
    server = make_server(echo_block(), compression=Deflate(min_size=100))
    with RawPeer.open("127.0.0.1", server.port, "/echo", strict=False,
                      headers=[OFFER]) as peer:
        big, small = "a" * 1000, "b" * 99
        peer.send(frame(TEXT, deflate(big.encode()), rsv=4))
        echoed = peer.recv_frame(WAIT)
        assert echoed.rsv == 4 and inflate(echoed.payload) == big.encode()
        assert len(echoed.payload) < 100
        peer.send(frame(TEXT, small))
        echoed = peer.recv_frame(WAIT)
        assert echoed.rsv == 0 and echoed.payload == small.encode()


def test_compression_off_refuses_the_offer(make_server):
    server = make_server(echo_block(), compression=None)
    with ws_connect(server.url("/echo")) as ws:  # websockets offers deflate by default
        assert ws.response.headers.get("Sec-WebSocket-Extensions") is None
        ws.send("x" * 5000)
        assert ws.recv(timeout=WAIT) == "x" * 5000


@pytest.mark.parametrize("client_options, expected", [
    ({}, "permessage-deflate; server_no_context_takeover; client_max_window_bits=12"),
    ({"client_no_context_takeover": True},
     "permessage-deflate; server_no_context_takeover; client_no_context_takeover; "
     "client_max_window_bits=12"),
    ({"server_max_window_bits": 10, "client_max_window_bits": 9},
     "permessage-deflate; server_no_context_takeover; server_max_window_bits=10; "
     "client_max_window_bits=9"),
    ({"server_no_context_takeover": True, "client_max_window_bits": None},
     "permessage-deflate; server_no_context_takeover"),
])
def test_websockets_client_against_our_server(make_server, client_options, expected):
    server = make_server(echo_block(), compression=Deflate(min_size=0))
    factory = ClientPerMessageDeflateFactory(**client_options)
    messages = [JSON_4K, JSON_4K.encode(), "tiny", JSON_4K[::-1], os.urandom(3000)]
    with ws_connect(server.url("/echo"), extensions=[factory]) as ws:
        assert ws.response.headers["Sec-WebSocket-Extensions"] == expected
        for message in messages * 3:
            ws.send(message)
            assert ws.recv(timeout=WAIT) == message


def test_our_client_against_our_server_both_ways(make_server):
    seen: Dict[str, Any] = {}

    def handler(ctx):
        seen["agreement"] = ctx.deflate_agreement
        return {"on_message": ctx.send}

    server = make_server(define_block("/echo", handler), compression=Deflate(min_size=0))
    for options in (Deflate(), Deflate(client_no_context_takeover=True,
                                       server_max_window_bits=9, client_max_window_bits=10)):
        with connect(server.url("/echo"), compression=options) as client:
            for message in [JSON_4K, "x", b"\0" * 100_000, JSON_4K] * 2:
                client.send(message)
                assert client.recv(timeout=WAIT) == message
            assert client.response.headers["Sec-WebSocket-Extensions"].startswith(
                "permessage-deflate; server_no_context_takeover")
        agreement = seen["agreement"]
        assert agreement.client_no_context_takeover is options.client_no_context_takeover
        assert agreement.server_max_window_bits == options.server_max_window_bits
        assert agreement.client_max_window_bits == options.client_max_window_bits


def test_threaded_sends_with_context_takeover_stay_in_order(make_server):
    """A client compressing with context takeover compresses in wire order."""
    received: List[str] = []
    done = threading.Event()

    def handler(ctx):
        def on_message(message):
            received.append(message)
            if len(received) == 400:
                done.set()
        return {"on_message": on_message}

    server = make_server(define_block("/in", handler))
    with connect(server.url("/in"), compression=Deflate(min_size=0)) as client:
        def sender(tag: str) -> None:
            for i in range(100):
                client.send(f"{tag} {i} " + JSON_4K[: 200 + i])

        threads = [threading.Thread(target=sender, args=(t,)) for t in "abcd"]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
        assert done.wait(WAIT), f"{len(received)} of 400 messages arrived"
    for tag in "abcd":
        mine = [m for m in received if m.startswith(tag + " ")]
        assert mine == [f"{tag} {i} " + JSON_4K[: 200 + i] for i in range(100)]


def test_a_message_that_inflates_past_the_limit_closes_with_1009(make_server):
    server = make_server(echo_block(), max_message_size=100_000)
    with RawPeer.open("127.0.0.1", server.port, "/echo", strict=False,
                      headers=[OFFER]) as peer:
        peer.send(frame(BINARY, deflate(b"\0" * 100_001), rsv=4))
        assert peer.expect_close(WAIT).close_code() == 1009


# -- Our client against websockets' server ---------------------------------------------------

@contextlib.contextmanager
def websockets_echo(**options: Any) -> Iterator[str]:
    def echo(ws):
        for message in ws:
            ws.send(message)

    server = ws_serve(echo, "127.0.0.1", 0, **options)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"ws://127.0.0.1:{server.socket.getsockname()[1]}/"
    finally:
        server.shutdown()
        thread.join(WAIT)


@pytest.mark.parametrize("server_options, client_options", [
    ({}, Deflate()),
    ({"server_no_context_takeover": True, "client_no_context_takeover": True},
     Deflate()),
    ({"server_max_window_bits": 9, "client_max_window_bits": 9}, Deflate(min_size=0)),
    ({}, Deflate(server_no_context_takeover=True, client_no_context_takeover=True,
                 server_max_window_bits=10, client_max_window_bits=11)),
])
def test_our_client_against_websockets_server(server_options, client_options):
    factory = ServerPerMessageDeflateFactory(**server_options)
    with websockets_echo(extensions=[factory]) as url:
        with connect(url, compression=client_options) as client:
            agreement = client_agreement(
                client.response.headers.get_all("Sec-WebSocket-Extensions"), client_options)
            for key in ("server_no_context_takeover", "client_no_context_takeover"):
                if server_options.get(key) or getattr(client_options, key):
                    assert getattr(agreement, key), key
            if "client_max_window_bits" in server_options:
                assert agreement.client_max_window_bits == 9
            for message in [JSON_4K, JSON_4K.encode(), "x", JSON_4K, b"\1" * 70_000] * 3:
                client.send(message)
                assert client.recv(timeout=WAIT) == message


def test_our_client_with_a_server_that_refuses_the_extension():
    with websockets_echo(compression=None) as url:
        with connect(url) as client:
            assert "Sec-WebSocket-Extensions" not in client.response.headers
            client.send(JSON_4K)
            assert client.recv(timeout=WAIT) == JSON_4K


def test_our_client_without_compression_offers_nothing(make_server):
    offers: List[Optional[str]] = []

    def handler(ctx):
        offers.append(ctx.request.headers.get("Sec-WebSocket-Extensions"))
        return {}

    server = make_server(define_block("/", handler))
    with connect(server.url("/"), compression=None):
        pass
    with connect(server.url("/")):
        pass
    assert offers == [None, client_offer(Deflate())]


def fake_server(extensions: str) -> Iterator[int]:
    """A server that answers any handshake with a 101 carrying ``extensions``."""
    from gaman_sync.protocol.handshake import accept_token
    listener = socket.create_server(("127.0.0.1", 0))

    def run():
        sock, _ = listener.accept()
        with sock:
            request = b""
            while b"\r\n\r\n" not in request:
                request += sock.recv(4096)
            key = next(line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
                       if line.lower().startswith(b"sec-websocket-key:"))
            sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept_token(key)
                         + b"\r\nSec-WebSocket-Extensions: " + extensions.encode()
                         + b"\r\n\r\n")
            sock.settimeout(WAIT)
            with contextlib.suppress(OSError):
                sock.recv(1)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return listener, thread


@pytest.mark.parametrize("extensions, message", [
    ("permessage-deflate; server_max_window_bits=20", "not 8 to 15"),
    ("x-webkit-deflate-frame", "selected x-webkit-deflate-frame"),
    ("permessage-deflate; client_max_window_bits", "needs a value"),
])
def test_our_client_refuses_an_invalid_answer(extensions, message):
    listener, thread = fake_server(extensions)
    with listener:
        with pytest.raises(InvalidHeader, match=message):
            connect(f"ws://127.0.0.1:{listener.getsockname()[1]}/", open_timeout=WAIT)
    thread.join(WAIT)


# -- Broadcast: compressed once per window ------------------------------------------------------

def test_broadcast_is_compressed_once_per_window(make_server, monkeypatch):
    calls: List[int] = []
    real = blocks_module.broadcast_frame

    def counting(message, agreement):
        calls.append(agreement.broadcast_window())
        return real(message, agreement)

    monkeypatch.setattr(blocks_module, "broadcast_frame", counting)
    joined = threading.Semaphore(0)

    def handler(ctx):
        return {"on_open": joined.release}

    server = make_server(define_block("/room", handler))
    peers = []
    offers = [[OFFER]] * 5 + [[("Sec-WebSocket-Extensions",
                                "permessage-deflate; server_max_window_bits=10")]] * 3 + [[]] * 2
    try:
        for headers in offers:
            peers.append(RawPeer.open("127.0.0.1", server.port, "/room", strict=False,
                                      headers=headers))
        for _ in offers:
            assert joined.acquire(timeout=WAIT)
        block = server.blocks[0]
        deadline = time.monotonic() + WAIT
        while len(block.clients) < len(offers) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert block.broadcast(JSON_4K) == len(offers)
        assert sorted(calls) == [10, 15]
        frames = [peer.recv_frame(WAIT) for peer in peers]
        for got, headers in zip(frames, offers):
            if headers:
                assert got.rsv == 4 and len(got.payload) < len(JSON_4K) // 2
                assert inflate(got.payload).decode() == JSON_4K
            else:
                assert got.rsv == 0 and got.payload.decode() == JSON_4K
        # Same window, same bytes: one frame shared.
        assert len({f.payload for f in frames[:5]}) == 1
        assert server.broadcast(JSON_4K) == len(offers)  # the whole server's too
        assert len(calls) == 4
    finally:
        for peer in peers:
            peer.close()


# -- A zip bomb costs the limit, not its size ------------------------------------------------------

SERVER_SCRIPT = """
import sys
from gaman_sync import define_block
from gaman_sync.testing import run_server
with run_server(define_block("/", lambda ctx: {}), max_message_size=int(sys.argv[1])) as server:
    print(server.port, flush=True)
    sys.stdin.read()
"""


def peak_rss(pid: int) -> int:
    """VmHWM of ``pid``, in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def bomb_frames(total: int, per_frame: int) -> Iterator[bytes]:
    """``total`` zero bytes streamed through zlib, as one compressed message
    in frames of about ``per_frame`` compressed bytes."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = bytes(1 << 20)
    pending = b""
    first = True
    for _ in range(total // len(zeros)):
        pending += compressor.compress(zeros)
        if len(pending) >= per_frame:
            yield frame(BINARY if first else CONTINUATION, pending, fin=False,
                        rsv=4 if first else 0)
            first, pending = False, b""
    pending += compressor.flush(zlib.Z_SYNC_FLUSH)[:-4]
    yield frame(CONTINUATION, pending, fin=True)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc (Linux)")
def test_a_1_gib_zip_bomb_costs_no_more_than_the_limit():
    # 16 MiB: large enough that inflating whatever one read brings in (the
    # reads grow to 512 KiB, about 512 MiB inflated) would pass the bound
    # below before the size check after it could fail the message.
    limit = 16 << 20
    proc = subprocess.Popen([sys.executable, "-c", SERVER_SCRIPT, str(limit)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        # Warm up: a handshake and a compressed message, so that the
        # baseline includes what any connection costs.
        with RawPeer.open("127.0.0.1", port, "/", strict=False, headers=[OFFER]) as peer:
            peer.send(frame(BINARY, deflate(b"warm" * 1000), rsv=4))
            peer.close_handshake()
        before = peak_rss(proc.pid)
        sent = 0
        with RawPeer.open("127.0.0.1", port, "/", strict=False, headers=[OFFER],
                          timeout=60) as peer:
            # 1 GiB in frames of 256 KiB compressed (each about 256 MiB inflated).
            for data in bomb_frames(1 << 30, 256 * 1024):
                try:
                    peer.send(data)
                except OSError:
                    break  # the server has closed: the rest is not needed
                sent += len(data)
            close = peer.expect_close(60)
        after = peak_rss(proc.pid)
        assert close.close_code() == 1009
        grown = after - before
        print(f"peak RSS grew by {grown / 2**20:.1f} MiB")
        assert grown < limit + 64 * 1024 * 1024, (
            f"peak RSS grew by {grown / 2**20:.0f} MiB for a 1 GiB bomb "
            f"({sent} compressed bytes sent), limit {limit >> 20} MiB")
    finally:
        proc.stdin.close()
        proc.wait(WAIT)
        proc.stdout.close()


def test_the_cli_takes_compression(tmp_path):
    helped = subprocess.run([sys.executable, "-m", "gaman_sync", "--help"], capture_output=True,
                            text=True, timeout=WAIT * 3)
    assert "--compression {deflate,none}" in helped.stdout
    wrong = subprocess.run([sys.executable, "-m", "gaman_sync", "examples.chat:block",
                            "--compression", "gzip"], capture_output=True, text=True,
                           timeout=WAIT * 3)
    assert wrong.returncode == 2 and "--compression" in wrong.stderr.strip().splitlines()[-1]


def test_compressed_frames_fed_one_byte_at_a_time():
    """wsproto parses a header again when its masking key is not all there:
    the inflater must not take it for a new frame."""
    proto = server_protocol(1 << 20)
    text = JSON_4K
    data = (frame(TEXT, deflate(text.encode())[:7], fin=False, rsv=4)
            + frame(CONTINUATION, deflate(text.encode())[7:]) + frame(BINARY, b"plain"))
    events: List[Any] = []
    for i in range(len(data)):
        events += events_of(proto, data[i:i + 1])
    assert [e.data for e in events] == [text, b"plain"]
