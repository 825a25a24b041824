"""The settings of a server and of each of its connections, grouped by concern.

Every value is checked when the options are made, so that a wrong type or
value is one clear error that names the option, not a failure deep in a
connection's thread later.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Dict, Optional, Tuple, Union

__all__ = ["Deflate", "Options", "check_port", "check_origins", "SERVER_ONLY"]

KiB = 1024
MiB = 1024 * KiB

# Options that only a server uses: a client refuses them.
SERVER_ONLY = frozenset({"max_request_size", "max_connections", "handshake_timeout",
                         "shutdown_timeout", "origins"})


@dataclass(frozen=True)
class Deflate:
    """The settings of permessage-deflate (RFC 7692): ``compression=Deflate(...)``.

    ``compression="deflate"`` is ``Deflate()``. The same object serves both
    ends; each parameter says what it does on a server and on a client.
    """

    server_max_window_bits: int = 15
    """Server: the largest window it compresses with (a client may ask for
    less). Client: below 15, asks the server for at most this window."""
    client_max_window_bits: int = 12
    """Server: the window it allows a client that offers to be limited
    (smaller saves the server memory per connection: its decompressor's
    window is 2 ** bits bytes). Client: the largest window it compresses with."""
    server_no_context_takeover: bool = False
    """Client: ask the server to compress each message on its own. A server
    always does (so that one compressed broadcast frame fits every client),
    whatever this says."""
    client_no_context_takeover: bool = False
    """Server: ask clients to compress each message on its own (the server
    then keeps no decompressor between messages). Client: compress each
    message on its own (and say so in the offer)."""
    min_size: int = 1024
    """Messages smaller than this many bytes (UTF-8 for text) are sent
    uncompressed: compressing them costs more time than it saves bytes."""
    level: int = 6
    """zlib's compression level, 1 (fast) to 9 (small)."""
    mem_level: int = 8
    """zlib's memLevel, 1 to 9: memory of a compressor at work (not kept per
    connection) against speed and ratio."""

    def __post_init__(self) -> None:
        for name in ("server_max_window_bits", "client_max_window_bits"):
            _check_int(name, getattr(self, name), 9, 15, "window bits (zlib cannot "
                       "compress with 8)")
        for name in ("server_no_context_takeover", "client_no_context_takeover"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, not {getattr(self, name)!r}")
        _check_int("min_size", self.min_size, 0, None, "bytes")
        _check_int("level", self.level, 1, 9, "a zlib level")
        _check_int("mem_level", self.mem_level, 1, 9, "a zlib memLevel")


def _check_int(name: str, value: Any, low: int, high: Optional[int], what: str) -> None:
    accepts = f"an int from {low} to {high}" if high is not None else f"an int of {low} or more"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be {accepts} ({what}), not {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be {accepts} ({what}), not {value!r}")


def check_compression(value: Any) -> Optional[Deflate]:
    """``compression`` as a :class:`Deflate` (or None), or a clear error."""
    if value is None or isinstance(value, Deflate):
        return value
    if isinstance(value, str) and value.lower() == "deflate":
        return Deflate()
    if isinstance(value, str) and value.lower() == "none":
        return None
    raise ValueError(f"compression must be 'deflate', None or a Deflate(...), not {value!r}")


@dataclass(frozen=True)
class Options:
    """Every setting has a safe default; pass any of them to
    :class:`~gaman_sync.WebSocketServer`, :func:`~gaman_sync.serve` or
    :func:`~gaman_sync.connect` by name. One instance is shared by all
    connections of a server."""

    # Limits on what a peer may send.
    max_message_size: Optional[int] = 1 * MiB
    """Largest incoming message in bytes; a larger one closes with 1009. ``None``: no limit."""
    max_request_size: int = 16 * KiB
    """Largest opening request (request line and headers) in bytes; larger gets 431."""
    max_connections: int = 5000
    """Connections served at once (handshakes included); past it new ones get 503."""
    origins: Optional[Tuple[str, ...]] = None
    """The ``Origin`` values a browser may connect from (``"*"``: any), for
    blocks that set none; any other gets 403. ``None``: every origin. A
    request without ``Origin`` (not a browser) is accepted unless the block
    sets ``require_origin``."""

    # Timeouts, in seconds.
    handshake_timeout: Optional[float] = 10.0
    """Time a client has to send its whole opening request."""
    close_timeout: Optional[float] = 10.0
    """Time the peer has to answer our close frame before TCP is dropped.
    ``None``: 10 s for the last bytes, and no timer for the close."""
    shutdown_timeout: float = 5.0
    """How long :meth:`~gaman_sync.WebSocketServer.shutdown` waits for clients
    to answer its 1001 close before it drops them."""

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
    """How long ``send`` waits for room in a full outgoing buffer before it raises
    :class:`~gaman_sync.SendTimeout`. ``None``: wait as long as it takes."""

    # Compression.
    compression: Union[Deflate, str, None] = "deflate"
    """permessage-deflate: ``"deflate"`` (the default settings), a
    :class:`Deflate` with others, or ``None`` (off). A server uses it with
    clients that offer it; a client offers it. Read back, it is a
    :class:`Deflate` or ``None``."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "origins", check_origins(self.origins))
        object.__setattr__(self, "compression", check_compression(self.compression))
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("origins", "compression"):
                continue
            if f.name in _SECONDS:
                _check_seconds(f.name, value, optional=f.name != "shutdown_timeout")
            else:
                _check_size(f.name, value, optional=f.name == "max_message_size")

    @property
    def deflate(self) -> Optional[Deflate]:
        """:attr:`compression` as it is once checked: a :class:`Deflate` or None."""
        return self.compression if isinstance(self.compression, Deflate) else None

    @classmethod
    def from_kwargs(cls, options: Dict[str, Any]) -> Options:
        """Build options from keyword arguments, naming any unknown one."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(unknown)}; known: {sorted(known)}")
        return cls(**options)


_SECONDS = frozenset({"handshake_timeout", "close_timeout", "shutdown_timeout",
                      "ping_interval", "ping_timeout", "send_timeout"})


def _check_seconds(name: str, value: Any, optional: bool) -> None:
    if value is None and optional:
        return
    accepts = "a positive number of seconds" + (" or None" if optional else "")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be {accepts}, not {value!r}")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be {accepts}, not {value!r}")


def _check_size(name: str, value: Any, optional: bool) -> None:
    if value is None and optional:
        return
    accepts = "a positive int" + (" (bytes) or None" if optional else "")
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be {accepts}, not {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be {accepts}, not {value!r}")


def check_port(port: Any) -> None:
    """Raise unless ``port`` is a TCP port number (0 picks a free one)."""
    if isinstance(port, bool) or not isinstance(port, int):
        raise TypeError(f"port must be an int from 0 to 65535, not {port!r}")
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be an int from 0 to 65535, not {port!r}")


def check_origins(origins: Any) -> Optional[Tuple[str, ...]]:
    """``origins`` as a tuple of str (or None), or a clear error."""
    if origins is None:
        return None
    if isinstance(origins, (str, bytes)) or not hasattr(origins, "__iter__"):
        raise TypeError(f"origins must be a list of origins like 'https://example.com' "
                        f"(or '*'), or None, not {origins!r}")
    values = tuple(origins)
    for origin in values:
        if not isinstance(origin, str) or not origin or origin != origin.strip():
            raise TypeError(f"origins must be a list of str like 'https://example.com', "
                            f"not {origins!r}")
    return values
