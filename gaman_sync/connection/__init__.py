"""The connection engine that servers and clients share: the thread, the write
path, keepalive, closing, and the dispatch of a connection's callbacks."""

from .engine import Connection, ReadyState, interrupted_connection_code
from .handler import HandlerLike, WebSocketHandler, as_handler, reject_coroutine

__all__ = ["Connection", "HandlerLike", "ReadyState", "WebSocketHandler", "as_handler",
           "interrupted_connection_code", "reject_coroutine"]
