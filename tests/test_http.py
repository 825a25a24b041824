"""Plain HTTP on the WebSocket port (gaman_sync.server.http): pages, static
folders that no path escapes, http= handlers run off the accept thread, the
health path, and the bounds (methods, request size, handshake timeout,
``Connection: close``). Requests are written by hand on raw sockets, so that
a path reaches the server exactly as written (``..``, ``%2e%2e``, ``%2f``).
"""

from __future__ import annotations

import select
import socket
import threading
import time
from pathlib import Path
from typing import Dict, Tuple

import pytest
from websockets.sync.client import connect

from gaman_sync import WebSocketServer, define_block
from gaman_sync.server.http import StaticFiles, check_answer, content_type

from .conftest import WAIT, Recorder

Answer = Tuple[int, Dict[str, str], bytes]


def parse(raw: bytes) -> Answer:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def read_to_eof(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes."""
    chunks = []
    while True:
        data = sock.recv(1 << 20)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def fetch(port: int, target: str, method: str = "GET", extra: str = "",
          timeout: float = WAIT) -> Answer:
    """Send one request as written; read the answer until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode())
        return parse(read_to_eof(sock))  # Connection: close, and the server does close


def others_are_served(port: int, times: int) -> None:
    """A WebSocket echo and the health path answer, each round within 0.5 s."""
    for _ in range(times):
        begun = time.monotonic()
        with connect(f"ws://127.0.0.1:{port}/echo", open_timeout=WAIT) as ws:
            ws.send("hi")
            assert ws.recv(timeout=WAIT) == "hi"
        assert fetch(port, "/health")[0] == 200
        assert time.monotonic() - begun < 0.5


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A folder to serve, and a secret next to it that must never be served."""
    root = tmp_path / "site"
    (root / "css").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "index.html").write_text("<h1>home</h1>")
    (root / "docs").mkdir()
    (root / "docs" / "index.html").write_text("<h1>docs</h1>")
    (root / "css" / "site.css").write_text("body { color: red }")
    (root / "app.js").write_text("console.log(1)")
    (root / "data.bin").write_bytes(bytes(range(256)))
    (root / "noext").write_bytes(b"?")
    (root / ".env").write_text("TOKEN=hidden")
    (tmp_path / "secret.txt").write_text("the secret")
    (root / "out.txt").symlink_to(tmp_path / "secret.txt")       # points outside
    (root / "outdir").symlink_to(tmp_path, target_is_directory=True)
    (root / "in.css").symlink_to(root / "css" / "site.css")     # points inside
    return root


def test_a_page_answers_get_and_head(make_server, site):
    server = make_server([define_block("/", page=site / "index.html")])
    status, headers, body = fetch(server.port, "/")
    assert (status, body) == (200, b"<h1>home</h1>")
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert headers["content-length"] == "13"
    assert headers["connection"] == "close"
    status, headers, body = fetch(server.port, "/", "HEAD")
    assert (status, headers["content-length"], body) == (200, "13", b"")
    (site / "index.html").write_text("<h1>edited</h1>")  # read per request: no restart
    assert fetch(server.port, "/")[2] == b"<h1>edited</h1>"


@pytest.mark.parametrize("target, expected, kind", [
    ("/s/", b"<h1>home</h1>", "text/html; charset=utf-8"),
    ("/s/index.html", b"<h1>home</h1>", "text/html; charset=utf-8"),
    ("/s/docs/", b"<h1>docs</h1>", "text/html; charset=utf-8"),  # a folder's index
    ("/s/docs", b"<h1>docs</h1>", "text/html; charset=utf-8"),
    ("/s/css/site.css", b"body { color: red }", "text/css; charset=utf-8"),
    ("/s/css%2Fsite.css", b"body { color: red }", "text/css; charset=utf-8"),  # inside
    ("/s/in.css", b"body { color: red }", "text/css; charset=utf-8"),  # a link inside
    ("/s/data.bin", bytes(range(256)), "application/octet-stream"),
    ("/s/noext", b"?", "application/octet-stream"),
    ("/s/app.js?v=2", b"console.log(1)", content_type("app.js")),
])
def test_a_static_folder_serves_its_files(make_server, site, target, expected, kind):
    server = make_server([define_block("/s/*", static=site)])
    status, headers, body = fetch(server.port, target)
    assert (status, body, headers["content-type"]) == (200, expected, kind)
    assert headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("target", [
    "/s/../secret.txt", "/s/css/../../secret.txt", "/s/%2e%2e/secret.txt",
    "/s/%2E%2E/secret.txt", "/s/..%2fsecret.txt", "/s/..%2Fsecret.txt",
    "/s/css%2f..%2f..%2fsecret.txt", "/s/.%2e/secret.txt", "/s/%2e%2e%2fsecret.txt",
    "/s/%2Ftmp%2Fsecret.txt", "/s//etc/passwd", "/s/%2fetc%2fpasswd", "/s/%252e%252e/x",
    "/s/..%5csecret.txt", "/s/..\\secret.txt", "/s/%00", "/s/./index.html",
    "/s/out.txt", "/s/outdir/secret.txt", "/s/outdir/",  # symbolic links out of the folder
    "/s/.env", "/s/%2eenv", "/s/css/.", "/s/empty/", "/s/empty", "/s/css/", "/s/missing",
])
def test_no_path_escapes_a_static_folder(make_server, site, target):
    server = make_server([define_block("/s/*", static=site)])
    status, _, body = fetch(server.port, target)
    assert status == 404, (target, body)
    assert b"the secret" not in body and b"TOKEN" not in body and b"<h1>" not in body


def test_static_files_resolve_inside_the_folder_only(site):
    files = StaticFiles(str(site))
    assert files.resolve("css/site.css") == site.resolve() / "css" / "site.css"
    assert files.resolve("") == site.resolve() / "index.html"
    for rest in ("../secret.txt", "/etc/passwd", "css//site.css", "out.txt", "outdir/secret.txt",
                 "css/..", ".env", "a\0b", "..\\secret.txt", str(site / "index.html")):
        assert files.resolve(rest) is None, rest


def test_an_http_handler_answers_in_a_connection_thread(make_server):
    calls = Recorder()

    def hello(request):
        calls.add("call", request.method, request.params, dict(request.query),
                  threading.current_thread().name)
        return 201, [("X-Room", request.params["room"])], f"hello {request.query['who']}"

    server = make_server([define_block("/rooms/:room", http=hello)])
    status, headers, body = fetch(server.port, "/rooms/hall?who=ann")
    assert (status, headers["x-room"], body) == (201, "hall", b"hello ann")
    assert headers["content-type"] == "text/plain; charset=utf-8"
    _, method, params, query, thread = calls.events[0]
    assert (method, params, query) == ("GET", {"room": "hall"}, {"who": "ann"})
    assert thread.startswith("gaman_sync-conn-"), thread  # not the accept thread


@pytest.mark.parametrize("answer", [
    None, "text", (200, [], 3), (99, [], ""), (600, [], ""), (True, [], ""),
    (200, [("Content-Length", "9")], ""), (200, [("Connection", "keep-alive")], ""),
    (200, [("Bad Name", "x")], ""), (200, [("X", "a\r\nInjected: 1")], ""), (200, "X: 1", ""),
])
def test_a_broken_http_handler_gets_500_and_a_log_line(make_server, caplog, answer):
    def handler(request):
        if answer is None:
            raise RuntimeError("boom")
        return answer

    server = make_server([define_block("/", http=handler)])
    with caplog.at_level("ERROR", logger="gaman_sync"):
        status, headers, body = fetch(server.port, "/")
    assert status == 500 and b"boom" not in body and b"Injected" not in str(headers).encode()
    assert any("the http handler raised" in r.getMessage() for r in caplog.records)


def test_check_answer_accepts_the_documented_forms():
    assert check_answer((200, {}, b"\x00")) == (200, [("Content-Type",
                                                       "application/octet-stream")], b"\x00")
    assert check_answer((204, [], "")) == (204, [], b"")
    assert check_answer((200, {"Content-Type": "text/html"}, "<p>")) == (
        200, [("Content-Type", "text/html")], b"<p>")


def test_a_slow_http_handler_holds_no_other_request(make_server):
    """While a handler waits, the accept thread still opens WebSockets and
    answers the health path, each well within 0.5 s."""
    release = threading.Event()
    started = threading.Event()

    def slow(request):
        started.set()
        release.wait(WAIT)
        return 200, [], "late"

    server = make_server([define_block("/slow", http=slow),
                          define_block("/echo", lambda ctx: {"on_message": ctx.send})],
                         health_path="/health")
    result: Dict[str, Answer] = {}
    waiting = threading.Thread(target=lambda: result.update(slow=fetch(server.port, "/slow")))
    waiting.start()
    try:
        assert started.wait(WAIT)
        others_are_served(server.port, 10)
    finally:
        release.set()
        waiting.join(WAIT)
    assert result["slow"][0] == 200 and result["slow"][2] == b"late"


def test_a_slow_reader_of_a_big_file_holds_no_other_request(make_server, tmp_path):
    big = tmp_path / "big.bin"
    content = bytes(range(256)) * (16 * 1024)  # 4 MiB
    big.write_bytes(content)
    server = make_server([define_block("/big", page=big),
                          define_block("/echo", lambda ctx: {"on_message": ctx.send})],
                         health_path="/health")
    reader = socket.socket()
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    reader.settimeout(WAIT)
    try:
        reader.connect(("127.0.0.1", server.port))
        reader.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")  # and reads nothing yet
        # The answer has started (its first bytes wait unread): the file is
        # being sent to a reader that does not read while others are served.
        assert select.select([reader], [], [], WAIT)[0], "the big file was never sent"
        others_are_served(server.port, 5)
        raw = read_to_eof(reader)
    finally:
        reader.close()
    status, headers, body = parse(raw)
    assert (status, int(headers["content-length"])) == (200, len(content))
    assert body == content


def test_health_path_is_opt_in(make_server):
    block = define_block("/echo", lambda ctx: {"on_message": ctx.send})
    plain = make_server(block)
    assert fetch(plain.port, "/health")[0] == 404
    server = make_server(block, health_path="/health")
    assert fetch(server.port, "/health") == (200, {
        "content-type": "text/plain; charset=utf-8", "cache-control": "no-store",
        "content-length": "3", "connection": "close"}, b"ok\n")
    status, headers, body = fetch(server.port, "/health", "HEAD")
    assert (status, headers["content-length"], body) == (200, "3", b"")
    assert fetch(server.port, "/health", "POST")[0] == 405
    assert fetch(server.port, "/health?probe=1")[0] == 200
    # WebSockets are untouched, and a static catch-all does not hide the health path.
    with connect(f"ws://127.0.0.1:{server.port}/echo", open_timeout=WAIT) as ws:
        ws.send("x")
        assert ws.recv(timeout=WAIT) == "x"


def test_health_path_wins_over_a_catch_all(make_server, site):
    server = make_server(define_block("/*", static=site), health_path="/health")
    assert fetch(server.port, "/health")[2] == b"ok\n"
    assert fetch(server.port, "/")[2] == b"<h1>home</h1>"


@pytest.mark.parametrize("bad", ["health", "/a?b", "/rooms/:room", 5])
def test_health_path_must_be_a_plain_path(bad):
    block = define_block("/", lambda ctx: {})
    with pytest.raises((TypeError, ValueError)):
        WebSocketServer(block, port=0, health_path=bad)


def test_only_get_and_head(make_server, site):
    server = make_server([define_block("/", page=site / "index.html"),
                          define_block("/ws", lambda ctx: {})])
    for method in ("POST", "PUT", "DELETE", "OPTIONS", "PATCH"):
        status, headers, _ = fetch(server.port, "/", method, "Content-Length: 0\r\n")
        assert (status, headers["allow"]) == (405, "GET, HEAD"), method
    # A WebSocket-only block keeps its answers: 426 to a plain GET, 405 to others.
    assert fetch(server.port, "/ws")[0] == 426
    assert fetch(server.port, "/ws", "POST", "Content-Length: 0\r\n")[0] == 405


def test_one_block_serves_a_page_and_its_websocket(make_server, site):
    server = make_server(define_block("/", lambda ctx: {"on_message": ctx.send},
                                      page=site / "index.html"))
    assert fetch(server.port, "/")[2] == b"<h1>home</h1>"
    with connect(f"ws://127.0.0.1:{server.port}/", open_timeout=WAIT) as ws:
        ws.send("both")
        assert ws.recv(timeout=WAIT) == "both"


def test_an_upgrade_to_a_block_without_websocket_is_404(make_server, site):
    from websockets.exceptions import InvalidStatus

    server = make_server(define_block("/", page=site / "index.html"))
    with pytest.raises(InvalidStatus) as caught:
        connect(f"ws://127.0.0.1:{server.port}/", open_timeout=WAIT)
    assert caught.value.response.status_code == 404


def test_the_request_size_limit_and_handshake_timeout_apply(make_server, site):
    server = make_server(define_block("/", page=site / "index.html"),
                         max_request_size=1024, handshake_timeout=0.3)
    assert fetch(server.port, "/", extra="X-Big: " + "a" * 2000 + "\r\n")[0] == 431
    with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # never finished
        begun = time.monotonic()
        assert sock.recv(100) == b""  # closed, unanswered
        assert time.monotonic() - begun < 0.3 + 1.0


def test_the_connection_closes_after_each_answer(make_server, site):
    server = make_server(define_block("/", page=site / "index.html"))
    with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = read_to_eof(sock)
    assert data.count(b"HTTP/1.1 200") == 1 and b"Connection: close" in data


def test_define_block_checks_plain_http(tmp_path, site):
    with pytest.raises(ValueError, match="not a file"):
        define_block("/", page=tmp_path / "missing.html")
    with pytest.raises(ValueError, match="not a folder"):
        define_block("/s/*", static=tmp_path / "missing")
    with pytest.raises(ValueError, match=r"ends with '\*'"):
        define_block("/s", static=site)
    with pytest.raises(TypeError, match="one way"):
        define_block("/", http=lambda r: (200, [], ""), page=site / "index.html")
    with pytest.raises(TypeError, match="http must be a function"):
        define_block("/", http="index.html")
    with pytest.raises(TypeError, match="on_request"):
        define_block("/", page=site / "index.html", on_request=lambda r: None)
    with pytest.raises(TypeError, match="only redirects"):
        define_block("/", redirect="/x", page=site / "index.html")
    with pytest.raises(TypeError, match="needs a websocket handler"):
        define_block("/")

    async def handler(request):
        return 200, [], ""

    with pytest.raises(TypeError, match="async"):
        define_block("/", http=handler)
    block = define_block("/s/*", static=str(site))
    assert block.static == str(site.resolve()) and isinstance(block.http, StaticFiles)
    assert define_block("/s/*", static=site) == block
