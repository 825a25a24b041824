"""What a server serves: endpoints, and each endpoint's clients and broadcast.

The server layer does not know GamanJS blocks: it serves *endpoints*, any
object with a ``path``, the ``subprotocols`` it speaks and a
``handler_for(ctx)`` that returns the connection's callbacks, and an
``http`` responder for plain GET and HEAD requests (see :mod:`.http`).
:class:`gaman_sync.Block` is one.

Rooms
-----

A room belongs to one block, as ``clients`` does (``ctx.server`` is the
block's server, as in GamanJS): room ``lobby`` of ``/chat`` and room
``lobby`` of ``/game`` are two rooms. A connection joins and leaves with
``ctx.join(room)`` and ``ctx.leave(room)``, from any thread, and leaves all
of its rooms once it has ended (after its ``on_close``, where ``ctx.rooms``
still names them). Each room is a dict of its members, like ``clients``, so
a broadcast to a room of 1,000 costs what a broadcast to 1,000 clients
costs. Memberships change under one lock per block, taken by joins, leaves
and by the end of a connection that was in a room; a broadcast and the end
of a connection in no room never take it.

A member counts from the moment its handler has returned (when it joins
``clients``): a handler may join rooms before, and a client it refuses never
receives a room's broadcast either.

Across processes
----------------

With a broker (:mod:`gaman_sync.broker`), a broadcast is delivered to this
process's clients at once, then published once on the block's channel, in
an envelope that keeps its type (text or binary), its room and the ids it
skips; every other process delivers it to its own clients (see
:meth:`BlockServer.receive`). Connection ids are then unique across
processes, so ``exclude`` names connections anywhere.
"""

from __future__ import annotations

import logging
import threading
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    FrozenSet,
    Iterable,
    List,
    Optional,
    Sequence,
    Tuple,
    Union,
    runtime_checkable,
)
from typing import Protocol as _Interface

from ..broker.envelope import pack, unpack
from ..connection import ReadyState, WebSocketHandler
from ..protocol import Data, HandshakeError, Request, encode_frame
from ..protocol.deflate import broadcast_frame
from ..protocol.handshake import Fields, check_upgrade
from .connection import ServerConnection
from .decisions import Decision

if TYPE_CHECKING:
    from ..broker import Broker
    from .server import WebSocketServer

__all__ = ["Endpoint", "BlockServer", "broadcast", "Exclude"]

logger = logging.getLogger("gaman_sync")

Exclude = Union[ServerConnection, int, Iterable[Union[ServerConnection, int]], None]
"""Who a broadcast skips: a connection or its id, or several of either."""


SubprotocolSelector = Callable[[List[str], Request], Optional[str]]


@runtime_checkable
class Endpoint(_Interface):
    """What a server routes requests to (a :class:`gaman_sync.Block`)."""

    # Read-only properties: a frozen dataclass (a Block) satisfies them,
    # where plain annotations would ask for settable attributes.

    @property
    def path(self) -> str:
        """The path pattern (see :mod:`.routing`)."""
        ...

    @property
    def websocket(self) -> Optional[Callable[[ServerConnection], Any]]:
        """The WebSocket handler; None for an endpoint that serves plain HTTP
        only (or only redirects)."""
        ...

    @property
    def http(self) -> Optional[Callable[[Request], Any]]:
        """Answers plain GET and HEAD requests (see :mod:`.http`), or None."""
        ...

    @property
    def subprotocols(self) -> Union[Tuple[str, ...], SubprotocolSelector]:
        """The subprotocols it speaks, in its order of preference, or a function
        ``(offered, request) -> chosen or None``."""
        ...

    @property
    def origins(self) -> Optional[Tuple[str, ...]]:
        """The ``Origin`` values it accepts (``"*"``: any); None: the server's default."""
        ...

    @property
    def require_origin(self) -> bool:
        """Refuse a request without ``Origin`` when ``origins`` is a list."""
        ...

    @property
    def on_request(self) -> Optional[Callable[[Request], Decision]]:
        """Decides before the 101, in the connection's thread (see :mod:`.decisions`)."""
        ...

    @property
    def redirect(self) -> Optional[str]:
        """A path template (``/r/:room``) every request is redirected to, or None."""
        ...

    @property
    def redirect_status(self) -> int:
        """The status of those redirects."""
        ...

    @property
    def on_redirect(self) -> Optional[Callable[[str, Request], Any]]:
        """Called with the absolute URL and the request, for each redirect made."""
        ...

    def handler_for(self, ctx: ServerConnection) -> WebSocketHandler:
        """The callbacks for a new connection, called in its thread."""
        ...


class BlockServer:
    """One block's view of the server: ``ctx.server`` in a handler.

    As in GamanJS, where each block has its own ``ws`` server, ``clients``
    and ``broadcast`` cover this block's connections only. ``root`` is the
    whole :class:`~gaman_sync.WebSocketServer` (every block, ``shutdown``,
    ``port``).
    """

    def __init__(self, root: WebSocketServer, endpoint: Endpoint) -> None:
        self.root = root
        """The :class:`~gaman_sync.WebSocketServer` that runs this block."""
        self.endpoint = endpoint
        """The block served."""
        # Joined and left without a lock: a dict's item assignment, pop()
        # and list() are each atomic, and a shared lock here is what
        # thousands of connections ending at once would queue on (each
        # holder waiting its turn for the GIL among them).
        self._clients: Dict[ServerConnection, None] = {}
        # Those of them with permessage-deflate: while there is none, a
        # broadcast is exactly the plain one.
        self._deflated: Dict[ServerConnection, None] = {}
        # Rooms: room -> its members, and member -> its rooms (a frozenset,
        # replaced whole, so that ctx.rooms reads it without the lock).
        self._rooms: Dict[str, Dict[ServerConnection, None]] = {}
        self._memberships: Dict[ServerConnection, FrozenSet[str]] = {}
        self._rooms_lock = threading.Lock()
        # Set by the server when a broker carries broadcasts to other
        # processes: publish(payload) sends one envelope on this block's channel.
        self._publish: Optional[Callable[[bytes], None]] = None
        self.upgrades = endpoint.websocket is not None or endpoint.redirect is not None
        """Does it take WebSocket upgrades (else plain HTTP only)?"""
        self.http = endpoint.http
        """What answers plain GET and HEAD requests, or None."""
        origins = endpoint.origins if endpoint.origins is not None else root.options.origins
        self.origins: Optional[FrozenSet[str]] = (
            None if origins is None or "*" in origins
            else frozenset(origin.lower() for origin in origins))
        """The ``Origin`` values accepted, lower-cased (the block's, else the
        server's ``origins`` option); None: any."""
        self.decides = (endpoint.on_request is not None or endpoint.redirect is not None
                        or callable(endpoint.subprotocols) or not self.upgrades)
        """Does an upgrade need more than the accept thread's checks before
        its 101 (``on_request``, a redirect, a subprotocol function; or an
        endpoint without WebSocket, which refuses it)? Then it is made in the
        connection's thread, not in the accept thread."""

    def check_upgrade(self, request: Request, fields: Optional[Fields] = None) -> bytes:
        """Check that ``request`` may open a WebSocket on this block (a GET, a
        valid upgrade, an accepted ``Origin``); its ``Sec-WebSocket-Key``, or
        :class:`~gaman_sync.protocol.HandshakeError` with the status to answer.
        ``fields``: its headers by lower-cased name, if the caller has them.
        (The standalone accept thread and the WSGI middleware both ask here.)"""
        if request.method != "GET":
            raise HandshakeError(405, "a WebSocket handshake is a GET request",
                                 [("Allow", "GET")])
        key = check_upgrade(request, fields)
        if self.origins is not None and not self.allows_origin(request.origin):
            raise HandshakeError(403, "this origin may not open a WebSocket here")
        return key

    def allows_origin(self, origin: Optional[str]) -> bool:
        """May a request with this ``Origin`` (None: no header) open a connection?"""
        origins = self.origins
        if origins is None:
            return True
        if origin is None:
            return not self.endpoint.require_origin
        return origin.lower() in origins

    @property
    def block(self) -> Endpoint:
        """The block served (GamanJS's name for the endpoint)."""
        return self.endpoint

    @property
    def path(self) -> str:
        """The block's path."""
        return self.endpoint.path

    @property
    def clients(self) -> List[ServerConnection]:
        """The open connections of this block, in the order they joined (a
        snapshot). A connection joins once its handler has returned, and
        leaves the moment its close starts, whoever starts it."""
        return [conn for conn in list(self._clients) if conn.is_open]

    @property
    def port(self) -> int:
        """The port the server listens on."""
        return self.root.port

    @property
    def address(self) -> Tuple[Any, ...]:
        """The address the server listens on."""
        return self.root.address

    def broadcast(self, message: Data, room: Optional[str] = None,
                  exclude: Exclude = None) -> int:
        """Send ``message`` to every open client of this block, or of its
        ``room``; never blocks.

        The frame is encoded once and queued for each client. A client whose
        outgoing buffer is already over ``write_limit`` is closed with 1008
        instead of holding up the others. ``exclude`` is a connection or its
        id, or several of either. With a broker, the message then goes to
        the other processes, whose clients (of the room) get it too. Returns
        the number of this process's clients the message was queued for.
        """
        if room is None:
            sent = broadcast(list(self._clients), message, exclude, bool(self._deflated))
        else:
            members = self._rooms.get(room) if isinstance(room, str) else _bad_room(room)
            sent = broadcast(list(members) if members else (), message, exclude,
                             bool(self._deflated))
        if self._publish is not None:
            self._publish(pack(message, room, _excluded_ids(exclude)))
        return sent

    def publish(self, message: Data, room: Optional[str] = None,
                exclude: Exclude = None) -> None:
        """Send a broadcast to the other processes only (what
        :meth:`broadcast` does after its local delivery); nothing without a
        broker."""
        if self._publish is not None:
            self._publish(pack(message, room, _excluded_ids(exclude)))

    def connect_broker(self, broker: Optional[Broker], channel: str) -> None:
        """Publish this block's broadcasts on ``channel`` of ``broker`` from
        now on (None: no more); the server calls it once its broker started."""
        if broker is None:
            self._publish = None
        else:
            publish = broker.publish
            self._publish = lambda payload: publish(channel, payload)

    def receive(self, envelope: bytes) -> int:
        """Deliver a broadcast that another process published on this
        block's channel to this process's clients (of its room, but those it
        excludes), encoding the frame once; the broker's thread calls it.
        ``ValueError`` if ``envelope`` is not one
        (:mod:`gaman_sync.broker.envelope`). Returns the number of clients."""
        message, room, skip = unpack(envelope)
        if room is None:
            return broadcast(list(self._clients), message, skip, bool(self._deflated))
        members = self._rooms.get(room)
        return (broadcast(list(members), message, skip, bool(self._deflated)) if members
                else 0)

    # -- Rooms ------------------------------------------------------------------

    @property
    def rooms(self) -> List[str]:
        """The rooms that have members in this process (a snapshot)."""
        return list(self._rooms)

    def room_clients(self, room: str) -> List[ServerConnection]:
        """The open connections of this process in ``room`` (a snapshot)."""
        members = self._rooms.get(room) if isinstance(room, str) else _bad_room(room)
        return [conn for conn in list(members) if conn.is_open] if members else []

    def rooms_of(self, conn: ServerConnection) -> FrozenSet[str]:
        """The rooms ``conn`` is in (``ctx.rooms``)."""
        return self._memberships.get(conn, _NO_ROOMS)

    def join(self, conn: ServerConnection, room: str) -> None:
        """``conn`` joins ``room`` (``ctx.join``); nothing for a connection
        that has ended."""
        if not isinstance(room, str):
            _bad_room(room)
        with self._rooms_lock:
            if _ended(conn):
                return
            rooms = self._memberships.get(conn, _NO_ROOMS)
            if room in rooms:
                return
            # Recorded before looking at the clients: add() looks the other way.
            self._memberships[conn] = rooms | {room}
            if conn in self._clients:
                self._rooms.setdefault(room, {})[conn] = None
        if _ended(conn):
            # It ended meanwhile, and discard() may have found no rooms to leave.
            self._leave_all(conn)

    def leave(self, conn: ServerConnection, room: str) -> None:
        """``conn`` leaves ``room`` (``ctx.leave``); nothing if it is not in it."""
        if not isinstance(room, str):
            _bad_room(room)
        with self._rooms_lock:
            rooms = self._memberships.get(conn, _NO_ROOMS)
            if room not in rooms:
                return
            rooms = rooms - {room}
            if rooms:
                self._memberships[conn] = rooms
            else:
                del self._memberships[conn]
            self._drop_member(room, conn)

    def _drop_member(self, room: str, conn: ServerConnection) -> None:
        """(The caller holds the rooms lock.)"""
        members = self._rooms.get(room)
        if members is not None:
            members.pop(conn, None)
            if not members:
                del self._rooms[room]

    def _leave_all(self, conn: ServerConnection) -> None:
        with self._rooms_lock:
            for room in self._memberships.pop(conn, _NO_ROOMS):
                self._drop_member(room, conn)

    # -- What the server and the connections call --------------------------------

    def add(self, conn: ServerConnection) -> None:
        """``conn`` joins the clients (its thread, once its handler returned),
        and the rooms it joined meanwhile."""
        if conn.deflate_window is not None:
            self._deflated[conn] = None
        self._clients[conn] = None
        if conn in self._memberships:
            with self._rooms_lock:
                for room in self._memberships.get(conn, _NO_ROOMS):
                    self._rooms.setdefault(room, {})[conn] = None

    def discard(self, conn: ServerConnection) -> None:
        """``conn`` is gone (the server, once its thread is done with it):
        it leaves the clients and its rooms."""
        self._clients.pop(conn, None)
        self._deflated.pop(conn, None)
        if conn in self._memberships:
            self._leave_all(conn)

    @property
    def compressing(self) -> bool:
        """Has any client of this block negotiated permessage-deflate?"""
        return bool(self._deflated)

    def __repr__(self) -> str:
        return f"<BlockServer {self.path} with {len(self._clients)} clients>"


_NO_ROOMS: FrozenSet[str] = frozenset()


def _ended(conn: ServerConnection) -> bool:
    """Has ``conn`` ended (``on_close`` due or done)? It never joins a room again."""
    return conn.ready_state is ReadyState.CLOSED


def _bad_room(room: Any) -> Any:
    raise TypeError(f"room must be a str (a room's name) or None, not {room!r:.60}; to skip "
                    "clients, pass exclude=")


def _excluded_ids(exclude: Exclude) -> FrozenSet[int]:
    if exclude is None:
        return frozenset()
    items = (exclude,) if isinstance(exclude, (ServerConnection, int)) else exclude
    try:
        ids = []
        for item in items:
            if isinstance(item, ServerConnection):
                ids.append(item.id)
            elif isinstance(item, int) and not isinstance(item, bool):
                ids.append(item)
            else:
                raise TypeError
    except TypeError:
        raise TypeError("exclude must be a connection or a connection id, or an iterable of "
                        f"them, not {exclude!r:.60}") from None
    return frozenset(ids)


def broadcast(clients: Sequence[ServerConnection], message: Data, exclude: Exclude,
              deflated: bool = False) -> int:
    """Queue ``message``, encoded once, for each of ``clients`` not excluded.

    With ``deflated`` (some of them negotiated permessage-deflate), it is
    encoded once per kind of frame they take: plain, and compressed with each
    window in use (a server compresses every message on its own, so one
    compressed frame fits every client with that window)."""
    if deflated:
        return _broadcast_deflated(clients, message, exclude)
    header, payload = encode_frame(message)
    frame = header + payload
    skip = _excluded_ids(exclude)
    sent = 0
    for conn in clients:
        if skip and conn.id in skip:
            continue
        if conn.send_frame_nowait(frame):
            sent += 1
        elif conn.is_open:
            _drop(conn)
    return sent


def _broadcast_deflated(clients: Sequence[ServerConnection], message: Data,
                        exclude: Exclude) -> int:
    skip = _excluded_ids(exclude)
    frames: Dict[Optional[int], bytes] = {}
    sent = 0
    for conn in clients:
        if skip and conn.id in skip:
            continue
        window = conn.deflate_window
        frame = frames.get(window)
        if frame is None:
            if window is None:
                header, payload = encode_frame(message)
                frame = header + payload
            else:
                agreement = conn.deflate_agreement
                assert agreement is not None
                frame = broadcast_frame(message, agreement)
            frames[window] = frame
        if conn.send_frame_nowait(frame):
            sent += 1
        elif conn.is_open:
            _drop(conn)
    return sent


def _drop(conn: ServerConnection) -> None:
    # Over write_limit: a close frame would wait behind the backlog the peer
    # is not reading, so TCP is dropped and 1008 reported.
    logger.warning("%s: closed with 1008, its outgoing buffer is over write_limit "
                   "(%s bytes): the client is not reading", conn, conn.options.write_limit)
    conn.abort(1008, "outgoing buffer over write_limit")
