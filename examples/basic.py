"""The basic block of the GamanJS WebSocket page, in Python.

Run: ``python -m gaman_sync examples.basic:block`` or ``python examples/basic.py``.
"""

import logging

from gaman_sync import WebSocketHandler, define_block, serve

log = logging.getLogger("examples.basic")


def websocket(ctx):
    log.info("Connected clients: %s", ctx.server.clients)

    def on_message(message):
        # str for a text message, bytes for a binary one: answer in kind.
        log.info("Received message: %s", message)
        if isinstance(message, bytes):
            ctx.send(b"Echo: " + message)
        else:
            ctx.send("Echo: " + message)

    return WebSocketHandler(
        on_open=lambda: log.info("Connection opened"),
        on_message=on_message,
        on_close=lambda code, reason: log.info("Connection closed. Code: %s, Reason: %s",
                                               code, reason),
        on_error=lambda error: log.error("WebSocket error: %s", error),
    )


block = define_block(path="/", websocket=websocket)

if __name__ == "__main__":
    import os

    logging.basicConfig(level=logging.INFO)
    serve(block, port=int(os.environ.get("PORT", "8000")))
