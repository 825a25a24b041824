"""A server's side of one connection: ``ctx`` in a block's handler.

What a server adds to the shared engine: the endpoint's handler runs in the
connection's thread and returns the callbacks; once it has returned, the
connection joins its block's clients (if the handler did not close it) and
its 101 goes out (the engine's preamble), followed by whatever the handler
sent. So a handler that refuses a client (a token check, then
``ctx.close(4001)``) never lets it receive a broadcast, and a client that has
its 101 never misses one.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Optional

from ..connection import Connection
from ..io import Runtime, Transport
from ..options import Options
from ..protocol import Protocol, Request
from ..protocol.http import format_address

if TYPE_CHECKING:
    from .blocks import BlockServer

__all__ = ["ServerConnection"]

logger = logging.getLogger("gaman_sync")


class ServerConnection(Connection):
    """A WebSocket connection accepted by a server: the ``ctx`` a block's
    handler is called with (GamanJS's ``WebSocketContext``)."""

    __slots__ = ("id", "server", "request", "subprotocol")

    def __init__(self, transport: Transport, protocol: Protocol, runtime: Runtime,
                 options: Options, conn_id: int, request: Request, server: "BlockServer",
                 subprotocol: Optional[str], response: bytes) -> None:
        super().__init__(transport, protocol, runtime, options, request.remote_address,
                         preamble=response)
        self.id = conn_id
        """A number unique among the connections of this server."""
        self.server = server
        """The block's server (``clients``, ``broadcast``; ``root`` is the whole server)."""
        self.request = request
        """The opening handshake's request (path, query, headers, remote address)."""
        self.subprotocol = subprotocol
        """The subprotocol selected in the handshake, or ``None``."""

    def opening(self) -> bool:
        """Run the endpoint's handler for this connection and join its clients."""
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s: opened", self)
        try:
            self.handler = self.server.endpoint.handler_for(self)
        except Exception as exc:
            logger.error("%s: the block's handler raised; closing with 1011", self,
                         exc_info=exc)
            self.close(1011, "internal error")
            return False
        # Joined once the handler has returned, and only if it did not close
        # the connection: a handler that refuses a client never lets it
        # receive a broadcast. The 101 goes out right after, with what the
        # handler sent behind it.
        self.send_preamble(before=self._join)
        return True

    def _join(self) -> None:
        if self.is_open:
            self.server.add(self)

    def describe(self) -> str:
        return f"connection {self.id} ({format_address(self.remote_address)} {self.request.path})"

    def __repr__(self) -> str:
        return (f"<ServerConnection {self.id} {self.ready_state.name} from "
                f"{format_address(self.remote_address)}>")
