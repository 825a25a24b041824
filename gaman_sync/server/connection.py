"""A server's side of one connection: ``ctx`` in a block's handler.

What a server adds to the shared engine: the endpoint's handler runs in the
connection's thread and returns the callbacks; once it has returned, the
connection joins its block's clients (if the handler did not close it) and
its 101 goes out (the engine's preamble), followed by whatever the handler
sent. So a handler that refuses a client (a token check, then
``ctx.close(4001)``) never lets it receive a broadcast, and a client that has
its 101 never misses one.

A block that decides (``on_request``, a redirect, a subprotocol function)
does so here too, before the handler, in the connection's own thread: user
code that takes its time (a database lookup for a token) delays this client
only, never the accept thread. A refusal or a redirect is an HTTP response
sent in place of the 101; the connection then ends without a WebSocket frame.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, FrozenSet, Optional
from urllib.parse import urljoin

from ..connection import Connection
from ..io import Runtime, Transport
from ..options import Options
from ..protocol import Protocol, Request
from ..protocol.deflate import Agreement
from ..protocol.handshake import accept_response, add_header, error_response
from ..protocol.http import format_address
from .decisions import Accept, Decision, Redirect, Reject
from .routing import fill

if TYPE_CHECKING:
    from .blocks import BlockServer

__all__ = ["ServerConnection"]

logger = logging.getLogger("gaman_sync")


class ServerConnection(Connection):
    """A WebSocket connection accepted by a server: the ``ctx`` a block's
    handler is called with (GamanJS's ``WebSocketContext``)."""

    __slots__ = ("id", "server", "request", "subprotocol", "handshake_status", "deflate_window")

    # Set only for a block that decides (its 101 is made later): read from
    # the class otherwise, with no slot on every idle connection.
    _key = b""  # the client's key
    _extensions: Optional[str] = None  # the extensions' header value for the 101

    def __init__(self, transport: Transport, protocol: Protocol, runtime: Runtime,
                 options: Options, conn_id: int, request: Request, server: BlockServer,
                 subprotocol: Optional[str], response: Optional[bytes],
                 key: bytes = b"", extensions: Optional[str] = None) -> None:
        # The extensions accepted (permessage-deflate) go in the 101.
        if response is not None and extensions is not None:
            response = add_header(response, "Sec-WebSocket-Extensions", extensions)
        # A block that decides makes its 101 later: the writes wait all the same.
        super().__init__(transport, protocol, runtime, options, request.remote_address,
                         preamble=response if response is not None else b"")
        if response is None and extensions is not None:
            self._extensions = extensions
        deflate = protocol.deflate
        self.deflate_window = deflate.broadcast_window() if deflate is not None else None
        """The window our compressor uses with this client (0: it sends
        plain), or None without permessage-deflate: a broadcast encodes one
        frame per value."""
        self.id = conn_id
        """A number unique among the connections of this server."""
        self.server = server
        """The block's server (``clients``, ``broadcast``; ``root`` is the whole server)."""
        self.request = request
        """The opening handshake's request (path, params, query, headers, remote address)."""
        self.subprotocol = subprotocol
        """The subprotocol selected in the handshake, or ``None``."""
        if response is None:
            self._key = key
        self.handshake_status: Optional[int] = 101 if response is not None else None
        """How the opening handshake was answered: 101 once accepted, else the
        status of the refusal or redirect that ``on_request`` (or the block)
        made; None while it decides, and for a plain HTTP request."""

    @property
    def deflate_agreement(self) -> Optional[Agreement]:
        """The permessage-deflate parameters negotiated, or None."""
        return self._proto.deflate

    # -- Rooms (see gaman_sync.server.blocks) -----------------------------

    def join(self, room: str) -> None:
        """Join ``room`` of this block: ``ctx.server.broadcast(m, room=room)``
        reaches it, in every process that shares a broker. From any thread;
        joining twice is joining once. The connection leaves every room once
        it has ended."""
        self.server.join(self, room)

    def leave(self, room: str) -> None:
        """Leave ``room`` (nothing if not in it)."""
        self.server.leave(self, room)

    @property
    def rooms(self) -> FrozenSet[str]:
        """The rooms this connection is in (still set in ``on_close``; empty
        once the connection has ended)."""
        return self.server.rooms_of(self)

    def opening(self) -> bool:
        """Decide (for a block that does), run the endpoint's handler for this
        connection, join its clients and send the 101."""
        response = None
        if self._key:
            response = self._decide()
            if response is None:
                return False  # refused or redirected: the engine ends it
        try:
            self.handler = self.server.endpoint.handler_for(self)
        except Exception as exc:
            logger.error("%s: the block's handler raised; closing with 1011", self,
                         exc_info=exc)
            self.close(1011, "internal error")
            self.send_preamble(preamble=response)
            return False
        # Joined once the handler has returned, and only if it did not close
        # the connection: a handler that refuses a client never lets it
        # receive a broadcast. The 101 goes out right after, with what the
        # handler sent behind it.
        self.send_preamble(before=self._join, preamble=response)
        return True

    def _join(self) -> None:
        if self.is_open:
            self.server.add(self)

    def _decide(self) -> Optional[bytes]:
        """The 101 for a block that decides, or None once it was refused or
        redirected (its HTTP response is then on its way)."""
        endpoint = self.server.endpoint
        request = self.request
        decision: Decision = None
        try:
            if endpoint.redirect is not None:
                location = fill(endpoint.redirect, request.params)
                if request.query_string and "?" not in location:
                    location += "?" + request.query_string
                decision = Redirect(location, endpoint.redirect_status)
            elif endpoint.on_request is not None:
                decision = endpoint.on_request(request)
                if decision is None:
                    decision = Accept()
                elif not isinstance(decision, (Accept, Reject, Redirect)):
                    raise TypeError(f"on_request must return Accept, Reject, Redirect or "
                                    f"None, not {decision!r}")
            else:
                decision = Accept()
            if isinstance(decision, Reject):
                logger.info("%s: refused by on_request with %s", self, decision.status)
                self.handshake_status = decision.status
                self.refuse(error_response(decision.status, decision.body or "refused",
                                           decision.headers))
                return None
            if isinstance(decision, Redirect):
                self._redirect(decision)
                return None
            subprotocol = self._subprotocol(decision)
        except Exception as exc:
            # Nothing of the traceback goes on the wire.
            logger.error("%s: deciding on the request raised; refused with 500", self,
                         exc_info=exc)
            self.handshake_status = 500
            self.refuse(error_response(500, "internal error"))
            return None
        self.subprotocol = subprotocol
        response = accept_response(self._key, subprotocol, decision.headers)
        if self._extensions is not None:
            response = add_header(response, "Sec-WebSocket-Extensions", self._extensions)
        self.handshake_status = 101
        return response

    def _subprotocol(self, decision: Accept) -> Optional[str]:
        offered = self.request.subprotocols
        if decision.subprotocol is not None:
            if decision.subprotocol not in offered:
                raise ValueError(f"on_request chose subprotocol {decision.subprotocol!r}, "
                                 f"which the client did not offer ({offered})")
            return decision.subprotocol
        mine = self.server.endpoint.subprotocols
        if callable(mine):
            chosen = mine(list(offered), self.request)
            if chosen is not None and chosen not in offered:
                raise ValueError(f"the subprotocol function chose {chosen!r}, which the "
                                 f"client did not offer ({offered})")
            return chosen
        return next((p for p in offered if p in mine), None)

    def _redirect(self, decision: Redirect) -> None:
        request = self.request
        base = f"ws://{request.host or 'localhost'}{request.target}"
        url = urljoin(base, decision.location)
        logger.info("%s: redirected with %s to %s", self, decision.status, url)
        self.handshake_status = decision.status
        self.refuse(error_response(decision.status, f"moved to {url}",
                                   [("Location", decision.location)]))
        on_redirect = self.server.endpoint.on_redirect
        if on_redirect is not None:
            try:
                on_redirect(url, request)
            except Exception:
                logger.exception("%s: on_redirect raised", self)

    def describe(self) -> str:
        return f"connection {self.id} ({format_address(self.remote_address)} {self.request.path})"

    def __repr__(self) -> str:
        return (f"<ServerConnection {self.id} {self.ready_state.name} from "
                f"{format_address(self.remote_address)}>")
