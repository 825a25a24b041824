"""Round trips per second of a 32-byte message through ``TestClient``: in
memory (``TestClient.local``: a socketpair, no TCP) against over loopback
(``run_server`` on 127.0.0.1), same echo block, same engine.

Run: ``python benchmarks/testclient.py [seconds] [rounds]``: the two modes
alternate for ``rounds`` rounds of ``seconds`` each (other load on the
machine then hits both alike), and the medians are printed.
"""

import statistics
import sys
import time

from gaman_sync import define_block
from gaman_sync.testing import TestClient, run_server

MESSAGE = b"x" * 32
block = define_block("/echo", lambda ctx: {"on_message": ctx.send})


def measure(client: TestClient, seconds: float) -> float:
    """Round trips per second over ``seconds`` (after a short warm-up)."""
    for _ in range(200):
        client.send(MESSAGE)
        client.recv()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(100):
            client.send(MESSAGE)
            client.recv()
        count += 100
    return count / (time.perf_counter() - start)


def main(seconds: float = 1.0, rounds: int = 5) -> None:
    local, loopback = [], []
    for _ in range(rounds):
        with TestClient.local(block, "/echo") as client:
            local.append(measure(client, seconds))
        with run_server(block) as server, TestClient(server, "/echo") as client:
            loopback.append(measure(client, seconds))
    for label, runs in (("in memory (socketpair)", local), ("over loopback (TCP)", loopback)):
        print(f"{label:24}{statistics.median(runs):9.0f} round trips/s (median; "
              f"runs: {', '.join(f'{r:.0f}' for r in runs)})")
    ratio = statistics.median(local) / statistics.median(loopback)
    print(f"ratio in memory / loopback: {ratio:.2f}")


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 1.0,
         int(sys.argv[2]) if len(sys.argv) > 2 else 5)
