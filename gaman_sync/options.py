"""The settings of a server and of each of its connections, grouped by concern."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional

__all__ = ["Options"]

KiB = 1024
MiB = 1024 * KiB


@dataclass(frozen=True)
class Options:
    """Every setting has a safe default; pass any of them to
    :class:`~gaman_sync.WebSocketServer` or :func:`~gaman_sync.serve` by name.
    One instance is shared by all connections of a server."""

    # Limits on what a peer may send.
    max_message_size: Optional[int] = 1 * MiB
    """Largest incoming message in bytes; a larger one closes with 1009. ``None``: no limit."""
    max_request_size: int = 16 * KiB
    """Largest opening request (request line and headers) in bytes; larger gets 431."""
    max_connections: int = 5000
    """Connections served at once (handshakes included); past it new ones get 503."""

    # Timeouts, in seconds.
    handshake_timeout: Optional[float] = 10.0
    """Time a client has to send its whole opening request."""
    close_timeout: Optional[float] = 10.0
    """Time the peer has to answer our close frame before TCP is dropped."""

    # Keepalive.
    ping_interval: Optional[float] = 20.0
    """Seconds between keepalive pings; ``None`` turns keepalive off."""
    ping_timeout: Optional[float] = 20.0
    """A peer that has not answered a keepalive ping in this time is closed with 1011."""

    # Backpressure on what we send.
    write_limit: int = 2 * MiB
    """Bytes that may wait in a connection's outgoing buffer (beyond what the
    kernel holds). ``send`` waits while it is full; a ``broadcast`` that finds
    it full closes that client with 1008."""
    send_timeout: Optional[float] = 10.0
    """How long ``send`` waits for room in a full buffer before it raises
    :class:`~gaman_sync.SendTimeout`. ``None``: wait as long as it takes."""

    def __post_init__(self) -> None:
        for name in ("max_message_size", "handshake_timeout", "close_timeout",
                     "ping_interval", "ping_timeout", "send_timeout"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive or None, not {value!r}")
        for name in ("max_request_size", "max_connections", "write_limit"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")

    @classmethod
    def from_kwargs(cls, options: dict[str, Any]) -> "Options":
        """Build options from keyword arguments, naming any unknown one."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(unknown)}; known: {sorted(known)}")
        return cls(**options)
