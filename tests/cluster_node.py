"""A block whose clients drive rooms and broadcasts with JSON commands, and
a server process for it: ``python tests/cluster_node.py [REDIS_URL]``
prints ``READY <port>`` once it listens on 127.0.0.1 (port 0) and serves
until SIGTERM; with a URL, through a :class:`~gaman_sync.RedisBroker`.

On open, a client gets ``{"id": ctx.id, "pid": ...}``. Commands (text):

- ``{"op": "join" | "leave", "room": R}``: answered ``{"joined": R}`` or ``{"left": R}``;
- ``{"op": "rooms"}``: answered ``{"rooms": [...]}``, sorted;
- ``{"op": "say", "text": T, "binary": B, "room": R, "exclude": [ids] | "self"}``:
  broadcasts ``T`` (as bytes if ``B``) and answers ``{"sent": n}`` if ``"reply"``.

Anything broadcast is a plain message, never JSON, so a client tells them apart.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Callable, Dict, Optional

if __name__ == "__main__":  # run as a script: the package from this checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gaman_sync import define_block


def room_block(path: str = "/rooms", on_close: Optional[Callable[[Any], None]] = None) -> Any:
    """The block; ``?join=R`` joins room R in the handler, before the 101,
    and ``?refuse=1`` closes with 4001 in the handler after that."""

    def handler(ctx: Any) -> Dict[str, Any]:
        query = ctx.request.query
        if "join" in query:
            ctx.join(query["join"])
        if query.get("refuse"):
            ctx.close(4001)
            return {}
        ctx.send(json.dumps({"id": ctx.id, "pid": os.getpid()}))

        def on_message(message: Any) -> None:
            cmd = json.loads(message)
            op = cmd["op"]
            if op == "join":
                ctx.join(cmd["room"])
                ctx.send(json.dumps({"joined": cmd["room"]}))
            elif op == "leave":
                ctx.leave(cmd["room"])
                ctx.send(json.dumps({"left": cmd["room"]}))
            elif op == "rooms":
                ctx.send(json.dumps({"rooms": sorted(ctx.rooms)}))
            elif op == "say":
                text = cmd["text"]
                exclude = cmd.get("exclude")
                sent = ctx.server.broadcast(text.encode() if cmd.get("binary") else text,
                                            room=cmd.get("room"),
                                            exclude=ctx if exclude == "self" else exclude)
                if cmd.get("reply"):
                    ctx.send(json.dumps({"sent": sent}))

        def closed(code: int, reason: str) -> None:
            if on_close is not None:
                on_close(ctx)

        return {"on_message": on_message, "on_close": closed}

    return define_block(path, handler)


def main(argv: list) -> None:
    from gaman_sync import RedisBroker, WebSocketServer

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    broker = RedisBroker(argv[0]) if argv else None
    server = WebSocketServer(room_block(), host="127.0.0.1", port=0, broker=broker,
                             ping_interval=None)
    server.start()
    import signal
    signal.signal(signal.SIGTERM, lambda *_: server.request_shutdown())
    print(f"READY {server.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
