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
from ..protocol.state import Protocol, State
from .handler import WebSocketHandler

__all__ = ["Connection", "ReadyState", "interrupted_connection_code"]

logger = logging.getLogger("gaman_sync")

# Reads start small and grow while they come back full: an idle connection
# blocks in recv() holding a small buffer (socket.recv allocates it up
# front; the C helper reads this much into its stack and holds none), a
# large message is read in large chunks.
_RECV_MIN = 2048  # the C helper's STACK_RECV
_RECV_MAX = 512 * 1024
# Below this, header and payload are joined and sent with one send(); above
# it, sendmsg() sends both without copying the payload.
_JOIN_LIMIT = 16 * 1024
_EMPTY_HANDLER = WebSocketHandler()
_ABNORMAL = int(CloseCode.ABNORMAL_CLOSURE)
# The paths every message takes compare the protocol's state with this, not
# through its is_open property: a property call is a Python frame, which
# costs about what two counter increments cost.
_OPEN = State.OPEN
_monotonic = time.monotonic
_LONG_AGO = 1e-9  # a time before any monotonic() reading, and true


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
                 "options", "messages_out", "bytes_out", "messages_in", "bytes_in",
                 "_finished", "_watched", "transport", "runtime", "thread", "_remote",
                 "handler", "_opened", "_reading", "_ping_timer", "_unanswered_since",
                 "_next_ping", "_preamble", "__dict__", "__weakref__")

    # What most connections never set, or set only as they end, is read
    # from the class until then: no slot (8 bytes each, on every idle
    # connection) and no assignment in __init__.
    _room: Optional[threading.Condition] = None  # made by the first wait for room
    _aborted = False  # TCP dropped by abort()
    # (code, reason, force) of a drop that could not take the lock
    _abort_close: Optional[Tuple[int, str, bool]] = None
    _close_timer: Optional[Timer] = None
    _started = 0.0  # when it opened, if DEBUG was on then (for the last DEBUG line)
    _dropped = 0  # messages not delivered because our close had started
    _refused = False
    _loan: Optional[_Loan] = None  # lending the reading: see lend_reader()
    # The keepalive waited once for a read just started (see _keepalive).
    _fresh_read_waited = False
    hold_events: Optional[Callable[[], None]] = None
    """For subclasses: called before each event while received bytes wait
    to be handled; it may wait (a client's recv() hand-off)."""

    def __init__(self, transport: Transport, protocol: Protocol, runtime: Runtime,
                 options: Options, remote_address: Any = None,
                 handler: Optional[WebSocketHandler] = None,
                 preamble: Optional[bytes] = None) -> None:
        self.thread: Optional[threading.Thread] = None
        """The connection's thread, once it runs."""
        self.transport = transport
        """What the connection reads and writes (see :mod:`gaman_sync.io.transport`)."""
        self._send_fn, self._send_arg = transport.send_target()  # every write calls it
        # Traffic counters: plain ints bumped where the work is done anyway
        # (the write path under the lock, the reader in its own thread), so
        # they are exact without a lock of their own.
        self.messages_in = 0
        """Messages received (whole messages, delivered or not)."""
        self.bytes_in = 0
        """Bytes read after the opening handshake: every frame, headers and
        control frames included."""
        self.messages_out = 0
        """Messages sent (each ``send``, and each broadcast that reached it)."""
        self.bytes_out = 0
        """Bytes written after the opening handshake, handed to the kernel or
        queued for it: every frame, headers and control frames included."""
        self.runtime = runtime
        """The shared threads it uses (timers, writer)."""
        self.options = options
        """Its settings."""
        self.handler = handler or _EMPTY_HANDLER
        """The callbacks it dispatches to."""
        self._remote = remote_address
        self._lock = threading.Lock()
        self._proto = protocol
        self._outgoing: Optional[Deque[Union[bytes, memoryview]]] = None
        self._outgoing_size = 0
        self._watched = False
        self._opened = False  # the callbacks are known: on_close is owed
        self._finished = False
        # When the thread began waiting in recv() (0.0: it is in a callback
        # or handling what it read; see _read_until_closed)
        self._reading = 0.0
        self._ping_timer: Optional[Timer] = None
        self._unanswered_since: Optional[float] = None
        self._next_ping = 0.0
        if logger.isEnabledFor(logging.DEBUG):  # for the DEBUG line at the end only
            self._started = time.monotonic()
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
            if self._proto.state is not _OPEN:
                raise self._closed_error()
            if self._outgoing_size and self._outgoing_size + size > self.options.write_limit:
                self._wait_for_room(size, self.options.send_timeout if timeout is None
                                    else timeout)
            # Counted before the write: once its bytes are out, a stats()
            # call (another thread, maybe the peer's) must see it counted.
            self.messages_out += 1
            self._write_frame(header, payload)

    def send_frame(self, frame: bytes, timeout: Optional[float] = None) -> None:
        """:meth:`send` for a data frame the caller encoded whole (a client's,
        masked by the C helper: see :attr:`Protocol.encode_whole`)."""
        size = len(frame)
        with self._lock:
            if self._proto.state is not _OPEN:
                raise self._closed_error()
            if self._outgoing_size and self._outgoing_size + size > self.options.write_limit:
                self._wait_for_room(size, self.options.send_timeout if timeout is None
                                    else timeout)
            self.messages_out += 1  # before the write, as in send()
            self._write(frame)

    def send_in_order(self, message: Data, timeout: Optional[float] = None) -> None:
        """:meth:`send` for a protocol whose frames must be encoded in wire
        order (a compressor with context takeover): room is waited for
        first, then the frame is encoded and written under the lock."""
        size = len(message)  # the uncompressed size bounds the room to wait for
        with self._lock:
            if self._proto.state is not _OPEN:
                raise self._closed_error()
            if self._outgoing_size and self._outgoing_size + size > self.options.write_limit:
                self._wait_for_room(size, self.options.send_timeout if timeout is None
                                    else timeout)
            header, payload = self._proto.encode(message)
            self.messages_out += 1  # before the write, as in send()
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
            if self._proto.state is not _OPEN or self._outgoing_size > self.options.write_limit:
                return False
            self.messages_out += 1  # before the write, as in send()
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
        self.reclaim_reader()

    def close_nowait(self, code: int, reason: str, lock_timeout: float) -> bool:
        """:meth:`close` for an owner that must not wait (a shutdown): if the
        lock stays taken for ``lock_timeout`` seconds, TCP is dropped and
        ``code`` reported, without the closing handshake. False if the
        connection was already closing."""
        return self._close(code, reason, lock_timeout)

    # -- Lending the reading (a client's recv() reads in its own thread) ------

    def lend_reader(self, condition: threading.Condition) -> None:
        """Ask the connection's thread to let callers of :meth:`read_message`
        read the transport in their own threads, from its next read on.

        The thread then waits, holding nothing, until a caller hands back
        what it cannot handle (the peer's close, a protocol error, the end
        of the stream), or until the callers have stayed away for
        ``_LOAN_CHECK`` seconds, or until the connection is dropped or closed
        by us: then it reads again. ``condition`` is notified when the reading
        is lent or given back; the caller holds it, and must always pass the
        same one."""
        loan = self._loan
        if loan is None:
            loan = self._loan = _Loan(condition)
        loan.asked = True

    def reader_lent(self) -> bool:
        """True if a :meth:`read_message` call would read now (the caller
        holds the condition given to :meth:`lend_reader`)."""
        loan = self._loan
        return loan is not None and loan.lent and not loan.borrowed

    @property
    def reader(self) -> str:
        """Who reads the transport: ``"thread"`` (the connection's thread),
        ``"lent"`` (lent to :meth:`read_message` callers, none reading now)
        or ``"borrowed"`` (one is reading now). A snapshot, for logs and tests."""
        loan = self._loan
        if loan is None or not loan.lent:
            return "thread"
        return "borrowed" if loan.borrowed else "lent"

    def read_message(self, timeout: Optional[float] = None) -> Optional[Union[str, bytes]]:
        """Read the next message in the calling thread, once the connection's
        thread has lent its reading (:meth:`lend_reader`); one thread at a
        time. Pings are answered and pongs noted on the way, as the
        connection's thread does. ``None`` when the reading is not lent, or
        when the connection is ending (the connection's thread finishes it:
        wait for it). Raises ``TimeoutError`` after ``timeout`` seconds; the
        reading stays lent."""
        loan = self._loan
        if loan is None:
            return None
        cond = loan.cond
        # The condition's own acquire and release (its lock's, C calls): the
        # with statement would add two Python calls to every message.
        cond.acquire()
        if not loan.lent or loan.borrowed:
            cond.release()
            return None
        loan.borrowed = True
        cond.release()
        # The loop below runs in the caller's thread, written out in this one
        # method (a frame less per message): what the last read brought in,
        # one event at a time, then a read, until a message or something the
        # connection's thread must handle (then handed, and None returned).
        handed = False
        try:
            proto = self._proto
            lock = self._lock
            deadline = 0.0
            event: Any = None
            if proto.unparsed:
                # What the last read brought in after the message it returned
                # (usually nothing: a request-response exchange reads it all).
                with lock:
                    out, event = proto.next_event()
                    if out:
                        self._write(out)
            while True:
                while event is not None:
                    kind = type(event)
                    if kind is MessageReceived:
                        self.messages_in += 1
                        if proto.state is _OPEN:
                            return event.data  # type: ignore[no-any-return]
                        self._dropped += 1  # our close started: see the module's docstring
                    elif kind is PongReceived:
                        self._unanswered_since = None
                        if self.handler.on_pong is not None:
                            self._call("on_pong", self.handler.on_pong, event.data)
                    else:  # the peer's close or a protocol error: the thread's job
                        loan.handed = event
                        handed = True
                        return None
                    with lock:
                        out, event = proto.next_event()
                        if out:
                            self._write(out)
                if self._aborted or self._outgoing_size > self.options.write_limit:
                    # Dropped, or owing the peer more than write_limit: the
                    # thread waits for the writer before it reads on.
                    handed = True
                    return None
                size = loan.size
                try:
                    if timeout is None:
                        data = self.transport.recv(size)
                    elif not deadline:  # the first read: the clock starts
                        if timeout <= 0:
                            raise TimeoutError(f"no message in {timeout} s")
                        deadline = _monotonic() + timeout
                        data = self.transport.recv_for(size, timeout)
                    else:
                        remaining = deadline - _monotonic()
                        if remaining <= 0:
                            raise TimeoutError(f"no message in {timeout} s")
                        data = self.transport.recv_for(size, remaining)
                except socket.timeout:
                    raise TimeoutError(f"no message in {timeout} s") from None
                except TimeoutError:
                    raise  # ours, above (an OSError too on Python 3.9)
                except OSError:
                    data = b""
                received = len(data)
                if not received:
                    loan.handed = _END
                    handed = True
                    return None
                self.bytes_in += received
                if received == size:
                    if size < _RECV_MAX:
                        loan.size = size << 2
                elif size > _RECV_MIN and received < size >> 4:
                    loan.size = size >> 2
                with lock:
                    out, event = proto.next_event(data)
                    if out:
                        self._write(out)
        finally:
            cond.acquire()
            loan.borrowed = False
            loan.visits += 1
            if handed or loan.reclaim:
                loan.reclaim = False
                loan.lent = False
                cond.notify_all()
            cond.release()

    def reclaim_reader(self) -> None:
        """Give the reading back to the connection's thread now if no caller
        is reading, or as soon as the one reading returns (we closed, or are
        dropping the connection: the thread finishes it)."""
        loan = self._loan
        if loan is None:
            return
        with loan.cond:
            if not loan.lent:
                return
            if loan.borrowed:
                loan.reclaim = True
            else:
                loan.lent = False
                loan.cond.notify_all()

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
            if self._preamble is not None:  # opening() did not send it
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
            # The preamble is the handshake's, and what was held was counted
            # when it was written: neither counts here.
            counted = self.bytes_out
            self._write(preamble)
            if held:
                for chunk in held:
                    self._write(chunk)
                self._notify_room()  # a send() may be waiting for the held bytes to go
            self.bytes_out = counted

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
        size = len(data)
        if not size:
            return
        self.bytes_out += size
        if self._outgoing is not None:
            self._outgoing.append(data)
            self._outgoing_size += size
            return
        try:
            sent = self._send_fn(self._send_arg, data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._write_failed()
            return
        if sent < size:
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
        self.bytes_out += len(header) + len(payload)
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
        if self._loan is not None:
            self.reclaim_reader()  # the answer to our close is the thread's to read
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
            reading = self._reading
            if reading:
                fresh = min(timeout, 1.0) / 2
                if now - reading >= fresh or self._fresh_read_waited:
                    logger.info("%s: no pong in %s s; closing it", self, timeout)
                    self._fail_from_outside(1011, "keepalive ping timeout")
                    return
                # The thread started this read a moment ago, back from a
                # callback with the ping out: the pong may be in it (its
                # bytes back from the kernel, the thread waiting for the
                # GIL this timer holds). Once per ping, judge after it.
                self._fresh_read_waited = True
                since = self._unanswered_since = reading + fresh - timeout
            else:
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
                    if self._fresh_read_waited:  # (read from the class until first set)
                        self._fresh_read_waited = False
                self._write(self._proto.ping(b""))
                self._next_ping = now + cast(float, options.ping_interval)
            wake = self._next_ping
            if since is not None and timeout is not None:
                wake = min(wake, since + timeout)
            self._ping_timer = self.runtime.timers.call_later(max(wake - now, 0.0),
                                                              self._keepalive)

    # -- The connection's thread -------------------------------------------

    def _serve(self) -> None:
        if self._started:
            logger.debug("%s: opened", self)
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
        pending: Any = None  # an event a borrower of the reading handed back
        while True:
            # Everything the last read brought in, one event at a time.
            while True:
                if pending is None:
                    if hold is not None and proto.has_buffered_input():
                        hold()
                    with lock:
                        out, event = proto.next_event()
                        if out:
                            self._write(out)
                    if event is None:
                        break
                else:
                    event, pending = pending, None
                kind = type(event)  # dispatch on the exact type: cheaper than isinstance
                if kind is MessageReceived:
                    self.messages_in += 1
                    if proto.state is not _OPEN:
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
            if self._loan is not None and self._loan.asked:
                pending = self._lend(self._loan)
                if pending is _END:
                    with lock:
                        proto.abandon()
                    return
                continue
            # Reading from when: now if a ping is out (the keepalive judges
            # a read just started apart), else from long ago (any pong will
            # be read as soon as it comes).
            self._reading = _monotonic() if self._unanswered_since is not None else _LONG_AGO
            try:
                data = recv(size)
            except OSError:
                data = b""
            self._reading = 0.0
            received = len(data)
            if not received:
                with lock:
                    proto.abandon()
                return
            self.bytes_in += received
            if received == size:
                if size < _RECV_MAX:
                    size <<= 2
            elif size > _RECV_MIN and received < size >> 4:
                size >>= 2
            with lock:
                proto.receive_data(data)

    def _lend(self, loan: _Loan) -> Any:
        """Lend the reading (see :meth:`lend_reader`) and wait until it comes
        back; the event a borrower handed back, or None."""
        cond = loan.cond
        with cond:
            loan.asked = False
            if self._aborted or self._finished:
                return None
            loan.lent = True
            loan.seen = loan.visits
            loan.generation += 1
            cond.notify_all()
            # Someone reads, or will within _LOAN_CHECK: the keepalive may
            # judge the peer by its pongs.
            self._reading = _LONG_AGO
            self.runtime.timers.call_later(_LOAN_CHECK, self._check_loan, loan.generation)
            while loan.lent:
                cond.wait()
            self._reading = 0.0
            handed, loan.handed = loan.handed, None
        return handed

    def _check_loan(self, generation: int) -> None:
        """Timer: take the reading back from callers that stay away."""
        loan = self._loan
        if loan is None:
            return
        with loan.cond:
            if not loan.lent or loan.generation != generation:
                return  # given back meanwhile (and maybe lent again, with its own timer)
            if loan.borrowed or loan.visits != loan.seen:
                loan.seen = loan.visits
                self.runtime.timers.call_later(_LOAN_CHECK, self._check_loan, generation)
                return
            loan.lent = False
            loan.cond.notify_all()

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
        if self._started:  # DEBUG was on when it opened: one check per connection
            logger.debug("%s: closed with %s %r after %.3f s%s", self, code,
                         proto.close_reason, time.monotonic() - self._started,
                         f"; {self._dropped} message(s) that came after our close were not "
                         "delivered" if self._dropped else "")
        if self._opened:
            on_close = self.handler.on_close
            if on_close is not None:
                try:
                    on_close(code, proto.close_reason)
                except Exception:
                    logger.exception("%s: on_close raised", self)


# Seconds after which the connection's thread takes back a reading it lent
# (lend_reader) if no borrower came to read meanwhile: its pings and close are
# then handled without the application's help.
_LOAN_CHECK = 0.05
# Handed back by a borrower that met the end of the stream.
_END = object()


class _Loan:
    """The state of a lent reading, guarded by ``cond``."""

    __slots__ = ("cond", "asked", "lent", "borrowed", "reclaim", "handed", "visits", "seen",
                 "size", "generation")

    def __init__(self, cond: threading.Condition) -> None:
        self.cond = cond
        self.asked = False     # the thread is to lend at its next read
        self.lent = False      # borrowers read; the thread waits
        self.borrowed = False  # one is reading now
        self.reclaim = False   # the thread wants it back when that one returns
        self.handed: Any = None  # for the thread: an event, or _END
        self.visits = 0        # read_message calls so far
        self.seen = 0          # visits at the last check
        self.size = _RECV_MIN  # the borrowers' read size, grown as for the thread
        self.generation = 0    # counts the lendings: a timer checks its own


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
