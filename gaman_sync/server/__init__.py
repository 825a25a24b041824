"""The server: listening, routing endpoints by path, the clients of each, and
a shutdown that leaves nothing running.

Threads: one accepts and runs every opening handshake (see
:mod:`.acceptor`), the runtime's timer and writer threads serve every
connection, and each open connection has its own. Nothing else.
"""

from .blocks import BlockServer, Endpoint
from .connection import ServerConnection
from .decisions import Accept, Redirect, Reject
from .processes import WorkersFailed
from .server import WebSocketServer, serve, serve_until_signalled
from .stats import ServerStats

__all__ = ["Accept", "BlockServer", "Endpoint", "Redirect", "Reject", "ServerConnection",
           "ServerStats", "WebSocketServer", "WorkersFailed", "serve", "serve_until_signalled"]
