"""One WebSocket connection: its socket, its thread and its write path.

Theory of operation
-------------------
Each connection has exactly one thread. It reads the socket in large
chunks, feeds everything that arrived to the protocol glue
(:mod:`gaman_sync.protocol`, wsproto underneath) and runs the handler's
callbacks. It is the only thread that reads the socket and the only one that
closes it; any other thread that wants the connection gone shuts the socket
down, which wakes the reader.

Any thread may write (``send``, ``ping``, ``close``, a broadcast, the
keepalive timer, the reader's own pong and close replies). Every write
happens under ``_lock``, which also guards the wsproto state, so frames are
whole and in order on the wire. Writes never block under the lock: a frame
goes to the kernel with a non-blocking ``send``; whatever the kernel does not
take waits in ``_pending`` and the server's one writer thread
(:mod:`gaman_sync.flusher`) sends it when the socket is writable. A peer
that stops reading therefore costs buffer space, bounded by
``write_limit``, and never a blocked thread: ``send`` waits (up to its
timeout) for room, and a broadcast that finds the buffer full closes that
client with 1008.
"""

from __future__ import annotations

import functools
import logging
import socket
import sys
import threading
import time
from collections import deque
from enum import IntEnum
from types import FrameType
from typing import TYPE_CHECKING, Any, Callable, Deque, List, Optional, Union, cast

try:
    from typing import Protocol as _Interface
except ImportError:  # pragma: no cover - Python < 3.8
    _Interface = object  # type: ignore[assignment,misc]

from .errors import ConnectionClosed, SendTimeout
from .handler import WebSocketHandler, as_handler
from .nonblocking import DONTWAIT as _DONTWAIT
from .nonblocking import close as _close_now
from .nonblocking import send as _send_now
from .options import Options
from .protocol import (ABNORMAL, Closed, Failed, Message, Pong, Protocol,
                       check_close_code, encode_frame)
from .request import Request, format_address

try:
    from ._speedups import recv_gated as _recv_gated
except ImportError:  # not built, or not POSIX: sock.recv
    _recv_gated = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from .block import Block
    from .flusher import Flusher
    from .timers import Timer, Timers

__all__ = ["Connection", "ReadyState", "ConnectionHost", "ClientView"]

logger = logging.getLogger("gaman_sync")

# Reads start small and grow while they come back full: an idle connection
# blocks in recv() holding a small buffer (CPython allocates it up front),
# a large message is read in large chunks.
_RECV_MIN = 2048
_RECV_MAX = 512 * 1024
# Below this, header and payload are joined and sent with one send(); above
# it, sendmsg() sends both without copying the payload.
_JOIN_LIMIT = 16 * 1024
_EMPTY_HANDLER = WebSocketHandler()


class ConnectionHost(_Interface):
    """What runs a connection provides it (the server, today): the settings
    and the shared threads, and word when the connection's thread is done."""

    options: Options
    timers: "Timers"
    flusher: "Flusher"

    def _release(self, conn: "Connection") -> None: ...


class ClientView(_Interface):
    """What ``ctx.server`` is to the connection: its block, and the set of
    clients it joins and leaves (a :class:`~gaman_sync.BlockServer`)."""

    block: "Block"

    @property
    def clients(self) -> List["Connection"]: ...

    def broadcast(self, message: Union[str, bytes], exclude: Any = None) -> int: ...

    def _attach(self, conn: "Connection") -> None: ...

    def _detach(self, conn: "Connection") -> None: ...


class ReadyState(IntEnum):
    """The state of a connection, numbered as ``WebSocket.readyState``."""

    CONNECTING = 0
    OPEN = 1
    CLOSING = 2
    CLOSED = 3


class Connection:
    """A WebSocket connection: the ``ctx`` a block's handler is called with.

    ``send``, ``ping``, ``close`` and ``terminate`` may be called from any
    thread. The callbacks run in this connection's own thread, one at a time.
    Attributes may be set on it freely (``ctx.user = ...``).
    """

    # __dict__ stays so that users can hang their own attributes on ctx.
    __slots__ = ("id", "server", "request", "subprotocol", "thread", "_sock", "_remote",
                 "_host", "_options", "_lock", "_room", "_proto", "_pending",
                 "_pending_size", "_watched", "_handler", "_opened", "_attached", "_aborted",
                 "_abort_close", "_finished", "_reading", "_close_timer", "_ping_timer",
                 "_unanswered_since", "_next_ping", "__dict__", "__weakref__")

    def __init__(self, sock: socket.socket, remote_address: Any, host: ConnectionHost,
                 conn_id: int, request: Request, server: ClientView,
                 subprotocol: Optional[str] = None,
                 trailing_data: bytes = b"") -> None:
        self.id = conn_id
        """A number unique among the connections of this server."""
        self.server = server
        """The block's server (``clients``, ``broadcast``; ``root`` is the whole server)."""
        self.request = request
        """The opening handshake's request (path, query, headers, remote address)."""
        self.subprotocol = subprotocol
        """The subprotocol selected in the handshake, or ``None``."""
        self.thread: Optional[threading.Thread] = None
        """The connection's thread."""
        self._sock = sock
        self._host = host
        self._options: Options = host.options
        self._lock = threading.Lock()
        self._room: Optional[threading.Condition] = None
        self._proto = Protocol(self._options.max_message_size, trailing_data)
        self._pending: Optional[Deque[Union[bytes, memoryview]]] = None
        self._pending_size = 0
        self._watched = False
        self._handler = _EMPTY_HANDLER
        self._opened = False  # the handler gave its callbacks: on_close is owed
        self._attached = False  # in its block's clients
        self._aborted = False
        self._abort_close: Optional[tuple] = None  # close code for a drop without the lock
        self._finished = False
        self._reading = False  # the thread waits in recv(), not in a callback
        self._close_timer: Optional[Timer] = None
        self._ping_timer: Optional[Timer] = None
        self._unanswered_since: Optional[float] = None
        self._next_ping = 0.0
        self._remote = remote_address

    def __repr__(self) -> str:
        return (f"<Connection {self.id} {self.ready_state.name} from "
                f"{format_address(self._remote)}>")

    # -- The public API ---------------------------------------------------

    @property
    def ready_state(self) -> ReadyState:
        """OPEN, CLOSING (a close frame was sent or received, or TCP is being
        dropped) or CLOSED (``on_close`` is due or done), as ``readyState``."""
        if self._finished:
            return ReadyState.CLOSED
        if not self._proto.is_open:
            return ReadyState.CLOSING
        return ReadyState.OPEN

    @property
    def remote_address(self) -> Any:
        """The peer's address, as ``socket.getpeername()`` gives it."""
        return self._remote

    @property
    def buffered_amount(self) -> int:
        """Bytes queued for sending that the kernel has not taken yet."""
        return self._pending_size

    @property
    def close_code(self) -> Optional[int]:
        """The close code that ended (or is ending) the connection, once known."""
        return self._proto.close_code

    def send(self, message: Union[str, bytes, bytearray, memoryview],
             timeout: Optional[float] = None) -> None:
        """Send a text (``str``) or binary (``bytes``) message. Thread-safe.

        Returns once the message is handed to the kernel or queued. If it
        does not fit in the outgoing buffer's ``write_limit`` (a peer reading
        slower than we send), waits for room up to ``timeout`` seconds
        (default: the ``send_timeout`` option) and then raises
        :class:`SendTimeout`. A message larger than ``write_limit`` is sent
        once the buffer is empty. Raises :class:`ConnectionClosed` once the
        connection is closing.
        """
        header, payload = encode_frame(message)
        size = len(header) + len(payload)
        with self._lock:
            if not self._proto.is_open:
                raise self._closed_error()
            if self._pending_size and self._pending_size + size > self._options.write_limit:
                self._wait_for_room(size, self._options.send_timeout if timeout is None
                                    else timeout)
            self._write_frame(header, payload)

    def ping(self, data: Union[bytes, str] = b"") -> None:
        """Send a ping (at most 125 bytes); the pong reaches ``on_pong``."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        with self._lock:
            self._write(self._proto.ping(data))

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake; ``on_close`` follows once it completes
        (or after ``close_timeout`` if the peer does not answer). Thread-safe;
        does nothing if the connection is already closing."""
        check_close_code(code)
        if len(reason.encode("utf-8")) > 123:
            raise ValueError("a close reason is at most 123 bytes of UTF-8")
        self._close(code, reason)

    def terminate(self) -> None:
        """Drop the TCP connection at once, without a closing handshake.

        ``on_close`` reports 1006, as for a connection that was lost."""
        with self._lock:
            if not self._finished:
                self._proto.close_code = ABNORMAL
                self._proto.close_reason = ""
                self._proto.abandon()
        self._abort()

    # -- The write path ----------------------------------------------------

    def _write(self, data: bytes) -> None:
        """Queue or send ``data``; the caller holds ``_lock``."""
        if not data:
            return
        if self._pending is not None:
            self._pending.append(data)
            self._pending_size += len(data)
            return
        try:
            sent = _send_now(self._sock, data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._write_failed()
            return
        if sent < len(data):
            self._queue(memoryview(data)[sent:])

    def _write_frame(self, header: bytes, payload: bytes) -> None:
        """Queue or send one data frame; the caller holds ``_lock``."""
        if len(payload) <= _JOIN_LIMIT:
            self._write(header + payload)
            return
        if self._pending is not None:
            self._write(header)
            self._write(payload)
            return
        try:
            sent = self._sock.sendmsg((header, payload), (), _DONTWAIT)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._write_failed()
            return
        if sent < len(header):
            self._queue(header[sent:])
            self._queue(payload)
        elif sent < len(header) + len(payload):
            self._queue(memoryview(payload)[sent - len(header):])

    def _queue(self, chunk: Union[bytes, memoryview]) -> None:
        if self._pending is None:
            self._pending = deque()
        self._pending.append(chunk)
        self._pending_size += len(chunk)
        if not self._watched:
            self._watched = True
            self._host.flusher.watch(self._sock, self._flush)

    def _flush(self) -> bool:
        """Send what the kernel takes (writer thread); True when all is sent."""
        with self._lock:
            pending = self._pending
            while pending:
                chunk = pending[0]
                try:
                    sent = _send_now(self._sock, chunk)
                except BlockingIOError:
                    return False
                except OSError:
                    self._write_failed()
                    return True
                self._pending_size -= sent
                if sent < len(chunk):
                    pending[0] = memoryview(chunk)[sent:]
                    self._notify_room()
                    return False
                pending.popleft()
            self._pending = None
            self._watched = False
            self._notify_room()
            return True

    def _write_failed(self) -> None:
        """The peer is gone (reset or broken pipe): drop what is queued; the
        reader sees the end of the stream and finishes the connection."""
        self._pending = None
        self._pending_size = 0
        self._notify_room()
        self._proto.abandon()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _notify_room(self) -> None:
        if self._room is not None:
            self._room.notify_all()

    def _room_condition(self) -> threading.Condition:
        """Signalled (under ``_lock``) whenever the outgoing buffer shrinks;
        made on first use, since most connections never wait for room."""
        if self._room is None:
            self._room = threading.Condition(self._lock)
        return self._room

    def _wait_for_room(self, size: int, timeout: Optional[float]) -> None:
        """Wait, with ``_lock`` held, until ``size`` more bytes fit in
        ``write_limit`` (or the buffer is empty)."""
        room = self._room_condition()
        deadline = None if timeout is None else time.monotonic() + timeout
        limit = self._options.write_limit
        while self._pending_size and self._pending_size + size > limit:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise SendTimeout(f"no room in the outgoing buffer (write_limit {limit} "
                                  f"bytes) for {timeout} s: the peer is not reading")
            room.wait(remaining)
            if not self._proto.is_open:
                raise self._closed_error()

    def _broadcast_frame(self, frame: bytes) -> bool:
        """Queue a frame encoded for everyone; never waits. Returns False if
        this client was skipped (closing) or closed for being over the limit."""
        with self._lock:
            if not self._proto.is_open:
                return False
            if self._pending_size <= self._options.write_limit:
                self._write(frame)
                return True
            # The close frame would wait behind the backlog the peer is not
            # reading, so it is only recorded, and TCP is dropped at once.
            self._proto.close(1008, "outgoing buffer over write_limit")
            self._proto.abandon()
            self._pending = None
            self._pending_size = 0
            self._notify_room()
        logger.warning("connection %s: closed with 1008, its outgoing buffer is over "
                       "write_limit (%s bytes): the client is not reading", self.id,
                       self._options.write_limit)
        self._abort()
        return False

    def _closed_error(self) -> ConnectionClosed:
        return ConnectionClosed(self._proto.close_code, self._proto.close_reason)

    # -- Closing -----------------------------------------------------------

    def _close(self, code: int, reason: str, lock_timeout: float = -1) -> bool:
        """Send our close frame; False if already closing. With a
        ``lock_timeout``, a lock that stays taken is not waited for: TCP is
        dropped and ``code`` is reported, without the closing handshake."""
        if not self._lock.acquire(timeout=lock_timeout):
            self._abort_close = (code, reason)
            self._abort()
            return True
        try:
            data = self._proto.close(code, reason)
            if not data:
                return False
            self._write(data)
            if self._options.close_timeout is not None and not self._finished:
                self._close_timer = self._host.timers.call_later(
                    self._options.close_timeout, self._close_timed_out)
        finally:
            self._lock.release()
        return True

    def _close_timed_out(self) -> None:
        if not self._finished:
            logger.info("connection %s: no answer to our close frame in %s s; dropping it",
                        self.id, self._options.close_timeout)
            self._abort()

    def _abort(self) -> None:
        """Drop TCP now (from any thread): the reader wakes up and finishes."""
        self._aborted = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _fail_from_outside(self, code: int, reason: str) -> None:
        """Send a close frame if possible, and drop TCP without waiting."""
        with self._lock:
            self._write(self._proto.close(code, reason))
            self._proto.abandon(code, reason)
        self._abort()

    # -- Keepalive ---------------------------------------------------------

    def _start_keepalive(self) -> None:
        interval = self._options.ping_interval
        if interval is not None:
            self._next_ping = time.monotonic() + interval
            self._ping_timer = self._host.timers.call_later(interval, self._keepalive)

    def _keepalive(self) -> None:
        """Timer: ping every ``ping_interval``; fail the connection when a ping
        has waited ``ping_timeout`` for its pong. Any pong answers."""
        options = self._options
        now = time.monotonic()
        timeout = options.ping_timeout
        since = self._unanswered_since
        if since is not None and timeout is not None and now - since >= timeout:
            if self._reading:
                logger.info("connection %s: no pong in %s s; closing it", self.id, timeout)
                self._fail_from_outside(1011, "keepalive ping timeout")
                return
            # A callback holds the connection's thread: the pong may be
            # waiting unread. Judge the peer once the thread reads again.
            since = self._unanswered_since = now - timeout + min(timeout, 1.0)
        with self._lock:
            if not self._proto.is_open or self._finished:
                return
            if now >= self._next_ping:
                if since is None:
                    # Set before the ping goes out: its pong may be handled
                    # before this thread runs another line.
                    self._unanswered_since = since = now
                self._write(self._proto.ping(b""))
                self._next_ping = now + cast(float, options.ping_interval)
            wake = self._next_ping
            if since is not None and timeout is not None:
                wake = min(wake, since + timeout)
            self._ping_timer = self._host.timers.call_later(max(wake - now, 0.0),
                                                            self._keepalive)

    # -- The connection's thread -------------------------------------------

    def run(self, response: bytes = b"") -> None:
        """The connection's thread: send the handshake's ``response`` (the
        101), then serve until ``on_close``. Never raises."""
        try:
            with self._lock:
                # Joined before the 101 goes out, and under the lock that any
                # broadcast takes: no broadcast can precede the 101 on the
                # wire, nor miss a client that has received it.
                self.server._attach(self)
                self._attached = True
                self._write(response)
            self._serve()
        except Exception:
            logger.exception("connection %s: unexpected error", self.id)
        finally:
            self._finish()

    def _linger(self) -> None:
        """Half-close and read until the peer closes too (or ``close_timeout``),
        so that unread input does not turn our last bytes into a reset."""
        sock = self._sock
        try:
            sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + (self._options.close_timeout or 10.0)
            while not self._aborted:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                sock.settimeout(remaining)
                if not sock.recv(65536):
                    return
        except OSError:
            pass

    def _serve(self) -> None:
        try:
            handler = as_handler(self.server.block.websocket(self))
        except Exception as exc:
            logger.error("connection %s: the block's handler raised; closing with 1011",
                         self.id, exc_info=exc)
            self._close(1011, "internal error")
            self._read_until_closed()
            return
        self._handler = handler
        self._opened = True
        self._start_keepalive()
        if handler.on_open is not None:
            self._call("on_open", handler.on_open)
        self._read_until_closed()

    def _read_until_closed(self) -> None:
        sock = self._sock
        recv: Callable[[int], bytes] = sock.recv
        if _recv_gated is not None and sock.gettimeout() is None:
            # Queues for the GIL behind the C helper's gate (see _speedups.c).
            recv = functools.partial(_recv_gated, sock.fileno())
        lock = self._lock
        proto = self._proto
        handler = self._handler
        on_message = handler.on_message
        size = _RECV_MIN
        event: Any  # one of protocol's event classes, told apart by type()
        while True:
            # Everything the last read brought in, one event at a time.
            while True:
                with lock:
                    out, event = proto.next_event()
                    if out:
                        self._write(out)
                if event is None:
                    break
                kind = type(event)  # dispatch on the exact type: cheaper than isinstance
                if kind is Message:
                    if on_message is not None:
                        try:
                            on_message(event.data)
                        except Exception as exc:
                            self._callback_failed("on_message", exc)
                elif kind is Pong:
                    self._unanswered_since = None
                    if handler.on_pong is not None:
                        self._call("on_pong", handler.on_pong, event.data)
                elif kind is Closed:
                    self._wait_flushed()
                    return
                elif kind is Failed:
                    logger.info("connection %s: failed with %s: %s", self.id,
                                event.code, event.reason)
                    self._wait_flushed()
                    self._linger()
                    return
            if self._pending_size > self._options.write_limit:
                self._wait_drained_below_limit()
            self._reading = True
            try:
                data = recv(size)
            except OSError:
                data = b""
            self._reading = False
            if not data:
                with lock:
                    proto.abandon()
                return
            if len(data) == size:
                if size < _RECV_MAX:
                    size <<= 2
            elif size > _RECV_MIN and len(data) < size >> 4:
                size >>= 2
            with lock:
                proto.receive_data(data)

    def _wait_drained_below_limit(self) -> None:
        """Backpressure on the peer: while what we owe it (pongs, echoes) is
        over ``write_limit``, stop reading what would make us owe more. A peer
        that floods pings and never reads is held by TCP, not by our memory."""
        with self._lock:
            room = self._room_condition()
            limit = self._options.write_limit
            while self._pending_size > limit and self._pending is not None \
                    and not self._aborted:
                room.wait(1.0)

    def _wait_flushed(self) -> None:
        """Let the writer thread send our last frames (within ``close_timeout``)."""
        with self._lock:
            if self._pending is None:
                return
            room = self._room_condition()
            deadline = time.monotonic() + (self._options.close_timeout or 10.0)
            while self._pending is not None and not self._aborted:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                room.wait(remaining)

    def _call(self, name: str, callback: Callable[..., Any], *args: Any) -> None:
        try:
            callback(*args)
        except Exception as exc:
            self._callback_failed(name, exc)

    def _callback_failed(self, name: str, exc: Exception) -> None:
        logger.error("connection %s: %s raised", self.id, name, exc_info=exc)
        on_error = self._handler.on_error
        if on_error is None:
            return
        try:
            on_error(exc)
        except Exception as error_exc:
            logger.error("connection %s: on_error raised; closing with 1011", self.id,
                         exc_info=error_exc)
            try:
                self._close(1011, "internal error")
            except OSError:
                pass

    def _finish(self) -> None:
        with self._lock:
            self._finished = True
            proto = self._proto
            if self._abort_close is not None:
                proto.abandon(*self._abort_close)
            proto.abandon()
            self._pending = None
            self._pending_size = 0
            self._notify_room()
            watched, self._watched = self._watched, False
        for timer in (self._close_timer, self._ping_timer):
            if timer is not None:
                timer.cancel()
        if watched:
            self._host.flusher.forget(self._sock)
        try:
            _close_now(self._sock)
        except OSError:
            pass
        try:
            if self._attached:
                self.server._detach(self)
            if self._opened:
                on_close = self._handler.on_close
                if on_close is not None:
                    try:
                        on_close(proto.close_code or ABNORMAL, proto.close_reason)
                    except Exception:
                        logger.exception("connection %s: on_close raised", self.id)
        finally:
            self._host._release(self)


def interrupted_connection_code() -> bool:
    """True if the calling thread is inside this module's code further up its
    stack: a signal handler that interrupted a ``send`` or a broadcast, which
    may be holding a connection's lock. (Callbacks run in connection threads,
    never in the main thread where signal handlers run.)"""
    if threading.current_thread() is not threading.main_thread():
        return False
    frame: Optional[FrameType] = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename == __file__:
            return True
        frame = frame.f_back
    return False


