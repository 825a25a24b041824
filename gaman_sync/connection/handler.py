"""The callbacks of one connection: the events the engine dispatches.

Both ends dispatch the same events (a server's block handler returns them, a
client passes them to ``connect``), so they are defined here, with the
connection engine, and the GamanJS contract above reuses them under the same
names.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, fields
from inspect import CO_COROUTINE
from types import FunctionType
from typing import Any, Callable, Mapping, Optional, Union

__all__ = ["WebSocketHandler", "HandlerLike", "as_handler", "reject_coroutine"]


@dataclass(frozen=True)
class WebSocketHandler:
    """What to do on each event of one connection. Every callback is optional.

    All of them run in the connection's own thread, one at a time, so a
    callback that takes long delays that connection's other events (its
    automatic pong replies and its close included), never another connection.
    """

    on_open: Optional[Callable[[], Any]] = None
    """Called once, after the handshake and before any other callback."""
    on_message: Optional[Callable[[Union[str, bytes]], Any]] = None
    """Called with each whole message: ``str`` for text, ``bytes`` for binary."""
    on_close: Optional[Callable[[int, str], Any]] = None
    """Called exactly once, last, with the close code and reason that ended it."""
    on_pong: Optional[Callable[[bytes], Any]] = None
    """Called with the payload of each pong the peer sends."""
    on_error: Optional[Callable[[Exception], Any]] = None
    """Called with any exception another callback raised; the connection stays open."""
    on_redirect: Optional[Callable[[str, Any], Any]] = None
    """Called by the client when a server redirects it (``url``, ``request``)."""


_NAMES = frozenset(f.name for f in fields(WebSocketHandler))
# GamanJS spells the keys in camelCase; accepting them makes porting a handler trivial.
_CAMEL = {"onOpen": "on_open", "onMessage": "on_message", "onClose": "on_close",
          "onPong": "on_pong", "onError": "on_error", "onRedirect": "on_redirect"}

HandlerLike = Union[WebSocketHandler, Mapping[str, Optional[Callable[..., Any]]], None]


def as_handler(value: HandlerLike) -> WebSocketHandler:
    """Turn what a block's handler returned into a :class:`WebSocketHandler`.

    Accepts a ``WebSocketHandler``, a mapping with the same keys (snake_case or
    GamanJS camelCase), or ``None`` for no callbacks at all.
    """
    if isinstance(value, WebSocketHandler):
        for f in fields(value):
            reject_coroutine(getattr(value, f.name), f"callback {f.name!r}")
        return value
    if value is None:
        return WebSocketHandler()
    if not isinstance(value, Mapping):
        raise TypeError(
            "a websocket handler must return a WebSocketHandler or a dict of "
            f"callbacks, not {type(value).__name__}"
        )
    # Built without the dataclass's __init__: this runs once per connection,
    # and the frozen __init__ sets all six fields one by one where a handler
    # usually gives one or two (the others read the class's None). Equality,
    # repr and hash read the attributes, so they see the same object.
    handler = _new(WebSocketHandler)
    for key, callback in value.items():
        name = _CAMEL.get(key, key)
        if name not in _NAMES:
            raise TypeError(f"unknown callback {key!r}; expected one of {sorted(_NAMES)}")
        if callback is None:
            continue
        if not callable(callback):
            raise TypeError(f"callback {key!r} is not callable")
        reject_coroutine(callback, f"callback {key!r}")
        _set(handler, name, callback)
    return handler


_new = object.__new__
_set = object.__setattr__  # past the frozen dataclass's guard, once, at construction


def reject_coroutine(function: object, what: str) -> None:
    """Refuse an ``async def`` function: this server calls callbacks in
    threads and would never await it (in GamanJS a handler may be async)."""
    if type(function) is FunctionType:
        # A plain def (a closure, per connection): its code flags and the
        # mark of inspect.markcoroutinefunction (Python 3.12) say it all, ten
        # times faster than inspect's general answer. Not function.__dict__,
        # which would give each callback an empty dict to keep.
        coroutine = bool(function.__code__.co_flags & CO_COROUTINE) \
            or getattr(function, "_is_coroutine_marker", None) is not None
    else:
        coroutine = inspect.iscoroutinefunction(function)
    if coroutine:
        raise TypeError(f"{what} is an async function; gaman_sync calls callbacks in the "
                        "connection's thread: use a plain def")
