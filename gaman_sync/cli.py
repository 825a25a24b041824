"""``python -m gaman_sync MODULE:ATTR`` and the ``gaman-sync`` script."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import List, Optional, Sequence

from .block import Block
from .server import serve

__all__ = ["main", "load_blocks"]


def load_blocks(spec: str) -> List[Block]:
    """Import ``MODULE:ATTR`` (from the current directory first) and return
    its block or list of blocks."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"expected MODULE:ATTR, like examples.chat:block, not {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    target: object = importlib.import_module(module_name)
    for part in attr.split("."):
        target = getattr(target, part)
    blocks = [target] if isinstance(target, Block) else list(target)  # type: ignore[call-overload]
    for block in blocks:
        if not isinstance(block, Block):
            raise TypeError(f"{spec} must be a Block or a list of Blocks, found {block!r}")
    return blocks


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run a server for the block(s) named on the command line."""
    parser = argparse.ArgumentParser(
        prog="gaman-sync",
        description="Serve GamanJS-style WebSocket blocks with a threaded server.")
    parser.add_argument("app", metavar="MODULE:ATTR",
                        help="a block or a list of blocks, e.g. examples.chat:block")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port (default %(default)s)")
    parser.add_argument("--max-message-size", type=int, default=None, metavar="BYTES",
                        help="largest incoming message (default 1 MiB)")
    parser.add_argument("--ping-interval", type=float, default=None, metavar="SECONDS",
                        help="keepalive ping interval (default 20)")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        blocks = load_blocks(args.app)
    except (ImportError, AttributeError, ValueError, TypeError) as exc:
        parser.error(f"cannot load {args.app}: {exc}")
    options = {}
    if args.max_message_size is not None:
        options["max_message_size"] = args.max_message_size
    if args.ping_interval is not None:
        options["ping_interval"] = args.ping_interval
    try:
        serve(blocks, host=args.host, port=args.port, **options)
    except OSError as exc:  # the port is taken, the address is not ours, ...
        parser.error(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}")
    return 0
