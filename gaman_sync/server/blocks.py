"""What a server serves: endpoints, and each endpoint's clients and broadcast.

The server layer does not know GamanJS blocks: it serves *endpoints*, any
object with a ``path``, the ``subprotocols`` it speaks and a
``handler_for(ctx)`` that returns the connection's callbacks, and an
``http`` responder for plain GET and HEAD requests (see :mod:`.http`).
:class:`gaman_sync.Block` is one.
"""

from __future__ import annotations

import logging
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    FrozenSet,
    Iterable,
    List,
    Optional,
    Sequence,
    Tuple,
    Union,
    runtime_checkable,
)
from typing import Protocol as _Interface

from ..connection import WebSocketHandler
from ..protocol import Data, HandshakeError, Request, encode_frame
from ..protocol.handshake import check_upgrade
from .connection import ServerConnection
from .decisions import Decision

if TYPE_CHECKING:
    from .server import WebSocketServer

__all__ = ["Endpoint", "BlockServer", "broadcast", "Exclude"]

logger = logging.getLogger("gaman_sync")

Exclude = Union[ServerConnection, int, Iterable[Union[ServerConnection, int]], None]
"""Who a broadcast skips: a connection or its id, or several of either."""


SubprotocolSelector = Callable[[List[str], Request], Optional[str]]


@runtime_checkable
class Endpoint(_Interface):
    """What a server routes requests to (a :class:`gaman_sync.Block`)."""

    # Read-only properties: a frozen dataclass (a Block) satisfies them,
    # where plain annotations would ask for settable attributes.

    @property
    def path(self) -> str:
        """The path pattern (see :mod:`.routing`)."""
        ...

    @property
    def websocket(self) -> Optional[Callable[[ServerConnection], Any]]:
        """The WebSocket handler; None for an endpoint that serves plain HTTP
        only (or only redirects)."""
        ...

    @property
    def http(self) -> Optional[Callable[[Request], Any]]:
        """Answers plain GET and HEAD requests (see :mod:`.http`), or None."""
        ...

    @property
    def subprotocols(self) -> Union[Tuple[str, ...], SubprotocolSelector]:
        """The subprotocols it speaks, in its order of preference, or a function
        ``(offered, request) -> chosen or None``."""
        ...

    @property
    def origins(self) -> Optional[Tuple[str, ...]]:
        """The ``Origin`` values it accepts (``"*"``: any); None: the server's default."""
        ...

    @property
    def require_origin(self) -> bool:
        """Refuse a request without ``Origin`` when ``origins`` is a list."""
        ...

    @property
    def on_request(self) -> Optional[Callable[[Request], Decision]]:
        """Decides before the 101, in the connection's thread (see :mod:`.decisions`)."""
        ...

    @property
    def redirect(self) -> Optional[str]:
        """A path template (``/r/:room``) every request is redirected to, or None."""
        ...

    @property
    def redirect_status(self) -> int:
        """The status of those redirects."""
        ...

    @property
    def on_redirect(self) -> Optional[Callable[[str, Request], Any]]:
        """Called with the absolute URL and the request, for each redirect made."""
        ...

    def handler_for(self, ctx: ServerConnection) -> WebSocketHandler:
        """The callbacks for a new connection, called in its thread."""
        ...


class BlockServer:
    """One block's view of the server: ``ctx.server`` in a handler.

    As in GamanJS, where each block has its own ``ws`` server, ``clients``
    and ``broadcast`` cover this block's connections only. ``root`` is the
    whole :class:`~gaman_sync.WebSocketServer` (every block, ``shutdown``,
    ``port``).
    """

    def __init__(self, root: WebSocketServer, endpoint: Endpoint) -> None:
        self.root = root
        """The :class:`~gaman_sync.WebSocketServer` that runs this block."""
        self.endpoint = endpoint
        """The block served."""
        # Joined and left without a lock: a dict's item assignment, pop()
        # and list() are each atomic, and a shared lock here is what
        # thousands of connections ending at once would queue on (each
        # holder waiting its turn for the GIL among them).
        self._clients: Dict[ServerConnection, None] = {}
        self.upgrades = endpoint.websocket is not None or endpoint.redirect is not None
        """Does it take WebSocket upgrades (else plain HTTP only)?"""
        self.http = endpoint.http
        """What answers plain GET and HEAD requests, or None."""
        origins = endpoint.origins if endpoint.origins is not None else root.options.origins
        self.origins: Optional[FrozenSet[str]] = (
            None if origins is None or "*" in origins
            else frozenset(origin.lower() for origin in origins))
        """The ``Origin`` values accepted, lower-cased (the block's, else the
        server's ``origins`` option); None: any."""
        self.decides = (endpoint.on_request is not None or endpoint.redirect is not None
                        or callable(endpoint.subprotocols) or not self.upgrades)
        """Does an upgrade need more than the accept thread's checks before
        its 101 (``on_request``, a redirect, a subprotocol function; or an
        endpoint without WebSocket, which refuses it)? Then it is made in the
        connection's thread, not in the accept thread."""

    def check_upgrade(self, request: Request) -> bytes:
        """Check that ``request`` may open a WebSocket on this block (a GET, a
        valid upgrade, an accepted ``Origin``); its ``Sec-WebSocket-Key``, or
        :class:`~gaman_sync.protocol.HandshakeError` with the status to answer.
        (The standalone accept thread and the WSGI middleware both ask here.)"""
        if request.method != "GET":
            raise HandshakeError(405, "a WebSocket handshake is a GET request",
                                 [("Allow", "GET")])
        key = check_upgrade(request)
        if self.origins is not None and not self.allows_origin(request.origin):
            raise HandshakeError(403, "this origin may not open a WebSocket here")
        return key

    def allows_origin(self, origin: Optional[str]) -> bool:
        """May a request with this ``Origin`` (None: no header) open a connection?"""
        origins = self.origins
        if origins is None:
            return True
        if origin is None:
            return not self.endpoint.require_origin
        return origin.lower() in origins

    @property
    def block(self) -> Endpoint:
        """The block served (GamanJS's name for the endpoint)."""
        return self.endpoint

    @property
    def path(self) -> str:
        """The block's path."""
        return self.endpoint.path

    @property
    def clients(self) -> List[ServerConnection]:
        """The open connections of this block, in the order they joined (a
        snapshot). A connection joins once its handler has returned, and
        leaves the moment its close starts, whoever starts it."""
        return [conn for conn in list(self._clients) if conn.is_open]

    @property
    def port(self) -> int:
        """The port the server listens on."""
        return self.root.port

    @property
    def address(self) -> Tuple[Any, ...]:
        """The address the server listens on."""
        return self.root.address

    def broadcast(self, message: Data, exclude: Exclude = None) -> int:
        """Send ``message`` to every open client of this block; never blocks.

        The frame is encoded once and queued for each client. A client whose
        outgoing buffer is already over ``write_limit`` is closed with 1008
        instead of holding up the others. ``exclude`` is a connection or its
        id, or several of either. Returns the number of clients the message
        was queued for.
        """
        return broadcast(list(self._clients), message, exclude)

    def add(self, conn: ServerConnection) -> None:
        """``conn`` joins the clients (its thread, once its handler returned)."""
        self._clients[conn] = None

    def discard(self, conn: ServerConnection) -> None:
        """``conn`` is gone (the server, once its thread is done with it)."""
        self._clients.pop(conn, None)

    def __repr__(self) -> str:
        return f"<BlockServer {self.path} with {len(self._clients)} clients>"


def _excluded_ids(exclude: Exclude) -> FrozenSet[int]:
    if exclude is None:
        return frozenset()
    items = (exclude,) if isinstance(exclude, (ServerConnection, int)) else exclude
    try:
        ids = []
        for item in items:
            if isinstance(item, ServerConnection):
                ids.append(item.id)
            elif isinstance(item, int) and not isinstance(item, bool):
                ids.append(item)
            else:
                raise TypeError
    except TypeError:
        raise TypeError("exclude must be a connection or a connection id, or an iterable of "
                        f"them, not {exclude!r:.60}") from None
    return frozenset(ids)


def broadcast(clients: Sequence[ServerConnection], message: Data, exclude: Exclude) -> int:
    """Queue ``message``, encoded once, for each of ``clients`` not excluded."""
    header, payload = encode_frame(message)
    frame = header + payload
    skip = _excluded_ids(exclude)
    sent = 0
    for conn in clients:
        if skip and conn.id in skip:
            continue
        if conn.send_frame_nowait(frame):
            sent += 1
        elif conn.is_open:
            # Over write_limit: a close frame would wait behind the backlog
            # the peer is not reading, so TCP is dropped and 1008 reported.
            logger.warning("%s: closed with 1008, its outgoing buffer is over write_limit "
                           "(%s bytes): the client is not reading", conn,
                           conn.options.write_limit)
            conn.abort(1008, "outgoing buffer over write_limit")
    return sent
