"""The connection engine that servers and clients share.

Theory of operation
-------------------
Each connection has exactly one thread (:meth:`Connection.run`). It reads its
transport in large chunks, feeds everything that arrived to the protocol
state machine (:mod:`gaman_sync.protocol`, wsproto underneath) and runs the
callbacks. It is the only thread that reads the transport and the only one
that closes it; any other thread that wants the connection gone shuts the
transport down, which wakes the reader.

Any thread may write (``send``, ``ping``, ``close``, a broadcast, the
keepalive timer, the reader's own pong and close replies). Every write
happens under ``_lock``, which also guards the protocol state, so frames are
whole and in order on the wire. Writes never block under the lock: a frame
goes to the kernel with a non-blocking send; whatever the kernel does not
take waits in ``_outgoing`` and the runtime's one writer thread
(:mod:`gaman_sync.io.flusher`) sends it when the transport is writable. A
peer that stops reading therefore costs buffer space, bounded by
``write_limit``, and never a blocked thread: ``send`` waits (up to its
timeout) for room, and :meth:`Connection.send_frame_nowait` refuses.

What differs between a server's and a client's connection is small and
lives in the subclasses: what happens before the read loop
(:meth:`Connection.opening`: a server sends its 101 and runs the block's
handler) and how the owner learns that the connection ended (the owner runs
:meth:`Connection.run` in its thread and acts when it returns). Masking,
and which end closes TCP first, are the protocol's business (its side).

Closing: the first close code recorded wins (ours if we closed first, the
peer's if it did; 1006 when TCP was lost without one). Once our close has
started, messages that still arrive are not delivered: the application said
it is done, and anything it would answer could not be sent. Pings, pongs and
the peer's close are still handled.
"""

from __future__ import annotations

import inspect
import logging
import socket
import sys
import threading
import time
from collections import deque
from enum import IntEnum
from types import FrameType
from typing import Any, Callable, Deque, Optional, Tuple, Union, cast

from ..exceptions import ConnectionClosed, SendTimeout, closed_error
from ..io.runtime import Runtime
from ..io.timers import Timer
from ..io.transport import Transport
from ..options import Options
from ..protocol.events import Closed, Failed, MessageReceived, PongReceived
from ..protocol.frames import CloseCode, Data, check_close_code
from ..protocol.http import format_address
from ..protocol.state import Protocol
from .handler import WebSocketHandler

__all__ = ["Connection", "ReadyState", "interrupted_connection_code"]

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
_ABNORMAL = int(CloseCode.ABNORMAL_CLOSURE)


class ReadyState(IntEnum):
    """The state of a connection, numbered as ``WebSocket.readyState``."""

    CONNECTING = 0
    OPEN = 1
    CLOSING = 2
    CLOSED = 3


class Connection:
    """A WebSocket connection after its opening handshake, either side.

    ``send``, ``ping``, ``close`` and ``terminate`` may be called from any
    thread. The callbacks run in this connection's own thread, one at a time.
    Attributes may be set on it freely (``ctx.user = ...``).
    """

    # __dict__ stays so that users can hang their own attributes on ctx.
    # Slots are laid out in this order: what every write touches comes first,
    # in one cache line, since a broadcast touches it on a thousand connections.
    __slots__ = ("_lock", "_proto", "_outgoing", "_outgoing_size", "_send_fn", "_send_arg",
                 "options",
                 "_finished", "_watched", "_room", "transport", "runtime", "thread", "_remote",
                 "handler", "_opened", "_aborted", "_abort_close", "_reading", "_close_timer",
                 "_ping_timer", "_unanswered_since", "_next_ping", "_started", "_dropped",
                 "_preamble", "_refused", "hold_events", "__dict__", "__weakref__")

    def __init__(self, transport: Transport, protocol: Protocol, runtime: Runtime,
                 options: Options, remote_address: Any = None,
                 handler: Optional[WebSocketHandler] = None,
                 preamble: Optional[bytes] = None) -> None:
        self.thread: Optional[threading.Thread] = None
        """The connection's thread, once it runs."""
        self.transport = transport
        """What the connection reads and writes (see :mod:`gaman_sync.io.transport`)."""
        self._send_fn, self._send_arg = transport.send_target()  # every write calls it
        self.runtime = runtime
        """The shared threads it uses (timers, writer)."""
        self.options = options
        """Its settings."""
        self.handler = handler or _EMPTY_HANDLER
        """The callbacks it dispatches to."""
        self._remote = remote_address
        self._lock = threading.Lock()
        self._room: Optional[threading.Condition] = None
        self._proto = protocol
        self._outgoing: Optional[Deque[Union[bytes, memoryview]]] = None
        self._outgoing_size = 0
        self._watched = False
        self._opened = False  # the callbacks are known: on_close is owed
        self._aborted = False
        # (code, reason, force) for a drop without the lock
        self._abort_close: Optional[Tuple[int, str, bool]] = None
        self._finished = False
        self._reading = False  # the thread waits in recv(), not in a callback
        self._close_timer: Optional[Timer] = None
        self._ping_timer: Optional[Timer] = None
        self._unanswered_since: Optional[float] = None
        self._next_ping = 0.0
        # For the DEBUG line at the end only: a float less per connection otherwise.
        self._started = time.monotonic() if logger.isEnabledFor(logging.DEBUG) else 0.0
        self._dropped = 0  # messages not delivered because our close had started
        self.hold_events: Optional[Callable[[], None]] = None
        """For subclasses: called before each event while received bytes wait
        to be handled; it may wait (a client's recv() hand-off)."""
        self._refused = False
        self._preamble = preamble
        if preamble is not None:
            # Until send_preamble(), every write waits here, unsent, behind
            # the preamble (a server's 101): no frame, not even a shutdown's
            # close, can go out before it. (A list: the writer thread never
            # sees it, and most handlers send nothing before their 101.)
            self._outgoing = []  # type: ignore[assignment]

    # -- The public API ---------------------------------------------------

    @property
    def ready_state(self) -> ReadyState:
        """CONNECTING (a server's handler is running: its 101 is not sent
        yet), OPEN, CLOSING (a close frame was sent or received, or TCP is
        being dropped) or CLOSED (``on_close`` is due or done), as
        ``readyState``."""
        if self._finished:
            return ReadyState.CLOSED
        if self._preamble is not None:
            return ReadyState.CONNECTING
        if not self._proto.is_open:
            return ReadyState.CLOSING
        return ReadyState.OPEN

    @property
    def is_open(self) -> bool:
        """True until a close frame is sent or received, or TCP is lost."""
        return self._proto.is_open and not self._finished

    @property
    def remote_address(self) -> Any:
        """The peer's address, as ``socket.getpeername()`` gives it."""
        return self._remote

    @property
    def buffered_amount(self) -> int:
        """Bytes queued for sending that the kernel has not taken yet."""
        return self._outgoing_size

    @property
    def close_code(self) -> Optional[int]:
        """The close code that ended (or is ending) the connection, once known."""
        return self._proto.close_code

    @property
    def close_reason(self) -> str:
        """The reason that came with :attr:`close_code`."""
        return self._proto.close_reason

    def send(self, message: Data, timeout: Optional[float] = None) -> None:
        """Send a text (``str``) or binary (``bytes``) message. Thread-safe.

        Returns once the message is handed to the kernel or queued. If it
        does not fit in the outgoing buffer's ``write_limit`` (a peer reading
        slower than we send), waits for room up to ``timeout`` seconds
        (default: the ``send_timeout`` option) and then raises
        :class:`~gaman_sync.SendTimeout`. A message larger than
        ``write_limit`` is sent once the buffer is empty. Raises
        :class:`~gaman_sync.ConnectionClosed` once the connection is closing.
        """
        header, payload = self._proto.encode(message)
        size = len(header) + len(payload)
        with self._lock:
            if not self._proto.is_open:
                raise self._closed_error()
            if self._outgoing_size and self._outgoing_size + size > self.options.write_limit:
                self._wait_for_room(size, self.options.send_timeout if timeout is None
                                    else timeout)
            self._write_frame(header, payload)

    def ping(self, data: Union[bytes, str] = b"") -> None:
        """Send a ping (at most 125 bytes); the pong reaches ``on_pong``."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        elif not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes or str, not {type(data).__name__}")
        with self._lock:
            self._write(self._proto.ping(bytes(data)))

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake; ``on_close`` follows once it completes
        (or after ``close_timeout`` if the peer does not answer). Thread-safe;
        does nothing if the connection is already closing."""
        check_close_code(code, reason)
        self._close(code, reason)

    def terminate(self) -> None:
        """Drop the TCP connection at once, without a closing handshake.

        ``on_close`` reports 1006, as for a connection that was lost."""
        self.abort(_ABNORMAL, "", force=True)

    # -- What an owner calls ------------------------------------------------

    def send_frame_nowait(self, frame: bytes) -> bool:
        """Queue a data frame encoded by the caller (one broadcast frame for
        many connections); never waits. Returns False, queuing nothing, if the
        connection is not open or its outgoing buffer is over ``write_limit``:
        the caller decides what that means (:attr:`is_open` tells which)."""
        with self._lock:
            if not self._proto.is_open or self._outgoing_size > self.options.write_limit:
                return False
            self._write(frame)
            return True

    def abort(self, code: Optional[int] = None, reason: str = "", force: bool = False,
              lock_timeout: float = -1) -> None:
        """Drop TCP now, from any thread, discarding what is queued: the
        connection's thread wakes up and finishes. ``code`` is reported to
        ``on_close`` unless one is known (or, with ``force``, in its place).
        With a ``lock_timeout``, a lock held that long (a callback stuck in
        ``send``) is not waited for: the code is recorded for the end."""
        if not self._lock.acquire(timeout=lock_timeout):
            if code is not None:
                self._abort_close = (code, reason, force)
        else:
            try:
                if code is not None and not self._finished:
                    self._proto.abandon(code, reason, force)
                self._drop_outgoing()
            finally:
                self._lock.release()
        self._aborted = True
        self.transport.shutdown()

    def close_nowait(self, code: int, reason: str, lock_timeout: float) -> bool:
        """:meth:`close` for an owner that must not wait (a shutdown): if the
        lock stays taken for ``lock_timeout`` seconds, TCP is dropped and
        ``code`` reported, without the closing handshake. False if the
        connection was already closing."""
        return self._close(code, reason, lock_timeout)

    def run(self) -> None:
        """The connection's thread: :meth:`opening`, then serve until the
        connection ends and ``on_close`` has run. Never raises."""
        self.thread = threading.current_thread()
        try:
            serving = self.opening()
            if self._refused:
                self._wait_flushed()
                self._linger(half_close=True)
                return
            self.send_preamble()
            if serving:
                self._serve()
            else:
                self._read_until_closed()
        except Exception:
            logger.exception("%s: unexpected error", self)
        finally:
            self._finish()

    def opening(self) -> bool:
        """Called first in the connection's thread, to set :attr:`handler`;
        False if the connection must close without serving (it has started
        closing). For subclasses; the base class serves :attr:`handler`."""
        return True

    def send_preamble(self, before: Optional[Callable[[], None]] = None,
                      preamble: Optional[bytes] = None) -> None:
        """Send the preamble (a server's 101; ``preamble`` replaces the one
        given at construction), then what was written while it was held, in
        that order; a no-op once sent. ``before`` runs first, under the write
        lock (a server joins its clients there): no broadcast can then reach
        the connection before its preamble, nor miss it after."""
        with self._lock:
            if self._preamble is None:
                return
            preamble, self._preamble = preamble or self._preamble, None
            held = self._outgoing or ()
            self._outgoing = None
            self._outgoing_size = 0
            if self._aborted or self._finished:
                return
            if before is not None:
                before()
            self._write(preamble)
            for chunk in held:
                self._write(chunk)
            self._notify_room()

    def refuse(self, response: bytes) -> None:
        """Refuse the opening handshake (from :meth:`opening`): send the HTTP
        ``response`` in place of the preamble, drop anything written while it
        was held, and end the connection with a lingering close, never a
        WebSocket frame. ``on_close`` is not called: it never opened."""
        with self._lock:
            self._preamble = None
            self._outgoing = None
            self._outgoing_size = 0
            self._proto.abandon(_ABNORMAL, "handshake refused", force=True)
            self._refused = True
            self._write(response)

    def describe(self) -> str:
        """A few words for log lines: who the peer is."""
        return f"connection from {format_address(self._remote)}"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.ready_state.name} {format_address(self._remote)}>"

    def __str__(self) -> str:
        return self.describe()

    # -- The write path ----------------------------------------------------

    def _write(self, data: Union[bytes, memoryview]) -> None:
        """Queue or send ``data``; the caller holds ``_lock``."""
        if not data:
            return
        if self._outgoing is not None:
            self._outgoing.append(data)
            self._outgoing_size += len(data)
            return
        try:
            sent = self._send_fn(self._send_arg, data)
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
        if self._outgoing is not None:
            self._write(header)
            self._write(payload)
            return
        try:
            sent = self.transport.sendmsg_nowait((header, payload))
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
        if self._outgoing is None:
            self._outgoing = deque()
        self._outgoing.append(chunk)
        self._outgoing_size += len(chunk)
        if not self._watched:
            self._watched = True
            self.runtime.flusher.watch(self.transport, self._flush)

    def _flush(self) -> bool:
        """Send what the kernel takes (writer thread); True when all is sent."""
        with self._lock:
            outgoing = self._outgoing
            while outgoing:
                chunk = outgoing[0]
                try:
                    sent = self._send_fn(self._send_arg, chunk)
                except BlockingIOError:
                    return False
                except OSError:
                    self._write_failed()
                    return True
                self._outgoing_size -= sent
                if sent < len(chunk):
                    outgoing[0] = memoryview(chunk)[sent:]
                    self._notify_room()
                    return False
                outgoing.popleft()
            self._outgoing = None
            self._watched = False
            self._notify_room()
            return True

    def _drop_outgoing(self) -> None:
        """Forget what is queued (the peer is gone, or is being dropped); the
        caller holds ``_lock``."""
        self._outgoing = None
        self._outgoing_size = 0
        self._notify_room()

    def _write_failed(self) -> None:
        """The peer is gone (reset or broken pipe): drop what is queued; the
        reader sees the end of the stream and finishes the connection."""
        self._drop_outgoing()
        self._proto.abandon()
        self.transport.shutdown()

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
        limit = self.options.write_limit
        while self._outgoing_size and self._outgoing_size + size > limit:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise SendTimeout(f"no room in the outgoing buffer (write_limit {limit} "
                                  f"bytes) for {timeout} s: the peer is not reading")
            room.wait(remaining)
            if not self._proto.is_open:
                raise self._closed_error()

    def _closed_error(self) -> ConnectionClosed:
        return closed_error(self._proto.close_code, self._proto.close_reason)

    # -- Closing -----------------------------------------------------------

    def _close(self, code: int, reason: str, lock_timeout: float = -1) -> bool:
        """Send our close frame; False if already closing."""
        if not self._lock.acquire(timeout=lock_timeout):
            self.abort(code, reason, lock_timeout=0)
            return True
        try:
            data = self._proto.close(code, reason)
            if not data:
                return False
            self._write(data)
            timeout = self.options.close_timeout
            if timeout is not None and not self._finished:
                self._close_timer = self.runtime.timers.call_later(timeout,
                                                                   self._close_timed_out)
        finally:
            self._lock.release()
        return True

    def _close_timed_out(self) -> None:
        if not self._finished:
            logger.info("%s: no answer to our close frame in %s s; dropping it", self,
                        self.options.close_timeout)
            self.abort()

    def _fail_from_outside(self, code: int, reason: str) -> None:
        """Send a close frame if possible, and drop TCP without waiting."""
        with self._lock:
            self._write(self._proto.close(code, reason))
            self._proto.abandon(code, reason)
        self.abort()

    # -- Keepalive ---------------------------------------------------------

    def _start_keepalive(self) -> None:
        interval = self.options.ping_interval
        if interval is not None:
            self._next_ping = time.monotonic() + interval
            self._ping_timer = self.runtime.timers.call_later(interval, self._keepalive)

    def _keepalive(self) -> None:
        """Timer: ping every ``ping_interval``; fail the connection when a ping
        has waited ``ping_timeout`` for its pong. Any pong answers."""
        options = self.options
        now = time.monotonic()
        timeout = options.ping_timeout
        since = self._unanswered_since
        if since is not None and timeout is not None and now - since >= timeout:
            if self._reading:
                logger.info("%s: no pong in %s s; closing it", self, timeout)
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
            self._ping_timer = self.runtime.timers.call_later(max(wake - now, 0.0),
                                                              self._keepalive)

    # -- The connection's thread -------------------------------------------

    def _serve(self) -> None:
        self._opened = True
        self._start_keepalive()
        on_open = self.handler.on_open
        if on_open is not None:
            self._call("on_open", on_open)
        self._read_until_closed()

    def _read_until_closed(self) -> None:
        recv = self.transport.recv
        lock = self._lock
        proto = self._proto
        handler = self.handler
        on_message = handler.on_message
        hold = self.hold_events
        size = _RECV_MIN
        event: Any  # one of protocol's event classes, told apart by type()
        while True:
            # Everything the last read brought in, one event at a time.
            while True:
                if hold is not None and proto.has_buffered_input():
                    hold()
                with lock:
                    out, event = proto.next_event()
                    if out:
                        self._write(out)
                if event is None:
                    break
                kind = type(event)  # dispatch on the exact type: cheaper than isinstance
                if kind is MessageReceived:
                    if not proto.is_open:
                        self._dropped += 1  # our close started: see the module's docstring
                    elif on_message is not None:
                        try:
                            on_message(event.data)
                        except Exception as exc:
                            self._callback_failed("on_message", exc)
                elif kind is PongReceived:
                    self._unanswered_since = None
                    if handler.on_pong is not None:
                        self._call("on_pong", handler.on_pong, event.data)
                elif kind is Closed:
                    self._wait_flushed()
                    if not proto.closes_tcp_first:
                        self._linger(half_close=False)
                    return
                elif kind is Failed:
                    logger.info("%s: failed with %s: %s", self, event.code, event.reason)
                    self._wait_flushed()
                    self._linger(half_close=proto.closes_tcp_first)
                    return
            if self._outgoing_size > self.options.write_limit:
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

    def _linger(self, half_close: bool) -> None:
        """Read until the peer closes TCP (or ``close_timeout``): a server
        half-closes first, so that unread input does not turn our last bytes
        into a reset; a client waits for the server to close first (RFC 6455
        7.1.1)."""
        transport = self.transport
        if half_close:
            transport.shutdown(socket.SHUT_WR)
        timeout = self.options.close_timeout
        deadline = time.monotonic() + (timeout if timeout is not None else 10.0)
        try:
            while not self._aborted:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                if not transport.recv_for(65536, remaining):
                    return
        except OSError:
            pass

    def _wait_drained_below_limit(self) -> None:
        """Backpressure on the peer: while what we owe it (pongs, echoes) is
        over ``write_limit``, stop reading what would make us owe more. A peer
        that floods pings and never reads is held by TCP, not by our memory."""
        with self._lock:
            room = self._room_condition()
            limit = self.options.write_limit
            while self._outgoing_size > limit and self._outgoing is not None \
                    and not self._aborted:
                room.wait(1.0)

    def _wait_flushed(self) -> None:
        """Let the writer thread send our last frames (within ``close_timeout``)."""
        with self._lock:
            if self._outgoing is None:
                return
            room = self._room_condition()
            timeout = self.options.close_timeout
            deadline = time.monotonic() + (timeout if timeout is not None else 10.0)
            while self._outgoing is not None and not self._aborted:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                room.wait(remaining)

    def _call(self, name: str, callback: Any, *args: Any) -> None:
        try:
            callback(*args)
        except Exception as exc:
            self._callback_failed(name, exc)

    def _callback_failed(self, name: str, exc: Exception) -> None:
        """A callback raised: ``on_error`` gets it if there is one (and the
        library stays quiet); otherwise it is logged, once, with its traceback."""
        on_error = self.handler.on_error
        if on_error is None:
            if isinstance(exc, ConnectionClosed):
                # Sending on a connection that closed meanwhile: no bug to trace.
                logger.info("%s: %s raised %s", self, name, exc)
            else:
                logger.error("%s: %s raised", self, name, exc_info=exc)
            return
        try:
            on_error(exc)
        except Exception as error_exc:
            logger.error("%s: on_error raised; closing with 1011", self, exc_info=error_exc)
            self._close(1011, "internal error")

    def _finish(self) -> None:
        with self._lock:
            self._finished = True
            proto = self._proto
            if self._abort_close is not None:
                proto.abandon(*self._abort_close)
            proto.abandon()
            self._drop_outgoing()
            watched, self._watched = self._watched, False
        for timer in (self._close_timer, self._ping_timer):
            if timer is not None:
                timer.cancel()
        if watched:
            self.runtime.flusher.forget(self.transport)
        self.transport.close()
        code = proto.close_code or _ABNORMAL
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s: closed with %s %r after %.3f s%s", self, code,
                         proto.close_reason,
                         time.monotonic() - self._started if self._started else 0.0,
                         f"; {self._dropped} message(s) that came after our close were not "
                         "delivered" if self._dropped else "")
        if self._opened:
            on_close = self.handler.on_close
            if on_close is not None:
                try:
                    on_close(code, proto.close_reason)
                except Exception:
                    logger.exception("%s: on_close raised", self)


# The code objects of the engine's methods: any thread holding a connection's
# lock is inside one of them.
_ENGINE_CODE = frozenset(
    member.__code__ for member in vars(Connection).values() if inspect.isfunction(member))


def interrupted_connection_code() -> bool:
    """True if the calling thread (a signal handler's, in the main thread) is
    running inside the engine further up its stack: it interrupted a
    ``send`` or a broadcast, which may be holding a connection's lock.
    (Callbacks run in connection threads, never in the main thread.)"""
    if threading.current_thread() is not threading.main_thread():
        return False
    frame: Optional[FrameType] = sys._getframe(1)
    while frame is not None:
        if frame.f_code in _ENGINE_CODE:
            return True
        frame = frame.f_back
    return False
