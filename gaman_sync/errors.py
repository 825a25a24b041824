"""Exceptions raised by gaman_sync."""

from __future__ import annotations

__all__ = ["WebSocketError", "ConnectionClosed", "SendTimeout"]


class WebSocketError(Exception):
    """Base class of every exception raised by gaman_sync."""


class ConnectionClosed(WebSocketError):
    """The connection is closing or closed, so nothing more can be sent on it.

    ``code`` and ``reason`` are the close code and reason that ended it, when
    they are known (``None`` and ``""`` while the closing handshake is still
    under way).
    """

    def __init__(self, code: int | None = None, reason: str = "") -> None:
        self.code = code
        self.reason = reason
        detail = f" (code {code}{': ' + reason if reason else ''})" if code else ""
        super().__init__(f"the WebSocket connection is closed{detail}")


class SendTimeout(WebSocketError, TimeoutError):
    """``send`` waited ``timeout`` seconds for room in a full outgoing buffer.

    The peer is not reading fast enough. The message was not queued and the
    connection stays open: the caller decides whether to retry or to close.
    """
