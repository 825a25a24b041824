"""``gaman-sync MODULE:BLOCK [MODULE:BLOCK ...]`` (and ``python -m gaman_sync``):
serve blocks from the command line; ``gaman-sync connect URL``: try a server.

Serving: every ``MODULE:BLOCK`` is imported (from the current directory
first) and their blocks are served together by one
:class:`~gaman_sync.WebSocketServer`, routed by path. Once listening, it logs
the URL of each block (a path with parameters shown as its pattern), then
serves until SIGINT or SIGTERM, which shut it down gracefully (every client
gets 1001; a second signal ends it at once, status 130).

Every mistake a user can make before the server runs (a bad value, a module
that does not import, a name that is not a block, a port in use) is exactly
one line on stderr, ``gaman-sync: error: ...``, naming the argument and what
it accepts, and exit status 2: never a traceback.

``connect`` as the first argument runs the interactive client of
:mod:`gaman_sync.client.__main__` instead. ``MODULE:BLOCK`` always has a
colon, so a module named ``connect`` is still served as ``connect:block``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import ssl
import sys
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence

from .app import Block
from .broker import BrokerUnavailable, RedisBroker
from .client.__main__ import main as client_main
from .options import MiB, Options, check_port
from .server import WebSocketServer, serve, serve_until_signalled
from .server.processes import WorkersFailed, check_workers
from .version import __version__

__all__ = ["main", "load_blocks", "build_parser", "served_urls"]

logger = logging.getLogger("gaman_sync")

PROG = "gaman-sync"


def load_blocks(spec: str) -> List[Block]:
    """Import ``MODULE:BLOCK`` (from the current directory first) and return
    its block or list of blocks. Raises ``ValueError`` (bad spec),
    ``ImportError``/``AttributeError`` (not found) or ``TypeError`` (not
    blocks), each naming what it expected; an exception raised by the
    module's own code while it is imported goes through as it is."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"expected MODULE:BLOCK, like examples.chat:block, not {spec!r}")
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


def _load(spec: str) -> List[Block]:
    """:func:`load_blocks`, with every failure as one line (``ValueError``)."""
    try:
        return load_blocks(spec)
    except (ValueError, TypeError) as exc:
        raise ValueError(str(exc)) from None
    except AttributeError as exc:
        raise ValueError(f"cannot load {spec}: {exc}") from None
    except Exception as exc:  # ImportError, or the module's own code failed
        module = spec.partition(":")[0]
        missing = isinstance(exc, ModuleNotFoundError) and exc.name == module
        why = str(exc) if missing else f"{type(exc).__name__}: {exc}"
        hint = "" if missing else f" (python -c 'import {module}' shows the traceback)"
        raise ValueError(f"cannot load {spec}: importing {module} failed: {why}{hint}") \
            from None


# -- Values ----------------------------------------------------------------

def _number(kind: Callable[[str], Any], accepts: str, check: Callable[[Any], bool],
            off: bool = False) -> Callable[[str], Any]:
    """An argparse ``type`` that names what it accepts; with ``off``, the
    word ``off`` gives None."""
    if off:
        accepts += " or 'off'"

    def parse(text: str) -> Any:
        if off and text.strip().lower() == "off":
            return None
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {accepts}, not {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"expected {accepts}, not {text!r}")
        return value
    parse.__name__ = accepts  # what argparse names in its own messages
    return parse


def _positive(value: float) -> bool:
    return 0 < value < math.inf


_seconds = _number(float, "a positive number of seconds", _positive)
_seconds_or_off = _number(float, "a positive number of seconds", _positive, off=True)
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


def _path(text: str) -> str:
    if not text.startswith("/"):
        raise argparse.ArgumentTypeError(f"expected a path starting with '/', not {text!r}")
    return text


def _size(value: Optional[int]) -> str:
    if value is None:
        return "no limit"
    return f"{value}, {value // MiB} MiB" if value % MiB == 0 else str(value)


def _secs(value: Optional[float]) -> str:
    return "off" if value is None else f"{value:g}"


def tls_context(certfile: Optional[str], keyfile: Optional[str],
                ca_certs: Optional[str]) -> Optional[ssl.SSLContext]:
    """The server's TLS context for ``--certfile``/``--keyfile``/``--ca-certs``
    (None without ``--certfile``): client certificates are required and
    checked against ``ca_certs`` when it is given. Raises ``ValueError``
    with one line naming the option and the file."""
    if certfile is None:
        if keyfile is not None or ca_certs is not None:
            raise ValueError("--keyfile and --ca-certs need --certfile")
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        files = certfile if keyfile is None else f"{certfile} and --keyfile {keyfile}"
        raise ValueError(f"--certfile {files}: cannot load the certificate and its key "
                         f"({getattr(exc, 'strerror', None) or exc})") from None
    if ca_certs is not None:
        try:
            context.load_verify_locations(ca_certs)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"--ca-certs {ca_certs}: cannot load certificates "
                             f"({getattr(exc, 'strerror', None) or exc})") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


# -- The parser ------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (no usage block)."""

    def error(self, message: str) -> NoReturn:
        """Print ``PROG: error: MESSAGE`` on one line and exit with status 2."""
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser (``--help`` shows every flag's default)."""
    defaults = Options()
    parser = _Parser(
        prog=PROG,
        description="Serve GamanJS-style WebSocket blocks with a threaded server. "
                    "Ctrl-C or SIGTERM shuts it down gracefully (a second one ends it "
                    "at once).",
        epilog=f"'{PROG} connect URL' is an interactive client instead: it sends each "
               f"line of stdin and prints each message ('{PROG} connect --help'). "
               f"MODULE:BLOCK always has a colon, so a module named connect is still "
               f"served as connect:block.")
    parser.add_argument("blocks", metavar="MODULE:BLOCK", nargs="+",
                        help="a block or a list of blocks, e.g. examples.chat:block; "
                             "several are served together, routed by path")
    parser.add_argument("--version", action="version", version=f"gaman_sync {__version__}")

    listen = parser.add_argument_group("listening")
    listen.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default %(default)s)")
    listen.add_argument("--port", type=_port, default=8000,
                        help="port; 0 picks a free one (default %(default)s)")
    listen.add_argument("--max-connections", type=_count, metavar="N",
                        default=defaults.max_connections,
                        help="connections at once; past it new ones get 503 "
                             "(default %(default)s)")
    listen.add_argument("--health-path", type=_path, metavar="PATH",
                        help="answer plain GET PATH with 200 'ok', for load balancers "
                             "(e.g. /health; default: off)")
    listen.add_argument("--certfile", metavar="PEM",
                        help="serve wss:// with this certificate chain (default: ws://)")
    listen.add_argument("--keyfile", metavar="PEM",
                        help="the certificate's private key (default: in --certfile)")
    listen.add_argument("--ca-certs", metavar="PEM",
                        help="require client certificates signed by these CAs "
                             "(default: none asked)")

    scale = parser.add_argument_group("several processes")
    scale.add_argument("--workers", type=_count, metavar="N",
                       help="N server processes on the port, supervised by this one "
                            "(Linux; default: one server in this process)")
    scale.add_argument("--redis", metavar="URL",
                       help="share broadcasts with the other processes through Redis "
                            "(e.g. redis://127.0.0.1:6379/0; needs pip install "
                            "'gaman_sync[redis]'; default: off)")

    conn = parser.add_argument_group("connections")
    conn.add_argument("--compression", choices=["deflate", "none"], default="deflate",
                      help="permessage-deflate with clients that offer it "
                           "(default %(default)s)")
    conn.add_argument("--max-message-size", type=_bytes, metavar="BYTES",
                      default=defaults.max_message_size,
                      help=f"largest incoming message; larger closes with 1009 "
                           f"(default {_size(defaults.max_message_size)})")
    conn.add_argument("--ping-interval", type=_seconds_or_off, metavar="SECONDS",
                      default=defaults.ping_interval,
                      help=f"keepalive ping interval, or 'off' "
                           f"(default {_secs(defaults.ping_interval)})")
    conn.add_argument("--ping-timeout", type=_seconds_or_off, metavar="SECONDS",
                      default=defaults.ping_timeout,
                      help=f"a ping unanswered this long closes with 1011, or 'off' "
                           f"(default {_secs(defaults.ping_timeout)})")
    conn.add_argument("--close-timeout", type=_seconds, metavar="SECONDS",
                      default=defaults.close_timeout,
                      help=f"time a peer has to answer our close "
                           f"(default {_secs(defaults.close_timeout)})")
    conn.add_argument("--shutdown-timeout", type=_seconds, metavar="SECONDS",
                      default=defaults.shutdown_timeout,
                      help=f"time clients have to close at shutdown "
                           f"(default {_secs(defaults.shutdown_timeout)})")

    logs = parser.add_argument_group("logging")
    logs.add_argument("--log-level", default="info",
                      choices=["debug", "info", "warning", "error"],
                      help="(default %(default)s)")
    logs.add_argument("--access-log", action="store_true",
                      help="one line per connection when it closes (logger "
                           "gaman_sync.access): peer, path, close code, duration, messages "
                           "and bytes each way (default: off)")
    logs.add_argument("--stats-interval", type=_seconds, metavar="SECONDS",
                      help="log the server's stats every SECONDS on one line (logger "
                           "gaman_sync.stats): open connections, accepted, rejected by "
                           "status, messages and bytes each way, closes by code "
                           "(default: off)")
    return parser


def _server_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The keyword arguments of :class:`~gaman_sync.WebSocketServer` that the
    flags give."""
    options: Dict[str, Any] = {name: getattr(args, name) for name in (
        "max_message_size", "max_connections", "ping_interval", "ping_timeout",
        "close_timeout", "shutdown_timeout")}
    options["health_path"] = args.health_path
    options["compression"] = None if args.compression == "none" else args.compression
    options["access_log"] = args.access_log
    options["stats_interval"] = args.stats_interval
    return options


def served_urls(server: WebSocketServer) -> List[str]:
    """What ``server`` serves (once started, or once its workers listen),
    one URL per block path (a pattern for a path with parameters), with what
    answers there."""
    urls = []
    for view in server.blocks:
        endpoint = view.endpoint
        ws_url = server.url(endpoint.path)
        if endpoint.redirect is not None:
            urls.append(f"{ws_url} (redirects to {endpoint.redirect})")
        elif view.upgrades:
            urls.append(ws_url)
        if view.http is not None:
            urls.append(f"http{ws_url[2:]} (plain HTTP)")  # ws -> http, wss -> https
    if server.health_path is not None:
        urls.append(f"http{server.url(server.health_path)[2:]} (health check)")
    return urls


# -- Running ---------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["connect"]:
        return client_main(args_list[1:], prog=f"{PROG} connect")
    parser = build_parser()
    args = parser.parse_args(args_list)
    if args.workers is not None:
        try:
            check_workers(args.workers)
        except ValueError as exc:
            parser.error(f"--workers: {exc}")
    # With workers, each line says which process wrote it.
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s"
                        + ("[%(process)d]" if args.workers else "") + ": %(message)s")

    blocks: List[Block] = []
    for spec in args.blocks:
        try:
            blocks.extend(_load(spec))
        except ValueError as exc:
            parser.error(str(exc))
    try:
        ssl_context = tls_context(args.certfile, args.keyfile, args.ca_certs)
    except ValueError as exc:
        parser.error(str(exc))
    broker_options: Dict[str, Any] = {}
    if args.redis is not None:
        try:
            broker_options["broker"] = RedisBroker(args.redis)
        except (ImportError, ValueError) as exc:
            parser.error(f"--redis: {exc}")
    try:
        server = WebSocketServer(blocks, host=args.host, port=args.port,
                                 ssl_context=ssl_context, **broker_options,
                                 **_server_options(args))
    except (ValueError, TypeError) as exc:  # two blocks on one path, say
        parser.error(str(exc))

    def ready(started: WebSocketServer) -> None:
        for url in served_urls(started):
            logger.info("serving %s", url)

    try:
        if args.workers is not None:
            # The server above checked the arguments; each worker makes its own.
            serve(blocks, host=args.host, port=args.port, workers=args.workers, ready=ready,
                  ssl_context=ssl_context, **broker_options, **_server_options(args))
        else:
            serve_until_signalled(server, ready)
    except WorkersFailed as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except BrokerUnavailable as exc:
        parser.error(f"--redis: {exc}")
    except OSError as exc:  # the port is taken, the address is not ours, ...
        if server.listening or server.wait_for_shutdown_request(0):
            raise
        parser.error(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}")
    except KeyboardInterrupt as exc:  # a second signal during the shutdown
        print(f"{PROG}: stopped at once ({exc or 'interrupted'})", file=sys.stderr)
        return 130
    return 0
