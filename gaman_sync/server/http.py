"""Plain HTTP on the WebSocket port: a page, a folder of files, a handler's
answers, and an opt-in health check, so that one server serves a page and
its WebSocket.

Plain HTTP here is small and bounded, a side door of the handshake:

- ``GET`` and ``HEAD`` only (405 otherwise), one request per connection,
  answered with ``Connection: close`` (no keep-alive to manage);
- the request is read by the accept thread exactly as a handshake is: the
  ``max_request_size`` limit (431) and the ``handshake_timeout`` apply, and
  a request that is not a WebSocket upgrade takes this door only when its
  path's block serves HTTP (else the usual 426, 404 or 405).

Threads. The accept thread never runs user code and never reads a file: it
routes the request and answers only what is fixed and small (the health
check, and refusals), with one non-blocking send, as it refuses a
handshake. Everything else (an ``http=`` handler, a ``page=`` file, a file
of a ``static=`` folder) is answered in a connection thread of its own, as a
block's ``on_request`` is, and counts against ``max_connections`` while it
runs: the answer is made there (the handler called, or the file read whole)
and goes out through the connection's write path (a non-blocking send, the
rest drained by the writer thread, within ``close_timeout``), followed by a
lingering close. A slow handler, a slow disk or a slow reader of a large
file holds its own thread only, never the accept thread. Files are read
whole per request (pages and their assets, not large downloads) and never
cached, so an edited page is served at once.

Files. :class:`StaticFiles` serves a folder under a path ending in ``*``;
the rest of the path names the file. A path never leaves the folder: a
segment that is empty, ``.``, ``..`` or starts with ``.`` (hidden files,
``.git``) gets 404, whether sent plain or percent-encoded (``%2e%2e``,
``..%2f``), and so does a file whose real path (symbolic links resolved) is
outside the folder. A folder is answered with its ``index.html`` if it has
one, never with a listing. Content types come from :mod:`mimetypes`
(``application/octet-stream`` when unknown; text types in UTF-8).
"""

from __future__ import annotations

import logging
import mimetypes
import os
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Callable, Iterable, List, Mapping, Optional, Tuple, Union

from ..protocol import Request
from ..protocol.handshake import check_header
from .connection import ServerConnection

__all__ = ["HttpAnswer", "HttpHandler", "Page", "StaticFiles", "HttpExchange",
           "http_response", "text_response", "check_answer", "health_response",
           "content_type"]

logger = logging.getLogger("gaman_sync")

HeadersLike = Union[Mapping[str, str], Iterable[Tuple[str, str]]]
HttpAnswer = Tuple[int, HeadersLike, Union[str, bytes]]
"""What an ``http=`` handler returns: ``(status, headers, body)``."""
HttpHandler = Callable[[Request], HttpAnswer]
"""``http(request)``, called in a connection thread for each GET or HEAD."""

_SET_BY_SERVER = frozenset(("content-length", "connection", "transfer-encoding"))
_TEXT_TYPES = frozenset(("application/javascript", "application/json", "application/xml",
                         "image/svg+xml", "application/manifest+json"))
_NO_BODY = frozenset((204, 304))


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def content_type(name: str) -> str:
    """The ``Content-Type`` of a file name, from :mod:`mimetypes`."""
    kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
    if kind.startswith("text/") or kind in _TEXT_TYPES:
        kind += "; charset=utf-8"
    return kind


def check_answer(answer: object) -> Tuple[int, List[Tuple[str, str]], bytes]:
    """``(status, headers, body)`` from an ``http=`` handler, checked:
    ``TypeError`` or ``ValueError`` saying what is wrong otherwise."""
    if not isinstance(answer, tuple) or len(answer) != 3:
        raise TypeError(f"an http handler returns (status, headers, body), not {answer!r:.80}")
    status, headers, body = answer
    if not isinstance(status, int) or isinstance(status, bool) or not 200 <= status <= 599:
        raise ValueError(f"an http handler's status is an int from 200 to 599, not {status!r}")
    if isinstance(headers, Mapping):
        headers = list(headers.items())
    elif isinstance(headers, (str, bytes)):
        raise TypeError(f"headers are (name, value) pairs or a dict, not {headers!r:.60}")
    checked = []
    for pair in headers:
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise TypeError(f"a header is a (name, value) pair, not {pair!r:.60}")
        name, value = check_header(*pair)
        if name.lower() in _SET_BY_SERVER:
            raise ValueError(f"the server sets {name!r} itself; leave it out")
        checked.append((name, value))
    if isinstance(body, str):
        data = body.encode("utf-8")
        default_type = "text/plain; charset=utf-8"
    elif isinstance(body, (bytes, bytearray, memoryview)):
        data = bytes(body)
        default_type = "application/octet-stream"
    else:
        raise TypeError(f"an http handler's body is str or bytes, not {type(body).__name__}")
    if data and not any(name.lower() == "content-type" for name, _ in checked):
        checked.insert(0, ("Content-Type", default_type))
    return status, checked, data


def http_response(status: int, headers: Iterable[Tuple[str, str]], body: bytes,
                  head: bool = False) -> bytes:
    """An HTTP/1.1 response that closes the connection: ``Content-Length``
    (the body's, also for ``HEAD``, which gets no body) and
    ``Connection: close`` are added."""
    lines = [f"HTTP/1.1 {status} {_phrase(status)}"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    if status in _NO_BODY:
        body = b""
    else:
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + (b"" if head else body)


def text_response(status: int, message: str = "", head: bool = False,
                  headers: Iterable[Tuple[str, str]] = ()) -> bytes:
    """A short plain-text answer (``404 Not Found``, ...)."""
    body = f"{status} {_phrase(status)}{': ' if message else ''}{message}\n".encode()
    return http_response(status, [("Content-Type", "text/plain; charset=utf-8"), *headers],
                         body, head)


_HEALTH = {head: http_response(200, [("Content-Type", "text/plain; charset=utf-8"),
                                     ("Cache-Control", "no-store")], b"ok\n", head)
           for head in (False, True)}


def health_response(head: bool = False) -> bytes:
    """The answer of the health path: ``200 OK``, body ``ok``."""
    return _HEALTH[head]


def _file_answer(path: Path) -> HttpAnswer:
    try:
        data = path.read_bytes()
    except OSError:
        return 404, (), "404 Not Found\n"
    return 200, [("Content-Type", content_type(path.name)), ("Cache-Control", "no-cache"),
                 ("X-Content-Type-Options", "nosniff")], data


@dataclass(frozen=True)
class Page:
    """Serves one file (``define_block(path, page=file)``) at the block's path."""

    file: str
    """The file's absolute path."""

    def __post_init__(self) -> None:
        path = Path(os.fspath(self.file)).resolve()
        if not path.is_file():
            raise ValueError(f"page {self.file!r} is not a file")
        object.__setattr__(self, "file", str(path))

    def __call__(self, request: Request) -> HttpAnswer:
        """The file, read now (404 if it has gone)."""
        return _file_answer(Path(self.file))


@dataclass(frozen=True)
class StaticFiles:
    """Serves the files of a folder (``define_block("/files/*",
    static=folder)``): the rest of the path (the ``*``) names the file. See
    the module's docstring for what it never serves."""

    folder: str
    """The folder's real absolute path (symbolic links resolved)."""
    index: str = "index.html"
    """The file that answers for a folder (there is never a listing)."""

    def __post_init__(self) -> None:
        path = Path(os.fspath(self.folder)).resolve()
        if not path.is_dir():
            raise ValueError(f"static folder {self.folder!r} is not a folder")
        object.__setattr__(self, "folder", str(path))

    def resolve(self, rest: str) -> Optional[Path]:
        """The real path of the file that ``rest`` (``"css/site.css"``,
        percent-decoded) names inside the folder, or None (404)."""
        root = Path(self.folder)
        parts = rest.split("/")
        if parts[-1] == "":
            parts[-1] = self.index  # "" or "docs/": the folder's index
        for part in parts:
            if not part or part.startswith(".") or "\\" in part or "\0" in part \
                    or os.path.isabs(part):
                return None
        try:
            real = root.joinpath(*parts).resolve(strict=True)
            if real.is_dir():
                real = (real / self.index).resolve(strict=True)
        except (OSError, RuntimeError):  # missing, or a symbolic link loop
            return None
        if root not in real.parents or not real.is_file():
            return None
        return real

    def __call__(self, request: Request) -> HttpAnswer:
        """The file that the path's rest names, or 404."""
        real = self.resolve(request.params.get("*", ""))
        if real is None:
            return 404, (), "404 Not Found\n"
        return _file_answer(real)


class HttpExchange(ServerConnection):
    """One plain HTTP request and its answer, in a connection thread: the
    block's ``http`` responder is called and its answer sent, then the
    connection ends (a lingering close). No WebSocket frame, no callback."""

    __slots__ = ()

    def opening(self) -> bool:
        """Answer the request (in the connection's thread); False: nothing
        is served after the answer."""
        request = self.request
        head = request.method == "HEAD"
        responder = self.server.endpoint.http
        assert responder is not None
        try:
            status, headers, body = check_answer(responder(request))
            response = http_response(status, headers, body, head)
        except Exception as exc:
            logger.error("%s: the http handler raised; answered 500", self, exc_info=exc)
            status, response = 500, text_response(500, "internal error", head)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s: %s %s answered %s (%d bytes)", self, request.method,
                         request.target, status, len(response))
        self.refuse(response)
        return False
