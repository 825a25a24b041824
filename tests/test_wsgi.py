"""Blocks mounted in a WSGI application (gaman_sync.wsgi), on real servers
and real sockets: werkzeug's threaded server in this process, and gunicorn
(``gthread``, and ``sync`` once) in a process of its own, both on 127.0.0.1.

The same Flask application (tests/wsgi_app.py) runs under both: a page, an
echo block and a chat block; what its callbacks saw is read from its
``/stats`` page, since under gunicorn they run in another process. The
protocol checks of the standalone server (test_rfc6455, test_concurrency)
run again here against a block mounted under werkzeug: this module's
``make_server`` fixture gives them one.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import wsgiref.simple_server
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect
from werkzeug.serving import make_server as make_werkzeug_server

from gaman_sync import define_block
from gaman_sync.testing import TEXT, RawPeer, frame
from gaman_sync.wsgi import WebSocketMiddleware

from . import wsgi_app
from .conftest import WAIT

# The standalone server's protocol checks, run again against a mounted block
# (with this module's make_server): framing, close codes, 1007, 1009, and the
# stalled reader cut from broadcast.
from .test_concurrency import test_stalled_client_does_not_hold_up_broadcasts  # noqa: F401
from .test_rfc6455 import (  # noqa: F401
    echo,
    serve,
    test_4_2_2_accept_key_and_frames_in_the_handshake_segment,
    test_5_2_every_length_class_echoes,
    test_5_2_many_frames_in_one_segment,
    test_5_2_one_byte_at_a_time_behaves_as_one_segment,
    test_5_2_reserved_bits_without_extension_fail,
    test_5_3_unmasked_client_frame_fails,
    test_5_4_fragments_arriving_separately_with_pings_between,
    test_5_5_2_ping_is_answered_with_an_identical_pong,
    test_7_1_1_server_closes_tcp_promptly_once_its_close_is_answered,
    test_7_1_1_server_closes_tcp_within_close_timeout_if_never_answered,
    test_7_4_invalid_close_code_fails_with_1002,
    test_7_4_valid_close_code_is_echoed,
    test_7_close_reaches_on_close_once_and_last,
    test_8_1_fragmented_text_fails_fast_at_the_invalid_fragment,
    test_8_1_invalid_text_closes_with_1007,
    test_10_4_huge_announced_length_fails_at_its_header,
    test_10_4_oversized_frame_fails_at_its_header,
    test_10_4_the_limit_leaves_other_connections_alone,
)

ROOT = Path(__file__).resolve().parent.parent


# -- The servers ------------------------------------------------------------------

def not_found(environ: dict, start_response: Callable) -> List[bytes]:
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"not found\n"]


class Werkzeug:
    """A WSGI application served by werkzeug's threaded server on 127.0.0.1,
    port 0, in a thread of this process."""

    def __init__(self, app: Callable) -> None:
        self.httpd = make_werkzeug_server("127.0.0.1", 0, app, threaded=True)
        self.port = self.httpd.server_port
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="werkzeug",
                                       daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(WAIT)


class Mounted:
    """Blocks mounted in a WSGI application under werkzeug, as the reused
    tests see a started server: ``port`` is werkzeug's, and the rest (``clients``,
    ``broadcast``, ``blocks``...) is the middleware's server."""

    def __init__(self, blocks: Any, **options: Any) -> None:
        self.middleware = WebSocketMiddleware(not_found, blocks, **options)
        self.site = Werkzeug(self.middleware)
        self.port = self.site.port

    def __getattr__(self, name: str) -> Any:
        return getattr(self.middleware.server, name)

    def close(self) -> None:
        server = self.middleware.server
        try:
            self.middleware.shutdown(WAIT)
        finally:
            self.site.stop()
        deadline = time.monotonic() + WAIT
        while server.threads and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.threads == [], f"threads left behind: {server.threads}"


@pytest.fixture
def make_server():
    """Overrides conftest's: ``make_server(blocks, **options)`` mounts the
    blocks under werkzeug (see :class:`Mounted`); stopped after the test."""
    mounted: List[Mounted] = []

    def factory(blocks: Any, **options: Any) -> Mounted:
        mounted.append(Mounted(blocks, **options))
        return mounted[-1]

    yield factory
    for m in mounted:
        m.close()


def free_port() -> int:
    """A port that was free a moment ago (gunicorn cannot bind port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port: int, path: str = "/", headers: Optional[Dict[str, str]] = None,
             method: str = "GET") -> tuple[int, Dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def _control_socket_option() -> List[str]:
    """gunicorn 24 and later open a control socket in ~/.gunicorn unless told not to."""
    out = subprocess.run([sys.executable, "-m", "gunicorn", "--help"], capture_output=True,
                         text=True, timeout=60).stdout
    return ["--no-control-socket"] if "--no-control-socket" in out else []


CONTROL_SOCKET = _control_socket_option()


class Gunicorn:
    """``gunicorn APP`` in a process of its own on 127.0.0.1 (a free port,
    picked again if another process took it first)."""

    def __init__(self, app: str = "tests.wsgi_app:app", worker: str = "gthread",
                 threads: int = 4, log: Optional[Path] = None, extra: List[str] = ()) -> None:
        self.log = log
        for _ in range(5):
            self.port = free_port()
            self.log_file = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 (closed in stop)
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-k", worker, "--threads", str(threads),
                 "-b", f"127.0.0.1:{self.port}", "--graceful-timeout", "10",
                 *CONTROL_SOCKET, *extra, app],
                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self.log_file)
            if self._ready():
                return
            self.stop()
        raise AssertionError(f"gunicorn did not start: {self.log_text()}")

    def _ready(self) -> bool:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False  # the port was taken, say: try another
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return True
            except OSError:
                time.sleep(0.05)
        return False

    def log_text(self) -> str:
        return self.log.read_text() if self.log else "(no log)"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(WAIT)
        if self.log_file is not subprocess.DEVNULL:
            self.log_file.close()


class Site:
    """The test application on one WSGI server: its port and its stats."""

    def __init__(self, port: int, kind: str) -> None:
        self.port = port
        self.kind = kind

    def url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def stats(self) -> Dict[str, Any]:
        status, _, body = http_get(self.port, "/stats")
        assert status == 200, body
        return json.loads(body)

    def wait_stats(self, predicate: Callable[[Dict[str, Any]], bool]) -> Dict[str, Any]:
        deadline = time.monotonic() + WAIT
        while True:
            stats = self.stats()
            if predicate(stats):
                return stats
            assert time.monotonic() < deadline, f"timed out; stats: {stats}"
            time.sleep(0.02)


@contextlib.contextmanager
def werkzeug_site() -> Iterator[Site]:
    flask_app, middleware, _ = wsgi_app.make_app(shutdown_timeout=3.0, close_timeout=2.0)
    site = Werkzeug(flask_app)
    try:
        yield Site(site.port, "werkzeug")
    finally:
        middleware.shutdown(WAIT)
        site.stop()
        assert middleware.server.threads == []


@contextlib.contextmanager
def gunicorn_site(tmp_path: Path, **kw: Any) -> Iterator[tuple[Site, Gunicorn]]:
    g = Gunicorn(log=tmp_path / "gunicorn.log", **kw)
    try:
        yield Site(g.port, "gunicorn"), g
    except BaseException:
        print(g.log_text()[-5000:])
        raise
    finally:
        g.stop()


@pytest.fixture(params=["werkzeug", "gunicorn"])
def site(request, tmp_path) -> Iterator[Site]:
    """The test application under werkzeug, then under gunicorn (gthread, 4 threads)."""
    if request.param == "werkzeug":
        with werkzeug_site() as s:
            yield s
    else:
        with gunicorn_site(tmp_path) as (s, _):
            yield s


# -- Both servers -------------------------------------------------------------------

def test_a_plain_get_returns_the_page(site):
    status, _, body = http_get(site.port, "/")
    assert (status, body.decode()) == (200, wsgi_app.PAGE)


def test_text_and_binary_echo_on_the_same_port(site):
    with connect(site.url("/echo")) as ws:
        ws.send("hello")
        assert ws.recv(timeout=WAIT) == "hello"
        ws.send(b"\x00\x01\xff")
        assert ws.recv(timeout=WAIT) == b"\x00\x01\xff"
        ws.send("é" * 70_000)
        assert ws.recv(timeout=WAIT) == "é" * 70_000


def test_two_clients_see_each_others_broadcasts(site):
    with connect(site.url("/chat")) as alice, connect(site.url("/chat")) as bob:
        alice.send("from alice")
        assert bob.recv(timeout=WAIT) == "from alice"
        assert alice.recv(timeout=WAIT) == "from alice"
        bob.send(b"from bob")
        assert alice.recv(timeout=WAIT) == b"from bob"
        assert bob.recv(timeout=WAIT) == b"from bob"


def test_on_open_and_on_close_fire_once_per_connection(site):
    for path in ("/echo", "/chat", "/echo"):
        with connect(site.url(path)) as ws:
            ws.send("x")
            ws.recv(timeout=WAIT)
    stats = site.wait_stats(lambda s: len(s["closes"]) == 3)
    assert stats["opens"] == {"1": 1, "2": 1, "3": 1}
    assert stats["closes"] == {"1": [[1000, ""]], "2": [[1000, ""]], "3": [[1000, ""]]}


def test_the_client_closes_with_a_handshake(site):
    with RawPeer.open("127.0.0.1", site.port, "/echo") as peer:
        peer.send_text("a")
        assert peer.recv_frame().payload == b"a"
        f = peer.close_handshake(4000, b"bye")  # our close, its echo, then its TCP close
        assert (f.close_code(), f.close_reason()) == (4000, b"bye")
    assert site.wait_stats(lambda s: s["closes"])["closes"] == {"1": [[4000, "bye"]]}


def test_the_server_closes_with_a_handshake(site):
    with RawPeer.open("127.0.0.1", site.port, "/echo") as peer:
        peer.send_text("close:4001")
        assert peer.expect_close().close_code() == 4001
        peer.send_close(4001)
        assert peer.wait_eof() == b"", "bytes after the close handshake (a second response?)"
    assert site.wait_stats(lambda s: s["closes"])["closes"] == {"1": [[4001, "asked"]]}


def test_frames_sent_with_the_request_are_not_lost(site):
    # Read ahead by the WSGI server with the request: taken from its buffer.
    peer = RawPeer.open("127.0.0.1", site.port, "/echo",
                        after=frame(TEXT, "early") + frame(TEXT, "bird"))
    with peer:
        assert [peer.recv_frame().payload for _ in range(2)] == [b"early", b"bird"]
        assert peer.close_handshake().close_code() == 1000


def test_worker_threads_come_back_after_50_connections(site):
    # gunicorn runs with --threads 4: a thread not given back after its
    # WebSocket closed would leave the page unserved within 13 cycles.
    for i in range(50):
        with connect(site.url("/echo"), open_timeout=WAIT) as ws:
            ws.send(str(i))
            assert ws.recv(timeout=WAIT) == str(i)
    status, _, body = http_get(site.port, "/")
    assert (status, body.decode()) == (200, wsgi_app.PAGE)
    stats = site.wait_stats(lambda s: len(s["closes"]) == 50)
    assert set(stats["opens"].values()) == {1}


@pytest.mark.parametrize("headers, method, status", [
    ({"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13"},
     "GET", 400),  # no key
    ({"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "8",
      "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}, "GET", 426),
    ({"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
      "Sec-WebSocket-Key": "short"}, "GET", 400),
    ({"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
      "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}, "POST", 405),
    ({"Upgrade": "websocket", "Sec-WebSocket-Version": "13",
      "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}, "GET", 400),  # no Connection: Upgrade
], ids=["no-key", "version-8", "bad-key", "post", "no-connection-upgrade"])
def test_a_bad_upgrade_gets_a_clear_answer(site, headers, method, status):
    got, response_headers, body = http_get(site.port, "/echo", headers, method)
    assert got == status, body
    assert body.startswith(f"{status} ".encode()), body
    if status == 426:
        assert response_headers.get("Sec-WebSocket-Version") == "13"
    # And the server still serves.
    assert http_get(site.port, "/")[0] == 200


def test_other_requests_go_to_the_application(site):
    # No upgrade on a block's path, and an upgrade on a path without a block.
    assert http_get(site.port, "/echo")[0] == 404
    upgrade = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    assert http_get(site.port, "/elsewhere", upgrade)[0] == 404


# -- gunicorn ---------------------------------------------------------------------------

def test_sigterm_to_gunicorn_gives_every_client_1001(tmp_path):
    with gunicorn_site(tmp_path) as (site, g):
        with contextlib.ExitStack() as stack:
            clients = [stack.enter_context(connect(site.url(path)))
                       for path in ("/echo", "/chat", "/chat")]
            for ws in clients:  # all open, each in its worker thread
                ws.send("ping")
                ws.recv(timeout=WAIT)
            start = time.monotonic()
            g.proc.send_signal(signal.SIGTERM)
            for ws in clients:
                with pytest.raises(ConnectionClosed) as info:
                    while True:  # a chat client may have a broadcast still to read
                        ws.recv(timeout=WAIT)
                assert info.value.rcvd is not None and info.value.rcvd.code == 1001
            assert g.proc.wait(WAIT) == 0
            # Not after --graceful-timeout (10 s): the signal closed them.
            assert time.monotonic() - start < 5.0


def test_gunicorn_sync_worker(tmp_path):
    """A sync worker serves one request at a time: a WebSocket holds the
    whole worker (``--timeout 0``, or the arbiter kills it meanwhile)."""
    with gunicorn_site(tmp_path, worker="sync", extra=["--timeout", "0"]) as (site, _):
        with connect(site.url("/echo")) as ws:
            ws.send("over sync")
            assert ws.recv(timeout=WAIT) == "over sync"
            ws.send(b"\x01" * 100_000)
            assert ws.recv(timeout=WAIT) == b"\x01" * 100_000
        assert http_get(site.port, "/")[0] == 200
        with connect(site.url("/echo")) as ws:
            ws.send("again")
            assert ws.recv(timeout=WAIT) == "again"


# -- werkzeug and the middleware itself ---------------------------------------------------

def test_shutdown_gives_every_client_1001():
    flask_app, middleware, _ = wsgi_app.make_app()
    server = Werkzeug(flask_app)
    try:
        stack = contextlib.ExitStack()
        clients = [stack.enter_context(connect(f"ws://127.0.0.1:{server.port}{p}"))
                   for p in ("/echo", "/chat")]
        middleware.shutdown(WAIT)
        for ws in clients:
            with pytest.raises(ConnectionClosed) as info:
                ws.recv(timeout=WAIT)
            assert info.value.rcvd.code == 1001
        assert middleware.server.threads == []
        # An upgrade after the shutdown: 503, and pages are still served.
        with pytest.raises(Exception, match="503"):
            connect(f"ws://127.0.0.1:{server.port}/echo")
        assert http_get(server.port, "/")[0] == 200
        stack.close()
    finally:
        server.stop()


def test_clients_and_broadcast_span_every_block_of_the_middleware(make_server):
    mounted = make_server([define_block("/a", lambda ctx: {}), define_block("/b", lambda ctx: {})])
    with connect(f"ws://127.0.0.1:{mounted.port}/a") as a, \
            connect(f"ws://127.0.0.1:{mounted.port}/b") as b:
        assert len(mounted.middleware.clients) == 2
        assert mounted.middleware.server.broadcast("to all") == 2
        assert a.recv(timeout=WAIT) == b.recv(timeout=WAIT) == "to all"


def test_origins_are_checked(make_server):
    mounted = make_server(define_block("/ws", lambda ctx: {}), origins=["https://good.test"])
    with connect(f"ws://127.0.0.1:{mounted.port}/ws", origin="https://good.test"):
        pass
    with pytest.raises(Exception, match="403"):
        connect(f"ws://127.0.0.1:{mounted.port}/ws", origin="https://evil.test")


def test_a_server_that_does_not_expose_its_socket_gets_500_and_one_log_line(caplog):
    caplog.set_level(logging.INFO, logger="gaman_sync")
    middleware = WebSocketMiddleware(not_found, define_block("/ws", lambda ctx: {}))

    class Quiet(wsgiref.simple_server.WSGIRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    httpd = wsgiref.simple_server.make_server("127.0.0.1", 0, middleware, handler_class=Quiet)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        upgrade = {"Upgrade": "websocket", "Connection": "Upgrade",
                   "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
        status, _, body = http_get(httpd.server_port, "/ws", upgrade)
        assert status == 500
        assert b"does not expose its socket" in body
        lines = [r for r in caplog.records if r.name == "gaman_sync"]
        assert len(lines) == 1 and "does not expose its socket" in lines[0].getMessage()
        assert http_get(httpd.server_port, "/other")[0] == 404
    finally:
        httpd.shutdown()
        httpd.server_close()
        middleware.shutdown()


def test_mount_refuses_a_second_call_and_a_non_flask_app():
    from flask import Flask

    from gaman_sync.wsgi import mount

    app = Flask(__name__)
    middleware = mount(app, define_block("/ws", lambda ctx: {}))
    assert app.wsgi_app is middleware
    with pytest.raises(ValueError, match="one call"):
        mount(app, define_block("/other", lambda ctx: {}))
    with pytest.raises(TypeError, match="wsgi_app"):
        mount(not_found, define_block("/ws", lambda ctx: {}))


# -- examples/flask_chat.py ---------------------------------------------------------------

def chat_round(port: int) -> None:
    with connect(f"ws://127.0.0.1:{port}/chat") as alice, \
            connect(f"ws://127.0.0.1:{port}/chat") as bob:
        alice.send("hi bob")
        assert bob.recv(timeout=WAIT) == "hi bob"
        assert alice.recv(timeout=WAIT) == "hi bob"


def wait_listening(proc: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the example exited"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("the example never listened")


def test_flask_chat_example_under_flasks_server_and_sigterm(tmp_path):
    port = free_port()
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen([sys.executable, "examples/flask_chat.py"], cwd=ROOT,
                                env={**os.environ, "PORT": str(port)}, stdout=log, stderr=log)
    try:
        wait_listening(proc, port)
        status, _, body = http_get(port, "/")
        assert status == 200 and b"new WebSocket" in body
        chat_round(port)
        with connect(f"ws://127.0.0.1:{port}/chat") as ws:
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed) as info:
                ws.recv(timeout=WAIT)
            assert info.value.rcvd.code == 1001
        proc.wait(WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)
    assert "joined" in (tmp_path / "log").read_text()


def test_flask_chat_example_under_gunicorn(tmp_path):
    g = Gunicorn("examples.flask_chat:app", threads=100, log=tmp_path / "gunicorn.log")
    try:
        status, _, body = http_get(g.port, "/")
        assert status == 200 and b"new WebSocket" in body
        chat_round(g.port)
    finally:
        g.stop()
