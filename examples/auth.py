"""A token checked before the upgrade: 401 without it, the user's name on ctx with it.

``on_request`` runs before any 101 is sent, in the connection's own thread
(so a slow lookup delays this client only). It finds the token in the
query (``?token=...``, what a browser's ``new WebSocket(url)`` can send) or
in an ``Authorization: Bearer ...`` header (what other clients send), and
refuses with 401 when it is missing or unknown: the client gets a plain
HTTP answer, never a WebSocket, and the handler never runs.

The handler runs only for accepted requests. It reads the same request
again (``ctx.request`` is the very request ``on_request`` accepted) and
puts the user's name on ``ctx``, where every callback finds it.

Run as a server: ``python -m gaman_sync examples.auth:block``, then connect
to ws://127.0.0.1:8000/private?token=alice-secret. Or
``python examples/auth.py``: it starts the server on a free port, tries
without a token and with each kind, and prints what happened.
"""

import logging

from gaman_sync import InvalidStatus, Reject, WebSocketServer, connect, define_block

log = logging.getLogger("examples.auth")

# The "database": token -> user name.
USERS = {"alice-secret": "alice", "bob-secret": "bob"}


def user_for(request):
    """The user a request's token belongs to, or None."""
    token = request.query.get("token")
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if token is None and scheme.lower() == "bearer":
        token = value.strip()
    return USERS.get(token) if token else None


def check_token(request):
    if user_for(request) is None:
        return Reject(401, "a valid token is needed",
                      headers=[("WWW-Authenticate", 'Bearer realm="private"')])
    return None  # accept


def private(ctx):
    ctx.user = user_for(ctx.request)  # on_request made sure there is one

    def on_open():
        log.info("%s connected", ctx.user)
        ctx.send(f"hello {ctx.user}")

    def on_message(message):
        ctx.send(f"{ctx.user}: {message}")

    return {"on_open": on_open, "on_message": on_message}


block = define_block(path="/private", websocket=private, on_request=check_token)


def demo(out=print):
    """Start the server on a free port; connect without a token, then with one."""
    with WebSocketServer(block, host="127.0.0.1", port=0) as server:  # starts it
        url = f"ws://127.0.0.1:{server.port}/private"
        try:
            connect(url, open_timeout=10)
        except InvalidStatus as exc:
            out(f"without a token: {exc.status} "
                f"({exc.headers.get('www-authenticate')})")
        with connect(url + "?token=alice-secret", open_timeout=10) as ws:
            out(f"with a token in the query: {ws.recv(timeout=10)}")
        with connect(url, headers={"Authorization": "Bearer bob-secret"},
                     open_timeout=10) as ws:
            out(f"with a token in a header: {ws.recv(timeout=10)}")
            ws.send("hi")
            out(ws.recv(timeout=10))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    demo()
