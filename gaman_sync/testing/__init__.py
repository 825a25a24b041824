"""Tools for testing WebSocket programs: this package's blocks, and endpoints
written by anyone else.

- :mod:`gaman_sync.testing.raw`: :class:`RawPeer`, a peer that speaks frames,
  not messages, to any WebSocket endpoint (any frame, split over any TCP
  writes, pings inside a fragmented message, frames read back with their
  arrival times). It uses only the standard library and the sans-IO
  :mod:`gaman_sync.protocol`.
- :mod:`gaman_sync.testing.server`: :func:`run_server`, a server on
  127.0.0.1 port 0 for the length of a ``with`` block, which fails the test
  if it leaves a thread or its listening socket behind.
- :mod:`gaman_sync.testing.client`: :class:`TestClient`, a blocking client
  whose every wait has a short timeout, over loopback or in memory
  (:meth:`TestClient.local`: no network, same engine).
- :mod:`gaman_sync.testing.plugin`: the pytest plugin (fixtures
  ``ws_server`` and ``ws_client``), registered as a ``pytest11`` entry
  point; the only module here that imports pytest.

The raw peer's names load with the package; ``run_server`` and
``TestClient`` load the server and the client on first use, so that a test
of another server written with :class:`RawPeer` alone loads no server
machinery.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .raw import (
    BINARY,
    CLOSE,
    CONT,
    DEFAULT_TIMEOUT,
    PING,
    PONG,
    TEXT,
    Frame,
    FrameParser,
    HandshakeFailed,
    HTTPResponse,
    MultiReader,
    PeerClosed,
    ProtocolViolation,
    RawPeer,
    chunks,
    close_frame,
    close_payload,
    connect_many,
    fragmented,
    frame,
    handshake_request,
    parse_close,
    raise_nofile,
)

# name -> the module of this package that defines it, imported on first use
_LAZY = {"run_server": "server", "shut_down_cleanly": "server", "leftovers": "server",
         "TestClient": "client", "ReceiveTimeout": "client"}

__all__ = ["BINARY", "CLOSE", "CONT", "DEFAULT_TIMEOUT", "PING", "PONG", "TEXT", "Frame",
           "FrameParser", "HTTPResponse", "HandshakeFailed", "MultiReader", "PeerClosed",
           "ProtocolViolation", "RawPeer", "ReceiveTimeout", "TestClient", "chunks",
           "close_frame", "close_payload", "connect_many", "fragmented", "frame",
           "handshake_request", "leftovers", "parse_close", "raise_nofile", "run_server",
           "shut_down_cleanly"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'gaman_sync.testing' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:  # (not typing.List: no extra public name)
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:
    from .client import ReceiveTimeout, TestClient
    from .server import leftovers, run_server, shut_down_cleanly
