"""The server: accepting, routing blocks by path, the clients of each block,
and a shutdown that leaves nothing running.

Threads: one accepts and runs every opening handshake (see
:mod:`gaman_sync.acceptor`), one runs every timer, one drains slow peers'
buffers, and each open connection has its own. Nothing else, but a
broker's own (two for :class:`~gaman_sync.broker.RedisBroker`).

A broker (``broker=``) carries each block's broadcasts to the other
processes of the application: it starts with the server (before it listens,
so that connection ids can be made unique across processes from the
broker's process number) and stops at the end of its shutdown.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import logging
import math
import signal
import socket
import ssl
import threading
import time
import weakref
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ..broker import Broker, LocalBroker
from ..connection import interrupted_connection_code
from ..io import PlainTransport, Runtime, Transport
from ..io.nonblocking import speedups_status
from ..options import Options, check_port
from ..protocol import Data, Protocol, Request, Side
from ..protocol.deflate import server_answer
from ..protocol.http import format_address
from .acceptor import Acceptor
from .blocks import BlockServer, Endpoint, Exclude, broadcast
from .connection import ServerConnection
from .http import HttpExchange
from .processes import check_workers, reserve_port, run_workers
from .routing import Pattern, Router
from .stats import ServerStats, Tally, access_fields

__all__ = ["WebSocketServer", "serve", "serve_until_signalled", "ServerStats"]

logger = logging.getLogger("gaman_sync")
access_logger = logging.getLogger("gaman_sync.access")
stats_logger = logging.getLogger("gaman_sync.stats")

ID_SPAN = 10**10
"""With a broker, connection ids are ``node * ID_SPAN + n``: unique across
processes, and ``n`` counts up to ten billion connections per process."""

ID_SPAN = 10**10
"""With a broker, connection ids are ``node * ID_SPAN + n``: unique across
processes, and ``n`` counts up to ten billion connections per process."""

# Started servers that were not shut down: the exit hook shuts them down.
_running: weakref.WeakSet[WebSocketServer] = weakref.WeakSet()


@atexit.register
def _shutdown_at_exit() -> None:
    """A program that ends without ``shutdown()`` still closes its clients with
    1001 instead of leaving them with a dropped connection (1006)."""
    for server in list(_running):
        server.shutdown()


class WebSocketServer:
    """A threaded WebSocket server for one or more blocks.

    For embedding in a program that is not async::

        server = WebSocketServer([block], port=0)
        server.start()            # returns once listening; server.port is set
        ...                       # send from any thread
        server.shutdown()

    It is also a context manager (``start`` on entry, ``shutdown`` on exit).
    Options are keyword arguments, as listed in :class:`~gaman_sync.Options`.
    A server started and never shut down is shut down when the program exits.

    ``health_path="/health"`` answers plain GET and HEAD requests for that
    path with ``200 OK`` (body ``ok``) from the accept thread, for load
    balancers; off by default. Blocks may serve plain HTTP too (``http=``,
    ``page=``, ``static=``: see :mod:`gaman_sync.server.http`).

    ``ssl_context`` (an ``ssl.SSLContext`` with the server's certificate
    loaded, e.g. ``ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)``
    then ``load_cert_chain(certfile, keyfile)``) serves ``wss://`` (and
    HTTPS for the health path and pages): the TLS handshake runs in the
    accept thread under ``handshake_timeout``, TLS itself in memory in each
    connection's transport (see :mod:`gaman_sync.io.tls`). Client
    certificates are asked for and checked when the context says so
    (``verify_mode = ssl.CERT_REQUIRED`` and ``load_verify_locations``).

    ``access_log=True`` logs one line per WebSocket connection when it ends,
    at INFO on the ``gaman_sync.access`` logger: peer, path, close code,
    duration, and messages and bytes each way. ``stats_interval=N`` logs
    :meth:`stats` every N seconds (and once at shutdown) on the
    ``gaman_sync.stats`` logger, from the timer thread. Both are off by default.

    ``broker=RedisBroker(url)`` makes broadcasts reach the clients of every
    process that shares it (see :mod:`gaman_sync.broker`); the default,
    :class:`~gaman_sync.broker.LocalBroker`, reaches this process's only.
    The server starts the broker and stops it at the end of its shutdown.

    ``reuse_port=True`` sets ``SO_REUSEPORT`` on the listening socket, so
    that several servers (in several processes) can listen on one port, and
    Linux spreads the connections over them: what ``serve(workers=N)`` does.
    """

    def __init__(self, blocks: Union[Endpoint, Sequence[Endpoint]], host: str = "127.0.0.1",
                 port: int = 8000, *, backlog: int = 1024, health_path: Optional[str] = None,
                 ssl_context: Optional[ssl.SSLContext] = None,
                 access_log: bool = False, stats_interval: Optional[float] = None,
                 broker: Optional[Broker] = None, reuse_port: bool = False,
                 **options: Any) -> None:
        if isinstance(blocks, Endpoint):
            blocks = [blocks]
        elif isinstance(blocks, (str, bytes)) or not hasattr(blocks, "__iter__"):
            raise TypeError(f"blocks must be a Block (from define_block) or a list of "
                            f"Blocks, not {type(blocks).__name__}")
        if not isinstance(host, str):
            raise TypeError(f"host must be a str (an address or a name), not "
                            f"{type(host).__name__}")
        check_port(port)
        if not isinstance(backlog, int) or isinstance(backlog, bool) or backlog < 0:
            raise ValueError(f"backlog must be an int of 0 or more, not {backlog!r}")
        self.options = Options.from_kwargs(options)
        """The :class:`~gaman_sync.Options` every connection uses."""
        self.host = host
        self._requested_port = port
        self._backlog = backlog
        self._reuse_port = bool(reuse_port)
        self._lock = threading.RLock()
        self._routes: Dict[str, BlockServer] = {}
        for block in blocks:
            if not isinstance(block, Endpoint):
                raise TypeError(f"expected a Block (from define_block), not {block!r}")
            if block.path in self._routes:
                raise ValueError(f"two blocks share the path {block.path!r}")
            self._routes[block.path] = BlockServer(self, block)
        if not self._routes:
            raise ValueError("a server needs at least one block")
        self._router: Router[BlockServer] = Router(list(self._routes.items()))
        # Pattern(): a ValueError unless a path
        if health_path is not None and not Pattern(health_path).is_exact:
            raise ValueError(f"health_path must be a plain path, without parameters: "
                             f"{health_path!r}")
        self.health_path = health_path
        """The path answered with ``200 OK`` for health checks, or None."""
        self.ssl_context = _check_ssl_context(ssl_context)
        """The TLS settings (``wss://``), or None (``ws://``)."""
        if not isinstance(access_log, bool):
            raise TypeError(f"access_log must be True or False, not {access_log!r}")
        self.access_log = access_log
        """Log a line per connection when it ends (``gaman_sync.access``)?"""
        if stats_interval is not None and (
                isinstance(stats_interval, bool) or not isinstance(stats_interval, (int, float))
                or not 0 < stats_interval < math.inf):
            raise ValueError(f"stats_interval must be a positive number of seconds, or None, "
                             f"not {stats_interval!r}")
        self.stats_interval = stats_interval
        """Seconds between two stats lines (``gaman_sync.stats``), or None."""
        self._tally = Tally()
        self._stats_timer_started = False
        if broker is None:
            broker = LocalBroker()
        elif not isinstance(broker, Broker):
            raise TypeError(f"broker must be a Broker (RedisBroker(url), say) or None, "
                            f"not {broker!r:.60}")
        self.broker: Broker = broker
        """What carries broadcasts to the other processes (a
        :class:`~gaman_sync.broker.LocalBroker` by default: none)."""
        self._broker_started = False
        self._channels: Dict[str, BlockServer] = {}
        self.runtime = Runtime("gaman_sync")
        """The shared threads: timers, the writer, the connection threads."""
        # Each connection, with the time it was accepted if the access log
        # is on (else None: no float kept per connection for nothing).
        self._connections: Dict[ServerConnection, Optional[float]] = {}
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
        self._speedups = False  # the C helper in use, as found at start()

    # -- Public API -----------------------------------------------------

    @property
    def blocks(self) -> List[BlockServer]:
        """Each block's view (what its handlers see as ``ctx.server``)."""
        return list(self._routes.values())

    @property
    def clients(self) -> List[ServerConnection]:
        """The open connections of every block (a snapshot)."""
        return [c for view in self._routes.values() for c in view.clients]

    @property
    def address(self) -> Tuple[Any, ...]:
        """The address the server listens (or listened) on, once started."""
        if self._address is None:
            raise RuntimeError("the server is not listening; call start() first")
        return self._address

    @property
    def port(self) -> int:
        """The port the server listens on: the one picked when 0 was asked."""
        port: int = self.address[1]
        return port

    @property
    def listening(self) -> bool:
        """True from :meth:`start` until :meth:`shutdown`."""
        return self._listener is not None and not self._closing

    @property
    def threads(self) -> List[threading.Thread]:
        """The live threads of this server: its accept thread and its
        runtime's (timers, writer, connections). Empty once it has shut down
        cleanly."""
        accept = self._accept_thread
        return [t for t in threading.enumerate() if t.is_alive()
                and (t is accept or self.runtime.owns(t))] + self.broker.threads

    @property
    def listener_open(self) -> bool:
        """Is the listening socket open (from start() until the shutdown closed it)?"""
        listener = self._listener
        return listener is not None and listener.fileno() != -1

    def url(self, path: str = "/") -> str:
        """``ws://host:port/path`` (``wss://`` with TLS) for this server: once
        started, or before when it was given a port other than 0 (the
        supervisor of ``serve(workers=N)`` names its workers' port so)."""
        if self._address is None and self._requested_port:
            host, port = self.host or "0.0.0.0", self._requested_port
        else:
            host, port = self.address[0], self.port
        if ":" in host:
            host = f"[{host}]"
        scheme = "ws" if self.ssl_context is None else "wss"
        return f"{scheme}://{host}:{port}{path}"

    def broadcast(self, message: Data, exclude: Exclude = None) -> int:
        """Send ``message`` to the open clients of every block (see
        :meth:`BlockServer.broadcast`); with a broker, on every block's
        channel to the other processes too."""
        sent = broadcast(self.clients, message, exclude,
                         any(view.compressing for view in self._routes.values()))
        for view in self._routes.values():
            view.publish(message, None, exclude)
        return sent

    def stats(self) -> ServerStats:
        """What the server has done since it was made, as a
        :class:`~gaman_sync.server.stats.ServerStats` (a frozen dataclass;
        ``as_dict()`` for a plain dict; ``str()`` for one log line):

        - ``open``: WebSocket connections served now; ``accepted``: opening
          handshakes answered with 101 in all;
        - ``rejected``: refused handshakes by HTTP status (``{404: 2, 403: 1}``),
          those of ``on_request`` and redirects included;
        - ``messages_in``, ``bytes_in``, ``messages_out``, ``bytes_out``: over
          every connection, closed and open; a broadcast counts one message per
          client it reached; bytes are WebSocket frames after the handshake
          (headers and control frames included);
        - ``closes``: closed connections by close code (``{1000: 9, 1006: 1}``).

        Plain HTTP requests (pages, ``health_path``) are not counted. Safe
        from any thread; it costs a pass over the open connections."""
        tally = self._tally
        with tally.lock:
            return tally.snapshot(list(self._connections))

    def start(self) -> WebSocketServer:
        """Listen and accept in a background thread; return once listening."""
        with self._lock:
            if self._closing or self._shutdown_started:
                raise RuntimeError("the server was shut down; make a new one")
            if self._listener is not None:
                return self
            if self._acceptor is not None:
                raise RuntimeError("this server serves adopted sockets only: it was "
                                   "given one by adopt() before start()")
            self._start_broker()
            try:
                listener = _listen(self.host, self._requested_port, self._backlog,
                                   self._reuse_port)
            except BaseException:
                self._stop_broker(self.options.shutdown_timeout)
                raise
            self._address = listener.getsockname()
            listener.setblocking(False)
            in_use, why_not = self._start_accepting(listener)
            # Last: `listening` turns true only once address and port are known.
            self._listener = listener
        logger.info("listening on %s (C helper %s)", format_address(self.address),
                    "in use" if in_use else f"not in use: {why_not}")
        return self

    def adopt(self, sock: socket.socket, remote_address: Any = None) -> None:
        """Serve a socket that is already connected (one end of a
        ``socket.socketpair()``, a socket accepted by another program) as if
        this server had accepted it: its opening handshake is read and checked
        in the accept thread, then it is served like any other connection. A
        server that was not started serves adopted sockets without listening.
        The server owns the socket from here on; on a server with an
        ``ssl_context`` it speaks TLS like any other."""
        if not isinstance(sock, socket.socket):
            raise TypeError(f"sock must be a connected socket.socket, not {sock!r}")
        if sock.gettimeout() is not None:
            sock.settimeout(None)  # the connection's thread reads it in blocking mode
        with self._lock:
            if self._closing or self._shutdown_started:
                sock.close()
                raise RuntimeError("the server was shut down; make a new one")
            if self._acceptor is None:
                self._start_broker()
                self._start_accepting(None)
            assert self._acceptor is not None
            self._acceptor.adopt(sock, remote_address if remote_address is not None
                                 else _peer_of(sock))

    def _start_accepting(self, listener: Optional[socket.socket]) -> Tuple[bool, str]:
        """The accept thread (the caller holds the lock)."""
        serves_http = any(view.http is not None for view in self._routes.values())
        self._acceptor = Acceptor(listener, self.options, self._route, self._accepted,
                                  self._capacity, self._plain if serves_http else None,
                                  self.health_path, self.ssl_context,
                                  rejected=self._tally.rejected)
        self._accept_thread = threading.Thread(target=self._acceptor.run,
                                               name="gaman_sync-accept", daemon=True)
        self._accept_thread.start()
        _running.add(self)
        self._start_stats_timer()
        in_use, why_not = speedups_status()
        self._speedups = in_use
        return in_use, why_not

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
        """Ask for a shutdown: :meth:`serve_forever` shuts down and returns,
        and :meth:`wait_for_shutdown_request` returns True. Safe in a signal
        handler (it only sets a flag)."""
        self._stop_requested.set()

    def wait_for_shutdown_request(self, timeout: Optional[float] = None) -> bool:
        """Wait up to ``timeout`` seconds (``None``: forever) for
        :meth:`request_shutdown`; True once it was called. The loop of a
        program that has its own work to do between checks."""
        return self._stop_requested.wait(timeout)

    def shutdown(self, timeout: Optional[float] = None) -> None:
        """Stop accepting, close every connection with 1001, and end every thread.

        Clients get ``timeout`` seconds (default: the ``shutdown_timeout``
        option; less a short grace) to answer the close; the connections that
        have not are then dropped, and every ``on_close`` that has started
        runs once. A callback that does not return within the timeout is left
        behind in its thread, and its ``on_close`` runs when it returns.
        Called from one of the server's own threads (a callback, say), it
        starts the shutdown in a new thread and returns at once, since it
        cannot wait for the thread it runs in. So does a signal handler that
        interrupted this server's code (a ``send`` or a ``broadcast`` in the
        main thread): that code may hold a connection's lock, which the
        shutdown needs.
        """
        if timeout is None:
            timeout = self.options.shutdown_timeout
        elif isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
                or not timeout >= 0:
            raise ValueError(f"timeout must be a number of seconds of 0 or more, or None "
                             f"(the shutdown_timeout option), not {timeout!r}")
        if self.runtime.owns() or threading.current_thread() is self._accept_thread \
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
            _running.discard(self)
        self._stop_requested.set()  # wakes serve_forever
        if started:
            # The first call's timeout bounds the shutdown, not this one's.
            self._done.wait(max(self._shutdown_deadline - time.monotonic(), 0.0) + 2.0)
            return
        open_now = len(self._connections)
        if open_now:
            # The wait that follows can take the whole timeout: say why.
            logger.info("shutting down: %d connection(s) closing with 1001, within %g s",
                        open_now, timeout)
        try:
            self._shutdown(timeout)
        finally:
            self._done.set()

    def __enter__(self) -> WebSocketServer:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        where = format_address(self._address) if self._address is not None else "not started"
        return f"<WebSocketServer {where}, {len(self._connections)} connections>"

    # -- What the acceptor calls ---------------------------------------------

    def _route(self, request: Request) -> Optional[Tuple[BlockServer, Mapping[str, str]]]:
        """The block that serves ``request``'s path and the path's
        parameters, or None (404)."""
        return self._router.match(request.raw_path)

    def _capacity(self) -> int:
        """How many more connections may open (the acceptor counts its own)."""
        return self.options.max_connections - len(self._connections)

    def _accepted(self, transport: Transport, request: Request, view: BlockServer,
                  subprotocol: Optional[str], trailing_data: bytes,
                  response: Optional[bytes], key: bytes) -> None:
        """A handshake was accepted (in the accept thread): give the connection
        its thread, which sends the 101 ``response`` (or, for a block that
        decides, makes it from ``key``) once its handler returned."""
        with self._lock:
            conn = self._connection(transport, request, view, subprotocol, trailing_data,
                                    response, key)
        if conn is not None:
            self._launch(conn, transport)

    def serve_socket(self, sock: socket.socket, request: Request, view: BlockServer,
                     key: bytes, subprotocol: Optional[str] = None,
                     response: Optional[bytes] = None, trailing_data: bytes = b"") -> None:
        """Serve a connection whose opening handshake another server read and
        checked, in the calling thread, until it ends (a WSGI server's worker
        thread: see :mod:`gaman_sync.wsgi`). The server owns ``sock`` from here on.

        ``request`` is routed to ``view`` (one of :attr:`blocks`, its
        ``params`` set) and its upgrade checked; ``key`` is its
        ``Sec-WebSocket-Key``; ``response`` is the 101 to send, with
        ``subprotocol``, or None for a block that decides (``on_request``, a
        redirect, a subprotocol function), which then answers from here;
        ``trailing_data`` are bytes that came after the request. The
        connection counts among this server's: ``clients``, ``broadcast``,
        ``max_connections`` and ``shutdown`` (1001) treat it as one accepted
        here. The server need not be started. Raises ``RuntimeError``, with
        nothing sent and ``sock`` closed, once the server was shut down or
        when ``max_connections`` are open."""
        if sock.gettimeout() is not None:
            sock.settimeout(None)  # the engine reads it in blocking mode
        with self._lock:
            refusal = ("the server was shut down" if self._closing or self._shutdown_started
                       else f"max_connections ({self.options.max_connections}) reached"
                       if self._capacity() <= 0 else None)
            if refusal is not None:
                sock.close()
                raise RuntimeError(refusal)
            try:
                self._start_broker()
            except BaseException:
                sock.close()
                raise
            _running.add(self)  # a program that exits shuts it down (1001)
            self._start_stats_timer()
            self._speedups = speedups_status()[0]
            conn = self._connection(PlainTransport(sock), request, view, subprotocol,
                                    trailing_data, response, key)
        assert conn is not None
        try:
            conn.run()
        finally:
            # The caller's thread lives on: a shutdown must not wait for it to end.
            conn.thread = None
            self._forget(conn)

    def _connection(self, transport: Transport, request: Request, view: BlockServer,
                    subprotocol: Optional[str], trailing_data: bytes,
                    response: Optional[bytes], key: bytes) -> Optional[ServerConnection]:
        """The connection of an accepted handshake, counted among this
        server's (the caller holds the lock); None, and ``transport`` closed,
        once the server is closing."""
        if self._closing:
            transport.close()
            return None
        options = self.options
        # permessage-deflate, if the client offers it and it is on.
        answer = None
        deflate = options.deflate
        if deflate is not None:
            offers = request.extensions  # found by the upgrade's check
            answer = server_answer(offers, deflate) if offers else None
        conn = ServerConnection(
            transport,
            Protocol(Side.SERVER, options.max_message_size, trailing_data,
                     unmask_in_c=self._speedups,
                     deflate=answer[1] if answer is not None else None),
            self.runtime, options, next(self._ids), request, view, subprotocol, response, key,
            extensions=answer[0] if answer is not None else None)
        if trailing_data:
            conn.bytes_in = len(trailing_data)  # frames that came with the request
        self._connections[conn] = time.monotonic() if self.access_log else None
        return conn

    def _plain(self, transport: Transport, request: Request, view: BlockServer) -> None:
        """A plain HTTP request for a block that serves HTTP (in the accept
        thread): its answer is made and sent in a connection thread."""
        with self._lock:
            if self._closing:
                transport.close()
                return
            conn = HttpExchange(transport, Protocol(Side.SERVER), self.runtime,
                                self.options, next(self._ids), request, view, None, None)
            self._connections[conn] = None
        self._launch(conn, transport)

    def _launch(self, conn: ServerConnection, transport: Transport) -> None:
        """Run ``conn`` in a connection thread."""
        def serve() -> None:
            thread = threading.current_thread()
            thread.name = f"gaman_sync-conn-{conn.id}"
            try:
                conn.run()
            finally:
                self._forget(conn)

        try:
            self.runtime.workers.run(serve)
        except RuntimeError as exc:  # "can't start new thread"
            logger.warning("could not start a thread for a connection: %s", exc)
            self._forget(conn)
            transport.close()

    def _forget(self, conn: ServerConnection) -> None:
        """A connection's thread is done with it."""
        # Without the server's lock, as for a block's clients; only a
        # shutdown waits for this, and it sets _closing before it looks. The
        # tally's short lock makes the move from open to closed one step for
        # stats().
        conn.server.discard(conn)
        with self._tally.lock:
            started = self._connections.pop(conn, None)
            code = self._tally.ended(conn)
        if started is not None and code is not None:
            try:
                line, fields = access_fields(conn, code, time.monotonic() - started)
                access_logger.info("%s", line, extra=fields)
            except Exception:  # a log handler that fails must not end the thread's cleanup
                logger.exception("%s: the access log failed", conn)
        if self._closing:
            with self._lock:
                self._released.notify_all()

    # -- The broker ------------------------------------------------------

    def _start_broker(self) -> None:
        """Start the broker once, before the first connection (the caller
        holds the lock). Raises what its start raises
        (:class:`~gaman_sync.broker.BrokerUnavailable`)."""
        if self._broker_started:
            return
        broker = self.broker
        if broker.remote:
            self._channels = {broker.channel(path): view for path, view in self._routes.items()}
            broker.start(list(self._channels), self._receive)
            for channel, view in self._channels.items():
                view.connect_broker(broker, channel)
            if broker.node is not None:
                # Ids unique across the processes that share the broker, still
                # readable: process 3's connection 17 is 30000000017.
                self._ids = itertools.count(broker.node * ID_SPAN + 1)
        self._broker_started = True

    def _receive(self, channel: str, payload: bytes) -> None:
        """A broadcast from another process (in the broker's thread)."""
        view = self._channels.get(channel)
        if view is not None:
            view.receive(payload)

    def _stop_broker(self, timeout: float) -> None:
        if self._broker_started:
            self._broker_started = False
            for view in self._routes.values():
                view.connect_broker(None, "")
            self.broker.stop(timeout)

    # -- Internals -----------------------------------------------------

    def _start_stats_timer(self) -> None:
        """Log the stats every ``stats_interval`` from the timer thread (once
        started; the caller holds the lock)."""
        if self.stats_interval is not None and not self._stats_timer_started:
            self._stats_timer_started = True
            self.runtime.timers.call_later(self.stats_interval, self._log_stats)

    def _log_stats(self) -> None:
        """Timer: one stats line, and the next one scheduled."""
        if self._closing:
            return  # the shutdown logs the last one
        stats_logger.info("stats: %s", self.stats())
        assert self.stats_interval is not None
        self.runtime.timers.call_later(self.stats_interval, self._log_stats)

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
            conn.close_nowait(1001, "server shutting down", lock_timeout=min(0.1, left()))
        # Keep a short grace at the end to drop the connections that did not
        # answer, and still return within the timeout.
        if not self._wait_released(deadline - min(1.0, timeout / 4)):
            with self._lock:
                remaining = list(self._connections)
            logger.info("shutdown: dropping %d connection(s) that did not close in time",
                        len(remaining))
            for conn in remaining:
                conn.abort()
            if not self._wait_released(deadline):
                with self._lock:
                    stuck = len(self._connections)
                logger.warning("shutdown: %d connection thread(s) still running "
                               "(a callback that does not return?)", stuck)
        runtime = self.runtime
        runtime.workers.stop(left())
        for conn in conns:
            if conn.thread is not None and conn.thread is not threading.current_thread():
                conn.thread.join(left())
        # Idle, they end at once: a short floor past a spent deadline keeps
        # them from being left behind.
        runtime.timers.stop(max(left(), 0.2))
        runtime.flusher.stop(max(left(), 0.2))
        if self.stats_interval is not None:
            stats_logger.info("stats at shutdown: %s", self.stats())
        # Last: what the on_close callbacks broadcast still reaches the others.
        self._stop_broker(max(left(), 1.0))
        logger.info("shut down")

    def _wait_released(self, deadline: float) -> bool:
        with self._lock:
            while self._connections:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._released.wait(remaining)
            return True


def _check_ssl_context(context: Any) -> Optional[ssl.SSLContext]:
    """``ssl_context`` if it can serve TLS; one clear error otherwise."""
    if context is None:
        return None
    if not isinstance(context, ssl.SSLContext):
        raise TypeError(f"ssl_context must be an ssl.SSLContext (or None for ws://), "
                        f"not {context!r}")
    try:
        if context.protocol == ssl.PROTOCOL_TLS_CLIENT:
            # What wrap_bio says from Python 3.10 on; 3.9's accepts it.
            raise ValueError("Cannot create a server socket with a PROTOCOL_TLS_CLIENT context")
        context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)
    except (ValueError, ssl.SSLError) as exc:
        raise ValueError(f"ssl_context cannot serve TLS: {exc} (make it with "
                         f"ssl.create_default_context(ssl.Purpose.CLIENT_AUTH) or "
                         f"ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))") from None
    return context


def _peer_of(sock: socket.socket) -> Any:
    try:
        return sock.getpeername() or "local"  # a socketpair's end has no address
    except OSError:
        return "local"


def _listen(host: str, port: int, backlog: int, reuse_port: bool = False) -> socket.socket:
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    family = infos[0][0]
    address = infos[0][4]
    return socket.create_server(address, family=family, backlog=backlog,
                                reuse_port=reuse_port)


def serve(blocks: Union[Endpoint, Sequence[Endpoint]], host: str = "127.0.0.1",
          port: int = 8000, *, workers: Optional[int] = None,
          ready: Optional[Callable[[WebSocketServer], Any]] = None, **options: Any) -> None:
    """Run a server until Ctrl-C or SIGTERM, then shut it down cleanly.

    Keyword arguments are :class:`WebSocketServer`'s (``ssl_context`` for
    ``wss://``, ``broker=``, ``health_path=``, ``backlog=``) and the options
    of :class:`~gaman_sync.Options`.

    The first signal starts the shutdown (within the ``shutdown_timeout``
    option); a second Ctrl-C or SIGTERM during it ends the program at once,
    leaving the connections still open dropped.

    ``workers=N`` (Linux only) runs N server processes on the port instead of
    a server in this one, and supervises them: see
    :mod:`gaman_sync.server.processes`. Call it from the main thread, before
    starting threads of your own: it forks.

    ``ready(server)`` is called once the server listens (with workers: once
    every worker does, in this process, with a server object whose
    :meth:`~WebSocketServer.url` names their port), to log its URLs, say.
    """
    if workers is not None:
        check_workers(workers)
        reservation = reserve_port(host, port)
        try:
            server = WebSocketServer(blocks, host=host, port=reservation.getsockname()[1],
                                     reuse_port=True, **options)
        except BaseException:
            reservation.close()
            raise
        try:
            # Once here, in one line, rather than by each worker as it fails.
            server.broker.check()
        except BaseException:
            reservation.close()
            raise
        run_workers(server, workers, reservation, warn_broadcast=not server.broker.remote,
                    ready=None if ready is None else functools.partial(ready, server))
        return
    serve_until_signalled(WebSocketServer(blocks, host=host, port=port, **options), ready)


def serve_until_signalled(server: WebSocketServer,
                          ready: Optional[Callable[[WebSocketServer], Any]] = None) -> None:
    """:func:`serve` for a server already made: serve until Ctrl-C or
    SIGTERM, then shut it down. The handlers are set (in the main thread
    only) before the server starts, so that no signal finds the program
    without them, and restored on return; ``ready(server)`` is called once it
    listens. A second signal during the shutdown raises ``KeyboardInterrupt``.
    An ``OSError`` of :meth:`~WebSocketServer.start` (a port in use) is
    raised as it is."""
    previous: Dict[signal.Signals, Any] = {}

    def on_signal(signum: int, frame: Any) -> None:
        if server.wait_for_shutdown_request(0):
            # Restore the previous handlers first: a third signal is theirs.
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name} during shutdown")
        server.request_shutdown()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        server.start()
        try:
            if ready is not None:
                ready(server)
        except BaseException:
            server.shutdown()
            raise
        server.serve_forever()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
