"""Close codes and the frames we encode ourselves, without I/O.

wsproto parses every frame we receive and encodes our control frames; data
frames are encoded here, because a message always goes out as one frame whose
header depends only on its type and length. That lets a server encode a
broadcast once for every client, and lets a large payload leave with
``sendmsg`` without being copied behind its header. A client must mask each
frame with a fresh random key (RFC 6455 5.3), so its frames are encoded per
send; the XOR runs in the C helper where it is built, and there
:data:`client_frame` makes a client's whole frame (header, key and masked
payload) in one call, its keys taken from a pool of ``os.urandom`` bytes.
"""

from __future__ import annotations

import os
import struct
from enum import IntEnum
from typing import Tuple, Union

try:
    from .._speedups import xor_mask
except ImportError:  # not built: the XOR is done with Python integers
    xor_mask = None  # type: ignore[assignment]
try:
    from .._speedups import client_frame
except ImportError:  # not built (or an older build): encode_frame does it
    client_frame = None  # type: ignore[assignment]

__all__ = ["CloseCode", "Data", "check_close_code", "is_valid_close_code", "encode_frame",
           "frame_bytes", "mask_payload", "client_frame"]

Data = Union[str, bytes, bytearray, memoryview]
"""What may be sent as a message: ``str`` as text, the bytes-likes as binary."""


class CloseCode(IntEnum):
    """The close codes of RFC 6455 7.4.1 and the IANA registry."""

    NORMAL_CLOSURE = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS_RCVD = 1005
    ABNORMAL_CLOSURE = 1006
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    MANDATORY_EXTENSION = 1010
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    BAD_GATEWAY = 1014


def is_valid_close_code(code: int) -> bool:
    """May ``code`` travel in a close frame? (RFC 6455 7.4, and the IANA
    registry, which added 1012-1014 after the RFC.) 1004-1006 and 1015 are
    reserved: they only ever report what happened locally."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def check_close_code(code: object, reason: object = "") -> None:
    """Raise ``TypeError`` or ``ValueError`` unless an application may close
    with ``code`` and ``reason``."""
    if not isinstance(code, int) or isinstance(code, bool):
        raise TypeError(f"code must be an int close code, not {type(code).__name__}")
    if not is_valid_close_code(code):
        raise ValueError(f"close code {code} may not be sent; use 1000-1003, 1007-1014 "
                         "or 3000-4999")
    if not isinstance(reason, str):
        raise TypeError(f"reason must be a str, not {type(reason).__name__}")
    if len(reason.encode("utf-8")) > 123:
        raise ValueError("reason must be at most 123 bytes of UTF-8")


_HEADER_SMALL = struct.Struct("!BB").pack
_HEADER_MEDIUM = struct.Struct("!BBH").pack
_HEADER_LARGE = struct.Struct("!BBQ").pack
_MASK_BIT = 0x80


def mask_payload(payload: Union[bytes, bytearray, memoryview], key: bytes) -> bytes:
    """``payload`` XORed with the 4-byte ``key`` (RFC 6455 5.3): a new
    ``bytearray`` with the C helper (no second copy into ``bytes``: the
    write path takes any buffer), ``bytes`` without."""
    if xor_mask is not None:
        out = bytearray(payload)
        xor_mask(out, key)
        return out  # type: ignore[return-value]
    n = len(payload)
    if not n:
        return b""
    # One XOR of two big integers: much faster in CPython than a byte loop.
    pad = (key * ((n >> 2) + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(pad, "little")).to_bytes(
        n, "little")


def encode_frame(message: Data, mask: bool = False) -> Tuple[bytes, bytes]:
    """The header and the payload of one unfragmented data frame.

    ``str`` is sent as text, the bytes-likes as binary. With ``mask`` (a
    client's frames), the header ends with a fresh random key and the payload
    is masked with it.
    """
    if isinstance(message, str):
        payload: Union[bytes, bytearray, memoryview] = message.encode("utf-8")
        first = 0x81  # FIN | TEXT
    elif isinstance(message, bytes):
        payload = message
        first = 0x82  # FIN | BINARY
    elif isinstance(message, (bytearray, memoryview)):
        payload = bytes(message)
        first = 0x82
    else:
        raise TypeError(f"a message is str or bytes, not {type(message).__name__}")
    length = len(payload)
    second = _MASK_BIT if mask else 0
    if length < 126:
        header = _HEADER_SMALL(first, second | length)
    elif length < 65536:
        header = _HEADER_MEDIUM(first, second | 126, length)
    else:
        header = _HEADER_LARGE(first, second | 127, length)
    if mask:
        key = os.urandom(4)
        return header + key, mask_payload(payload, key)
    return header, payload  # type: ignore[return-value]


def frame_bytes(first: int, payload: Union[bytes, bytearray], mask: bool = False
                ) -> Tuple[bytes, bytes]:
    """The header and payload of one frame whose first byte (FIN, RSV, opcode)
    is ``first``: a compressed message's frame (RSV1 set). :func:`encode_frame`
    is the same for plain frames, written out for speed."""
    length = len(payload)
    second = _MASK_BIT if mask else 0
    if length < 126:
        header = _HEADER_SMALL(first, second | length)
    elif length < 65536:
        header = _HEADER_MEDIUM(first, second | 126, length)
    else:
        header = _HEADER_LARGE(first, second | 127, length)
    if mask:
        key = os.urandom(4)
        return header + key, mask_payload(payload, key)
    return header, bytes(payload)
