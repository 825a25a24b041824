"""``python -m gaman_sync MODULE:ATTR`` and the ``gaman-sync`` script.

Every mistake on the command line (a bad value, a name that is not a block)
is one usage line and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Any, Callable, List, Optional, Sequence

from .app import Block
from .broker import BrokerUnavailable, RedisBroker
from .options import check_port
from .server import serve
from .server.processes import WorkersFailed, check_workers
from .version import __version__

__all__ = ["main", "load_blocks"]


def load_blocks(spec: str) -> List[Block]:
    """Import ``MODULE:ATTR`` (from the current directory first) and return
    its block or list of blocks. Raises ``ValueError`` (bad spec),
    ``ImportError``/``AttributeError`` (not found) or ``TypeError`` (not
    blocks), each naming what it expected."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"expected MODULE:ATTR, like examples.chat:block, not {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    target: object = importlib.import_module(module_name)
    for part in attr.split("."):
        target = getattr(target, part)
    if isinstance(target, Block):
        return [target]
    if isinstance(target, (list, tuple)) and target and \
            all(isinstance(b, Block) for b in target):
        return list(target)
    what = "a function" if callable(target) else f"a {type(target).__name__}"
    hint = (" (a block's handler? pass the Block that define_block() returned)"
            if callable(target) else "")
    raise TypeError(f"{spec} is {what}, not a Block or a list of Blocks{hint}")


def _number(kind: Callable[[str], Any], accepts: str,
            check: Callable[[Any], bool]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {accepts}, not {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"expected {accepts}, not {text!r}")
        return value
    parse.__name__ = accepts  # what argparse names in its own messages
    return parse


_seconds = _number(float, "a positive number of seconds", lambda v: 0 < v < float("inf"))
_bytes = _number(int, "a positive number of bytes", lambda v: v > 0)
_count = _number(int, "a positive whole number", lambda v: v > 0)


def _port(text: str) -> int:
    try:
        port = int(text)
        check_port(port)
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, not {text!r}") \
            from None
    return port


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run a server for the block(s) named on the command line."""
    parser = argparse.ArgumentParser(
        prog="gaman-sync",
        description="Serve GamanJS-style WebSocket blocks with a threaded server. "
                    "Ctrl-C or SIGTERM shuts it down (a second one ends it at once).")
    parser.add_argument("app", metavar="MODULE:ATTR",
                        help="a block or a list of blocks, e.g. examples.chat:block")
    parser.add_argument("--version", action="version", version=f"gaman_sync {__version__}")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument("--port", type=_port, default=8000, help="port (default %(default)s)")
    parser.add_argument("--max-message-size", type=_bytes, metavar="BYTES",
                        help="largest incoming message (default 1 MiB)")
    parser.add_argument("--max-connections", type=_count, metavar="N",
                        help="connections at once (default 5000)")
    parser.add_argument("--ping-interval", type=_seconds, metavar="SECONDS",
                        help="keepalive ping interval (default 20)")
    parser.add_argument("--close-timeout", type=_seconds, metavar="SECONDS",
                        help="time a peer has to answer our close (default 10)")
    parser.add_argument("--shutdown-timeout", type=_seconds, metavar="SECONDS",
                        help="time clients have to close at shutdown (default 5)")
    parser.add_argument("--health-path", metavar="PATH",
                        help="answer plain GET PATH with 200 'ok', for load balancers "
                             "(e.g. /health; default: off)")
    parser.add_argument("--workers", type=_count, metavar="N",
                        help="N server processes on the port, supervised by this one "
                             "(Linux; default: one server in this process)")
    parser.add_argument("--redis", metavar="URL",
                        help="share broadcasts with the other processes through Redis "
                             "(e.g. redis://127.0.0.1:6379/0; needs pip install "
                             "'gaman_sync[redis]')")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    if args.workers is not None:
        try:
            check_workers(args.workers)
        except ValueError as exc:
            parser.error(f"--workers: {exc}")
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s"
                        + ("[%(process)d]" if args.workers else "") + ": %(message)s")
    try:
        blocks = load_blocks(args.app)
    except (ImportError, AttributeError, ValueError, TypeError) as exc:
        parser.error(f"cannot load {args.app}: {exc}")
    options = {name: getattr(args, name) for name in (
        "max_message_size", "max_connections", "ping_interval", "close_timeout",
        "shutdown_timeout") if getattr(args, name) is not None}
    if args.health_path is not None:
        if not args.health_path.startswith("/"):
            parser.error(f"--health-path: expected a path starting with '/', "
                         f"not {args.health_path!r}")
        options["health_path"] = args.health_path
    if args.redis is not None:
        try:
            options["broker"] = RedisBroker(args.redis)
        except (ImportError, ValueError) as exc:
            parser.error(f"--redis: {exc}")
    try:
        serve(blocks, host=args.host, port=args.port, workers=args.workers, **options)
    except WorkersFailed as exc:
        print(f"gaman-sync: {exc}", file=sys.stderr)
        return 1
    except BrokerUnavailable as exc:
        parser.error(f"--redis: {exc}")
    except OSError as exc:  # the port is taken, the address is not ours, ...
        parser.error(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}")
    except KeyboardInterrupt as exc:  # a second Ctrl-C during the shutdown
        print(f"gaman-sync: stopped at once ({exc or 'interrupted'})", file=sys.stderr)
        return 130
    return 0
