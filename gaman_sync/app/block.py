"""Blocks: a path and the handler that serves WebSocket connections on it
(GamanJS's ``defineBlock``), what the block decides at the handshake, and
what it answers to plain HTTP (a page, a folder of files, a handler: see
:mod:`gaman_sync.server.http`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Sequence, Tuple, Union

from ..connection import HandlerLike, WebSocketHandler, as_handler, reject_coroutine
from ..options import check_origins
from ..protocol import Request
from ..server.decisions import REDIRECT_STATUSES, Decision
from ..server.http import HttpHandler, Page, StaticFiles
from ..server.routing import Pattern

if TYPE_CHECKING:
    from ..server import ServerConnection

__all__ = ["Block", "define_block"]

Handler = Callable[["ServerConnection"], HandlerLike]
Subprotocols = Union[Tuple[str, ...], Callable[[List[str], Request], Optional[str]]]
PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class Block:
    """An endpoint: WebSocket upgrades for ``path`` are served by
    ``websocket``, plain GET and HEAD requests by ``http``.

    ``websocket(ctx)`` is called once per connection, in that connection's
    thread, before its 101 goes out, and returns its callbacks. ``http`` is
    the block's plain-HTTP responder: the ``http`` handler given, or the
    one that ``page`` or ``static`` make. The other fields are described at
    :func:`define_block`.
    """

    path: str
    websocket: Optional[Handler] = None
    subprotocols: Subprotocols = ()
    origins: Optional[Tuple[str, ...]] = None
    require_origin: bool = False
    on_request: Optional[Callable[[Request], Decision]] = None
    redirect: Optional[str] = None
    redirect_status: int = 308
    on_redirect: Optional[Callable[[str, Request], Any]] = None
    http: Optional[HttpHandler] = None
    page: Optional[str] = None
    static: Optional[str] = None

    def __post_init__(self) -> None:
        if not isinstance(self.path, str):
            raise TypeError(f"path must be a str starting with '/', not {self.path!r}")
        pattern = Pattern(self.path)  # ValueError naming the path when it is not one
        self._check_http(pattern)
        if self.redirect is None:
            if self.websocket is None and self.http is None:
                raise TypeError("define_block() needs a websocket handler (or a redirect, "
                                "or plain HTTP: http=, page= or static=): "
                                "define_block(path, websocket=handler)")
            if self.websocket is None:
                if self.on_request is not None:
                    raise TypeError("on_request decides on WebSocket upgrades: a block "
                                    "without a websocket handler has none")
            elif not callable(self.websocket):
                raise TypeError("websocket must be a callable taking the connection context, "
                                f"not {self.websocket!r}")
            else:
                reject_coroutine(self.websocket, "the websocket handler")
        else:
            if self.websocket is not None or self.on_request is not None \
                    or self.http is not None:
                raise TypeError("a redirect block has no websocket handler, no on_request "
                                "and no plain HTTP: it only redirects")
            if not isinstance(self.redirect, str) or not self.redirect:
                raise TypeError(f"redirect must be a path or URL (str), not {self.redirect!r}")
            extra = [part[1:] for part in self.redirect.split("/")
                     if part.startswith(":") and part[1:] not in pattern.names]
            if extra:
                raise ValueError(f"redirect {self.redirect!r} uses ':{extra[0]}', which "
                                 f"{self.path!r} does not have")
        if self.redirect_status not in REDIRECT_STATUSES:
            raise ValueError(f"redirect_status must be one of {REDIRECT_STATUSES}, not "
                             f"{self.redirect_status!r}")
        if callable(self.subprotocols):
            reject_coroutine(self.subprotocols, "the subprotocol function")
        elif isinstance(self.subprotocols, (str, bytes)) or not all(
                isinstance(p, str) and p and "," not in p for p in self.subprotocols):
            raise TypeError("subprotocols must be a list of subprotocol names (str) or a "
                            f"function, not {self.subprotocols!r}")
        else:
            object.__setattr__(self, "subprotocols", tuple(self.subprotocols))
        object.__setattr__(self, "origins", check_origins(self.origins))
        for name in ("on_request", "on_redirect"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise TypeError(f"{name} must be a function or None, not {value!r}")
            reject_coroutine(value, name)

    def _check_http(self, pattern: Pattern) -> None:
        made = isinstance(self.http, (Page, StaticFiles))  # by page= or static= (a copy)
        given = [name for name in ("http", "page", "static")
                 if getattr(self, name) is not None and not (name == "http" and made)]
        if len(given) > 1:
            raise TypeError(f"a block answers plain HTTP one way: http=, page= or static=, "
                            f"not {' and '.join(given)}")
        if self.page is not None:
            if isinstance(self.http, Page):  # dataclasses.replace() on a page block
                return
            if not isinstance(self.page, (str, os.PathLike)):
                raise TypeError(f"page must be a file path, not {self.page!r}")
            responder: HttpHandler = Page(os.fspath(self.page))
            object.__setattr__(self, "page", responder.file)  # type: ignore[attr-defined]
        elif self.static is not None:
            if isinstance(self.http, StaticFiles):
                return
            if not isinstance(self.static, (str, os.PathLike)):
                raise TypeError(f"static must be a folder path, not {self.static!r}")
            if not pattern.rest:
                raise ValueError(f"a static block's path ends with '*', the file's path in "
                                 f"the folder: {self.path.rstrip('/')}/* , not {self.path!r}")
            responder = StaticFiles(os.fspath(self.static))
            object.__setattr__(self, "static", responder.folder)
        elif self.http is not None:
            if not callable(self.http):
                raise TypeError(f"http must be a function (request) -> (status, headers, "
                                f"body), not {self.http!r}")
            reject_coroutine(self.http, "the http handler")
            return
        else:
            return
        object.__setattr__(self, "http", responder)

    def handler_for(self, ctx: ServerConnection) -> WebSocketHandler:
        """The callbacks for a new connection: ``websocket(ctx)``'s, checked."""
        assert self.websocket is not None
        return as_handler(self.websocket(ctx))


def define_block(
    path: str = "/",
    websocket: Optional[Handler] = None,
    subprotocols: Union[Sequence[str], Callable[[List[str], Request], Optional[str]]] = (),
    *,
    origins: Optional[Sequence[str]] = None,
    require_origin: bool = False,
    on_request: Optional[Callable[[Request], Decision]] = None,
    redirect: Optional[str] = None,
    redirect_status: int = 308,
    on_redirect: Optional[Callable[[str, Request], Any]] = None,
    http: Optional[HttpHandler] = None,
    page: Optional[PathLike] = None,
    static: Optional[PathLike] = None,
) -> Block:
    """Define a WebSocket block, as GamanJS's ``defineBlock`` does.

    - ``path``: ``/chat``, or a pattern with parameters: ``/rooms/:room``, and
      a last ``*`` for the rest (``ctx.request.params``);
    - ``websocket(ctx)``: returns the connection's callbacks;
    - ``subprotocols``: the names it speaks (the first the client offers that
      is in the list wins), or a function ``(offered, request) -> chosen``;
    - ``origins``: the ``Origin`` values accepted (403 for any other; ``"*"``
      for any); None: the server's ``origins`` option. ``require_origin``:
      refuse requests without ``Origin`` too;
    - ``on_request(request)``: decides before the 101, in the connection's
      thread: returns ``Accept(subprotocol, headers)``, ``Reject(status,
      body)``, ``Redirect(location, status)`` or None (accept);
    - ``redirect``: a block that only redirects, to a path template that may
      use the path's parameters (``/r/:room``), with ``redirect_status``
      (308); the query string is carried over;
    - ``on_redirect(url, request)``: called with the absolute URL of each
      redirect this block makes (a redirect block's, or ``on_request``'s);
    - plain HTTP, one of: ``http(request)`` returns ``(status, headers,
      body)`` for each GET or HEAD (called in a connection thread);
      ``page``: a file served at the path; ``static``: a folder served
      under a path ending in ``*`` (``/files/*``), without listings and
      never outside the folder. A block may have both a ``websocket`` and
      plain HTTP: an upgrade opens a WebSocket, a plain GET gets the page.
      See :mod:`gaman_sync.server.http`.
    """
    if isinstance(subprotocols, (str, bytes)):
        raise TypeError(f"subprotocols must be a list of str, not a single "
                        f"{type(subprotocols).__name__} ({subprotocols!r}): "
                        f"use [{subprotocols!r}]")
    if not callable(subprotocols):
        subprotocols = tuple(subprotocols)
    return Block(path=path, websocket=websocket, subprotocols=subprotocols,
                 origins=origins, require_origin=require_origin,  # type: ignore[arg-type]
                 on_request=on_request, redirect=redirect, redirect_status=redirect_status,
                 on_redirect=on_redirect, http=http, page=page,  # type: ignore[arg-type]
                 static=static)  # type: ignore[arg-type]
