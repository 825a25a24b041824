"""The advanced block of the GamanJS WebSocket page: answers "ping" with
"pong", logs pongs and redirects.

Run: ``python -m gaman_sync examples.advanced:block`` or ``python examples/advanced.py``.
"""

import logging

from gaman_sync import define_block, serve

log = logging.getLogger("examples.advanced")


def websocket(ctx):
    def on_open():
        log.info("Connection opened")

    def on_pong(data):
        log.info("Pong received: %r", data)

    def on_redirect(url, request):
        log.info("Redirecting to: %s", url)

    def on_message(message):
        if message == "ping":
            ctx.send("pong")
        else:
            ctx.send("Unknown message")

    return {"on_open": on_open, "on_pong": on_pong, "on_redirect": on_redirect,
            "on_message": on_message}


block = define_block(path="/", websocket=websocket)

if __name__ == "__main__":
    import os

    logging.basicConfig(level=logging.INFO)
    serve(block, port=int(os.environ.get("PORT", "8000")))
