"""A chat room with its page: http://127.0.0.1:8000/ serves ``chat.html``,
which talks to the room's WebSocket at ``/chat``.

Run: ``python -m gaman_sync examples.chat:block`` or ``python examples/chat.py``,
then open http://127.0.0.1:8000/ in two tabs (``?name=Alice`` picks a name),
or connect any WebSocket client to ws://127.0.0.1:8000/chat?name=Alice.

The room speaks JSON text messages. To each client that joins::

    {"type": "welcome", "id": 3, "name": "Alice"}

to everyone, whenever someone joins or leaves (``joined`` or ``left`` says who)::

    {"type": "members", "members": [{"id": 3, "name": "Alice"}, ...], "joined": {...}}

and for each text message a client sends, to everyone, the sender included::

    {"type": "message", "from": 3, "name": "Alice", "text": "hi"}

A binary message is passed on to everyone as it is.

The member list comes from this server's ``clients``: run under
``--workers N`` (with ``--redis``), messages reach everyone, but each worker
lists only its own clients (see the README, "Workers on one machine").
"""

import json
import logging
from pathlib import Path

from gaman_sync import define_block, serve

log = logging.getLogger("examples.chat")

MAX_NAME = 32


def member(ctx):
    return {"id": ctx.id, "name": ctx.name}


def announce(ctx, change):
    """Tell everyone who is in the room now, and who came or went."""
    members = [member(c) for c in ctx.server.clients]
    ctx.server.broadcast(json.dumps({"type": "members", "members": members,
                                     change: member(ctx)}))


def chat(ctx):
    name = " ".join(ctx.request.query.get("name", "").split())[:MAX_NAME]
    ctx.name = name or f"guest {ctx.id}"
    # Sent before the 101 is, this goes out right after it: always the first message.
    ctx.send(json.dumps({"type": "welcome", **member(ctx)}))

    def on_open():
        announce(ctx, "joined")
        log.info("%s (%s) joined; %d in the room", ctx.name, ctx.id, len(ctx.server.clients))

    def on_message(message):
        if isinstance(message, bytes):
            ctx.server.broadcast(message)
        else:
            ctx.server.broadcast(json.dumps({"type": "message", "from": ctx.id,
                                             "name": ctx.name, "text": message}))

    def on_close(code, reason):
        announce(ctx, "left")  # ctx has already left the clients
        log.info("%s (%s) left (%s %s)", ctx.name, ctx.id, code, reason)

    return {"on_open": on_open, "on_message": on_message, "on_close": on_close}


page = define_block(path="/", page=Path(__file__).with_name("chat.html"))
room = define_block(path="/chat", websocket=chat)
block = [page, room]

if __name__ == "__main__":
    import os

    logging.basicConfig(level=logging.INFO)
    serve(block, port=int(os.environ.get("PORT", "8000")), health_path="/health")
