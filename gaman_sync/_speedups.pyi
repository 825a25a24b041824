# Types of the optional C helpers (see _speedups.c for why they exist).
from typing import Tuple, Union

Buffer = Union[bytes, bytearray, memoryview]

def xor_mask(data: Union[bytearray, memoryview], key: bytes) -> None:
    """XOR a writable buffer in place with a 4-byte key, from the key's first byte."""

def send(fd: int, data: Buffer, flags: int = 0) -> int:
    """``socket.send()`` with MSG_DONTWAIT (and MSG_NOSIGNAL), keeping the GIL."""

def recv(fd: int, size: int, flags: int) -> bytes:
    """``socket.recv()`` with MSG_DONTWAIT, keeping the GIL."""

def recv_gated(fd: int, size: int) -> bytes:
    """A blocking ``socket.recv()`` that queues for the GIL behind the gate."""

def accept(fd: int) -> Tuple[int, bytes]:
    """(new descriptor, raw peer address) from a non-blocking listener (Linux)."""

def close(fd: int) -> None:
    """Close a socket's descriptor, keeping the GIL."""

def client_frame(message: Union[str, bytes, bytearray, memoryview]) -> bytes:
    """A client's whole data frame (str as text, bytes-likes as binary),
    masked with a fresh key from a pool of ``os.urandom`` bytes."""

def recv_for(fd: int, size: int, timeout: float) -> bytes:
    """poll() up to ``timeout`` seconds, then recv(), in one release of the
    GIL; ``socket.timeout`` if nothing came."""
