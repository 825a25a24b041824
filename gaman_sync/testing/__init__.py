"""Tools for testing WebSocket endpoints, this package's or any other.

:mod:`gaman_sync.testing.raw` is a raw peer: it sends any frame, byte by byte
if asked, and reads back exactly the frames that arrive (see its docstring).
Its public names are re-exported here. Nothing in this package imports the
server or the client of :mod:`gaman_sync`: only the sans-IO
:mod:`gaman_sync.protocol`.
"""

from .raw import (BINARY, CLOSE, CONT, DEFAULT_TIMEOUT, PING, PONG, TEXT, Frame, FrameParser,
                  HandshakeFailed, HTTPResponse, MultiReader, PeerClosed, ProtocolViolation,
                  RawPeer, chunks, close_frame, close_payload, connect_many, frame,
                  handshake_request, parse_close, raise_nofile)

__all__ = ["BINARY", "CLOSE", "CONT", "DEFAULT_TIMEOUT", "PING", "PONG", "TEXT", "Frame",
           "FrameParser", "HTTPResponse", "HandshakeFailed", "MultiReader", "PeerClosed",
           "ProtocolViolation", "RawPeer", "chunks", "close_frame", "close_payload",
           "connect_many", "frame", "handshake_request", "parse_close", "raise_nofile"]
