"""The HTTP messages of the opening handshake: headers, request and response."""

from __future__ import annotations

import re
from types import MappingProxyType
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import parse_qsl, unquote

__all__ = ["Headers", "Request", "Response", "header_tokens", "format_address",
           "HEADER_LINE", "REQUEST_LINE", "HEADER_VALUE", "TOKEN"]

# Most paths have no parameters: one shared empty mapping, not a dict each.
_NO_PARAMS: Mapping[str, str] = MappingProxyType({})

# The request head, as RFC 9112 (sections 2 to 5) and RFC 9110 (5.5, 5.6)
# write it, and as h11 reads it: a token for the method, a target of visible
# ASCII characters (a URI's: no obs-text, no control byte), HTTP/d.d; header
# names are tokens, values are visible characters (any byte but NUL and ASCII
# whitespace: obs-text and, as h11 allows, other control bytes) with spaces
# or tabs between them. Lines end in CRLF or in a bare LF (RFC 9112 2.2 lets
# a server accept the latter). A line that starts with a space or a tab
# (obs-fold) matches nothing, and is refused, as RFC 9112 5.2 allows.
# Compiled with re.ASCII, \s is ASCII whitespace only, as in h11's byte
# patterns; the head is decoded from latin-1, one character per byte, so
# str.strip() would also strip bytes that are not HTTP whitespace (0x1c to
# 0x1f, 0x85, 0xa0): what reads a value strips spaces and tabs only.
TOKEN = r"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
"""A token (RFC 9110 5.6.2): a method, a header's name."""
_VISIBLE = r"[^\x00\s]"
HEADER_VALUE = rf"{_VISIBLE}+(?:[ \t]+{_VISIBLE}+)*"
"""A header's value, not empty, without the whitespace around it (RFC 9110 5.5)."""
# The whitespace after a value is matched only after a value, so that no
# two repeats can take the same run of characters. RFC 9110's own form,
# OWS [value] OWS, lets a backtracking engine split a run of n spaces
# between the two OWS in n ways for each start, n**2 steps in all: "X:", 16
# KiB of spaces and tabs, then a bad byte took 2.2 s (h11, with that form,
# 0.7 s). As written here, each character is tried a bounded number of times
# whatever the input (benchmarks/request_parser.py measures it).
HEADER_LINE = rf"({TOKEN}):[ \t]*(?:({HEADER_VALUE})[ \t]*)?\r?\n"
"""A header line: its name and value (empty if none) in groups 1 and 2."""
REQUEST_LINE = rf"({TOKEN}) ([\x21-\x7e]+) HTTP/([0-9]\.[0-9])\r?\n"
"""A request line: method, target and version in groups 1 to 3."""
_HEADER_LINE_RE = re.compile(HEADER_LINE, re.ASCII)


class Headers(Mapping[str, str]):
    """Read-only, case-insensitive HTTP headers.

    ``headers["name"]`` gives the values of a repeated header joined with
    ``", "``, as HTTP allows; :meth:`get_all` gives them one by one.
    """

    __slots__ = ("_items",)

    def __init__(self, items: Sequence[Tuple[str, str]]) -> None:
        self._items: Union[Tuple[Tuple[str, str], ...], str] = tuple(items)

    @classmethod
    def from_lines(cls, lines: str) -> Headers:
        """Headers kept as the header lines of a request head, already
        checked (each matches :data:`HEADER_LINE`), and split into pairs
        each time they are read: a server's request lives as long as its
        connection, and one string costs a fraction of a pair of strings and
        a tuple per header, while most connections never read their headers
        after the handshake."""
        headers = cls(())
        headers._items = lines
        return headers

    def get_all(self, name: str) -> List[str]:
        """Every value of header ``name``, in the order they were sent."""
        name = name.lower()
        return [v for k, v in self.raw_items() if k.lower() == name]

    def raw_items(self) -> Tuple[Tuple[str, str], ...]:
        """The headers as sent: (name, value) pairs, repeats kept."""
        items = self._items
        if isinstance(items, str):
            return tuple(_HEADER_LINE_RE.findall(items))
        return items

    def __getitem__(self, name: str) -> str:
        values = self.get_all(name)
        if not values:
            raise KeyError(name)
        return ", ".join(values)

    def __iter__(self) -> Iterator[str]:
        seen = set()
        for k, _ in self.raw_items():
            if k.lower() not in seen:
                seen.add(k.lower())
                yield k

    def __len__(self) -> int:
        return len({k.lower() for k, _ in self.raw_items()})

    def __repr__(self) -> str:
        return f"Headers({list(self.raw_items())!r})"


class Request:
    """The opening handshake request of a connection (``ctx.request``)."""

    __slots__ = ("method", "target", "path", "query_string", "headers",
                 "remote_address", "http_version", "params", "extensions", "_query")

    def __init__(
        self,
        method: str,
        target: str,
        headers: Headers,
        remote_address: Optional[Tuple[Any, ...]] = None,
        http_version: str = "1.1",
    ) -> None:
        self.method = method
        """The HTTP method, ``"GET"`` for every WebSocket handshake."""
        self.target = target
        """The request target as sent: path and query string."""
        path, _, query = target.partition("?")
        self.path = unquote(path)
        """The path, percent-decoded, without the query string."""
        self.query_string = query
        """The raw query string, without the ``?``."""
        self.headers = headers
        """The request headers (case-insensitive)."""
        self.remote_address = remote_address
        """The peer's address, as ``socket.getpeername()`` gives it."""
        self.http_version = http_version
        self.params: Mapping[str, str] = _NO_PARAMS
        """The parameters of the block's path (``/rooms/:room`` gives
        ``{"room": ...}``; a trailing ``*`` gives ``{"*": the rest}``), set by
        routing."""
        self.extensions: Tuple[str, ...] = ()
        """The ``Sec-WebSocket-Extensions`` values offered, one per header
        line, as found by the upgrade's check (the server negotiates from
        them without looking through the headers again)."""
        self._query: Optional[Dict[str, str]] = None

    @property
    def query(self) -> Mapping[str, str]:
        """Query parameters, decoded; the last value wins where a name repeats
        (use ``urllib.parse.parse_qs(request.query_string)`` to keep them all)."""
        if self._query is None:
            self._query = dict(parse_qsl(self.query_string, keep_blank_values=True))
        return self._query

    @property
    def raw_path(self) -> str:
        """The path as sent, percent-encoded, without the query string."""
        return self.target.partition("?")[0]

    @property
    def origin(self) -> Optional[str]:
        """The ``Origin`` header (browsers send it), or None."""
        return self.headers.get("origin")

    @property
    def host(self) -> Optional[str]:
        """The ``Host`` header."""
        return self.headers.get("host")

    @property
    def subprotocols(self) -> List[str]:
        """The subprotocols the client offered, in its order of preference."""
        return header_tokens(self.headers.get_all("sec-websocket-protocol"))

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.target} from {self.remote_address}>"


class Response:
    """The HTTP response to a client's opening handshake (``conn.response``)."""

    __slots__ = ("status", "reason", "headers", "body")

    def __init__(self, status: int, reason: str, headers: Headers, body: bytes = b"") -> None:
        self.status = status
        """The status code: 101 when the connection opened."""
        self.reason = reason
        """The reason phrase."""
        self.headers = headers
        """The response headers (case-insensitive)."""
        self.body = body
        """The first bytes of the body of a response that refused the upgrade."""

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.reason}>"


def header_tokens(values: Sequence[str]) -> List[str]:
    """The comma-separated tokens of a header's values, stripped of spaces
    and tabs (HTTP's whitespace: not str.strip()'s, which would make
    ``"websocket\\xa0"`` a ``websocket``)."""
    tokens = (part.strip(" \t") for value in values for part in value.split(","))
    return [t for t in tokens if t]


def format_address(address: object) -> str:
    """``host:port`` (``[host]:port`` for IPv6) for logs."""
    if isinstance(address, tuple) and len(address) >= 2:
        host = str(address[0])
        return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"
    return str(address)
