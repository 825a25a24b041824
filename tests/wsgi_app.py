"""The Flask application of tests/test_wsgi.py, for werkzeug (in process) and
gunicorn (``gunicorn tests.wsgi_app:app``, in a process of its own).

- ``GET /``: a page; ``GET /stats``: the callbacks each connection saw, as JSON
  (``{"opens": {id: n}, "closes": {id: [[code, reason], ...]}}``), which is how
  a test sees into a gunicorn worker;
- ``/echo``: echoes; the text ``close:CODE`` makes the server close with CODE;
- ``/chat``: broadcasts every message to every client of the block.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Dict, List

from flask import Flask, Response

from gaman_sync import define_block
from gaman_sync.wsgi import WebSocketMiddleware, mount

PAGE = "hello from flask"


class Stats:
    """The callbacks of each connection, by ``ctx.id``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.opens: Dict[int, int] = {}
        self.closes: Dict[int, List[Any]] = {}

    def opened(self, ctx: Any) -> None:
        with self.lock:
            self.opens[ctx.id] = self.opens.get(ctx.id, 0) + 1

    def closed(self, ctx: Any, code: int, reason: str) -> None:
        with self.lock:
            self.closes.setdefault(ctx.id, []).append([code, reason])

    def as_json(self) -> str:
        with self.lock:
            return json.dumps({"opens": self.opens, "closes": self.closes})


def blocks(stats: Stats) -> list:
    def echo(ctx: Any) -> dict:
        def on_message(message: Any) -> None:
            if isinstance(message, str) and message.startswith("close:"):
                ctx.close(int(message[6:]), "asked")
            else:
                ctx.send(message)

        return {"on_open": lambda: stats.opened(ctx), "on_message": on_message,
                "on_close": lambda code, reason: stats.closed(ctx, code, reason)}

    def chat(ctx: Any) -> dict:
        return {"on_open": lambda: stats.opened(ctx),
                "on_message": lambda message: ctx.server.broadcast(message),
                "on_close": lambda code, reason: stats.closed(ctx, code, reason)}

    return [define_block("/echo", websocket=echo), define_block("/chat", websocket=chat)]


def make_app(**options: Any) -> tuple[Flask, WebSocketMiddleware, Stats]:
    """A new application, its middleware and its stats."""
    stats = Stats()
    flask_app = Flask(__name__)

    @flask_app.get("/")
    def index() -> str:
        return PAGE

    @flask_app.get("/stats")
    def show_stats() -> Response:
        return Response(stats.as_json(), mimetype="application/json")

    middleware = mount(flask_app, blocks(stats), **options)
    return flask_app, middleware, stats


# For gunicorn: short timeouts, so that a test's shutdown is quick.
app, middleware, stats = make_app(shutdown_timeout=3.0, close_timeout=2.0)
