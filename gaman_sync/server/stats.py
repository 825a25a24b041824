"""What a server has done: connections, refusals, traffic and close codes.

Theory of operation
-------------------
Nothing here runs on the hot path. Each connection counts its own traffic
(``messages_in``, ``bytes_in``, ``messages_out``, ``bytes_out``: plain ints
in the connection engine, bumped where the work is done anyway). When a
connection's thread is done with it, :meth:`Tally.ended` adds its counters
and its close code to the server's totals; :meth:`Tally.snapshot` adds the
totals of the connections still open to those. Both hold one small lock, so
that a connection that ends while a snapshot is taken is counted once, either
as open or as closed, never twice or not at all. Refusals made by the accept
thread (404, 403, 400, 503...) are counted as they happen.

A refusal by ``on_request`` (or a redirect) is counted with its status when
its connection ends; those connections, and plain HTTP requests, never count
as accepted, and their bytes are not WebSocket traffic.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, Optional, Tuple

from ..protocol.http import format_address
from .connection import ServerConnection

__all__ = ["ServerStats", "Tally", "ACCEPTED", "access_fields"]

ACCEPTED = 101
"""The status of an accepted opening handshake."""
_ABNORMAL = 1006


@dataclass(frozen=True)
class ServerStats:
    """A snapshot of :meth:`WebSocketServer.stats() <gaman_sync.WebSocketServer.stats>`.

    Counts are since the server was made; traffic totals cover the
    connections that have closed and those still open.
    """

    open: int
    """WebSocket connections being served now (closing ones included)."""
    accepted: int
    """Opening handshakes answered with 101 (open and closed connections)."""
    rejected: Dict[int, int] = field(default_factory=dict)
    """Opening handshakes refused, by the HTTP status they got: 400, 403
    (origin), 404 (no block), 426, 503 (``max_connections``), and the
    statuses of ``on_request``'s refusals and of redirects."""
    messages_in: int = 0
    """Messages received."""
    bytes_in: int = 0
    """Bytes received after the opening handshakes (frame headers and
    control frames included)."""
    messages_out: int = 0
    """Messages sent; a broadcast counts one per client it reached."""
    bytes_out: int = 0
    """Bytes sent after the opening handshakes (frame headers and control
    frames included)."""
    closes: Dict[int, int] = field(default_factory=dict)
    """Closed connections, by close code (1006: TCP lost without a close)."""

    def as_dict(self) -> Dict[str, Any]:
        """The same numbers as a plain dict (for JSON, a metrics exporter)."""
        return asdict(self)

    def __str__(self) -> str:
        """One line for a log: ``open=2 accepted=5 rejected=403:1,404:2 ...``."""
        def counts(by: Dict[int, int]) -> str:
            return ",".join(f"{key}:{value}" for key, value in sorted(by.items())) or "-"

        return (f"open={self.open} accepted={self.accepted} "
                f"rejected={counts(self.rejected)} "
                f"messages_in={self.messages_in} bytes_in={self.bytes_in} "
                f"messages_out={self.messages_out} bytes_out={self.bytes_out} "
                f"closes={counts(self.closes)}")


class Tally:
    """A server's running totals (see the module's docstring)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        """Held while a connection moves from open to closed, and while a
        snapshot is taken."""
        self._accepted = 0  # of the connections that have ended
        self._traffic = [0, 0, 0, 0]  # messages_in, bytes_in, messages_out, bytes_out
        self._rejected: Counter[int] = Counter()
        self._closes: Counter[int] = Counter()

    def rejected(self, status: int) -> None:
        """A handshake was refused with ``status`` (any thread)."""
        with self.lock:
            self._rejected[status] += 1

    def ended(self, conn: ServerConnection) -> Optional[int]:
        """Count ``conn``, which has ended (the caller holds :attr:`lock`):
        its close code if it was an accepted WebSocket connection, else None."""
        status = conn.handshake_status
        if status is None:
            return None  # plain HTTP, or dropped while on_request decided
        if status != ACCEPTED:
            self._rejected[status] += 1
            return None
        code = conn.close_code or _ABNORMAL
        self._accepted += 1
        self._closes[code] += 1
        traffic = self._traffic
        traffic[0] += conn.messages_in
        traffic[1] += conn.bytes_in
        traffic[2] += conn.messages_out
        traffic[3] += conn.bytes_out
        return code

    def snapshot(self, connections: Iterable[ServerConnection]) -> ServerStats:
        """The totals, with those of ``connections`` (the ones not ended:
        the caller holds :attr:`lock`)."""
        opened = 0
        m_in, b_in, m_out, b_out = self._traffic
        for conn in connections:
            if conn.handshake_status == ACCEPTED:
                opened += 1
                m_in += conn.messages_in
                b_in += conn.bytes_in
                m_out += conn.messages_out
                b_out += conn.bytes_out
        return ServerStats(open=opened, accepted=self._accepted + opened,
                           rejected=dict(self._rejected), messages_in=m_in, bytes_in=b_in,
                           messages_out=m_out, bytes_out=b_out, closes=dict(self._closes))


def access_fields(conn: ServerConnection, code: int,
                  duration: float) -> Tuple[str, Dict[str, Any]]:
    """The access log's line for an ended connection, and its fields (set on
    the log record too, for handlers that want them apart), such as
    ``peer=127.0.0.1:50312 path=/chat code=1000 duration=2.031s messages_in=3
    bytes_in=120 messages_out=5 bytes_out=310`` (on one line)."""
    fields: Dict[str, Any] = {
        "peer": format_address(conn.remote_address), "path": conn.request.raw_path,
        "code": code, "duration": round(duration, 3),
        "messages_in": conn.messages_in, "bytes_in": conn.bytes_in,
        "messages_out": conn.messages_out, "bytes_out": conn.bytes_out}
    line = " ".join(f"{key}={value}{'s' if key == 'duration' else ''}"
                    for key, value in fields.items())
    return line, fields
