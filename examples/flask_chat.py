"""A Flask application with a chat room: the page at ``/`` and the room's
WebSocket at ``/chat``, on the same port, served by the same WSGI server.

Run it with Flask's development server (werkzeug)::

    python examples/flask_chat.py            # PORT=8000 by default

or with gunicorn, one thread per open WebSocket plus room for the pages::

    gunicorn -k gthread --threads 100 -b 127.0.0.1:8000 examples.flask_chat:app

then open http://127.0.0.1:8000/ in two tabs. Every text message goes to
every client of the room (``ctx.server.broadcast``), as in
``examples/chat.py``; here it is a block mounted in a Flask application
(``gaman_sync.wsgi.mount``) instead of a standalone server.
"""

import logging
import os

from flask import Flask

from gaman_sync import define_block
from gaman_sync.wsgi import mount, shutdown_on_sigterm

log = logging.getLogger("examples.flask_chat")

PAGE = """<!doctype html>
<meta charset="utf-8">
<title>Flask chat</title>
<form id="form"><input id="text" autocomplete="off" autofocus> <button>Send</button></form>
<ul id="log"></ul>
<script>
  const log = document.getElementById("log");
  const ws = new WebSocket(`ws://${location.host}/chat`);
  const say = (line) => log.appendChild(document.createElement("li")).textContent = line;
  ws.onmessage = (event) => say(event.data);
  ws.onclose = (event) => say(`closed (${event.code})`);
  document.getElementById("form").onsubmit = (event) => {
    event.preventDefault();
    const text = document.getElementById("text");
    ws.send(text.value);
    text.value = "";
  };
</script>
"""


def chat(ctx):
    def on_open():
        log.info("client %s joined; %d in the room", ctx.id, len(ctx.server.clients))

    def on_message(message):
        ctx.server.broadcast(message)

    def on_close(code, reason):
        log.info("client %s left (%s %s)", ctx.id, code, reason)

    return {"on_open": on_open, "on_message": on_message, "on_close": on_close}


app = Flask(__name__)


@app.get("/")
def index():
    return PAGE


room = define_block(path="/chat", websocket=chat)
websockets = mount(app, room)  # the one line: /chat is now a WebSocket of this app

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    shutdown_on_sigterm()  # SIGTERM closes the room's clients with 1001, then exits
    app.run(host="127.0.0.1", port=int(os.environ.get("PORT", "8000")), threaded=True)
