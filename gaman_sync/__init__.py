"""gaman_sync: a threaded, synchronous WebSocket server on wsproto, with the
API of GamanJS's WebSocket blocks.

Layers, each importing only the ones below it:

- the contract: :mod:`~gaman_sync.block` and :mod:`~gaman_sync.handler`
  (what a user writes);
- the server: :mod:`~gaman_sync.server` (accept, routing, clients, shutdown);
- one connection: :mod:`~gaman_sync.connection` (its socket, its thread, the
  write path), with the shared :mod:`~gaman_sync.timers` and
  :mod:`~gaman_sync.flusher` threads;
- the protocol glue: :mod:`~gaman_sync.handshake` and
  :mod:`~gaman_sync.protocol` (no sockets; wsproto and h11 underneath).
"""

from .block import Block, define_block
from .connection import Connection, ReadyState
from .errors import ConnectionClosed, SendTimeout, WebSocketError
from .handler import WebSocketHandler
from .options import Options
from .request import Headers, Request
from .server import BlockServer, WebSocketServer, serve

WebSocketContext = Connection
"""The connection a block's handler receives as ``ctx`` (GamanJS's name)."""

__version__ = "0.1.0"

__all__ = [
    "Block", "BlockServer", "Connection", "ConnectionClosed", "Headers", "Options",
    "ReadyState", "Request", "SendTimeout", "WebSocketContext", "WebSocketError",
    "WebSocketHandler", "WebSocketServer", "define_block", "serve", "__version__",
]
