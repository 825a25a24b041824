"""The synchronous client: ``connect(url)``, on the same connection engine as
the server."""

from ..io.tls import InvalidCertificate
from .client import ClientConnection, connect

__all__ = ["ClientConnection", "connect", "InvalidCertificate"]
