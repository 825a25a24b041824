"""gaman_sync: a threaded, synchronous WebSocket server and client on wsproto,
with the API of GamanJS's WebSocket blocks.

Layers, each a folder, each importing only the ones below it:

- :mod:`~gaman_sync.wsgi`: blocks mounted in a WSGI application (Flask,
  Django) on the port its server already serves, above the server it runs;
- :mod:`~gaman_sync.testing` (and :mod:`~gaman_sync.strategies`): what
  users test with (a test client, a raw peer, a pytest plugin, hypothesis
  strategies), above the ends it drives;
- :mod:`~gaman_sync.app`: the GamanJS contract (blocks);
- :mod:`~gaman_sync.server` and :mod:`~gaman_sync.client`: the two ends;
- :mod:`~gaman_sync.connection`: the engine they share (the connection's
  thread, write path, keepalive, closing, and the callbacks it dispatches);
- :mod:`~gaman_sync.io`: transports and the shared threads;
- :mod:`~gaman_sync.broker`: what carries broadcasts to the other processes
  of an application (Redis pub/sub), beside ``io``;
- :mod:`~gaman_sync.protocol`: sans-IO frames, handshakes and the state
  machine (wsproto and h11 underneath; no socket, no thread).

``exceptions`` and ``options`` are leaves every layer may use, and so is the
optional C helper ``_speedups``. The names below are imported on first use,
so that ``import gaman_sync.protocol`` loads no socket or thread machinery.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__ as __version__

# name -> the module that defines it
_EXPORTS = {
    "Block": "app", "define_block": "app",
    "BlockServer": "server", "ServerConnection": "server", "WebSocketServer": "server",
    "serve": "server", "Accept": "server", "Reject": "server", "Redirect": "server",
    "ClientConnection": "client", "connect": "client",
    "Connection": "connection", "ReadyState": "connection", "WebSocketHandler": "connection",
    "Options": "options", "Deflate": "options",
    "CloseCode": "protocol", "Headers": "protocol", "Request": "protocol",
    "Response": "protocol",
    "WebSocketError": "exceptions", "ConnectionClosed": "exceptions",
    "ConnectionClosedOK": "exceptions", "ConnectionClosedError": "exceptions",
    "SendTimeout": "exceptions", "InvalidHandshake": "exceptions", "InvalidURI": "exceptions",
    "InvalidStatus": "exceptions", "InvalidHeader": "exceptions",
    "InvalidMessage": "exceptions", "HandshakeTimeout": "exceptions",
    "InvalidRedirect": "exceptions", "InvalidCertificate": "client",
    "WebSocketMiddleware": "wsgi",
    "Broker": "broker", "LocalBroker": "broker", "RedisBroker": "broker",
    "BrokerUnavailable": "broker",
}
# GamanJS's names for ours.
_ALIASES = {"WebSocketContext": ("server", "ServerConnection")}

__all__ = sorted([*_EXPORTS, *_ALIASES, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module, attr = _EXPORTS[name], name
    elif name in _ALIASES:
        module, attr = _ALIASES[name]
    else:
        raise AttributeError(f"module 'gaman_sync' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value  # once found, a plain attribute
    return value


def __dir__() -> list[str]:  # (not typing.List: no extra public name)
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # what type checkers and IDEs see
    # "X as X": an explicit re-export (mypy --strict cannot read the
    # computed __all__ above).
    from .app import Block as Block
    from .app import define_block as define_block
    from .broker import Broker as Broker
    from .broker import BrokerUnavailable as BrokerUnavailable
    from .broker import LocalBroker as LocalBroker
    from .broker import RedisBroker as RedisBroker
    from .client import ClientConnection as ClientConnection
    from .client import connect as connect
    from .connection import Connection as Connection
    from .connection import ReadyState as ReadyState
    from .connection import WebSocketHandler as WebSocketHandler
    from .exceptions import ConnectionClosed as ConnectionClosed
    from .exceptions import ConnectionClosedError as ConnectionClosedError
    from .exceptions import ConnectionClosedOK as ConnectionClosedOK
    from .exceptions import HandshakeTimeout as HandshakeTimeout
    from .exceptions import InvalidHandshake as InvalidHandshake
    from .exceptions import InvalidHeader as InvalidHeader
    from .exceptions import InvalidMessage as InvalidMessage
    from .exceptions import InvalidRedirect as InvalidRedirect
    from .exceptions import InvalidStatus as InvalidStatus
    from .exceptions import InvalidURI as InvalidURI
    from .exceptions import SendTimeout as SendTimeout
    from .exceptions import WebSocketError as WebSocketError
    from .io.tls import InvalidCertificate as InvalidCertificate
    from .options import Deflate as Deflate
    from .options import Options as Options
    from .protocol import CloseCode as CloseCode
    from .protocol import Headers as Headers
    from .protocol import Request as Request
    from .protocol import Response as Response
    from .server import Accept as Accept
    from .server import BlockServer as BlockServer
    from .server import Redirect as Redirect
    from .server import Reject as Reject
    from .server import ServerConnection as ServerConnection
    from .server import WebSocketServer as WebSocketServer
    from .server import serve as serve
    from .wsgi import WebSocketMiddleware as WebSocketMiddleware
    WebSocketContext = ServerConnection
