"""``python -m gaman_sync.client URL``: a blocking command-line client that
sends each line of stdin and prints what comes back.

Text messages are printed as they are, binary ones as ``bytes`` reprs. At the
end of stdin (Ctrl-D) it closes with 1000 and exits 0; if the server closes
first with another code, it says why and exits 1 (a refused or failed
connection: 1, a missing URL: 2, Ctrl-C: 130). Redirects are followed.

The main thread prints the messages (``for message in conn``); a second
thread reads stdin and sends, since neither must wait for the other.
``examples/client.py`` is this same client, run as a script.
"""

from __future__ import annotations

import argparse
import sys
import threading
from typing import Iterable, List, Optional

from ..exceptions import ConnectionClosed, ConnectionClosedError, InvalidHandshake
from .client import ClientConnection, connect

__all__ = ["main", "send_lines"]


def send_lines(conn: ClientConnection, lines: Iterable[str]) -> None:
    """Send each line (without its line ending); close with 1000 at the end."""
    try:
        for line in lines:
            conn.send(line.rstrip("\r\n"))
    except ConnectionClosed:
        return  # the server closed first: the main thread reports it
    conn.close(1000)


def main(argv: Optional[List[str]] = None, prog: str = "python -m gaman_sync.client") -> int:
    """Run the client on ``argv`` (default ``sys.argv[1:]``); the exit status."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Send each line of stdin to a WebSocket server; print what comes back.")
    parser.add_argument("url", help="the server's URL, e.g. ws://127.0.0.1:8000/echo")
    args = parser.parse_args(argv)

    try:
        conn = connect(args.url)
    except (OSError, InvalidHandshake) as exc:  # refused, unreachable, not a WebSocket
        print(f"error: cannot connect to {args.url}: {exc}", file=sys.stderr)
        return 1

    sender = threading.Thread(target=send_lines, args=(conn, sys.stdin), daemon=True)
    sender.start()
    try:
        for message in conn:  # ends when the connection closes normally
            print(message if isinstance(message, str) else repr(message), flush=True)
    except ConnectionClosedError as exc:
        print(f"closed by the server: {exc.code} {exc.reason}".rstrip(), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        conn.close(1000)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
