"""WebSocket blocks mounted in a WSGI application, on the port it already serves.

::

    from gaman_sync.wsgi import WebSocketMiddleware

    app = WebSocketMiddleware(app, [chat_block], ping_interval=20)

Theory of operation
-------------------
The middleware owns one :class:`~gaman_sync.WebSocketServer` that is never
started: it listens on nothing and has no accept thread, but it has
everything else a standalone server has, shared by every block of the
middleware: the blocks' ``clients`` and ``broadcast``, the options, the
runtime's timer thread (keepalive, close timeouts) and writer thread (slow
readers' buffers), and ``shutdown`` (1001 to every client).

A request that asks for a WebSocket (an ``Upgrade: websocket`` header) on a
block's path is taken over; every other request goes to the wrapped
application untouched. The one taken over is checked by the same code as in
the standalone server's accept thread (``BlockServer.check_upgrade``: method,
upgrade headers, origins; then the subprotocol and the 101 of
:func:`~gaman_sync.protocol.handshake.accept_response`); a request that fails
gets the same plain-text answer (400, 403, 405, 426) through the WSGI server,
as any response, and one log line. Then the middleware takes the raw socket
from the WSGI server:

==========================================  =====================================
WSGI server                                 where the socket is
==========================================  =====================================
werkzeug's threaded server (``flask run``,  ``environ["werkzeug.socket"]``
``app.run()``, ``werkzeug.serving``)
gunicorn, ``gthread`` and ``sync`` workers  ``environ["gunicorn.socket"]``
==========================================  =====================================

Servers that do not expose their socket (waitress, wsgiref and Django's
``runserver``, mod_wsgi), a TLS socket (terminate TLS in a proxy in front)
and green sockets (gevent, eventlet workers) are refused with ``500`` and a
log line that says why, before anything is written. A duplicate of the
socket (``socket.dup()``, a descriptor of our own on the same connection) is
handed to :meth:`WebSocketServer.serve_socket`, with the bytes the WSGI server
had already read past the request (werkzeug's buffered reader, gunicorn's
read-ahead), which runs the connection in the WSGI server's worker thread:
it sends the 101 once the block's handler returned, then reads, dispatches
the callbacks and closes as a standalone connection does, and returns when
the connection has ended and ``on_close`` has run.

Then the WSGI server must neither write a second response nor reuse the
connection. The middleware shuts the WSGI server's socket down in both
directions, calls ``start_response("101 Switching Protocols", [])`` and
returns an empty body. The server's access log gets its line with status 101;
its attempt to write the status line fails with ``EPIPE``, which both
servers take as a client that went away: werkzeug's handler drops the
connection silently (``connection_dropped``), gunicorn logs "Ignoring
connection epipe" at DEBUG and closes it. Neither writes a byte after the
WebSocket's last frame, and neither keeps the connection alive. (flask-sock
raises ``StopIteration`` for gunicorn instead, and for werkzeug lets it write
an HTTP response after the WebSocket's close.)

What it costs
-------------
Each open WebSocket holds one worker thread of the WSGI server for its whole
life. werkzeug starts a thread per request, without a bound. gunicorn's
``gthread`` worker has ``--threads`` of them per worker process: with all of
them held by WebSockets, plain requests wait in the queue, so size
``--threads`` (or ``--workers``) for the WebSockets you expect plus the
requests you serve. ``broadcast`` and ``clients`` cover the connections of
one process: with several gunicorn workers, each has its own middleware and
its own clients.

gunicorn's ``--timeout`` does not concern ``gthread`` workers (their main
loop keeps notifying the arbiter while the threads serve WebSockets), but it
kills a ``sync`` worker whose only thread is in a WebSocket for longer than
it: run ``sync`` workers with ``--timeout 0``, and expect one WebSocket per
worker process. On SIGTERM (``gunicorn`` stopping, or a worker being
replaced), gunicorn waits up to ``--graceful-timeout`` (30 s) for requests
in progress, and a WebSocket never ends by itself: the middleware chains the
worker's SIGTERM handler (see :func:`shutdown_on_sigterm`), so that the
signal shuts its server down, every client gets a 1001 close, and the
worker threads come back within the ``shutdown_timeout`` option (5 s). Keep
``--graceful-timeout`` above ``shutdown_timeout``. This happens on its own
when the middleware is built in a gunicorn worker (the application module
imported by the worker, gunicorn's default); with ``--preload`` the
application is built before the workers exist, so add the hook to the
gunicorn configuration file::

    from gaman_sync.wsgi import gunicorn_post_worker_init as post_worker_init

Under werkzeug, Ctrl-C ends the program and the exit hook shuts the server
down (1001); call :func:`shutdown_on_sigterm` in the main thread for the
same on SIGTERM.

Differences from the standalone server: ``ctx.server.port`` and ``address``
raise ``RuntimeError`` (the WSGI server owns the port); blocks that serve
plain HTTP (``http=``, ``page=``) are left to the application; a callback
that calls ``shutdown()`` from a connection's own thread waits out the
``shutdown_timeout`` (the standalone server hands that call to a thread of its
own, since it knows its threads).
"""

from __future__ import annotations

import io
import logging
import signal
import socket
import ssl
import sys
import threading
import weakref
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union, cast
from urllib.parse import quote, urlsplit

from .protocol import Headers, Request
from .protocol.handshake import HandshakeError, accept_response, error_response
from .protocol.http import format_address, header_tokens
from .server import BlockServer, Endpoint, WebSocketServer
from .server.routing import Router

__all__ = ["WebSocketMiddleware", "mount", "shutdown_on_sigterm", "gunicorn_post_worker_init",
           "SOCKET_KEYS"]

logger = logging.getLogger("gaman_sync")

Environ = Dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]

SOCKET_KEYS = ("gunicorn.socket", "werkzeug.socket")
"""The ``environ`` keys under which the supported WSGI servers put the
connection's socket (gunicorn's workers, werkzeug's server)."""

_SWITCHED = "101 Switching Protocols"
# What a WSGI application must not send (PEP 3333); Upgrade stays, which a
# 426 must carry, and which gunicorn lets through for "websocket".
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "te", "trailer"})

# Every middleware not yet shut down: the SIGTERM handler shuts them down.
_live: weakref.WeakSet[WebSocketMiddleware] = weakref.WeakSet()


class WebSocketMiddleware:
    """A WSGI application that serves ``blocks`` as WebSockets on their paths
    and passes every other request to ``app``.

    ``options`` are those of :class:`~gaman_sync.WebSocketServer` (the
    :class:`~gaman_sync.Options`: ``ping_interval``, ``max_message_size``,
    ``origins``, ``shutdown_timeout``...). See the module's documentation for
    the WSGI servers it runs under and what each WebSocket costs.
    """

    def __init__(self, app: WSGIApp, blocks: Union[Endpoint, Sequence[Endpoint]],
                 **options: Any) -> None:
        if not callable(app):
            raise TypeError(f"app must be a WSGI application (a callable), not {app!r}")
        self.app = app
        """The wrapped WSGI application: it gets every other request."""
        self.server = WebSocketServer(blocks, **options)
        """The server of the blocks (never started): ``clients``,
        ``broadcast``, ``shutdown``, ``options``."""
        self._router: Router[BlockServer] = Router([(view.path, view)
                                                    for view in self.server.blocks])
        _live.add(self)
        if _in_gunicorn_worker_main_thread():
            shutdown_on_sigterm()

    @property
    def clients(self) -> List[Any]:
        """The open connections of every block (a snapshot)."""
        return self.server.clients

    def shutdown(self, timeout: Optional[float] = None) -> None:
        """Close every connection with 1001 and end the server's threads (see
        :meth:`WebSocketServer.shutdown`); upgrades that come after are
        answered ``503``."""
        _live.discard(self)
        self.server.shutdown(timeout)

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if "websocket" not in (t.lower() for t in
                               header_tokens([environ.get("HTTP_UPGRADE", "")])):
            return self.app(environ, start_response)
        request = _request(environ)
        route = self._router.match(request.raw_path)
        # A block without WebSocket (a page) leaves its path to the application.
        if route is None or not getattr(route[0], "upgrades", True):
            return self.app(environ, start_response)
        view, request.params = route
        try:
            key = view.check_upgrade(request)
            sock = _socket_of(environ)
        except HandshakeError as exc:
            return _refuse(request, exc, start_response)
        if view.decides:
            # on_request, a redirect or a subprotocol function: decided in
            # the connection (this thread), which then answers.
            subprotocol, response = None, None
        else:
            # a tuple: a subprotocol function would make the view decide
            offered = cast(Tuple[str, ...], view.endpoint.subprotocols)
            subprotocol = next((p for p in request.subprotocols if p in offered), None)
            response = accept_response(key, subprotocol)
        try:
            ours = sock.dup()
        except OSError as exc:
            return _refuse(request, HandshakeError(500, f"cannot use the socket: {exc}"),
                           start_response)
        try:
            self.server.serve_socket(ours, request, view, key, subprotocol, response,
                                     _read_ahead(environ, sock))
        except RuntimeError as exc:  # shut down, or max_connections: nothing was sent
            return _refuse(request, HandshakeError(503, str(exc), [("Retry-After", "1")]),
                           start_response)
        # Whatever the WSGI server writes now fails (EPIPE), and it cannot
        # read another request from this connection.
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        start_response(_SWITCHED, [])
        return []

    def __repr__(self) -> str:
        return f"<WebSocketMiddleware {[v.path for v in self.server.blocks]} for {self.app!r}>"


def mount(app: Any, blocks: Union[Endpoint, Sequence[Endpoint]],
          **options: Any) -> WebSocketMiddleware:
    """Serve ``blocks`` in a Flask application (anything with a ``wsgi_app``
    attribute): ``mount(app, block)`` wraps ``app.wsgi_app`` in a
    :class:`WebSocketMiddleware` and returns it. Flask's own ``app.run()``,
    ``flask run`` and ``gunicorn module:app`` then serve both. Mount every
    block of an application in one call: they share one server."""
    inner = getattr(app, "wsgi_app", None)
    if inner is None:
        raise TypeError(f"mount() needs an application with a wsgi_app attribute (Flask); "
                        f"wrap others with WebSocketMiddleware(app, blocks): {app!r}")
    if isinstance(inner, WebSocketMiddleware):
        raise ValueError("blocks are already mounted on this application; mount them all "
                         "in one call, so that they share one server")
    middleware = WebSocketMiddleware(inner, blocks, **options)
    app.wsgi_app = middleware
    return middleware


def shutdown_on_sigterm() -> None:
    """Make SIGTERM shut down every :class:`WebSocketMiddleware` of the
    process (1001 to every client), after the handler already in place has
    run; with none (the default action), the process then ends by SIGTERM as
    it would have. Call it in the main thread; once is enough. Done on its
    own in a gunicorn worker (see the module's documentation)."""
    previous = signal.getsignal(signal.SIGTERM)
    if getattr(previous, "_gaman_sync_chained", False) or previous == signal.SIG_IGN:
        return

    def on_sigterm(signum: int, frame: Any) -> None:
        if callable(previous):
            previous(signum, frame)
            # A signal handler must not wait: the connections' threads may
            # need this one (the main thread) to finish.
            threading.Thread(target=_shutdown_all, name="gaman_sync-wsgi-shutdown",
                             daemon=True).start()
            return
        _shutdown_all()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.raise_signal(signal.SIGTERM)

    on_sigterm._gaman_sync_chained = True  # type: ignore[attr-defined]
    signal.signal(signal.SIGTERM, on_sigterm)


def gunicorn_post_worker_init(worker: Any) -> None:
    """gunicorn's ``post_worker_init`` hook, for ``--preload``: SIGTERM to the
    worker closes every WebSocket with 1001 (see :func:`shutdown_on_sigterm`)."""
    shutdown_on_sigterm()


# -- Internals ------------------------------------------------------------------

def _shutdown_all() -> None:
    for middleware in list(_live):
        try:
            middleware.shutdown()
        except Exception:
            logger.exception("shutting down %r failed", middleware)


def _in_gunicorn_worker_main_thread() -> bool:
    """Is this a gunicorn worker's main thread, its signals set up?"""
    if threading.current_thread() is not threading.main_thread() or "gunicorn" not in sys.modules:
        return False
    try:
        from gunicorn.workers.base import Worker
    except ImportError:
        return False
    return isinstance(getattr(signal.getsignal(signal.SIGTERM), "__self__", None), Worker)


def _request(environ: Environ) -> Request:
    """Our :class:`Request` for a WSGI request (headers as the server gives
    them: repeats joined with commas)."""
    target = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if target and not target.startswith("/"):
        parts = urlsplit(target)  # absolute-form
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if not target:
        path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
        query = environ.get("QUERY_STRING", "")
        target = quote(path or "/", safe="/:@!$&'()*+,;=-._~%") + (f"?{query}" if query else "")
    headers = []
    for name, value in environ.items():
        if name.startswith("HTTP_"):
            headers.append((name[5:].replace("_", "-").title(), value))
        elif name in ("CONTENT_TYPE", "CONTENT_LENGTH") and value:
            headers.append((name.replace("_", "-").title(), value))
    protocol = environ.get("SERVER_PROTOCOL", "HTTP/1.1")
    remote = None
    if environ.get("REMOTE_ADDR"):
        try:
            remote = (environ["REMOTE_ADDR"], int(environ.get("REMOTE_PORT") or 0))
        except ValueError:
            remote = (environ["REMOTE_ADDR"], 0)
    return Request(environ.get("REQUEST_METHOD", "GET"), target, Headers(headers), remote,
                   protocol.partition("/")[2] or protocol)


def _socket_of(environ: Environ) -> socket.socket:
    """The connection's socket, or a HandshakeError (500) that says why not."""
    for key in SOCKET_KEYS:
        sock = environ.get(key)
        if sock is not None:
            break
    else:
        raise HandshakeError(500, f"this WSGI server ({environ.get('SERVER_SOFTWARE', '?')}) "
                                  f"does not expose its socket; WebSockets run under gunicorn "
                                  f"(gthread or sync workers) or werkzeug")
    if isinstance(sock, ssl.SSLSocket):
        raise HandshakeError(500, "WebSockets over the WSGI server's own TLS are not supported; "
                                  "terminate TLS in a proxy in front of it")
    if not isinstance(sock, socket.socket) or sock.fileno() < 0:
        raise HandshakeError(500, f"{key} is not a plain open socket ({type(sock).__name__}); "
                                  f"green (gevent, eventlet) workers are not supported")
    return sock


def _read_ahead(environ: Environ, sock: socket.socket) -> bytes:
    """Bytes the WSGI server read past the request (a client's first frames,
    sent without waiting for the 101), taken from its buffer."""
    stream: Any = environ.get("wsgi.input")  # a file-like object, or None
    # gunicorn: the request's body reader sits on the connection's read-ahead.
    unreader: Any = getattr(getattr(stream, "reader", None), "unreader", None)
    take = getattr(unreader, "take_buffered", None)
    if callable(take):
        return bytes(take())
    buffered = getattr(unreader, "buf", None)
    if isinstance(buffered, io.BytesIO):
        # A gunicorn without take_buffered (23, the last for Python 3.9):
        # what take_buffered does, on the same buffer.
        data = buffered.getvalue()
        unreader.buf = io.BytesIO()
        return data
    # werkzeug: wsgi.input is the connection's buffered reader; peek without
    # blocking (the socket in non-blocking mode for one call).
    peek = getattr(stream, "peek", None)
    if not callable(peek):
        return b""
    timeout = sock.gettimeout()
    try:
        sock.settimeout(0.0)
        data = bytes(peek())
        if data:
            stream.read(len(data))
        return data
    except OSError:
        return b""
    finally:
        sock.settimeout(timeout)


def _refuse(request: Request, exc: HandshakeError,
            start_response: StartResponse) -> Iterable[bytes]:
    """Answer a refused upgrade through the WSGI server, with the body and
    headers the standalone server sends (:func:`error_response`), and log it."""
    log = logger.warning if exc.status >= 500 else logger.info
    log("refused a WebSocket upgrade from %s for %s with %s: %s",
        format_address(request.remote_address), request.path, exc.status, exc.message)
    head, _, body = error_response(exc.status, exc.message, exc.headers).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers: List[Tuple[str, str]] = []
    for line in lines[1:]:
        name, _, value = line.partition(": ")
        if name.lower() not in _HOP_BY_HOP:
            headers.append((name, value))
    start_response(lines[0].partition(" ")[2], headers)
    return [body]
