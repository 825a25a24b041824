"""Echo every message back to its sender.

Run: ``python -m gaman_sync examples.echo:block`` or ``python examples/echo.py``.
"""

import logging

from gaman_sync import define_block, serve


def echo(ctx):
    return {"on_message": ctx.send}


block = define_block(path="/echo", websocket=echo)

if __name__ == "__main__":
    import os

    logging.basicConfig(level=logging.INFO)
    serve(block, port=int(os.environ.get("PORT", "8000")))
