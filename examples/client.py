"""A blocking command-line client: sends each line of stdin, prints what comes back.

Run: ``python examples/client.py ws://127.0.0.1:8000/echo`` (against, for
example, ``python examples/echo.py``). Text messages are printed as they are,
binary ones as ``bytes`` reprs. At the end of stdin (Ctrl-D) it closes with
1000 and exits; if the server closes first, it says why and exits.

The main thread prints the messages (``for message in conn``); a second
thread reads stdin and sends, since neither must wait for the other.
"""

import argparse
import sys
import threading

from gaman_sync import ConnectionClosed, ConnectionClosedError, InvalidHandshake, connect


def send_lines(conn, lines):
    """Send each line (without its line ending); close with 1000 at the end."""
    try:
        for line in lines:
            conn.send(line.rstrip("\r\n"))
    except ConnectionClosed:
        return  # the server closed first: the main thread reports it
    conn.close(1000)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python examples/client.py",
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
