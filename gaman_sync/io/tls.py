"""TLS in memory: a transport that encrypts and decrypts with
``ssl.SSLObject`` and two ``ssl.MemoryBIO`` buffers, so that only ciphertext
touches the descriptor.

Theory of operation
-------------------
Why in memory, and not ``ssl.SSLSocket``: everything above the transport
relies on three properties of a plain socket, and an ``SSLSocket`` breaks
each of them. The write path sends without ever blocking (``MSG_DONTWAIT``
on a socket in blocking mode, through the C helper); an ``SSLSocket``
refuses flags and ``sendmsg``, and switching it to non-blocking mode would
break its connection thread's blocking reads. The reader waits in a blocking
``recv`` behind the C helper's gate; an ``SSLSocket`` reads through OpenSSL
with the GIL released and retaken on every record. The accept thread carries
every socket through its handshake in one selector, never blocking; an
``SSLSocket``'s handshake is either blocking (a thread per slow client) or
needs the non-blocking mode again. With the TLS state in memory, the socket
stays the plain ``socket.socket`` it was, reads and writes of ciphertext are
the same non-blocking calls on the same descriptor, and the engine, the
writer thread and the accept thread do not change: they see a
:class:`~.transport.Transport` that takes and gives plaintext.

Writing. ``SSLObject.write`` is all or nothing: once plaintext is encrypted
it cannot be given back. A write encrypts at most ``_CHUNK`` bytes at a time
and hands the ciphertext to the kernel without blocking; when the kernel
does not take all of it, the rest waits here (``_pending``, at most one
chunk's ciphertext) and the write stops, reporting the plaintext it
encrypted. The engine queues what was not reported and asks the writer
thread to call again when the descriptor is writable; each call first
drains ``_pending``, and raises ``BlockingIOError`` (took nothing) while it
cannot. One case needs care: when the *last* chunk of a write leaves
ciphertext behind, all of the plaintext was taken, and the engine, with
nothing queued, would stop watching the descriptor with our ciphertext
unsent. So the write then reports one byte fewer than it encrypted: the
engine keeps that byte queued and the descriptor watched, and when it offers
the byte again (always first: the engine resends what a write did not take
before anything else) it is counted as taken without being encrypted twice
(``_owed``). Backpressure stays the engine's: its ``write_limit`` counts
what it holds, and this transport holds at most one chunk more.

Threads. An ``SSL`` object must not be used by two threads at once, and a
connection has two: its reader decrypts while any thread (under the
connection's lock) encrypts. A lock of the transport's own serializes every
use of the ``SSLObject`` and the two buffers; it is held for memory work
only, never across a blocking call, and taken after the connection's lock,
never before, so the two cannot deadlock. The reader's blocking ``recv`` of
ciphertext happens outside it.

Closing. A graceful half-close (``shutdown(SHUT_WR)``, which the engine
calls once its close frame is out) sends a TLS ``close_notify`` before the
TCP FIN; a peer's ``close_notify`` reads as the end of the stream, and so
does a TCP end without one (the WebSocket closing handshake already tells a
truncation from a clean end).

The handshake itself is driven by the owner: the accept thread feeds what
arrives (:meth:`TLSTransport.feed`, :meth:`TLSTransport.do_handshake`) and
sends what it owes without blocking; a client runs
:meth:`TLSTransport.handshake_blocking` in its own thread.
"""

from __future__ import annotations

import functools
import math
import select
import socket
import ssl
import threading
import time
from typing import Any, Callable, Optional, Sequence, Tuple, Union

from ..exceptions import InvalidHandshake
from . import nonblocking
from .transport import Transport

__all__ = ["TLSTransport", "InvalidCertificate"]

Buffer = Union[bytes, bytearray, memoryview]

# Plaintext encrypted per step of a write: at most this much ciphertext (plus
# record overhead) waits in the transport when the kernel is full.
_CHUNK = 64 * 1024
_RECORD = 16 * 1024  # the largest plaintext of a TLS record
_WANT_READ = ssl.SSLWantReadError
_HAS_POLL = hasattr(select, "poll")  # not on Windows


class TLSTransport(Transport):
    """A TLS connection over a plain socket in blocking mode, TLS in memory
    (see the module's docstring)."""

    __slots__ = ("sock", "ssl", "_in", "_out", "_lock", "_pending", "_owed", "_raw_recv",
                 "_raw_send", "_close", "_fd", "handshake_done", "_poller")

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, server_side: bool,
                 server_hostname: Optional[str] = None) -> None:
        self.sock = sock
        """The socket, which only ever carries ciphertext."""
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.ssl = context.wrap_bio(self._in, self._out, server_side=server_side,
                                    server_hostname=server_hostname)
        """The ``ssl.SSLObject`` (``version()``, ``cipher()``, ``getpeercert()``)."""
        self._lock = threading.Lock()
        self._pending: Optional[memoryview] = None  # ciphertext the kernel has not taken
        self._owed = 0  # plaintext bytes encrypted but not yet reported as taken
        self._fd = sock.fileno()
        native = type(sock) is socket.socket
        gated = nonblocking.recv_gated if native else None
        self._raw_recv: Callable[[int], bytes] = (functools.partial(gated, self._fd)
                                                  if gated is not None else sock.recv)
        send_fd = nonblocking.send_fd if native else None
        self._raw_send: Callable[[Buffer], int] = (
            functools.partial(send_fd, self._fd) if send_fd is not None
            else functools.partial(nonblocking.send_plain, sock))
        self._close = nonblocking.close if native else nonblocking.close_plain
        self.handshake_done = False
        """True once the TLS handshake has completed."""
        self._poller: Optional[Any] = None  # made by the first recv_for

    # -- The handshake, driven by the owner -------------------------------

    def feed(self, data: bytes) -> None:
        """Ciphertext that arrived (the accept thread reads it)."""
        with self._lock:
            self._in.write(data)

    def do_handshake(self) -> bool:
        """Advance the handshake with what was fed; True once complete. What
        it owes the peer is then in :attr:`wants_write` (send it with
        :meth:`flush_nowait`). Raises ``ssl.SSLError`` when it fails."""
        with self._lock:
            try:
                self.ssl.do_handshake()
            except _WANT_READ:
                return False
            finally:
                self._take_output()
            self.handshake_done = True
            return True

    def read_available(self) -> bytes:
        """All the plaintext that what was fed decrypts to (``b""``: none yet).
        Raises ``EOFError`` at the peer's ``close_notify``, ``ssl.SSLError``
        on bad input."""
        with self._lock:
            data = self._decrypt(1 << 30)
        if data is None:
            return b""
        if not data:
            raise EOFError("the peer closed TLS")
        return data

    def write_nowait(self, data: bytes) -> None:
        """Encrypt ``data`` into :attr:`wants_write`, sending nothing yet
        (the accept thread's refusals)."""
        with self._lock:
            self.ssl.write(data)
            self._take_output()

    def close_notify(self) -> None:
        """Queue a TLS ``close_notify`` (to be sent by :meth:`flush_nowait`)."""
        with self._lock:
            self._unwrap()

    @property
    def wants_write(self) -> bool:
        """Is ciphertext waiting for the kernel?"""
        return self._pending is not None

    def flush_nowait(self) -> bool:
        """Send waiting ciphertext without blocking; True when none is left.
        Raises ``OSError`` when the peer is gone."""
        with self._lock:
            return self._drain()

    def handshake_blocking(self, deadline: Optional[float]) -> None:
        """Run the handshake in the calling thread, until ``deadline``
        (``time.monotonic()``; ``socket.timeout`` after). Raises
        ``ssl.SSLError`` (``ssl.SSLCertVerificationError`` for a certificate
        that does not verify)."""
        while True:
            done = self.do_handshake()
            self._sendall_pending(deadline)
            if done:
                return
            data = self._recv_raw_until(65536, deadline)
            if not data:
                raise ssl.SSLEOFError(ssl.SSL_ERROR_EOF,
                                      "the peer closed the connection during the TLS handshake")
            self.feed(data)

    def sendall_blocking(self, data: bytes, deadline: Optional[float]) -> None:
        """Encrypt and send all of ``data``, waiting until ``deadline`` at most
        (the client's handshake request)."""
        self.write_nowait(data)
        self._sendall_pending(deadline)

    def _sendall_pending(self, deadline: Optional[float]) -> None:
        sock = self.sock
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return
        self._set_timeout(deadline)
        try:
            sock.sendall(pending)
        finally:
            sock.settimeout(None)

    def _recv_raw_until(self, size: int, deadline: Optional[float]) -> bytes:
        self._set_timeout(deadline)
        try:
            return self.sock.recv(size)
        finally:
            self.sock.settimeout(None)

    def _set_timeout(self, deadline: Optional[float]) -> None:
        if deadline is None:
            self.sock.settimeout(None)
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("timed out")
        self.sock.settimeout(remaining)

    # -- The Transport interface ---------------------------------------------

    def send_nowait(self, data: Buffer) -> int:
        return self._send(data)

    def send_target(self) -> Tuple[Callable[[Any, Buffer], int], Any]:
        return TLSTransport._send, self

    def _send(self, data: Buffer) -> int:
        with self._lock:
            if self._pending is not None and not self._drain():
                raise BlockingIOError("the kernel holds enough of this connection's data")
            size = len(data)
            taken = 0
            owed = self._owed
            if owed:
                # The byte (or bytes) held back by the last write, offered
                # again: already encrypted, they only need to be counted.
                taken = min(owed, size)
                self._owed = owed - taken
                if taken == size:
                    return size
            return self._encrypt_and_send(data, taken, size)

    def sendmsg_nowait(self, buffers: Sequence[Buffer]) -> int:
        # The engine calls this for a large frame, header and payload: the
        # header joins the first chunk of the payload, so that it does not
        # cost a TLS record of its own.
        if len(buffers) == 2 and len(buffers[0]) < _CHUNK:
            head, body = buffers
            split = _CHUNK - len(head)
            first = bytes(head) + bytes(memoryview(body)[:split])
            sent = self._send(first)
            if sent < len(first) or split >= len(body):
                return sent
            try:
                return sent + self._send(memoryview(body)[split:])
            except BlockingIOError:
                return sent
        return self._send(b"".join(buffers))

    def _encrypt_and_send(self, data: Buffer, taken: int, size: int) -> int:
        """Encrypt ``data[taken:]`` chunk by chunk while the kernel takes the
        ciphertext; the plaintext count taken. The caller holds the lock."""
        write = self.ssl.write
        read = self._out.read
        view = memoryview(data) if taken or size > _CHUNK else data
        while True:
            end = min(taken + _CHUNK, size)
            write(view[taken:end] if view is not data else data)
            taken = end
            cipher = read()
            try:
                sent = self._raw_send(cipher)
            except BlockingIOError:
                sent = 0
            if sent < len(cipher):
                self._pending = memoryview(cipher)[sent:]
                break
            if taken == size:
                return size
        if taken == size:
            # See the module's docstring: one byte is reported as not taken,
            # so that the engine keeps the descriptor watched.
            self._owed = 1
            taken -= 1
            if not taken:
                raise BlockingIOError("the kernel took part of this connection's data")
        return taken

    def _drain(self) -> bool:
        """Send ``_pending``; True when it is all gone. The caller holds the lock."""
        pending = self._pending
        assert pending is not None
        try:
            sent = self._raw_send(pending)
        except BlockingIOError:
            return False
        if sent < len(pending):
            self._pending = pending[sent:]
            return False
        self._pending = None
        return True

    def _take_output(self) -> None:
        """Move what OpenSSL wrote to the outgoing buffer behind ``_pending``."""
        if self._out.pending:
            out = self._out.read()
            pending = self._pending
            self._pending = memoryview(out if pending is None else bytes(pending) + out)

    def _decrypt(self, size: int) -> Optional[bytes]:
        """Up to ``size`` bytes of plaintext from what was fed: None when a
        whole record has not arrived, ``b""`` at the peer's ``close_notify``.
        The caller holds the lock."""
        read = self.ssl.read
        try:
            # OpenSSL returns one record (16 KiB at most) per call, in a
            # buffer of the size asked for: asking for more would allocate it.
            data = read(size if size < _RECORD else _RECORD)
        except _WANT_READ:
            data = None
        else:
            # Gather what else arrived.
            if data and len(data) < size and self._in.pending:
                parts = [data]
                total = len(data)
                while total < size and self._in.pending:
                    try:
                        more = read(min(size - total, _RECORD))
                    except _WANT_READ:
                        break
                    if not more:
                        break  # close_notify after data: the next call ends the stream
                    parts.append(more)
                    total += len(more)
                data = b"".join(parts)
        if self._out.pending:
            # A post-handshake message asked for an answer (a TLS 1.3 key
            # update): it goes out now if the kernel takes it, else before
            # the next write.
            self._take_output()
            try:
                self._drain()
            except OSError:
                pass
        return data

    def recv(self, size: int) -> bytes:
        lock = self._lock
        with lock:
            # What an earlier read left: more records, or the rest of one.
            data = self._decrypt(size) if self._in.pending or self.ssl.pending() else None
        if data is not None:
            return data
        raw_recv = self._raw_recv
        incoming = self._in
        while True:
            raw = raw_recv(size)
            if not raw:
                return b""
            with lock:
                incoming.write(raw)
                data = self._decrypt(size)
            if data is not None:
                return data

    def recv_for(self, size: int, timeout: float) -> bytes:
        # As PlainTransport does: wait with poll(), then read in blocking
        # mode (a socket timeout would switch the descriptor's mode twice).
        # A client's recv(timeout) comes here for every message.
        deadline = time.monotonic() + timeout
        with self._lock:
            data = self._decrypt(size) if self._in.pending or self.ssl.pending() else None
        while data is None:
            poller = self._poller
            if poller is None and _HAS_POLL:
                poller = self._poller = select.poll()
                poller.register(self._fd, select.POLLIN)
            if poller is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not poller.poll(math.ceil(remaining * 1000)):
                    raise socket.timeout("timed out")
                raw = self._raw_recv(size)
            else:
                raw = self._recv_raw_until(size, deadline)  # socket.timeout at the deadline
            if not raw:
                return b""
            with self._lock:
                self._in.write(raw)
                data = self._decrypt(size)
        return data

    def shutdown(self, how: int = socket.SHUT_RDWR) -> None:
        if how == socket.SHUT_WR:
            # A graceful half-close: close_notify first, if the kernel takes it.
            try:
                with self._lock:
                    self._unwrap()
                    if self._pending is not None:
                        self._drain()
            except OSError:
                pass
        try:
            self.sock.shutdown(how)
        except OSError:
            pass

    def _unwrap(self) -> None:
        """Write our close_notify; the caller holds the lock."""
        try:
            self.ssl.unwrap()
        except (_WANT_READ, ssl.SSLError, ValueError):
            pass  # sent, not answered yet (or the handshake never finished)
        self._take_output()

    def close(self) -> None:
        try:
            self._close(self.sock)
        except OSError:
            pass

    def fileno(self) -> int:
        return self.sock.fileno()

    def __repr__(self) -> str:
        return f"<TLSTransport fd={self.sock.fileno()} {self.ssl.version() or 'handshaking'}>"


class InvalidCertificate(InvalidHandshake, ssl.SSLCertVerificationError):
    """The server's TLS certificate does not verify (untrusted, expired, for
    another host): the message names the URL and the reason.

    Also an ``ssl.SSLCertVerificationError`` (so an ``ssl.SSLError`` and an
    ``OSError``), as other TLS clients raise: code that catches either works.
    ``url``, ``verify_code`` and ``verify_message`` say what and why.
    """

    def __init__(self, url: str, error: ssl.SSLCertVerificationError) -> None:
        self.url = url
        why = error.verify_message or error.reason or str(error)
        ssl.SSLCertVerificationError.__init__(
            self, error.errno, f"the TLS certificate of {url} does not verify: {why}")
        # None where the error did not carry one (typeshed has no None here).
        self.verify_code = getattr(error, "verify_code", None)  # type: ignore[assignment]
        self.verify_message = getattr(error, "verify_message", None)  # type: ignore[assignment]
        self.reason = getattr(error, "reason", None)  # type: ignore[assignment]
        self.library = getattr(error, "library", None)  # type: ignore[assignment]

    def __str__(self) -> str:
        return str(self.args[1])
