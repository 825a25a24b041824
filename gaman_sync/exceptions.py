"""Exceptions raised by gaman_sync.

The tree::

    WebSocketError
    ├── ConnectionClosed            nothing more can be sent or received
    │   ├── ConnectionClosedOK      ... after a normal close (1000, 1001, 1005)
    │   └── ConnectionClosedError   ... after any other code, or a lost connection
    ├── SendTimeout                 (also a TimeoutError) no room in the outgoing buffer
    └── InvalidHandshake            a client's opening handshake failed
        ├── InvalidURI              the URL is not a ws:// (or wss://) URL
        ├── InvalidStatus           the server answered with another status than 101
        ├── InvalidHeader           a header of the 101 is missing or wrong
        ├── InvalidMessage          the response is not HTTP, or the server closed first
        ├── InvalidRedirect         a redirect loop, too many hops, or wss:// to ws://
        ├── InvalidCertificate      (also an ssl.SSLCertVerificationError) the
        │                           server's TLS certificate does not verify;
        │                           defined in gaman_sync.io.tls, which
        │                           imports ssl (this module imports nothing)
        └── HandshakeTimeout        (also a TimeoutError) no 101 in ``open_timeout``

Errors of the operating system (a refused connection, an unknown host) are
raised as the ``OSError`` they are, with a message naming the address.
Wrong arguments raise ``TypeError`` or ``ValueError``.
"""

from __future__ import annotations

from typing import Any, List, Optional

__all__ = ["WebSocketError", "ConnectionClosed", "ConnectionClosedOK", "ConnectionClosedError",
           "SendTimeout", "InvalidHandshake", "InvalidURI", "InvalidStatus", "InvalidHeader",
           "InvalidMessage", "InvalidRedirect", "HandshakeTimeout"]

_NORMAL = (1000, 1001, 1005)


class WebSocketError(Exception):
    """Base class of every exception raised by gaman_sync."""


class ConnectionClosed(WebSocketError):
    """The connection is closing or closed, so nothing more can be sent on it.

    ``code`` and ``reason`` are the close code and reason that ended it, when
    they are known (``None`` and ``""`` while the closing handshake is still
    under way). Raised as :class:`ConnectionClosedOK` or
    :class:`ConnectionClosedError` by :func:`closed_error`.
    """

    def __init__(self, code: Optional[int] = None, reason: str = "") -> None:
        self.code = code
        self.reason = reason
        detail = f" (code {code}{': ' + reason if reason else ''})" if code else ""
        super().__init__(f"the WebSocket connection is closed{detail}")


class ConnectionClosedOK(ConnectionClosed):
    """The connection closed normally (1000, 1001, or a close without a code)."""


class ConnectionClosedError(ConnectionClosed):
    """The connection closed with an error code, or TCP was lost (1006)."""


def closed_error(code: Optional[int], reason: str = "") -> ConnectionClosed:
    """The :class:`ConnectionClosed` subclass for ``code`` (``None``: not yet known)."""
    if code is None:
        return ConnectionClosed(None, reason)
    if code in _NORMAL:
        return ConnectionClosedOK(code, reason)
    return ConnectionClosedError(code, reason)


class SendTimeout(WebSocketError, TimeoutError):
    """``send`` waited ``timeout`` seconds for room in a full outgoing buffer.

    The peer is not reading fast enough. The message was not queued and the
    connection stays open: the caller decides whether to retry or to close.
    """


class InvalidHandshake(WebSocketError):
    """The opening handshake failed: no WebSocket connection was opened."""


class InvalidURI(InvalidHandshake, ValueError):
    """The URL cannot be connected to: not ``ws://`` (or ``wss://``), or no host."""


class InvalidStatus(InvalidHandshake):
    """The server answered with ``status`` instead of 101.

    ``response`` is the :class:`~gaman_sync.protocol.http.Response`, with
    the first bytes of its body.
    """

    def __init__(self, response: object, status: int, detail: str) -> None:
        self.response = response
        self.status = status
        super().__init__(detail)

    @property
    def headers(self) -> Any:
        """The response's headers (case-insensitive)."""
        # getattr: response is an object here (this module imports nothing
        # of the protocol layer, where Response lives).
        return getattr(self.response, "headers")  # noqa: B009

    @property
    def body(self) -> bytes:
        """The first bytes of the response's body."""
        body: bytes = getattr(self.response, "body")  # noqa: B009
        return body


class InvalidHeader(InvalidHandshake):
    """A header of the server's 101 is missing or wrong: ``name`` says which."""

    def __init__(self, name: str, detail: str) -> None:
        self.name = name
        super().__init__(detail)


class InvalidMessage(InvalidHandshake):
    """The server's answer is not a valid HTTP response, or it closed before
    answering."""


class InvalidRedirect(InvalidHandshake):
    """A redirect that is not followed: a loop, more than ``max_redirects``
    hops, or from ``wss://`` to ``ws://``. ``chain`` lists the URLs."""

    def __init__(self, chain: List[str], why: str) -> None:
        self.chain = list(chain)
        super().__init__(f"{why}: {' -> '.join(self.chain)}")


class HandshakeTimeout(InvalidHandshake, TimeoutError):
    """No complete answer to the opening handshake within ``open_timeout``."""
