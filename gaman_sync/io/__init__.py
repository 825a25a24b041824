"""The I/O layer: transports (a plain socket, with the C helper's fast path)
and the shared threads of a runtime (timers, the writer, connection threads).
Nothing here knows WebSocket: the connection engine above drives it.
"""

from .runtime import Runtime
from .transport import PlainTransport, Transport

__all__ = ["PlainTransport", "Runtime", "Transport"]
