"""The server: accepting, routing blocks by path, the clients of each block,
and a shutdown that leaves nothing running.

Threads: one accepts and runs every opening handshake (see
:mod:`gaman_sync.acceptor`), one runs every timer, one drains slow peers'
buffers, and each open connection has its own. Nothing else.
"""

from __future__ import annotations

import itertools
import logging
import signal
import socket
import threading
import time
from typing import (Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union)

from .acceptor import Acceptor
from .block import Block
from .connection import Connection, interrupted_connection_code
from .flusher import Flusher
from .options import Options
from .protocol import encode_frame
from .request import Request, format_address
from .timers import Timers
from .workers import Workers

__all__ = ["WebSocketServer", "BlockServer", "serve"]

logger = logging.getLogger("gaman_sync")

Message = Union[str, bytes, bytearray, memoryview]
Exclude = Union[Connection, Iterable[Connection], None]


class BlockServer:
    """One block's view of the server: ``ctx.server`` in a handler.

    As in GamanJS, where each block has its own ``ws`` server, ``clients``
    and ``broadcast`` cover this block's connections only. ``root`` is the
    whole :class:`WebSocketServer` (every block, ``shutdown``, ``port``).
    """

    def __init__(self, root: "WebSocketServer", block: Block) -> None:
        self.root = root
        """The :class:`WebSocketServer` that runs this block."""
        self.block = block
        """The :class:`~gaman_sync.Block` served."""
        # Joined and left without a lock: a dict's item assignment, pop()
        # and list() are each atomic, and a shared lock here is what
        # thousands of connections ending at once would queue on (each
        # holder waiting its turn for the GIL among them).
        self._clients: Dict[Connection, None] = {}

    @property
    def path(self) -> str:
        """The block's path."""
        return self.block.path

    @property
    def clients(self) -> List[Connection]:
        """The open connections of this block, in the order they opened (a snapshot)."""
        return list(self._clients)

    @property
    def port(self) -> int:
        """The port the server listens on."""
        return self.root.port

    @property
    def address(self) -> Tuple[Any, ...]:
        """The address the server listens on."""
        return self.root.address

    def broadcast(self, message: Message, exclude: Exclude = None) -> int:
        """Send ``message`` to every open client of this block; never blocks.

        The frame is encoded once and queued for each client. A client whose
        outgoing buffer is already over ``write_limit`` is closed with 1008
        instead of holding up the others. Returns the number of clients the
        message was queued for.
        """
        return _broadcast(list(self._clients), message, exclude)

    def _attach(self, conn: Connection) -> None:
        self._clients[conn] = None

    def _detach(self, conn: Connection) -> None:
        self._clients.pop(conn, None)

    def __repr__(self) -> str:
        return f"<BlockServer {self.path} with {len(self._clients)} clients>"


def _broadcast(clients: Sequence[Connection], message: Message, exclude: Exclude) -> int:
    header, payload = encode_frame(message)
    frame = header + payload
    if isinstance(exclude, Connection):
        exclude = (exclude,)
    skip = set(exclude) if exclude is not None else ()
    sent = 0
    for conn in clients:
        if conn not in skip and conn._broadcast_frame(frame):
            sent += 1
    return sent


class WebSocketServer:
    """A threaded WebSocket server for one or more blocks.

    For embedding in a program that is not async::

        server = WebSocketServer([block], port=0)
        server.start()            # returns once listening; server.port is set
        ...                       # send from any thread
        server.shutdown()

    It is also a context manager (``start`` on entry, ``shutdown`` on exit).
    Options are keyword arguments, as listed in :class:`~gaman_sync.Options`.
    """

    def __init__(self, blocks: Union[Block, Sequence[Block]], host: str = "127.0.0.1",
                 port: int = 8000, *, backlog: int = 1024, **options: Any) -> None:
        if isinstance(blocks, Block):
            blocks = [blocks]
        self.options = Options.from_kwargs(options)
        """The :class:`~gaman_sync.Options` every connection uses."""
        self.host = host
        self._requested_port = port
        self._backlog = backlog
        self._lock = threading.RLock()
        self._routes: Dict[str, BlockServer] = {}
        for block in blocks:
            if not isinstance(block, Block):
                raise TypeError(f"expected a Block (from define_block), not {block!r}")
            if block.path in self._routes:
                raise ValueError(f"two blocks share the path {block.path!r}")
            self._routes[block.path] = BlockServer(self, block)
        if not self._routes:
            raise ValueError("a server needs at least one block")
        self.timers = Timers()
        self.flusher = Flusher()
        self._workers = Workers("gaman_sync-conn", self._mark)
        self._connections: Dict[Connection, None] = {}
        self._ids = itertools.count(1)
        self._listener: Optional[socket.socket] = None
        self._address: Optional[Tuple[Any, ...]] = None
        self._shutdown_deadline = 0.0
        self._acceptor: Optional[Acceptor] = None
        self._accept_thread: Optional[threading.Thread] = None
        self._closing = False
        self._stop_requested = threading.Event()
        self._done = threading.Event()
        self._shutdown_started = False
        self._released = threading.Condition(self._lock)

    # -- Public API -----------------------------------------------------

    @property
    def blocks(self) -> List[BlockServer]:
        """Each block's view (what its handlers see as ``ctx.server``)."""
        return list(self._routes.values())

    @property
    def clients(self) -> List[Connection]:
        """The open connections of every block (a snapshot)."""
        return [c for view in self._routes.values() for c in list(view._clients)]

    @property
    def address(self) -> Tuple[Any, ...]:
        """The address the server listens (or listened) on, once started."""
        if self._address is None:
            raise RuntimeError("the server is not listening; call start() first")
        return self._address

    @property
    def port(self) -> int:
        """The port the server listens on: the one picked when 0 was asked."""
        return self.address[1]

    def broadcast(self, message: Message, exclude: Exclude = None) -> int:
        """Send ``message`` to the open clients of every block (see
        :meth:`BlockServer.broadcast`)."""
        return _broadcast(self.clients, message, exclude)

    def start(self) -> "WebSocketServer":
        """Listen and accept in a background thread; return once listening."""
        with self._lock:
            if self._closing or self._shutdown_started:
                raise RuntimeError("the server was shut down; make a new one")
            if self._listener is not None:
                return self
            self._listener = _listen(self.host, self._requested_port, self._backlog)
            self._address = self._listener.getsockname()
            self._listener.setblocking(False)
            self._acceptor = Acceptor(self._listener, self.options, self._route, self._opened,
                                      self._capacity)
            self._accept_thread = self._thread(self._acceptor.run, "gaman_sync-accept")
            self._accept_thread.start()
        logger.info("listening on %s", format_address(self.address))
        return self

    def serve_forever(self) -> None:
        """Start if needed, and block until the server is shut down (by
        :meth:`shutdown` from anywhere, or a stop request from a signal)."""
        self.start()
        try:
            # A timed wait keeps Ctrl-C deliverable on every platform.
            while not self._stop_requested.wait(0.5):
                pass
        finally:
            self.shutdown()

    def request_shutdown(self) -> None:
        """Ask :meth:`serve_forever` to shut down and return. Safe in a signal handler."""
        self._stop_requested.set()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every connection with 1001, and end every thread.

        Clients get ``timeout`` seconds (less a short grace) to answer the
        close; the connections that have not are then dropped. Every
        ``on_close`` runs once. Called from one of the server's own threads
        (a callback, say), it starts the shutdown in a new thread and returns
        at once, since it cannot wait for the thread it runs in. So does a
        signal handler that interrupted this server's code (a ``send`` or a
        ``broadcast`` in the main thread): that code may hold a connection's
        lock, which the shutdown needs.
        """
        if getattr(threading.current_thread(), "_gaman_server", None) is self \
                or interrupted_connection_code():
            with self._lock:
                if self._shutdown_started:
                    return
            threading.Thread(target=self.shutdown, args=(timeout,),
                             name="gaman_sync-shutdown", daemon=True).start()
            return
        with self._lock:
            started, self._shutdown_started = self._shutdown_started, True
            if not started:
                self._shutdown_deadline = time.monotonic() + timeout
        self._stop_requested.set()  # wakes serve_forever
        if started:
            # The first call's timeout bounds the shutdown, not this one's.
            self._done.wait(max(self._shutdown_deadline - time.monotonic(), 0.0) + 2.0)
            return
        try:
            self._shutdown(timeout)
        finally:
            self._done.set()

    def __enter__(self) -> "WebSocketServer":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        where = format_address(self._address) if self._address is not None else "not started"
        return f"<WebSocketServer {where}, {len(self._connections)} connections>"

    # -- What the acceptor and connections call back (the host interface) -----

    def _route(self, request: Request) -> Optional[BlockServer]:
        """The block that serves ``request``'s path, or None (404)."""
        return self._routes.get(request.path)

    def _release(self, conn: Connection) -> None:
        """A connection's thread is done with it."""
        # Without the lock, as for a block's clients; only a shutdown waits
        # for this, and it sets _closing before it looks.
        self._connections.pop(conn, None)
        if self._closing:
            with self._lock:
                self._released.notify_all()

    # -- Internals -----------------------------------------------------

    def _thread(self, target: Any, name: str) -> threading.Thread:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._mark(thread)
        return thread

    def _mark(self, thread: threading.Thread) -> None:
        """Make ``thread`` recognisable as this server's (see :meth:`shutdown`)."""
        thread._gaman_server = self  # type: ignore[attr-defined]

    def _capacity(self) -> int:
        """How many more connections may open (the acceptor counts its own)."""
        return self.options.max_connections - len(self._connections)

    def _opened(self, sock: socket.socket, address: Any, request: Request,
                view: BlockServer, subprotocol: Optional[str], trailing_data: bytes,
                response: bytes) -> None:
        """A handshake was accepted (in the accept thread): give it its thread,
        which sends the 101 ``response``."""
        with self._lock:
            if self._closing:
                sock.close()
                return
            conn = Connection(sock, address, self, next(self._ids), request, view,
                              subprotocol, trailing_data)
            self._connections[conn] = None
        def serve() -> None:
            thread = threading.current_thread()
            thread.name = f"gaman_sync-conn-{conn.id}"
            conn.thread = thread
            conn.run(response)

        try:
            self._workers.run(serve)
        except RuntimeError as exc:  # "can't start new thread"
            logger.warning("could not start a thread for a connection: %s", exc)
            self._release(conn)
            sock.close()

    def _shutdown(self, timeout: float) -> None:
        # The waits end a little before the timeout, leaving time for the
        # last steps, so that shutdown() as a whole returns within it.
        deadline = time.monotonic() + timeout - min(0.05, timeout / 10)

        def left() -> float:
            return max(deadline - time.monotonic(), 0.0)

        with self._lock:
            self._closing = True
        if self._acceptor is not None:
            self._acceptor.stop()
        if self._accept_thread is not None:
            self._accept_thread.join(left())
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            conns = list(self._connections)
        for conn in conns:
            conn._close(1001, "server shutting down", lock_timeout=min(0.1, left()))
        # Keep a short grace at the end to drop the connections that did not
        # answer, and still return within the timeout.
        if not self._wait_released(deadline - min(1.0, timeout / 4)):
            with self._lock:
                remaining = list(self._connections)
            logger.info("shutdown: dropping %d connection(s) that did not close in time",
                        len(remaining))
            for conn in remaining:
                conn._abort()
            if not self._wait_released(deadline):
                with self._lock:
                    stuck = len(self._connections)
                logger.warning("shutdown: %d connection thread(s) still running "
                               "(a callback that does not return?)", stuck)
        self._workers.stop(left())
        for conn in conns:
            if conn.thread is not None and conn.thread is not threading.current_thread():
                conn.thread.join(left())
        # Idle, they end at once: a short floor past a spent deadline keeps
        # them from being left behind.
        self.timers.stop(max(left(), 0.2))
        self.flusher.stop(max(left(), 0.2))
        logger.info("shut down")

    def _wait_released(self, deadline: float) -> bool:
        with self._lock:
            while self._connections:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._released.wait(remaining)
            return True


def _listen(host: str, port: int, backlog: int) -> socket.socket:
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    family = infos[0][0]
    address = infos[0][4]
    return socket.create_server(address, family=family, backlog=backlog)


def serve(blocks: Union[Block, Sequence[Block]], host: str = "127.0.0.1", port: int = 8000,
          **options: Any) -> None:
    """Run a server until Ctrl-C or SIGTERM, then shut it down cleanly."""
    server = WebSocketServer(blocks, host=host, port=port, **options)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: server.request_shutdown())
    try:
        server.serve_forever()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
