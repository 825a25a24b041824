"""The servers under test, one per process: ``python benchmarks/servers.py NAME``.

Every server listens on 127.0.0.1 (an ephemeral port), prints ``READY
<port>`` once it accepts connections, and serves until it is killed:

- ``/echo`` sends every message back to its sender;
- ``/broadcast`` sends every message it receives to every client of
  ``/broadcast`` (the sender included).

The adapters give every server the same settings: messages up to
``MESSAGE_LIMIT``, no compression, no keepalive pings, TCP_NODELAY on every
connection and a listen backlog of ``BACKLOG``. With ``BENCH_CERTFILE`` and
``BENCH_KEYFILE`` in the environment (the wss scenarios), the servers that
can serve TLS get the same ``ssl.SSLContext(PROTOCOL_TLS_SERVER)`` with that
certificate; the others refuse to start. Everything else stays at each
library's defaults. ``tcp-echo`` is not WebSocket: it is the ceiling, a thread
per connection that echoes bytes, with a one-line greeting (the path) instead
of a handshake (``/broadcast SIZE`` for broadcast clients, since TCP keeps
no message boundaries), which the load generator speaks in its ``tcp`` mode.
``gaman_sync-workers2`` is gaman_sync's ``serve(workers=2)``: a supervisor
and two worker processes on one port; ``run.py`` counts the CPU of all three.
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import ssl
import sys
import threading

MESSAGE_LIMIT = 16 * 2**20
# The socketserver default (5) and Python's create_server default (128) would
# make the connection storms of the idle scenarios measure SYN retransmission
# timers instead of the servers, so everyone gets the same deep backlog.
BACKLOG = 1024
HOST = "127.0.0.1"


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def ready(port: int) -> None:
    sys.stdout.write(f"READY {port}\n")
    sys.stdout.flush()


def wait_forever() -> None:
    threading.Event().wait()


def nodelay(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def tls_context():
    """The servers' TLS settings, or None for plain ws://."""
    certfile = os.environ.get("BENCH_CERTFILE")
    if not certfile:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certfile, os.environ.get("BENCH_KEYFILE") or None)
    return context


def no_tls(name: str) -> None:
    if tls_context() is not None:
        sys.exit(f"{name} does not serve TLS here")


# -- gaman_sync --------------------------------------------------------------

def _gaman_sync_blocks() -> list:
    from gaman_sync import define_block

    def echo(ctx):
        return {"on_message": ctx.send}

    def broadcast(ctx):
        return {"on_message": ctx.server.broadcast}

    def broadcast_room(ctx):
        # GAMAN_BENCH_ROOM (run.py's broadcast-room): every client in one room.
        ctx.join("all")
        send = ctx.server.broadcast
        return {"on_message": lambda message: send(message, room="all")}

    if os.environ.get("GAMAN_BENCH_ROOM"):
        broadcast = broadcast_room

    return [define_block("/echo", echo), define_block("/broadcast", broadcast)]


def _gaman_sync_options() -> dict:
    # gaman_sync sets TCP_NODELAY itself, and compresses only when offered
    # (the load generator offers only in the -deflate scenarios). With
    # GAMAN_BENCH_REDIS (run.py's broadcast-redis), broadcasts go through Redis.
    options = dict(backlog=BACKLOG, max_message_size=MESSAGE_LIMIT,
                   ping_interval=None, max_connections=20000)
    context = tls_context()
    if context is not None:
        options["ssl_context"] = context
    if os.environ.get("GAMAN_BENCH_REDIS"):
        from gaman_sync import RedisBroker
        options["broker"] = RedisBroker(os.environ["GAMAN_BENCH_REDIS"])
    return options


def run_gaman_sync() -> None:
    from gaman_sync import WebSocketServer

    server = WebSocketServer(_gaman_sync_blocks(), host=HOST, port=0, **_gaman_sync_options())
    server.start()
    ready(server.port)
    wait_forever()


def run_gaman_sync_workers(count: int) -> None:
    """``serve(workers=count)``: READY once the supervisor logs that every
    worker listens (its log line names the port)."""
    import re

    from gaman_sync import serve

    class Ready(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            found = re.match(r"\d+ worker\(s\) listening on .*:(\d+)$", record.getMessage())
            if found:
                ready(int(found.group(1)))

    log = logging.getLogger("gaman_sync")
    log.setLevel(logging.INFO)
    log.addHandler(Ready())
    serve(_gaman_sync_blocks(), host=HOST, port=0, workers=count, **_gaman_sync_options())


# -- websockets, threads -------------------------------------------------------

def run_websockets_sync() -> None:
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.server import serve

    audience = set()
    lock = threading.Lock()

    def handler(ws):
        # Catching ConnectionClosed keeps every abrupt disconnect from
        # logging a traceback, which would cost more than the disconnect.
        try:
            if ws.request.path == "/broadcast":
                with lock:
                    audience.add(ws)
                try:
                    for message in ws:
                        with lock:
                            targets = list(audience)
                        for target in targets:
                            try:
                                target.send(message)
                            except ConnectionClosed:
                                pass
                finally:
                    with lock:
                        audience.discard(ws)
            else:
                for message in ws:
                    ws.send(message)
        except ConnectionClosed:
            pass

    # websockets' threaded server sets TCP_NODELAY on each connection itself.
    server = serve(handler, HOST, 0, max_size=MESSAGE_LIMIT, compression=None,
                   ping_interval=None, backlog=BACKLOG, ssl=tls_context())
    ready(server.socket.getsockname()[1])
    server.serve_forever()


# -- websockets, asyncio -------------------------------------------------------

def run_websockets_asyncio() -> None:
    import asyncio

    from websockets.asyncio.server import broadcast, serve
    from websockets.exceptions import ConnectionClosed

    audience = set()

    async def handler(ws):
        try:
            if ws.request.path == "/broadcast":
                audience.add(ws)
                try:
                    async for message in ws:
                        broadcast(audience, message)
                finally:
                    audience.discard(ws)
            else:
                async for message in ws:
                    await ws.send(message)
        except ConnectionClosed:
            pass

    async def main():
        # asyncio sets TCP_NODELAY on every TCP transport it creates.
        async with serve(handler, HOST, 0, max_size=MESSAGE_LIMIT, compression=None,
                         ping_interval=None, backlog=BACKLOG, ssl=tls_context()) as server:
            ready(server.sockets[0].getsockname()[1])
            await asyncio.Event().wait()

    asyncio.run(main())


# -- simple-websocket ----------------------------------------------------------

def _read_request_head(sock: socket.socket, limit: int = 16384):
    """The request line and headers of an HTTP request, or None."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk or len(data) > limit:
            return None
        data += chunk
    # A WebSocket client sends nothing after its handshake request before
    # the 101 response, so nothing is lost by dropping what follows.
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    request_line, *header_lines = head.split("\r\n")
    method, target, _ = request_line.split(" ", 2)
    headers = []
    for line in header_lines:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    return method, target, headers


def _accept_forever(listener: socket.socket, serve_connection) -> None:
    while True:
        sock, _ = listener.accept()
        nodelay(sock)
        threading.Thread(target=serve_connection, args=(sock,), daemon=True).start()


def run_simple_websocket() -> None:
    import simple_websocket

    audience = set()
    lock = threading.Lock()

    def serve_connection(sock):
        try:
            head = _read_request_head(sock)
        except OSError:
            head = None
        if head is None:
            sock.close()
            return
        method, target, headers = head
        # simple_websocket.Server only needs a WSGI-ish environ: the headers
        # as HTTP_* keys and the socket under a key it knows (Werkzeug's).
        environ = {"REQUEST_METHOD": method, "PATH_INFO": target.split("?", 1)[0],
                   "werkzeug.socket": sock}
        for name, value in headers:
            environ["HTTP_" + name.upper().replace("-", "_")] = value
        try:
            # It accepts permessage-deflate only when the client offers it;
            # the load generator never does, so compression stays off.
            ws = simple_websocket.Server(environ, ping_interval=None,
                                         max_message_size=MESSAGE_LIMIT)
        except Exception:
            sock.close()
            return
        path = environ["PATH_INFO"]
        try:
            if path == "/broadcast":
                with lock:
                    audience.add(ws)
                try:
                    while True:
                        message = ws.receive()
                        with lock:
                            targets = list(audience)
                        for target_ws in targets:
                            try:
                                target_ws.send(message)
                            except (simple_websocket.ConnectionClosed, OSError):
                                pass
                finally:
                    with lock:
                        audience.discard(ws)
            else:
                while True:
                    ws.send(ws.receive())
        except (simple_websocket.ConnectionClosed, OSError):
            pass

    listener = socket.create_server((HOST, 0), backlog=BACKLOG)
    ready(listener.getsockname()[1])
    _accept_forever(listener, serve_connection)


# -- websocket-server ----------------------------------------------------------

def run_websocket_server() -> None:
    from websocket_server import WebsocketServer
    from websocket_server.websocket_server import WebSocketHandler

    class Handler(WebSocketHandler):
        path = "/"

        def setup(self):
            # The library reads the request line itself and drops the path;
            # peeking at it first leaves its parser untouched.
            self.path = _peek_path(self.request)
            super().setup()

    class Server(WebsocketServer):
        request_queue_size = BACKLOG

        def get_request(self):
            sock, address = super().get_request()
            nodelay(sock)
            return sock, address

    # ERROR rather than its default WARNING: it logs a line for every client
    # that drops, which would put stderr writes into the disconnect numbers.
    server = Server(host=HOST, port=0, loglevel=logging.ERROR)
    server.RequestHandlerClass = Handler
    audience = []
    lock = threading.Lock()

    def new_client(client, _server):
        if client["handler"].path == "/broadcast":
            with lock:
                audience.append(client)

    def client_left(client, _server):
        if client is not None and client["handler"].path == "/broadcast":
            with lock:
                if client in audience:
                    audience.remove(client)

    def message_received(client, srv, message):
        if client["handler"].path == "/broadcast":
            with lock:
                targets = list(audience)
            for target in targets:
                try:
                    srv.send_message(target, message)
                except OSError:
                    pass
        else:
            srv.send_message(client, message)

    server.set_fn_new_client(new_client)
    server.set_fn_client_left(client_left)
    server.set_fn_message_received(message_received)
    ready(server.port)
    server.run_forever()


def _peek_path(sock: socket.socket) -> str:
    data = b""
    for _ in range(1000):
        data = sock.recv(4096, socket.MSG_PEEK)
        if b"\r\n" in data or not data:
            break
        threading.Event().wait(0.001)
    parts = data.split(b"\r\n", 1)[0].split(b" ")
    return parts[1].decode("latin-1").split("?", 1)[0] if len(parts) >= 2 else "/"


# -- the ceiling: plain TCP echo -------------------------------------------------

def _read_greeting(sock: socket.socket):
    """The TCP clients' greeting line (the path) and what came after it, or
    None if the client left first."""
    data = b""
    while b"\n" not in data and len(data) < 4096:
        chunk = sock.recv(4096)
        if not chunk:
            return None
        data += chunk
    return data


def run_tcp_echo() -> None:
    audience = set()
    lock = threading.Lock()

    def serve_connection(sock):
        try:
            data = _read_greeting(sock)
            if data is None:
                return
            line, _, rest = data.partition(b"\n")
            path, _, size = line.partition(b" ")
            sock.sendall(b"ok\n")
            if path == b"/broadcast":
                size = int(size)
                with lock:
                    audience.add(sock)
                try:
                    while True:
                        # One message at a time, as a WebSocket server
                        # handles them: forwarding whatever arrived at once
                        # would batch messages and put the ceiling out of
                        # sight.
                        message = rest[:size]
                        rest = rest[size:]
                        if len(message) < size:
                            message += sock.recv(size - len(message), socket.MSG_WAITALL)
                        if len(message) < size:
                            return
                        with lock:
                            targets = list(audience)
                        for target in targets:
                            try:
                                target.sendall(message)
                            except OSError:
                                pass
                finally:
                    with lock:
                        audience.discard(sock)
            else:
                if rest:
                    sock.sendall(rest)
                while True:
                    chunk = sock.recv(262144)
                    if not chunk:
                        return
                    sock.sendall(chunk)
        except (OSError, ValueError):
            pass
        finally:
            sock.close()

    listener = socket.create_server((HOST, 0), backlog=BACKLOG)
    ready(listener.getsockname()[1])
    _accept_forever(listener, serve_connection)


def _wsproto_work():
    """wsproto's work for one 32-byte text message, as a callable: a
    server-side FrameProtocol parses a masked client frame and encodes the
    reply, which any WebSocket server on wsproto must do at the least. One
    FrameProtocol per calling thread."""
    from wsproto.frame_protocol import FrameProtocol

    frame = bytes(FrameProtocol(client=True, extensions=[]).send_data("x" * 32, True))
    local = threading.local()

    def work():
        proto = getattr(local, "proto", None)
        if proto is None:
            proto = local.proto = FrameProtocol(client=False, extensions=[])
        proto.receive_bytes(frame)
        for received in proto.received_frames():
            proto.send_data(received.payload, True)

    return work


def run_tcp_echo_wsproto() -> None:
    """The TCP echo, a thread per connection, plus wsproto's work for one
    message per chunk echoed (in the small-message echo scenarios each chunk
    is one message): what the design of a threaded server on wsproto comes
    to without any code of its own. Its socket calls are gaman_sync's (the C
    helper's, which keep the GIL where a call cannot block), the fastest we
    know for threads, so that this is a ceiling."""
    import functools

    from gaman_sync.io import nonblocking
    _recv_gated = nonblocking.recv_gated

    work = _wsproto_work()

    def serve_connection(sock):
        try:
            data = _read_greeting(sock)
            if data is None:
                return
            _, _, rest = data.partition(b"\n")
            sock.sendall(b"ok\n" + rest)
            recv = (functools.partial(_recv_gated, sock.fileno()) if _recv_gated is not None
                    else sock.recv)
            while True:
                chunk = recv(262144)
                if not chunk:
                    return
                work()
                while chunk:
                    try:
                        chunk = chunk[nonblocking.send(sock, chunk):]
                    except BlockingIOError:
                        sock.sendall(chunk)
                        break
        except OSError:
            pass
        finally:
            sock.close()

    listener = socket.create_server((HOST, 0), backlog=BACKLOG)
    ready(listener.getsockname()[1])
    _accept_forever(listener, serve_connection)


def run_tcp_echo_wsproto_asyncio() -> None:
    """The same work on asyncio: one thread, one event loop."""
    import asyncio

    work = _wsproto_work()

    class Echo(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport
            self.greeted = False
            self.head = b""

        def data_received(self, data):
            if not self.greeted:
                self.head += data
                if b"\n" not in self.head:
                    return
                self.greeted = True
                _, _, data = self.head.partition(b"\n")
                self.transport.write(b"ok\n")
                if not data:
                    return
            work()
            self.transport.write(data)

    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Echo, HOST, 0, backlog=BACKLOG)
        ready(server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    asyncio.run(main())


SERVERS = {
    "gaman_sync": run_gaman_sync,
    "gaman_sync-workers2": lambda: run_gaman_sync_workers(2),
    "websockets-sync": run_websockets_sync,
    "websockets-asyncio": run_websockets_asyncio,
    "simple-websocket": run_simple_websocket,
    "websocket-server": run_websocket_server,
    "tcp-echo": run_tcp_echo,
    "tcp-echo-wsproto": run_tcp_echo_wsproto,
    "tcp-echo-wsproto-asyncio": run_tcp_echo_wsproto_asyncio,
}


def main() -> None:
    if len(sys.argv) != 2 or sys.argv[1] not in SERVERS:
        sys.exit(f"usage: servers.py {{{','.join(SERVERS)}}}")
    raise_fd_limit()
    if sys.argv[1] not in ("gaman_sync", "websockets-sync", "websockets-asyncio"):
        no_tls(sys.argv[1])
    SERVERS[sys.argv[1]]()


if __name__ == "__main__":
    main()
