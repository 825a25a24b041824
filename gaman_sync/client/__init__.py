"""The synchronous client: ``connect(url)``, on the same connection engine as
the server."""

from .client import ClientConnection, connect

__all__ = ["ClientConnection", "connect"]
