"""Blocks: a path and the handler that serves WebSocket connections on it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence, Tuple

from .handler import HandlerLike, reject_coroutine

if TYPE_CHECKING:
    from .connection import Connection

__all__ = ["Block", "define_block"]

Handler = Callable[["Connection"], HandlerLike]


@dataclass(frozen=True)
class Block:
    """A WebSocket endpoint: requests for ``path`` are served by ``websocket``.

    ``websocket(ctx)`` is called once per connection, in that connection's
    thread, right after the handshake, and returns its callbacks.
    ``subprotocols`` lists the subprotocols this block speaks; the first one
    the client offers that is in this list is selected.
    """

    path: str
    websocket: Handler
    subprotocols: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path.startswith("/"):
            raise ValueError(f"a block's path must start with '/', not {self.path!r}")
        if not callable(self.websocket):
            raise TypeError("websocket must be a callable taking the connection context")
        reject_coroutine(self.websocket, "the websocket handler")


def define_block(
    path: str = "/",
    websocket: Handler | None = None,
    subprotocols: Sequence[str] = (),
) -> Block:
    """Define a WebSocket block, as GamanJS's ``defineBlock`` does."""
    if websocket is None:
        raise TypeError("define_block() needs a websocket handler")
    return Block(path=path, websocket=websocket, subprotocols=tuple(subprotocols))
