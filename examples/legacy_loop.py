"""A plain blocking program that publishes its readings over WebSocket.

The program is the kind that exists long before anyone adds a WebSocket to
it: a ``while True:`` loop that reads a value (here a counter and the time;
a sensor, a queue, a log file elsewhere) and sleeps. Three lines make it a
server: start a :class:`~gaman_sync.WebSocketServer` in the background,
``broadcast`` each reading from the loop, shut down on the way out. The loop
stays the program's main thread and stays blocking: the server's threads
do the networking.

Ctrl-C (SIGINT) raises ``KeyboardInterrupt`` in the loop, wherever it is
(in ``time.sleep`` most of the time); the ``finally`` shuts the server down,
which closes every client with 1001 (going away), and the program exits 0.
``broadcast`` never blocks and never raises for a client, so a slow or
vanished client cannot stall the loop. (Should Ctrl-C land inside
``broadcast`` itself, ``shutdown`` runs in a thread of its own, and the
exit hook of the server waits for it.)

Run: ``python examples/legacy_loop.py`` (``PORT=0`` picks a free port,
``INTERVAL`` sets the seconds between readings), then connect clients to
ws://127.0.0.1:8000/readings. It prints ``listening on port N`` once ready.
"""

import json
import logging
import os
import time

from gaman_sync import WebSocketServer, define_block

log = logging.getLogger("examples.legacy_loop")

# Clients only listen: each reading reaches every one of them.
block = define_block(path="/readings", websocket=lambda ctx: {})


def read_value(count):
    """The reading of the legacy loop: a counter and the time."""
    return {"count": count, "time": time.time()}


def main(port=8000, interval=1.0):
    server = WebSocketServer([block], host="127.0.0.1", port=port)
    server.start()  # in the background; returns once listening
    print(f"listening on port {server.port}", flush=True)
    count = 0
    try:
        while True:  # the program's own loop, unchanged but for one line
            count += 1
            reading = read_value(count)
            server.broadcast(json.dumps(reading))
            time.sleep(interval)
    except KeyboardInterrupt:
        log.info("Ctrl-C: shutting down after %d readings", count)
    finally:
        server.shutdown()  # 1001 to every client, then every thread ends


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main(port=int(os.environ.get("PORT", "8000")),
         interval=float(os.environ.get("INTERVAL", "1.0")))
