"""What a broadcast looks like between processes: its message, text or
binary, its room and the connections it skips.

One envelope is ``KIND HEADER \\n MESSAGE``:

- ``KIND``: one byte, ``t`` for a text message (``MESSAGE`` is its UTF-8) or
  ``b`` for a binary one;
- ``HEADER``: a JSON object on one line (JSON never holds a raw newline):
  ``"room"``, the room's name (absent: every client of the block), and
  ``"exclude"``, a list of connection ids to skip (absent: none);
- ``MESSAGE``: the message's bytes, as they are.

So ``t{}\\nhello`` is the text ``hello`` for every client of the block, and
``b{"room":"lobby","exclude":[30000000017]}\\n...`` binary bytes for room
``lobby`` but connection 30000000017. A program in another language can
publish one (see :class:`~gaman_sync.broker.RedisBroker` for the channel and
the bytes that come before it on Redis).
"""

from __future__ import annotations

import json
from typing import Any, Dict, FrozenSet, Iterable, Optional, Tuple, Union

__all__ = ["pack", "unpack"]

_TEXT, _BINARY = b"t", b"b"
_EMPTY = b"{}\n"


def pack(message: Union[str, bytes, bytearray, memoryview], room: Optional[str] = None,
         exclude: Iterable[int] = ()) -> bytes:
    """The envelope of a broadcast of ``message`` (``str``: text; bytes-like:
    binary) to ``room`` (None: every client) but the ids in ``exclude``."""
    if isinstance(message, str):
        kind, body = _TEXT, message.encode("utf-8")
    elif isinstance(message, (bytes, bytearray, memoryview)):
        kind, body = _BINARY, bytes(message)
    else:
        raise TypeError(f"a message is str or bytes, not {type(message).__name__}")
    header: Dict[str, Any] = {}
    if room is not None:
        header["room"] = room
    skip = sorted(exclude)
    if skip:
        header["exclude"] = skip
    head = (json.dumps(header, separators=(",", ":")).encode("utf-8")
            + b"\n") if header else _EMPTY
    return kind + head + body


def unpack(data: bytes) -> Tuple[Union[str, bytes], Optional[str], FrozenSet[int]]:
    """``(message, room, exclude)`` from an envelope; ``ValueError`` naming
    what is wrong for anything else."""
    kind = data[:1]
    if kind not in (_TEXT, _BINARY):
        raise ValueError(f"not a broadcast envelope: starts with {data[:8]!r}")
    end = data.find(b"\n", 1)
    if end < 0:
        raise ValueError("not a broadcast envelope: no end of header")
    try:
        header = json.loads(data[1:end])
    except ValueError as exc:
        raise ValueError(f"broadcast envelope with a header that is not JSON: {exc}") \
            from None
    if not isinstance(header, dict):
        raise ValueError("broadcast envelope whose header is not a JSON object")
    room = header.get("room")
    exclude = header.get("exclude", [])
    if room is not None and not isinstance(room, str):
        raise ValueError(f"broadcast envelope with a room that is not a string: {room!r:.40}")
    if not isinstance(exclude, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in exclude):
        raise ValueError("broadcast envelope whose exclude is not a list of connection ids")
    body = data[end + 1:]
    message: Union[str, bytes] = body.decode("utf-8") if kind == _TEXT else body
    return message, room, frozenset(exclude)
