"""``python -m gaman_sync.client URL``: a blocking command-line client that
sends each line of stdin and prints what comes back.

Text messages are printed as they are, binary ones as ``bytes`` reprs. At the
end of stdin (Ctrl-D) it waits for answers until none has come for
``--wait`` seconds (1 by default; so ``echo hi | python -m gaman_sync.client
URL`` prints the echo), then closes with 1000 and exits 0; if the server closes
first with another code, it says why and exits 1 (a refused or failed
connection: 1, a missing URL: 2, Ctrl-C: 130). Redirects are followed.

The main thread prints the messages (``for message in conn``); a second
thread reads stdin and sends, since neither must wait for the other.
``examples/client.py`` is this same client, run as a script.
"""

from __future__ import annotations

import argparse
import ssl
import sys
import threading
from typing import Iterable, List, Optional

from ..exceptions import ConnectionClosed, ConnectionClosedError, InvalidHandshake
from .client import ClientConnection, connect

__all__ = ["main", "send_lines"]


class Quiet:
    """Tells the sender when no message has arrived for a while."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._count = 0

    def arrived(self) -> None:
        """A message was printed (the main thread)."""
        with self._cond:
            self._count += 1
            self._cond.notify_all()

    def wait(self, seconds: float) -> None:
        """Return once ``seconds`` have passed without a message."""
        with self._cond:
            while True:
                seen = self._count
                self._cond.wait(seconds)
                if self._count == seen:
                    return


def send_lines(conn: ClientConnection, lines: Iterable[str], quiet: Optional[Quiet] = None,
               wait: float = 0.0) -> None:
    """Send each line (without its line ending); at the end, wait until no
    message has come for ``wait`` seconds, then close with 1000."""
    try:
        for line in lines:
            conn.send(line.rstrip("\r\n"))
    except ConnectionClosed:
        return  # the server closed first: the main thread reports it
    if quiet is not None and wait > 0:
        quiet.wait(wait)
    conn.close(1000)


def main(argv: Optional[List[str]] = None, prog: str = "python -m gaman_sync.client") -> int:
    """Run the client on ``argv`` (default ``sys.argv[1:]``); the exit status."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Send each line of stdin to a WebSocket server; print what comes back.")
    parser.add_argument("url", help="the server's URL, e.g. ws://127.0.0.1:8000/echo "
                                    "or wss://example.com/echo")
    parser.add_argument("--ca-certs", metavar="PEM",
                        help="for wss://: trust these certificate authorities (default: "
                             "the system's)")
    parser.add_argument("--insecure", action="store_true",
                        help="for wss://: do not check the server's certificate (testing only)")
    parser.add_argument("--certfile", metavar="PEM",
                        help="for wss://: present this client certificate (a server "
                             "started with --ca-certs asks for one; default: none)")
    parser.add_argument("--keyfile", metavar="PEM",
                        help="the client certificate's private key (default: in --certfile)")
    parser.add_argument("--wait", type=float, default=1.0, metavar="SECONDS",
                        help="at the end of stdin, wait for answers until none has come "
                             "for this long (default %(default)s)")
    args = parser.parse_args(argv)
    if not args.wait >= 0:
        parser.error(f"--wait: expected a number of seconds of 0 or more, not {args.wait}")

    context = None
    if args.keyfile is not None and args.certfile is None:
        parser.error("--keyfile is the key of --certfile: give --certfile too")
    if args.ca_certs is not None or args.insecure or args.certfile is not None:
        if not args.url.startswith("wss:"):
            parser.error("--ca-certs, --certfile and --insecure are for wss:// URLs")
        try:
            context = ssl.create_default_context(cafile=args.ca_certs)
        except (OSError, ssl.SSLError) as exc:
            parser.error(f"--ca-certs {args.ca_certs}: cannot load certificates "
                         f"({getattr(exc, 'strerror', None) or exc})")
        if args.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if args.certfile is not None:
            try:
                context.load_cert_chain(args.certfile, args.keyfile)
            except (OSError, ssl.SSLError) as exc:
                hint = "" if args.keyfile else "; if the key is in another file, give --keyfile"
                parser.error(f"--certfile {args.certfile}: cannot load the certificate and "
                             f"its key ({getattr(exc, 'strerror', None) or exc}{hint})")
    try:
        conn = connect(args.url, ssl_context=context)
    except (OSError, InvalidHandshake) as exc:  # refused, unreachable, not a WebSocket
        print(f"error: cannot connect to {args.url}: {exc}", file=sys.stderr)
        return 1

    quiet = Quiet()
    sender = threading.Thread(target=send_lines, args=(conn, sys.stdin, quiet, args.wait),
                              daemon=True)
    sender.start()
    try:
        for message in conn:  # ends when the connection closes normally
            print(message if isinstance(message, str) else repr(message), flush=True)
            quiet.arrived()
    except ConnectionClosedError as exc:
        print(f"closed by the server: {exc.code} {exc.reason}".rstrip(), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        conn.close(1000)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
