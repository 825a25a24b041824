"""The pytest plugin of gaman_sync: fixtures ``ws_server`` and ``ws_client``.

Theory of operation
-------------------
Installed with the package, it is registered as a ``pytest11`` entry point
(``gaman_sync = gaman_sync.testing.plugin``), so pytest loads it in every
project that has gaman_sync installed. Loading it only defines two
fixtures: no hook, no option, no import of the server or the client until
a test asks for a fixture. A run that uses neither is unchanged
(``-p no:gaman_sync`` disables it altogether; ``-p gaman_sync.testing.plugin``
loads it where the entry point is not installed).

Both fixtures are factories, so a test makes as many servers and clients as
it needs. At teardown the clients are closed first (each waits for its
closing handshake), then the servers are shut down, each checked by
:func:`~gaman_sync.testing.shut_down_cleanly`: a server thread still running
(a callback that never returns, say) fails the test at teardown with an
``AssertionError`` that names the thread and where it is stuck. Every
server is shut down even when an earlier one failed; the first failure is
the one raised.

Example::

    def test_echo(ws_server, ws_client):
        server = ws_server(define_block("/echo", lambda ctx: {"on_message": ctx.send}))
        client = ws_client(server, "/echo")
        client.send("hi")
        client.expect("hi")
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, List, Union

import pytest

__all__ = ["ws_client", "ws_server"]


@pytest.fixture
def ws_server() -> Iterator[Callable[..., Any]]:
    """A factory: ``ws_server(block_or_blocks, **options)`` starts a
    :class:`~gaman_sync.WebSocketServer` on 127.0.0.1, port 0 (use
    ``server.port`` or ``server.url(path)``) and returns it. Each is shut
    down after the test, which fails if a thread of it is left running."""
    from ..server import WebSocketServer
    from .server import DEFAULT_SHUTDOWN_TIMEOUT, shut_down_cleanly

    servers: List[WebSocketServer] = []

    def factory(blocks: Any, **options: Any) -> WebSocketServer:
        options.setdefault("host", "127.0.0.1")
        options.setdefault("port", 0)
        options.setdefault("shutdown_timeout", DEFAULT_SHUTDOWN_TIMEOUT)
        server = WebSocketServer(blocks, **options)
        server.start()
        servers.append(server)
        return server

    yield factory
    failures: List[AssertionError] = []
    for server in servers:
        try:
            shut_down_cleanly(server, what="the ws_server fixture's server")
        except AssertionError as exc:
            failures.append(exc)
    if failures:
        raise failures[0]


@pytest.fixture
def ws_client(ws_server: Callable[..., Any]) -> Iterator[Callable[..., Any]]:
    """A factory: ``ws_client(server_or_url, path="/", **connect_options)``
    returns a connected :class:`~gaman_sync.testing.TestClient`; each is
    closed after the test, before any ``ws_server`` is shut down (it depends
    on that fixture for this order only)."""
    from .client import TestClient

    clients: List[TestClient] = []

    def factory(server_or_url: Union[Any, str], path: str = "/",
                **connect_options: Any) -> TestClient:
        client = TestClient(server_or_url, path, **connect_options)
        clients.append(client)
        return client

    yield factory
    for client in reversed(clients):
        client.close()
