"""An old path redirected to a new one, and a client that follows it.

The rooms moved from ``/chat/:room`` to ``/rooms/:room``. A redirect block
keeps the old URLs working: the room and the query string are carried over,
with 308 (permanent) by default, and its ``on_redirect`` logs each one. The
new block greets the client with its room's name and echoes.

Run as a server: ``python -m gaman_sync examples.redirect:blocks``, then
connect to ws://127.0.0.1:8000/chat/kitchen.

Or ``python examples/redirect.py``: it starts the server on a free port,
connects to an old URL with our client, prints each hop the client follows
(``on_redirect``), then the greeting, and shuts down.
"""

import logging

from gaman_sync import WebSocketServer, connect, define_block

log = logging.getLogger("examples.redirect")


def room(ctx):
    name = ctx.request.params["room"]

    def on_open():
        ctx.send(f"welcome to {name}")

    return {"on_open": on_open, "on_message": ctx.send}


def moved(url, request):
    """The server's side of a redirect: the target URL and the old request."""
    log.info("redirected %s to %s", request.target, url)


blocks = [
    define_block(path="/chat/:room", redirect="/rooms/:room", on_redirect=moved),
    define_block(path="/rooms/:room", websocket=room),
]


def demo(out=print):
    """Start the server on a free port, follow the redirect, print each hop."""
    with WebSocketServer(blocks, host="127.0.0.1", port=0) as server:  # starts it
        url = f"ws://127.0.0.1:{server.port}/chat/kitchen?lang=en"
        out(f"connecting to {url}")

        def on_redirect(next_url, request):
            # Called before each hop, with the request about to be sent.
            out(f"redirected to {next_url} (GET {request.target})")

        with connect(url, on_redirect=on_redirect, open_timeout=10) as ws:
            out(f"connected to {ws.url}")
            out(ws.recv(timeout=10))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    demo()
