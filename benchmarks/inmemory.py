"""The in-memory ceiling: what parsing and answering a message costs with no
socket and no thread, through wsproto alone and through gaman_sync's
protocol glue.

    python benchmarks/inmemory.py [--seconds S]

For each case, one side receives client frames (masked, as a browser sends
them) already in memory and produces the echo's bytes; the time per message
is the best of several runs, on one core. No real server can answer faster
than this, whatever its I/O.

- ``wsproto`` uses wsproto as its documentation shows: a ``WSConnection``
  after the handshake, ``receive_data``, ``events()``, ``send(Message)``.
- ``gaman_sync`` is ``gaman_sync.protocol.Protocol`` (wsproto's
  ``FrameProtocol`` underneath, our own unmasked header for the reply), with
  the optional C helper if it is built.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable, Tuple

from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, Request, TextMessage
from wsproto.frame_protocol import FrameProtocol

from gaman_sync.protocol import Protocol, Side, encode_frame

SMALL = "x" * 32
LARGE = bytes(range(256)) * 4096  # 1 MiB
CHUNK = 256 * 1024  # how a large message arrives: in reads of this size


def client_frames(message, count: int = 1) -> bytes:
    client = FrameProtocol(client=True, extensions=[])
    return b"".join(bytes(client.send_data(message, True)) for _ in range(count))


def wsproto_server() -> WSConnection:
    server = WSConnection(ConnectionType.SERVER)
    client = WSConnection(ConnectionType.CLIENT)
    server.receive_data(client.send(Request(host="localhost", target="/")))
    for event in server.events():
        assert isinstance(event, Request)
    client.receive_data(server.send(AcceptConnection()))
    list(client.events())
    return server


def wsproto_echo(wire: bytes, chunk: int) -> Callable[[], int]:
    server = wsproto_server()

    def run() -> int:
        replies = 0
        parts = []
        for i in range(0, len(wire), chunk):
            server.receive_data(wire[i:i + chunk])
            for event in server.events():
                if isinstance(event, (TextMessage, BytesMessage)):
                    parts.append(event.data)
                    if event.message_finished:
                        data = parts[0] if len(parts) == 1 else parts[0][:0].join(parts)
                        parts = []
                        server.send(type(event)(data=data))
                        replies += 1
        return replies

    return run


def gaman_echo(wire: bytes, chunk: int) -> Callable[[], int]:
    proto = Protocol(Side.SERVER, 16 << 20)

    def run() -> int:
        replies = 0
        for i in range(0, len(wire), chunk):
            proto.receive_data(wire[i:i + chunk])
            while True:
                _, event = proto.next_event()
                if event is None:
                    break
                _header, _payload = encode_frame(event.data)
                replies += 1
        return replies

    return run


def best(run: Callable[[], int], messages: int, seconds: float) -> float:
    """Seconds per message, the best of runs for ``seconds``."""
    assert run() == messages  # also a warm-up
    fastest = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        run()
        fastest = min(fastest, time.perf_counter() - start)
    return fastest / messages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per case (default 2)")
    args = parser.parse_args()
    small_count = 1000
    small = client_frames(SMALL, small_count)
    large = client_frames(LARGE)
    helper = "with" if Protocol(Side.SERVER).unmasks_in_c else "without"
    print(f"gaman_sync {helper} its C helper; one core, no I/O\n")
    print("| case | 32 B text: µs per message | messages/s | 1 MiB binary: ms per MiB | MiB/s |")
    print("|---|--:|--:|--:|--:|")
    cases: Tuple[Tuple[str, Callable], ...] = (("wsproto (WSConnection)", wsproto_echo),
                                               ("gaman_sync protocol", gaman_echo))
    for name, make in cases:
        # Small messages arrive one per read, as in a ping-pong echo.
        per_small = best(make(small, len(small) // small_count), small_count, args.seconds)
        per_large = best(make(large, CHUNK), 1, args.seconds)
        print(f"| {name} | {per_small * 1e6:.2f} | {1 / per_small:,.0f} | "
              f"{per_large * 1e3:.2f} | {1 / per_large:,.0f} |")


if __name__ == "__main__":
    main()
