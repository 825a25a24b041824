"""WSS on both ends: TLS in memory on the server and the client, over real
TLS on loopback, with certificates made at test time by ``trustme``.

trustme is a test-only dependency (the ``test`` extra). Without it these
tests skip, unless ``GAMAN_SYNC_REQUIRE_PEERS=1`` (``.ci/run`` sets it): then
they fail.
"""

from __future__ import annotations

import datetime
import http.client
import logging
import os
import re
import select
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import gaman_sync
from gaman_sync import (
    InvalidCertificate,
    InvalidHandshake,
    InvalidRedirect,
    WebSocketServer,
    connect,
    define_block,
)

from .conftest import WAIT

ROOT = Path(__file__).resolve().parent.parent

try:
    import trustme
except ImportError:  # pragma: no cover - depends on the environment
    trustme = None
    if os.environ.get("GAMAN_SYNC_REQUIRE_PEERS") == "1":
        raise RuntimeError("GAMAN_SYNC_REQUIRE_PEERS=1, but trustme is not installed "
                           "(pip install -e '.[test]')") from None
    pytestmark = pytest.mark.skip(reason="trustme is not installed (pip install -e '.[test]')")


# -- Certificates ---------------------------------------------------------------

@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture(scope="module")
def server_context(ca):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


@pytest.fixture(scope="module")
def client_context(ca):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(context)
    return context


def _echo_block(path="/echo"):
    return define_block(path, lambda ctx: {"on_message": ctx.send})


@pytest.fixture
def wss_server(make_server, server_context):
    return make_server(_echo_block(), ssl_context=server_context)


def _conn_threads(server):
    return [t for t in server.threads if server.runtime.workers.owns(t)]


# -- Echo -------------------------------------------------------------------------

def test_url_is_wss(wss_server):
    assert wss_server.url("/echo") == f"wss://127.0.0.1:{wss_server.port}/echo"


@pytest.mark.parametrize("message", ["hello", "", "é" * 1000, b"\x00\xff" * 7,
                                     bytes(range(256)) * 4096],
                         ids=["text", "empty", "unicode", "binary", "1MiB"])
def test_echo_with_our_client(wss_server, client_context, message):
    with connect(wss_server.url("/echo"), ssl_context=client_context,
                 open_timeout=WAIT) as conn:
        assert isinstance(conn.transport, gaman_sync.io.tls.TLSTransport)
        assert conn.transport.ssl.version() in ("TLSv1.2", "TLSv1.3")
        for _ in range(3):
            conn.send(message)
            assert conn.recv(timeout=WAIT) == message
    assert conn.close_code == 1000


def test_echo_with_the_websockets_client(wss_server, client_context):
    sync_client = pytest.importorskip("websockets.sync.client")
    big = os.urandom(1 << 20)
    with sync_client.connect(wss_server.url("/echo"), ssl=client_context,
                             open_timeout=WAIT) as ws:
        for message in ["hi", b"\x01\x02", big, "x" * 70000]:
            ws.send(message)
            assert ws.recv(timeout=WAIT) == message


def test_large_messages_to_a_slow_reader_arrive_whole_and_in_order(make_server,
                                                                   server_context,
                                                                   client_context):
    """The server writes far more than the kernel holds while the client does
    not read: the writes wait (bounded by write_limit), ciphertext held in the
    transport goes out as the client reads, every byte in order."""
    chunks = [os.urandom(400_000 + i) for i in range(64)]  # random: compression saves nothing
    done = threading.Event()
    failed = []

    def websocket(ctx):
        def send_all():
            try:
                for chunk in chunks:
                    ctx.send(chunk, timeout=WAIT)
                ctx.send("end")
            except Exception as exc:  # pragma: no cover - reported below
                failed.append(exc)
            done.set()
        threading.Thread(target=send_all, daemon=True).start()
        return {}

    server = make_server(define_block("/big", websocket), ssl_context=server_context,
                         write_limit=256 * 1024)
    # A small receive buffer: the kernel (up to 32 MiB of autotuned buffers
    # on loopback) must not hold the whole stream.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.connect(("127.0.0.1", server.port))
    with connect(server.url("/big"), ssl_context=client_context, open_timeout=WAIT,
                 max_message_size=1 << 20, max_queue=1, sock=sock) as conn:
        time.sleep(0.3)  # let the server fill the kernel's buffers and its own
        assert not done.is_set()  # it is held by the client, not finished
        for chunk in chunks:
            assert conn.recv(timeout=WAIT) == chunk
        assert conn.recv(timeout=WAIT) == "end"
    assert done.wait(WAIT) and not failed


def test_the_last_bytes_of_a_write_the_kernel_held_back_still_go_out(make_server,
                                                                    server_context,
                                                                    client_context):
    """One large message, then nothing, through a small send buffer and to a
    reader that takes a few KiB at a time: the kernel takes the ciphertext
    in parts, and the message must arrive whole although nothing is written
    after it (what waits in the transport goes out; the write contract itself
    is checked in test_transport_counts_what_waits_in_it_as_not_taken)."""
    size = (3 << 20) + 40000  # the last 64 KiB chunk holds 40,010 bytes
    payload = (bytes(range(256)) * (size // 256 + 1))[:size]
    block = define_block("/one", lambda ctx: {"on_open": lambda: ctx.send(payload)})
    server = make_server(block, ssl_context=server_context)
    # The server's end with a small send buffer (the server adopts it): every
    # 64 KiB chunk of ciphertext is then taken in part, the last one too.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        raw = socket.create_connection(listener.getsockname(), timeout=WAIT)
        ours, address = listener.accept()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    server.adopt(ours, address)
    with client_context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(b"GET /one HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    b"Sec-WebSocket-Version: 13\r\n\r\n")
        received = b""
        while b"\r\n\r\n" not in received:
            received += tls.recv(4096)
        head, _, received = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101")
        time.sleep(0.2)  # the server fills the kernel's buffers
        wanted = 10 + size  # a 64-bit length header, then the payload
        parts = [received]
        got = len(received)
        while got < wanted:
            chunk = tls.recv(min(4096, wanted - got))  # socket.timeout fails the test
            assert chunk, f"the server closed after {got} of {wanted} bytes"
            parts.append(chunk)
            got += len(chunk)
        frame = b"".join(parts)
    assert frame[:2] == b"\x82\x7f" and int.from_bytes(frame[2:10], "big") == size
    assert frame[10:] == payload


def _tls_pair(server_context, client_context):
    """Two TLS transports over a TCP connection on loopback, handshake done."""
    from gaman_sync.io.tls import TLSTransport
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client_sock = socket.create_connection(listener.getsockname(), timeout=WAIT)
        server_sock, _ = listener.accept()
    client_sock.settimeout(None)
    server = TLSTransport(server_sock, server_context, server_side=True)
    client = TLSTransport(client_sock, client_context, server_side=False,
                          server_hostname="127.0.0.1")
    done = threading.Thread(target=client.handshake_blocking,
                            args=(time.monotonic() + WAIT,), daemon=True)
    done.start()
    server.handshake_blocking(time.monotonic() + WAIT)
    done.join(WAIT)
    assert client.handshake_done and server.handshake_done
    return server, client


def test_transport_counts_what_waits_in_it_as_not_taken(server_context, client_context):
    """The write contract, as the engine uses it: plaintext reported taken is
    never offered again, what was not is offered again first; ciphertext the
    kernel did not take never makes a write report everything (the engine
    would stop watching the socket with it unsent)."""
    server, client = _tls_pair(server_context, client_context)
    try:
        message = bytes(range(256)) * 200  # one chunk: every write's last
        stream = bytearray()
        for _ in range(10_000):  # the client does not read yet: fill the kernel
            try:
                taken = server.send_nowait(message)
            except BlockingIOError:
                taken = 0
            stream += message[:taken]
            if taken < len(message):
                break
            assert not server.wants_write, "all reported taken, but ciphertext waits"
        assert taken < len(message) and server.wants_write
        received = bytearray()
        total = len(stream) + len(message) - taken

        def read():
            while len(received) < total:
                data = client.recv(65536)
                if not data:
                    return
                received.extend(data)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        rest = memoryview(message)[taken:]
        deadline = time.monotonic() + WAIT
        while rest:  # what the engine does: offer the rest again once writable
            assert time.monotonic() < deadline
            select.select([], [server.fileno()], [], WAIT)
            try:
                taken = server.send_nowait(rest)
            except BlockingIOError:
                continue
            assert 0 < taken <= len(rest)
            stream += rest[:taken]
            rest = rest[taken:]
            assert rest or not server.wants_write, "all reported taken, but ciphertext waits"
        reader.join(WAIT)
        assert bytes(received) == bytes(stream)
    finally:
        server.close()
        client.close()


def test_broadcast_reaches_tls_clients_while_one_does_not_read(make_server, server_context,
                                                                client_context):
    block = define_block("/room", lambda ctx: {})
    server = make_server(block, ssl_context=server_context, write_limit=64 * 1024)
    stalled = connect(server.url("/room"), ssl_context=client_context, open_timeout=WAIT,
                      max_queue=1, max_message_size=1 << 20)
    readers = [connect(server.url("/room"), ssl_context=client_context, open_timeout=WAIT,
                       max_message_size=1 << 20) for _ in range(3)]
    try:
        deadline = time.monotonic() + WAIT
        while len(server.clients) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        payload = b"b" * 100_000
        started = time.monotonic()
        for i in range(40):
            server.broadcast(payload + bytes([i]))
            for reader in readers:
                assert reader.recv(timeout=WAIT) == payload + bytes([i])
        assert time.monotonic() - started < WAIT
    finally:
        for conn in [stalled, *readers]:
            conn.terminate()


# -- Certificates refused -------------------------------------------------------

def test_untrusted_certificate_is_refused_with_a_clear_error(wss_server):
    url = wss_server.url("/echo")
    other = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    trustme.CA().configure_trust(other)  # trusts another CA only
    for context in (None, other):  # the system's CAs, then another CA
        with pytest.raises(InvalidCertificate) as caught:
            connect(url, ssl_context=context, open_timeout=WAIT)
        exc = caught.value
        assert isinstance(exc, InvalidHandshake) and isinstance(exc, ssl.SSLCertVerificationError)
        assert url in str(exc) and "does not verify" in str(exc)
        assert exc.verify_code is not None and exc.verify_message
    assert not wss_server.clients


def test_expired_certificate_is_refused_with_a_clear_error(make_server, ca, client_context):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca.issue_cert("127.0.0.1", not_before=now - datetime.timedelta(days=30),
                  not_after=now - datetime.timedelta(days=1)).configure_cert(context)
    server = make_server(_echo_block(), ssl_context=context)
    with pytest.raises(InvalidCertificate, match="expired") as caught:
        connect(server.url("/echo"), ssl_context=client_context, open_timeout=WAIT)
    assert server.url("/echo") in str(caught.value)


def test_certificate_for_another_host_is_refused(make_server, ca, client_context):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("other.example").configure_cert(context)
    server = make_server(_echo_block(), ssl_context=context)
    with pytest.raises(InvalidCertificate, match=r"127\.0\.0\.1"):
        connect(server.url("/echo"), ssl_context=client_context, open_timeout=WAIT)


def test_client_certificates_required_and_checked(make_server, ca, client_context, tmp_path):
    clients_ca = trustme.CA()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    clients_ca.configure_trust(context)
    context.verify_mode = ssl.CERT_REQUIRED
    seen = []
    block = define_block("/echo", lambda ctx: (seen.append(
        ctx.transport.ssl.getpeercert()["subject"]), {"on_message": ctx.send})[1])
    server = make_server(block, ssl_context=context)
    url = server.url("/echo")

    with_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(with_cert)
    clients_ca.issue_cert("alice@example.org").configure_cert(with_cert)
    with connect(url, ssl_context=with_cert, open_timeout=WAIT) as conn:
        conn.send("hi")
        assert conn.recv(timeout=WAIT) == "hi"
    assert len(seen) == 1

    # Without a certificate, or with one of a CA the server does not trust.
    stranger = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(stranger)
    trustme.CA().issue_cert("mallory@example.org").configure_cert(stranger)
    for context in (client_context, stranger):
        with pytest.raises(ssl.SSLError) as info:
            connect(url, ssl_context=context, open_timeout=WAIT)
        assert url in str(info.value), info.value  # which server, whatever the TLS version
    with pytest.raises(ssl.SSLError, match="asks for a client certificate"):
        connect(url, ssl_context=client_context, open_timeout=WAIT)
    assert len(seen) == 1 and not server.clients

    # The command-line client presents one with --certfile and --keyfile.
    cert = clients_ca.issue_cert("bob@example.org")
    certfile, keyfile = tmp_path / "bob.pem", tmp_path / "bob.key"
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    cafile = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(cafile))
    run = [sys.executable, "-m", "gaman_sync.client", url, "--wait", "0.2",
           "--ca-certs", str(cafile)]
    ok = subprocess.run([*run, "--certfile", str(certfile), "--keyfile", str(keyfile)],
                        input="hello\n", cwd=ROOT, capture_output=True, text=True,
                        timeout=WAIT)
    assert ok.returncode == 0 and ok.stdout.strip() == "hello", ok.stderr
    refused = subprocess.run(run, input="hello\n", cwd=ROOT, capture_output=True, text=True,
                             timeout=WAIT)
    assert refused.returncode == 1 and "client certificate" in refused.stderr, refused.stderr
    assert len(seen) == 2


def test_ssl_context_arguments_are_checked(server_context, client_context):
    block = _echo_block()
    with pytest.raises(TypeError, match="ssl_context"):
        WebSocketServer(block, port=0, ssl_context="cert.pem")
    with pytest.raises(ValueError, match="ssl_context"):
        WebSocketServer(block, port=0, ssl_context=client_context)  # a client's context
    with pytest.raises(ValueError, match="ssl_context is for wss://"):
        connect("ws://127.0.0.1:1/", ssl_context=client_context)
    with pytest.raises(TypeError, match="ssl_context"):
        connect("wss://127.0.0.1:1/", ssl_context=object())


# -- Redirects between ws:// and wss:// --------------------------------------------

def test_redirect_from_ws_to_wss_is_followed_and_back_refused(make_server, server_context,
                                                             client_context):
    secure = make_server([_echo_block(), define_block("/down", redirect="ws://127.0.0.1:9/x")],
                         ssl_context=server_context)
    plain = make_server(define_block("/up", redirect=secure.url("/echo")))
    # ws:// to wss:// is followed, with the default context (ssl_context is
    # for wss:// URLs), which does not trust the test CA: the hop reached TLS.
    with pytest.raises(InvalidCertificate, match=re.escape(secure.url("/echo"))):
        connect(plain.url("/up"), open_timeout=WAIT)
    # wss:// to ws:// is refused, never followed silently.
    with pytest.raises(InvalidRedirect, match="wss:// to an unencrypted URL") as caught:
        connect(secure.url("/down"), ssl_context=client_context, open_timeout=WAIT)
    assert caught.value.chain == [secure.url("/down"), "ws://127.0.0.1:9/x"]


# -- Slow and wrong clients: the accept thread, never a connection thread ------------

def _client_hello():
    """The first flight of a real TLS client (a ClientHello)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = context.wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def _closed_by_peer(sock, timeout):
    """True once the server closed ``sock`` (EOF or reset) within ``timeout``."""
    deadline = time.monotonic() + timeout
    sock.setblocking(False)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        readable, _, _ = select.select([sock], [], [], remaining)
        if readable:
            try:
                if not sock.recv(65536):
                    return True
            except ConnectionResetError:
                return True
            except BlockingIOError:
                pass


@pytest.mark.slow
def test_200_slow_tls_clients_cost_no_thread_and_are_cut(make_server, server_context,
                                                          client_context):
    timeout = 3.0
    server = make_server(_echo_block(), ssl_context=server_context, handshake_timeout=timeout)
    hello = _client_hello()
    silent = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(100)]
    dribblers = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(100)]
    opened = time.monotonic()
    stop = threading.Event()

    def dribble():
        position = 0
        while not stop.is_set() and position < len(hello):
            for sock in dribblers:
                try:
                    sock.send(hello[position:position + 1])
                except OSError:
                    pass
            position += 1
            stop.wait(0.5)

    dribbler = threading.Thread(target=dribble, daemon=True)
    dribbler.start()
    try:
        # Meanwhile, others are served promptly, each in its own thread only.
        for _ in range(5):
            started = time.monotonic()
            with connect(server.url("/echo"), ssl_context=client_context,
                         open_timeout=WAIT) as conn:
                conn.send("ping")
                assert conn.recv(timeout=WAIT) == "ping"
                assert len(_conn_threads(server)) <= 1, _conn_threads(server)
            assert time.monotonic() - started < 1.0
        assert time.monotonic() - opened < timeout  # all of this while they were there
        # And every slow client is cut at the handshake timeout.
        for sock in silent + dribblers:
            assert _closed_by_peer(sock, opened + timeout + WAIT - time.monotonic())
        assert time.monotonic() - opened >= timeout - 0.1
    finally:
        stop.set()
        dribbler.join(WAIT)
        for sock in silent + dribblers:
            sock.close()


def _raw_exchange(server, data, timeout=WAIT):
    """Send ``data`` on a new TCP connection; what comes back until the
    server closes, and how long it took."""
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        started = time.monotonic()
        sock.sendall(data)
        sock.settimeout(timeout)
        received = b""
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        except ConnectionResetError:
            pass
        return received, time.monotonic() - started


def test_plain_http_to_the_tls_port_is_answered_at_once(wss_server):
    answer, took = _raw_exchange(wss_server, b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert b"TLS" in answer
    assert took < 2.5  # answered at once, the lingering close ended by our EOF... or its 2 s


@pytest.mark.parametrize("garbage", [
    b"\x16\x03\x01\x00\x05hello" + b"\x00" * 100,    # a handshake record that is no hello
    b"\x16\x03\x03\xff\xff" + os.urandom(2000),       # a record that is too long
    b"\x00\x01\x02\x03" * 10,                         # not TLS, not HTTP
    b"\x15\x03\x03\x00\x02\x02\x28",                  # an alert
], ids=["bad-hello", "too-long", "binary", "alert"])
def test_tls_garbage_is_cut_without_a_traceback(wss_server, client_context, caplog, garbage):
    caplog.set_level(logging.DEBUG, logger="gaman_sync")
    _, took = _raw_exchange(wss_server, garbage)
    assert took < 2.5
    mine = [r for r in caplog.records if r.name == "gaman_sync"
            and ("TLS" in r.getMessage() or "not TLS" in r.getMessage())]
    assert len(mine) <= 1, [r.getMessage() for r in mine]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    # And the server goes on serving.
    with connect(wss_server.url("/echo"), ssl_context=client_context, open_timeout=WAIT) as c:
        c.send("still here")
        assert c.recv(timeout=WAIT) == "still here"


def test_health_path_and_pages_over_https(make_server, server_context, client_context):
    block = define_block("/echo", lambda ctx: {"on_message": ctx.send},
                         http=lambda request: (200, {"Content-Type": "text/plain"}, "page"))
    server = make_server(block, ssl_context=server_context, health_path="/health")
    for path, body in (("/health", b"ok"), ("/echo", b"page")):
        https = http.client.HTTPSConnection("127.0.0.1", server.port, timeout=WAIT,
                                            context=client_context)
        try:
            https.request("GET", path)
            response = https.getresponse()
            assert response.status == 200 and response.read().strip() == body
        finally:
            https.close()


def test_past_max_connections_a_tls_client_is_closed_at_once(make_server, server_context,
                                                             client_context):
    server = make_server(_echo_block(), ssl_context=server_context, max_connections=1)
    with connect(server.url("/echo"), ssl_context=client_context, open_timeout=WAIT) as first:
        started = time.monotonic()
        with pytest.raises(OSError):  # the TLS handshake meets the end of the stream
            connect(server.url("/echo"), ssl_context=client_context, open_timeout=WAIT)
        assert time.monotonic() - started < 2.0
        first.send("still served")
        assert first.recv(timeout=WAIT) == "still served"
    deadline = time.monotonic() + WAIT  # the server forgets the first one right after
    while True:
        try:
            again = connect(server.url("/echo"), ssl_context=client_context,
                            open_timeout=WAIT)
            break
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    with again:
        again.send("room again")
        assert again.recv(timeout=WAIT) == "room again"


def test_a_server_that_closes_during_the_tls_handshake_is_a_clear_error(client_context):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        def serve_one():
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)  # the ClientHello, then a clean close

        peer = threading.Thread(target=serve_one, daemon=True)
        peer.start()
        url = f"wss://127.0.0.1:{listener.getsockname()[1]}/"
        with pytest.raises(ssl.SSLError) as caught:
            connect(url, ssl_context=client_context, open_timeout=WAIT)
        peer.join(WAIT)
    assert url in str(caught.value) and "TLS handshake" in str(caught.value)


# -- The command line ----------------------------------------------------------------

def test_cli_serves_wss(ca, client_context, tmp_path):
    cert = ca.issue_cert("127.0.0.1")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    proc = subprocess.Popen([sys.executable, "-m", "gaman_sync", "examples.echo:block",
                             "--port", "0", "--certfile", str(certfile), "--keyfile",
                             str(keyfile)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        port = None
        deadline = time.monotonic() + WAIT
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            found = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
            if found:
                port = int(found.group(1))
        assert port is not None, "no 'listening on' line"
        with connect(f"wss://127.0.0.1:{port}/echo", ssl_context=client_context,
                     open_timeout=WAIT) as conn:
            conn.send("over TLS")
            assert conn.recv(timeout=WAIT) == "over TLS"
    finally:
        proc.terminate()
        proc.wait(WAIT)
        proc.stderr.close()


@pytest.mark.parametrize("which", ["missing", "not-a-cert", "bad-ca-certs", "no-key",
                                   "key-alone"])
def test_cli_certificate_that_does_not_load_is_one_line_and_exit_2(ca, tmp_path, which):
    cert = ca.issue_cert("127.0.0.1")
    good = tmp_path / "good.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(good))
    chain_only = tmp_path / "chain.pem"
    cert.cert_chain_pems[0].write_to_path(str(chain_only))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    args = {"missing": ["--certfile", str(tmp_path / "nothing.pem")],
            "not-a-cert": ["--certfile", str(junk)],
            "bad-ca-certs": ["--certfile", str(good), "--ca-certs", str(junk)],
            "no-key": ["--certfile", str(chain_only)],
            "key-alone": ["--keyfile", str(good)]}[which]
    result = subprocess.run([sys.executable, "-m", "gaman_sync", "examples.echo:block",
                             "--port", "0", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=WAIT)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("gaman-sync: error: --"), result.stderr
    assert ("--ca-certs" if which == "bad-ca-certs" else "--certfile") in last
    if which == "no-key":  # the certificate without its key: say where to look
        assert "give --keyfile" in last, last
    if which == "key-alone":  # only the flag given is named
        assert "--keyfile needs --certfile" in last and "--ca-certs" not in last, last


def test_client_cli_accepts_wss(wss_server, ca, tmp_path):
    cafile = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(cafile))
    url = wss_server.url("/echo")
    run = [sys.executable, "-m", "gaman_sync.client", url, "--wait", "0.2"]
    ok = subprocess.run([*run, "--ca-certs", str(cafile)], input="hello\n", cwd=ROOT,
                        capture_output=True, text=True, timeout=WAIT)
    assert ok.returncode == 0 and ok.stdout.strip() == "hello", ok.stderr
    refused = subprocess.run(run, input="hello\n", cwd=ROOT, capture_output=True, text=True,
                             timeout=WAIT)
    assert refused.returncode == 1
    assert "does not verify" in refused.stderr and "Traceback" not in refused.stderr
