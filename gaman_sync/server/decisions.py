"""What a block's ``on_request`` decides, before any 101 is sent.

``on_request(request)`` runs in the connection's own thread (never in the
accept thread, so a slow one delays nobody else) and returns one of these,
or ``None`` for a plain :class:`Accept`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

from ..protocol.handshake import check_header

__all__ = ["Accept", "Reject", "Redirect", "Decision", "REDIRECT_STATUSES"]

REDIRECT_STATUSES = (301, 302, 303, 307, 308)


def _headers(value: object) -> Tuple[Tuple[str, str], ...]:
    if isinstance(value, dict):
        value = list(value.items())
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"headers must be a dict or a list of (name, value) pairs, "
                        f"not {value!r}")
    pairs = []
    for pair in value:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"headers must be (name, value) pairs, not {pair!r}")
        pairs.append(check_header(*pair))
    return tuple(pairs)


@dataclass(frozen=True)
class Accept:
    """Open the connection: ``subprotocol`` (one the client offered, or None
    for the block's own choice) and extra response ``headers``."""

    subprotocol: Optional[str] = None
    headers: Sequence[Tuple[str, str]] = ()

    def __post_init__(self) -> None:
        if self.subprotocol is not None and not isinstance(self.subprotocol, str):
            raise TypeError(f"subprotocol must be a str or None, not {self.subprotocol!r}")
        object.__setattr__(self, "headers", _headers(self.headers))


@dataclass(frozen=True)
class Reject:
    """Refuse with an HTTP ``status`` (400 to 599) and a short plain-text ``body``."""

    status: int
    body: str = ""
    headers: Sequence[Tuple[str, str]] = ()

    def __post_init__(self) -> None:
        if isinstance(self.status, bool) or not isinstance(self.status, int) \
                or not 400 <= self.status <= 599:
            raise ValueError(f"status must be an HTTP error status from 400 to 599, "
                             f"not {self.status!r}")
        if not isinstance(self.body, str):
            raise TypeError(f"body must be a str, not {self.body!r}")
        object.__setattr__(self, "headers", _headers(self.headers))


@dataclass(frozen=True)
class Redirect:
    """Redirect to ``location`` (absolute, or relative to the request's URL)
    with ``status`` 301, 302, 303, 307 or 308."""

    location: str
    status: int = 307

    def __post_init__(self) -> None:
        if not isinstance(self.location, str) or not self.location \
                or any(c in self.location for c in "\r\n\0 "):
            raise ValueError(f"location must be a URL or a path, not {self.location!r}")
        if self.status not in REDIRECT_STATUSES:
            raise ValueError(f"status must be one of {REDIRECT_STATUSES}, not {self.status!r}")


Decision = Union[Accept, Reject, Redirect, None]
