"""What the protocol state machine reports to the connection, one at a time.

Small classes with slots, told apart by their exact type: the connection's
read loop dispatches on ``type(event)``, cheaper than ``isinstance``.
"""

from __future__ import annotations

from typing import Union

__all__ = ["MessageReceived", "PongReceived", "Closed", "Failed", "Event"]


class MessageReceived:
    """A whole message: ``str`` for text, ``bytes`` for binary."""

    __slots__ = ("data",)

    def __init__(self, data: Union[str, bytes]) -> None:
        self.data = data

    def __repr__(self) -> str:
        return f"MessageReceived({self.data!r:.60})"


class PongReceived:
    """The peer sent a pong (solicited or not)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __repr__(self) -> str:
        return f"PongReceived({self.data!r})"


class Closed:
    """The closing handshake is complete: the TCP connection may go."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "Closed()"


class Failed:
    """We failed the connection (bad input, or a limit): our close frame is on
    its way; stop reading messages and close the TCP connection."""

    __slots__ = ("code", "reason")

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason

    def __repr__(self) -> str:
        return f"Failed({self.code}, {self.reason!r})"


Event = Union[MessageReceived, PongReceived, Closed, Failed]
