"""Transports: what a connection reads from and writes to.

Theory of operation
-------------------
The connection engine never touches a socket. It needs five things of its
transport, and the transport decides how to do each on what it wraps:

- ``send_nowait(data)`` / ``sendmsg_nowait(buffers)``: hand bytes to the kernel
  without ever blocking, returning the count taken, raising
  ``BlockingIOError`` when it takes nothing and ``OSError`` when the peer is
  gone;
- ``recv(size)``: wait for bytes (``b""`` at end of stream);
- ``recv_for(size, timeout)``: the same, for at most ``timeout`` seconds
  (``socket.timeout`` then);
- ``shutdown(how)``: wake a thread blocked in ``recv`` from another thread;
- ``close()``, and ``fileno()`` for the writer thread's selector.

:class:`PlainTransport` wraps a plain ``socket.socket`` in blocking mode and
makes these calls through the C helper where it is built
(:mod:`.nonblocking`): on the raw descriptor, keeping the GIL for the calls
that cannot block, and queueing for the GIL behind the helper's gate after a
blocking read. Only a socket whose type is exactly ``socket.socket`` gets the
C calls; a subclass (a TLS socket, a WSGI server's socket under gevent) gets
the socket's own methods, since its descriptor does not carry its bytes.
"""

from __future__ import annotations

import functools
import math
import select
import socket
from typing import Any, Callable, Optional, Sequence, Tuple, Union

from . import nonblocking

__all__ = ["Transport", "PlainTransport"]

_HAS_POLL = hasattr(select, "poll")  # not on Windows

Buffer = Union[bytes, bytearray, memoryview]


def _call(function: Callable[[Buffer], int], data: Buffer) -> int:
    return function(data)


class Transport:
    """The interface a connection uses (see the module's docstring)."""

    def send_nowait(self, data: Buffer) -> int:
        """Bytes the kernel took now; ``BlockingIOError`` if none."""
        raise NotImplementedError

    def sendmsg_nowait(self, buffers: Sequence[Buffer]) -> int:
        """``send_nowait`` of several buffers at once, without joining them."""
        raise NotImplementedError

    def send_target(self) -> Tuple[Callable[[Any, Buffer], int], Any]:
        """``(function, argument)`` with ``function(argument, data)`` doing what
        ``send_nowait(data)`` does: what a connection calls on every write.
        By default the argument is ``send_nowait`` itself."""
        return _call, self.send_nowait

    def recv(self, size: int) -> bytes:
        """Wait for up to ``size`` bytes; ``b""`` at end of stream."""
        raise NotImplementedError

    def recv_for(self, size: int, timeout: float) -> bytes:
        """``recv`` for at most ``timeout`` seconds (``socket.timeout`` after)."""
        raise NotImplementedError

    def shutdown(self, how: int = socket.SHUT_RDWR) -> None:
        """Shut the stream down in one or both directions; never raises."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the transport; never raises."""
        raise NotImplementedError

    def fileno(self) -> int:
        """A descriptor a selector can wait on for writability."""
        raise NotImplementedError


class PlainTransport(Transport):
    """A plain TCP (or Unix) socket in blocking mode."""

    __slots__ = ("sock", "recv", "recv_for", "_send", "_close", "_native", "_poller")

    def __init__(self, sock: socket.socket) -> None:
        if sock.gettimeout() is not None:
            raise ValueError("PlainTransport needs a socket in blocking mode "
                             "(sock.settimeout(None))")
        self.sock = sock
        """The socket."""
        # Only a socket.socket proper: the C helper works on the descriptor.
        self._native = type(sock) is socket.socket
        gated = nonblocking.recv_gated if self._native else None
        # recv is bound once per connection: the read loop calls it directly
        # (an instance attribute in the method's place, hence the ignore).
        recv = functools.partial(gated, sock.fileno()) if gated is not None else sock.recv
        self.recv: Callable[[int], bytes] = recv  # type: ignore[assignment]
        self._send = nonblocking.send if self._native else nonblocking.send_plain
        self._close = nonblocking.close if self._native else nonblocking.close_plain
        self._poller: Optional[select.poll] = None  # made by the first recv_for
        # Likewise: the C helper's poll() and recv() in one call where it is built.
        waited = nonblocking.recv_for if self._native else None
        self.recv_for: Callable[[int, float], bytes] = (
            functools.partial(waited, sock.fileno()) if waited is not None
            else self._recv_for_poll)  # type: ignore[assignment]

    @property
    def uses_speedups(self) -> bool:
        """True when the C helper makes this transport's socket calls."""
        return self._native and self._send is not nonblocking.send_plain

    def send_nowait(self, data: Buffer) -> int:
        return self._send(self.sock, data)

    def sendmsg_nowait(self, buffers: Sequence[Buffer]) -> int:
        return self.sock.sendmsg(buffers, (), nonblocking.DONTWAIT)

    def send_target(self) -> Tuple[Callable[[Any, Buffer], int], Any]:
        # The C helper's send and the descriptor: a write then touches no
        # object but the connection (a broadcast does it on every client).
        # The descriptor stays this socket's until the connection closes it,
        # after its last write.
        send_fd = nonblocking.send_fd if self._native else None
        if send_fd is not None:
            return send_fd, self.sock.fileno()
        return _call, self.send_nowait

    def _recv_for_poll(self, size: int, timeout: float) -> bytes:
        # recv_for without the C helper.
        # Wait with poll(), then read in blocking mode, where the bytes are:
        # two system calls, where a socket timeout costs four (it switches
        # the descriptor to non-blocking and back around its own poll). A
        # client's recv(timeout) comes here for every message.
        poller = self._poller
        if poller is None:
            if not _HAS_POLL:
                return self._recv_with_timeout(size, timeout)
            poller = self._poller = select.poll()
            poller.register(self.sock.fileno(), select.POLLIN)
        if not poller.poll(max(0, math.ceil(timeout * 1000))):
            raise socket.timeout("timed out")
        return self.recv(size)

    def _recv_with_timeout(self, size: int, timeout: float) -> bytes:
        sock = self.sock
        sock.settimeout(timeout)
        try:
            return sock.recv(size)
        finally:
            try:
                sock.settimeout(None)
            except OSError:
                pass

    def shutdown(self, how: int = socket.SHUT_RDWR) -> None:
        try:
            self.sock.shutdown(how)
        except OSError:
            pass

    def close(self) -> None:
        try:
            self._close(self.sock)
        except OSError:
            pass

    def fileno(self) -> int:
        return self.sock.fileno()

    def __repr__(self) -> str:
        return f"<PlainTransport fd={self.sock.fileno()}>"
