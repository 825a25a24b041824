"""Blocks: a path and the handler that serves WebSocket connections on it
(GamanJS's ``defineBlock``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence, Tuple

from ..connection import HandlerLike, WebSocketHandler, as_handler, reject_coroutine

if TYPE_CHECKING:
    from ..server import ServerConnection

__all__ = ["Block", "define_block"]

Handler = Callable[["ServerConnection"], HandlerLike]


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
        if not isinstance(self.path, str):
            raise TypeError(f"path must be a str starting with '/', not {self.path!r}")
        if not self.path.startswith("/") or "?" in self.path or "#" in self.path:
            raise ValueError(f"path must start with '/' and hold no query ('?') or fragment "
                             f"('#'), not {self.path!r}")
        if not callable(self.websocket):
            raise TypeError("websocket must be a callable taking the connection context, "
                            f"not {self.websocket!r}")
        reject_coroutine(self.websocket, "the websocket handler")
        if isinstance(self.subprotocols, (str, bytes)) or not all(
                isinstance(p, str) and p and "," not in p for p in self.subprotocols):
            raise TypeError("subprotocols must be a list of subprotocol names (str), not "
                            f"{self.subprotocols!r}")

    def handler_for(self, ctx: "ServerConnection") -> WebSocketHandler:
        """The callbacks for a new connection: ``websocket(ctx)``'s, checked."""
        return as_handler(self.websocket(ctx))


def define_block(
    path: str = "/",
    websocket: Handler | None = None,
    subprotocols: Sequence[str] = (),
) -> Block:
    """Define a WebSocket block, as GamanJS's ``defineBlock`` does."""
    if websocket is None:
        raise TypeError("define_block() needs a websocket handler: "
                        "define_block(path, websocket=handler)")
    if isinstance(subprotocols, (str, bytes)):
        raise TypeError(f"subprotocols must be a list of str, not a single "
                        f"{type(subprotocols).__name__} ({subprotocols!r}): "
                        f"use [{subprotocols!r}]")
    return Block(path=path, websocket=websocket, subprotocols=tuple(subprotocols))
