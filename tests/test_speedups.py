"""The optional C helpers (gaman_sync/_speedups.c): unmasking client frames,
and socket calls that cannot block made without releasing the GIL.

Unmasking must give exactly what wsproto's own masker gives, for every key,
length and way a payload is cut into reads; the socket calls must behave as
the socket methods do; and the server must behave the same with or without
the helpers.
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import subprocess
import sys
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gaman_sync import define_block
from gaman_sync.io import nonblocking
from gaman_sync.protocol import MessageReceived, Protocol, Side, frames
from gaman_sync.testing import BINARY, TEXT, RawPeer, chunks, frame

from .conftest import WAIT, Recorder

LINUX = sys.platform.startswith("linux")
needs_gate = pytest.mark.skipif(nonblocking.recv_gated is None,
                                reason="the C helper is not built here")
# Set where the package was installed without a compiler on purpose
# (.ci/test-installed VERSION no-helper); anywhere else the helper must be built.
WITHOUT_HELPER = os.environ.get("GAMAN_SYNC_WITHOUT_HELPER") == "1"
needs_helper = pytest.mark.skipif(WITHOUT_HELPER, reason="installed without the C helper "
                                  "on purpose (GAMAN_SYNC_WITHOUT_HELPER=1)")

keys = st.binary(min_size=4, max_size=4)
payloads = st.one_of(st.binary(max_size=300), st.binary(min_size=1000, max_size=70000))


def reference_xor(data: bytes, key: bytes) -> bytes:
    return bytes(b ^ key[i % 4] for i, b in enumerate(data))


def test_the_helpers_are_built():
    # CI compiles them; a silent fallback would leave the fast path untested.
    if WITHOUT_HELPER:  # then the fallback is in use, and says why
        built, why = nonblocking.speedups_status()
        assert not built and why, (built, why)
        assert frames.xor_mask is None and not Protocol(Side.SERVER).unmasks_in_c
        assert nonblocking.send is nonblocking.send_plain
        return
    assert frames.xor_mask is not None
    assert nonblocking.speedups_status() == (True, "")
    assert nonblocking.send is not nonblocking.send_plain
    assert nonblocking.recv is not nonblocking.recv_plain
    assert nonblocking.close is not nonblocking.close_plain
    assert nonblocking.recv_gated is not None
    assert Protocol(Side.SERVER).unmasks_in_c
    if LINUX:  # accept4()
        assert nonblocking.accept is not nonblocking.accept_plain


@pytest.fixture(params=["C helper", "socket methods"])
def calls(request):
    """``(send, recv, close, accept)``: the C helpers, then the socket methods."""
    if request.param == "C helper":
        return nonblocking.send, nonblocking.recv, nonblocking.close, nonblocking.accept
    return (nonblocking.send_plain, nonblocking.recv_plain, nonblocking.close_plain,
            nonblocking.accept_plain)


@pytest.mark.parametrize("family, host", [(socket.AF_INET, "127.0.0.1"),
                                          (socket.AF_INET6, "::1")], ids=["IPv4", "IPv6"])
def test_accept_gives_what_socket_accept_gives(calls, family, host):
    accept = calls[3]
    if family == socket.AF_INET6 and not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        listener = socket.create_server((host, 0), family=family)
    except OSError:
        pytest.skip(f"cannot listen on {host}")
    listener.setblocking(False)
    with listener:
        with pytest.raises(BlockingIOError):
            accept(listener)
        client = socket.create_connection(listener.getsockname()[:2], timeout=10)
        with client:
            assert select.select([listener], [], [], 10)[0]  # the connection is there
            sock, address = accept(listener)
            with sock:
                assert address == client.getsockname() == sock.getpeername()
                assert sock.family == family and sock.gettimeout() is None
                client.sendall(b"ping")
                assert sock.recv(4) == b"ping"


def test_nonblocking_calls_behave_as_the_socket_methods(calls):
    send, recv, close, _ = calls
    a, b = socket.socketpair()
    try:
        with pytest.raises(BlockingIOError):
            recv(b, 100)
        assert send(a, b"hello") == 5
        assert send(a, memoryview(b"<world>")[1:-1]) == 5
        assert recv(b, 3) == b"hel"
        assert recv(b, 100) == b"loworld"
        # The kernel takes what fits, then nothing, and says so.
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        chunk = b"x" * 65536
        total = 0
        with pytest.raises(BlockingIOError):
            for _ in range(1000):
                total += send(a, chunk)
        assert 0 < total < 1000 * len(chunk)
        close(a)
        assert a.fileno() == -1
        with pytest.raises(OSError):
            send(a, b"after close")
        got = 0
        while True:  # what was sent before the close, then the end of the stream
            data = recv(b, 65536)
            if not data:
                break
            got += len(data)
        assert got == total
    finally:
        a.close()
        b.close()


@needs_gate
def test_recv_gated_is_a_blocking_recv():
    from gaman_sync._speedups import recv_gated

    a, b = socket.socketpair()
    try:
        threading.Timer(0.05, a.sendall, (b"late",)).start()
        assert recv_gated(b.fileno(), 100) == b"late"  # waited for it
        a.sendall(b"0123456789")
        assert recv_gated(b.fileno(), 4) == b"0123"
        assert recv_gated(b.fileno(), 100) == b"456789"
        a.close()
        assert recv_gated(b.fileno(), 100) == b""
    finally:
        a.close()
        b.close()
    with pytest.raises(OSError):
        recv_gated(b.fileno(), 100)  # closed: -1


@needs_gate
def test_recv_gated_wakes_every_thread_when_more_than_the_gate_wake_at_once():
    """More threads than the gate lets through, woken together: each gets its
    own data, none is lost behind the gate."""
    from gaman_sync._speedups import recv_gated

    n = 400  # over the gate's 128
    pairs = [socket.socketpair() for _ in range(n)]
    got = [None] * n
    started = threading.Barrier(n + 1, timeout=10)

    def reader(i: int) -> None:
        started.wait()
        got[i] = recv_gated(pairs[i][1].fileno(), 100)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(n)]
    try:
        for t in threads:
            t.start()
        started.wait()
        for i, (a, _) in enumerate(pairs):
            a.sendall(b"%d" % i)
        for t in threads:
            t.join(10)
        assert not any(t.is_alive() for t in threads)
        assert got == [b"%d" % i for i in range(n)]
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_sending_to_a_vanished_peer_raises_without_sigpipe(calls):
    send = calls[0]
    a, b = socket.socketpair()
    b.close()
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        send(a, b"anyone?")
    a.close()


@needs_helper
@given(data=st.binary(max_size=200), key=keys)
def test_xor_mask_is_the_rfc_xor(data, key):
    buf = bytearray(data)
    frames.xor_mask(buf, key)
    assert bytes(buf) == reference_xor(data, key)


@needs_helper
def test_xor_mask_refuses_bad_arguments():
    with pytest.raises(ValueError):
        frames.xor_mask(bytearray(8), b"abc")
    with pytest.raises(TypeError):
        frames.xor_mask(b"read-only", b"abcd")


def messages(proto: Protocol, wire: bytes, cuts) -> list:
    got = []
    for piece in chunks(wire, cuts):
        proto.receive_data(piece)
        while True:
            _, event = proto.next_event()
            if event is None:
                break
            assert type(event) is MessageReceived, event
            got.append(event.data)
    return got


@pytest.mark.slow  # a long property run
@needs_helper
@given(sent=st.lists(st.tuples(st.booleans(), payloads, keys), min_size=1, max_size=4),
       cuts=st.lists(st.integers(0, 300000), max_size=10))
def test_protocol_gives_the_same_messages_with_and_without_the_helper(sent, cuts):
    wire = b"".join(frame(TEXT if text else BINARY,
                          data.decode("latin-1").encode("utf-8") if text else data, key=key)
                    for text, data, key in sent)
    expected = [data.decode("latin-1") if text else data for text, data, _ in sent]
    helped = Protocol(Side.SERVER, 1 << 20)
    fallback = Protocol(Side.SERVER, 1 << 20, unmask_in_c=False)
    assert helped.unmasks_in_c and not fallback.unmasks_in_c
    with_helper = messages(helped, wire, cuts)
    without = messages(fallback, wire, cuts)
    assert with_helper == without == expected


@pytest.mark.parametrize("helper", [
    pytest.param(True, id="C helpers", marks=needs_helper), pytest.param(False, id="pure Python")])
def test_echo_on_a_real_socket(make_server, helper):
    transports = []

    def echo(ctx):
        transports.append(ctx.transport)
        return {"on_message": ctx.send}

    nonblocking.use_speedups(helper)
    try:
        server = make_server([define_block("/echo", echo)])
        echo_over(server)
    finally:
        nonblocking.use_speedups(True)
    assert [t.uses_speedups for t in transports] == [helper]


def echo_over(server) -> None:
    with RawPeer.open("127.0.0.1", server.port, "/echo") as client:
        for size in (0, 1, 7, 125, 126, 4099, 65536, 1 << 20):
            data = os.urandom(size)
            key = os.urandom(4)
            # In pieces, so that one frame's payload is unmasked over several reads.
            wire = frame(BINARY, data, key=key)
            for piece in chunks(wire, range(0, len(wire), 65537)):
                client.send(piece)
            reply = client.recv_frame()
            assert (reply.opcode, reply.payload) == (BINARY, data), size
        client.send_frame(TEXT, "žluťoučký kůň " * 1000)
        assert client.recv_frame().payload.decode("utf-8") == "žluťoučký kůň " * 1000


@pytest.mark.parametrize("inherits", [False, True], ids=["accept4", "BSD accept"])
def test_connections_get_blocking_sockets(make_server, monkeypatch, inherits):
    """A connection's thread reads its socket in blocking mode. BSD's accept()
    passes the non-blocking listener's mode on to the socket (simulated
    here); an idle connection would then fail with 1006 at its first read."""
    if inherits:
        accept = nonblocking.accept

        def bsd_accept(listener):
            sock, address = accept(listener)
            os.set_blocking(sock.fileno(), False)
            return sock, address

        monkeypatch.setattr(nonblocking, "accept", bsd_accept)
        monkeypatch.setattr(nonblocking, "ACCEPT_GIVES_BLOCKING", False)
    seen = Recorder()

    def block(ctx):
        seen.add("blocking", os.get_blocking(ctx.transport.fileno()))
        return {"on_message": ctx.send, "on_close": lambda code, reason: seen.add("close", code)}

    server = make_server([define_block("/echo", block)])
    with RawPeer.open("127.0.0.1", server.port, "/echo", timeout=WAIT) as client:
        assert seen.wait_kind("blocking") == [("blocking", True)]
        threading.Event().wait(0.2)  # idle, so that the next read has to wait
        client.send_frame(TEXT, "still here")
        assert client.recv_frame().payload == b"still here"
        assert seen.kinds() == ["blocking"]


@pytest.mark.parametrize("checkout", [True, False])
def test_the_reason_it_is_not_in_use_gives_a_fix_that_works_where_it_runs(tmp_path, checkout):
    """Without the helper, the reason names the fix for where the package is
    imported from: a build in place for a checkout (an install elsewhere
    would be shadowed by it), a reinstall for an installed copy."""
    package = tmp_path / "gaman_sync"
    shutil.copytree(os.path.dirname(nonblocking.__file__).rsplit(os.sep, 1)[0], package,
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    if checkout:
        (tmp_path / "setup.py").write_text("")
    out = subprocess.run(
        # Without the finder of an editable install, which would find the
        # helper of the checkout these tests run from.
        [sys.executable, "-c", "import sys; sys.meta_path[:] = [f for f in sys.meta_path "
                               "if 'editable' not in repr(f)]; "
                               "from gaman_sync.io.nonblocking import speedups_status; "
                               "print(speedups_status())"],
        cwd=tmp_path, capture_output=True, text=True, timeout=WAIT,
        env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert "False" in out.stdout and "not built" in out.stdout
    if checkout:
        assert f"'pip install -e .' in {tmp_path}" in out.stdout, out.stdout
    else:
        assert "--force-reinstall" in out.stdout and "-e ." not in out.stdout, out.stdout
