"""A chat room: every message goes to every client of the block.

Run: ``python -m gaman_sync examples.chat:block`` or ``python examples/chat.py``,
then connect two clients to ws://127.0.0.1:8000/chat.
"""

import logging

from gaman_sync import define_block, serve

log = logging.getLogger("examples.chat")


def chat(ctx):
    def on_open():
        log.info("client %s joined; %d in the room", ctx.id, len(ctx.server.clients))

    def on_message(message):
        ctx.server.broadcast(message)

    def on_close(code, reason):
        log.info("client %s left (%s %s)", ctx.id, code, reason)

    return {"on_open": on_open, "on_message": on_message, "on_close": on_close}


block = define_block(path="/chat", websocket=chat)

if __name__ == "__main__":
    import os

    logging.basicConfig(level=logging.INFO)
    serve(block, port=int(os.environ.get("PORT", "8000")))
