"""Pathological request heads: does reading them grow in step with their size?

    python benchmarks/request_parser.py [--sizes 4096,16384,65536] [--h11-max 16384]

The server reads each handshake's request head with two regular expressions
(``gaman_sync.protocol.handshake.RequestParser``). A backtracking engine can
take time that grows with the square of the input (or worse) on a grammar
that lets two repeats take the same characters; the accept thread is shared
by every handshake, so one such request would stall all the others. Each
head here is built for that: long values with a bad byte at the end, runs of
spaces and tabs, many short lines and then a bad one, thousands of colons.

For each, at each size n, the best of several runs of our parser (and of
h11's server connection, the reference, up to ``--h11-max`` bytes: it is
quadratic on some of these), then the ratio of the time at the largest size
to the time at the smallest. Linear reading gives a ratio near the ratio of
the sizes (16 for 4 KiB to 64 KiB); quadratic, its square (256). A valid
upgrade request is the first row, for scale. One core; the machine's other
work shows as noise in single rows, never as a ratio near 256.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable, Dict, List

import h11

from gaman_sync.protocol.handshake import HandshakeError, RequestParser
from gaman_sync.testing import handshake_request

REQUEST_LINE = b"GET /echo HTTP/1.1\r\nHost: x\r\n"


def heads(n: int) -> Dict[str, bytes]:
    """Heads of about ``n`` bytes (the same as tests/test_request_parser.py)."""
    line = REQUEST_LINE
    return {
        "a valid upgrade, padded": handshake_request("/echo", headers=[("X-Pad", "p" * n)]),
        "a long value, then NUL": line + b"X: " + b"a" * n + b"\x00\r\n\r\n",
        "words, then NUL": line + b"X: " + b"a " * (n // 2) + b"\x00\r\n\r\n",
        "a value, spaces, NUL": line + b"X: a" + b" " * n + b"\x00\r\n\r\n",
        "spaces and tabs, NUL": line + b"X:" + b" \t" * (n // 2) + b"\x00\r\n\r\n",
        "spaces and tabs, CR": line + b"X:" + b" \t" * (n // 2) + b"\r\r\n\r\n",
        "spaces and tabs only": line + b"X:" + b" \t" * (n // 2) + b"\r\n\r\n",
        "word runs, bad end": line + b"X: " + b"a \t " * (n // 4) + b"\n\r\r\n\r\n",
        "short lines, a bad one": line + b"X: a b\r\n" * (n // 8) + b"Y : z\r\n\r\n",
        "short lines": line + b"X: a b\r\n" * (n // 8) + b"\r\n",
        "empty values": line + b"X:\r\n" * (n // 4) + b"\r\n",
        "colons in a value": line + b"X:" + b":" * n + b"\r\n\r\n",
        "colons for names": line + b":" * n + b"\r\n\r\n",
        "name: name: name:": line + b"X:" * (n // 2) + b"\x00\r\n\r\n",
        "a long target": b"GET /" + b"a" * n + b" HTTP/1.\r\nHost: x\r\n\r\n",
        "a long method": b"G" * n + b" / HTTP/1.1\r\nHost: x\r\n\r\n",
        "blank continuations": line + b" \r\n" * (n // 3) + b"\r\n",
        "bare CRs": line + b"X: a" + b"\r" * n + b"\n\r\n",
        "no end, 1 KiB reads": line + b"X: y\r\n" * (n // 6),
    }


def ours(data: bytes, read_size: int) -> Callable[[], None]:
    reads = [data[i:i + read_size] for i in range(0, len(data), read_size)]

    def run() -> None:
        parser = RequestParser(len(data) + 1)
        try:
            for piece in reads:
                if parser.feed(piece) is not None:
                    break
        except HandshakeError:
            pass
    return run


def theirs(data: bytes) -> Callable[[], None]:
    def run() -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=len(data) + 1)
        conn.receive_data(data)
        try:
            conn.next_event()
        except h11.RemoteProtocolError:
            pass
    return run


def best(fn: Callable[[], None], budget: float) -> float:
    """The best time of one call, over about ``budget`` seconds (3 calls at least)."""
    times: List[float] = []
    deadline = time.perf_counter() + budget
    while len(times) < 3 or time.perf_counter() < deadline:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if len(times) >= 200:
            break
    return min(times)


def fmt(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} µs" if seconds < 0.01 else f"{seconds * 1e3:,.0f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="4096,16384,65536",
                        help="head sizes in bytes, smallest first (default %(default)s)")
    parser.add_argument("--h11-max", type=int, default=16384,
                        help="h11 only up to this size (default %(default)s)")
    parser.add_argument("--budget", type=float, default=0.3,
                        help="seconds per measurement (default %(default)s)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    h11_sizes = [n for n in sizes if n <= args.h11_max]
    names = list(heads(16))
    width = max(len(n) for n in names)
    columns = [f"ours {n // 1024} KiB" for n in sizes] + ["ratio"] + \
        [f"h11 {n // 1024} KiB" for n in h11_sizes]
    print(f"{'head':{width}}  " + "  ".join(f"{c:>12}" for c in columns))
    worst = 0.0
    for name in names:
        read_size = 1024 if "1 KiB reads" in name else 1 << 30
        mine = [best(ours(heads(n)[name], read_size), args.budget) for n in sizes]
        ref = [best(theirs(heads(n)[name]), args.budget) for n in h11_sizes]
        ratio = mine[-1] / mine[0]
        if name != names[0]:
            worst = max(worst, ratio)
        cells = [fmt(t) for t in mine] + [f"{ratio:.1f}"] + [fmt(t) for t in ref]
        print(f"{name:{width}}  " + "  ".join(f"{c:>12}" for c in cells), flush=True)
    print(f"\nsizes ×{sizes[-1] / sizes[0]:g}: the largest time ratio is {worst:.1f} "
          f"(linear ≈ {sizes[-1] / sizes[0]:g}, quadratic ≈ {(sizes[-1] / sizes[0]) ** 2:g})")


if __name__ == "__main__":
    main()

