"""Socket calls that cannot block, made without giving up the GIL if the C
helper is built.

CPython releases the GIL around every socket call. With other threads
waiting for it, each release hands it over, and the caller, back from a call
that took a few microseconds, sleeps until it gets it back: two context
switches that buy nothing when the call could not block anyway. Under load a
thread-per-connection server pays them on every small write, so these calls
go through ``gaman_sync._speedups`` where it exists (see ``_speedups.c``),
and through the socket's own methods with ``MSG_DONTWAIT`` where it does not.
Both raise ``BlockingIOError`` when the kernel takes or has nothing.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any, Tuple, Union

__all__ = ["DONTWAIT", "FLAGS_SUFFICE", "send", "recv", "close", "accept", "make_blocking",
           "recv_gated", "recv_for", "send_fd", "use_speedups", "speedups_status", "send_plain",
           "recv_plain", "close_plain", "accept_plain"]

# Non-blocking, and no SIGPIPE (which would kill a program that restored its
# default action) when the peer is gone.
DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0) | getattr(socket, "MSG_NOSIGNAL", 0)
# Where MSG_DONTWAIT exists, a blocking socket can be read and written
# without blocking call by call; elsewhere the socket itself must be put in
# non-blocking mode for that.
FLAGS_SUFFICE = hasattr(socket, "MSG_DONTWAIT")
# Linux's accept4() gives a blocking socket whatever the listener's mode;
# BSD's accept() (macOS) passes the listener's O_NONBLOCK on.
ACCEPT_GIVES_BLOCKING = sys.platform.startswith("linux")

Data = Union[bytes, bytearray, memoryview]

_missing = ""  # why the C helper is not in use, for the log line at start
try:
    from .._speedups import close as _c_close
    from .._speedups import recv as _c_recv
    from .._speedups import recv_gated as _c_recv_gated
    from .._speedups import send as _c_send
except ImportError as exc:  # not built, or not POSIX
    _c_send = _c_recv = _c_close = _c_recv_gated = None  # type: ignore[assignment]
    _missing = str(exc)
try:
    from .._speedups import recv_for as _c_recv_for
except ImportError:  # not built, or built before it existed
    _c_recv_for = None  # type: ignore[assignment]
try:
    from .._speedups import accept as _c_accept
except ImportError:  # not built, or not Linux
    _c_accept = None  # type: ignore[assignment]


def send_plain(sock: socket.socket, data: Data) -> int:
    """Send what the kernel takes now; the count of bytes sent."""
    return sock.send(data, DONTWAIT)


def recv_plain(sock: socket.socket, size: int) -> bytes:
    """Up to ``size`` bytes that have arrived (``b""`` at end of stream)."""
    return sock.recv(size, DONTWAIT)


def close_plain(sock: socket.socket) -> None:
    """``sock.close()``."""
    sock.close()


def accept_plain(listener: socket.socket) -> Tuple[socket.socket, Any]:
    """``listener.accept()``, as ``accept`` is where the C helper is not built."""
    return listener.accept()


def _c_accept_socket(listener: socket.socket) -> Tuple[socket.socket, Any]:
    """``listener.accept()`` through the C helper's accept4()."""
    fd, raw = _c_accept(listener.fileno())
    try:
        sock = socket.socket(listener.family, listener.type, listener.proto, fileno=fd)
    except OSError:
        os.close(fd)
        raise
    return sock, _peer_address(listener.family, raw, sock)


def _peer_address(family: int, raw: bytes, sock: socket.socket) -> Any:
    """The address that ``accept()`` gives, from the raw ``sockaddr``."""
    if family == socket.AF_INET and len(raw) >= 8:
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), int.from_bytes(raw[2:4], "big")
    if family == socket.AF_INET6 and len(raw) >= 28:
        scope_id = int.from_bytes(raw[24:28], sys.byteorder)
        if scope_id:  # a link-local peer: its host names the interface (fe80::1%eth0)
            return sock.getpeername()
        return (socket.inet_ntop(socket.AF_INET6, raw[8:24]), int.from_bytes(raw[2:4], "big"),
                int.from_bytes(raw[4:8], "big"), 0)
    return sock.getpeername()


def make_blocking(sock: socket.socket) -> None:
    """Put an accepted socket in blocking mode for its connection's thread,
    unless it already is: a program-wide ``socket.setdefaulttimeout()``, or
    a non-blocking listener's mode passed on by BSD's ``accept()``, would
    otherwise make an idle connection's read fail."""
    if sock.gettimeout() is not None or not ACCEPT_GIVES_BLOCKING or not FLAGS_SUFFICE:
        sock.setblocking(True)


def _c_send_socket(sock: socket.socket, data: Data) -> int:
    """Send what the kernel takes now; the count of bytes sent."""
    return _c_send(sock.fileno(), data, DONTWAIT)


def _c_recv_socket(sock: socket.socket, size: int) -> bytes:
    """Up to ``size`` bytes that have arrived (``b""`` at end of stream)."""
    return _c_recv(sock.fileno(), size, DONTWAIT)


def _c_close_socket(sock: socket.socket) -> None:
    """``sock.close()`` (a socket without SO_LINGER never waits to close)."""
    fd = sock.detach()
    if fd >= 0:
        _c_close(fd)


# The calls in use: rebound together by use_speedups().
send = send_plain
recv = recv_plain
close = close_plain
accept = accept_plain
send_fd: Any = None
"""``send_fd(fd, data)``: the C helper's non-blocking send on a descriptor
(bound to one by a transport, a write then runs no Python frame), or None
where it is not built."""
recv_gated: Any = None
"""``recv_gated(fd, size)``: a blocking recv that queues for the GIL behind
the C helper's gate (see ``_speedups.c``), or None where it is not built."""
recv_for: Any = None
"""``recv_for(fd, size, timeout)``: poll() then recv() in one release of the
GIL, ``socket.timeout`` when nothing came, or None where it is not built."""
_enabled = False


def use_speedups(enabled: bool = True) -> bool:
    """Make these calls go through the C helper (the default where it is
    built) or through the socket's own methods. Affects sockets used from then
    on; returns whether the C helper is now in use."""
    global send, recv, close, accept, recv_gated, recv_for, send_fd, _enabled
    on = bool(enabled) and _c_send is not None
    send, recv, close = (_c_send_socket, _c_recv_socket, _c_close_socket) if on \
        else (send_plain, recv_plain, close_plain)
    accept = _c_accept_socket if on and _c_accept is not None else accept_plain
    recv_gated = _c_recv_gated if on else None
    recv_for = _c_recv_for if on else None
    send_fd = _c_send if on else None
    _enabled = on
    return on


def speedups_status() -> Tuple[bool, str]:
    """(in use, why not): whether the C helper makes the socket calls and
    unmasks, and if not, the reason."""
    if _enabled:
        return True, ""
    if _c_send is None:
        package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        checkout = os.path.dirname(package)
        if os.path.isfile(os.path.join(checkout, "setup.py")):
            # Imported from a source checkout: only a build in place helps
            # (an installed copy elsewhere is shadowed by this folder).
            fix = (f"with a C compiler, run 'pip install -e .' in {checkout}, which "
                   f"builds it in place")
        else:
            fix = ("reinstall with a C compiler "
                   "(pip install --force-reinstall --no-deps gaman_sync)")
        return False, f"it is not built ({_missing}); {fix}"
    return False, "turned off with use_speedups(False)"


use_speedups(True)
