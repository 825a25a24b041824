"""Two server processes and one Redis: a message sent to one server reaches
the clients of the other, in the same room.

Run ``python examples/cluster.py`` (it starts its own ``redis-server`` on a
free port; ``--redis redis://127.0.0.1:6379/0`` uses yours). It starts two
servers the way you would in production, each its own process::

    python -m gaman_sync examples.cluster:block --port 8001 --redis redis://127.0.0.1:6379/0
    python -m gaman_sync examples.cluster:block --port 8002 --redis redis://127.0.0.1:6379/0

then connects alice to the first, bob and carol to the second (carol in
another room), and alice says hello: bob gets it through Redis, carol does
not. ``block`` is a room chat: ``/room?room=NAME`` joins room ``NAME``, and
each text message goes to that room, in every process.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from typing import Any, Dict, List, Optional

from gaman_sync import connect, define_block

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def room(ctx: Any) -> Dict[str, Any]:
    name = ctx.request.query.get("room", "lobby")
    ctx.join(name)
    ctx.send(json.dumps({"type": "welcome", "id": ctx.id, "pid": os.getpid(), "room": name}))

    def on_message(text: Any) -> None:
        ctx.server.broadcast(json.dumps({"type": "message", "from": ctx.id,
                                         "pid": os.getpid(), "text": text}), room=name)

    return {"on_message": on_message}


block = define_block("/room", room)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_line(proc: subprocess.Popen, pattern: str, timeout: float = 15.0) -> re.Match:
    """The first line of ``proc``'s output that matches ``pattern``."""
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    for line in proc.stdout:
        match = re.search(pattern, line)
        if match:
            # The rest of its output is read and dropped, so that it never blocks on a full pipe.
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return match
        if time.monotonic() > deadline:
            break
    raise RuntimeError(f"no line matching {pattern!r} (exit status {proc.poll()})")


def start_redis(stack: ExitStack) -> str:
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is not installed (apt-get install redis-server), "
                 "or pass --redis URL")
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--logfile", ""],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stack.callback(proc.wait)
    stack.callback(proc.terminate)
    wait_for_line(proc, "Ready to accept connections")
    return f"redis://127.0.0.1:{port}/0"


def start_server(stack: ExitStack, url: str) -> int:
    """A server process on a free port (``python -m gaman_sync ... --redis``)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.Popen([sys.executable, "-m", "gaman_sync", "examples.cluster:block",
                             "--port", "0", "--redis", url], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stack.callback(proc.wait)
    stack.callback(proc.terminate)
    return int(wait_for_line(proc, r"listening on 127\.0\.0\.1:(\d+)").group(1))


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis", metavar="URL", help="a running Redis (default: start one)")
    args = parser.parse_args(argv)
    with ExitStack() as stack:
        url = args.redis or start_redis(stack)
        first, second = start_server(stack, url), start_server(stack, url)
        print(f"Redis at {url}; servers on ports {first} and {second}")
        alice = stack.enter_context(connect(f"ws://127.0.0.1:{first}/room?room=lobby"))
        bob = stack.enter_context(connect(f"ws://127.0.0.1:{second}/room?room=lobby"))
        carol = stack.enter_context(connect(f"ws://127.0.0.1:{second}/room?room=garden"))
        for name, ws in (("alice", alice), ("bob", bob), ("carol", carol)):
            welcome = json.loads(ws.recv(timeout=10))
            print(f"{name}: connection {welcome['id']} in process {welcome['pid']}, "
                  f"room {welcome['room']}")
        alice.send("hello from the first server")
        got = json.loads(bob.recv(timeout=10))
        print(f"bob got, through Redis: {got['text']!r} from connection {got['from']} "
              f"of process {got['pid']}")
        carol.send("carol's garden")  # what carol gets next: her own room's message
        print(f"carol got: {json.loads(carol.recv(timeout=10))['text']!r} (not alice's)")


if __name__ == "__main__":
    main()
