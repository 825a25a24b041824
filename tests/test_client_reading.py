"""The client's reading in the application's thread (``recv()`` without a
handler), on real sockets against websockets' threaded server.

Once an application waits in ``recv()``, the connection's thread lends it
its reading: ``recv()`` then reads the socket itself, with no hand-over
between threads per message. The connection's thread takes the reading back
whenever the application stays away, when the connection ends, and when it
is dropped or closed from another thread. These tests check each way back,
and that nothing is lost or reordered across them.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List

import pytest
from websockets.sync.server import serve as ws_serve

import gaman_sync
from gaman_sync import ConnectionClosedError, ConnectionClosedOK

from .conftest import WAIT


class Server:
    """websockets' server; every message is echoed but for a few commands."""

    def __init__(self) -> None:
        self.pongs = threading.Event()
        self.closed: List[Any] = []

    def handler(self, ws: Any) -> None:
        try:
            for message in ws:
                if message == "!ping":
                    # The application is away from recv(): only the
                    # connection's thread can answer.
                    if ws.ping().wait(WAIT):
                        self.pongs.set()
                elif isinstance(message, str) and message.startswith("!close"):
                    ws.close(4000, "bye")
                elif isinstance(message, str) and message.startswith("!burst "):
                    for i in range(int(message.split()[1])):
                        ws.send(str(i))
                else:
                    ws.send(message)
        finally:
            self.closed.append(ws.close_code)


@pytest.fixture
def server() -> Iterator[tuple]:
    srv = Server()
    with ws_serve(srv.handler, "127.0.0.1", 0, ping_interval=None) as ws_server:
        thread = threading.Thread(target=ws_server.serve_forever, daemon=True)
        thread.start()
        port = ws_server.socket.getsockname()[1]
        yield srv, f"ws://127.0.0.1:{port}/"
        ws_server.shutdown()
        thread.join(WAIT)


@contextmanager
def client(url: str, **options: Any) -> Iterator[gaman_sync.ClientConnection]:
    conn = gaman_sync.connect(url, open_timeout=WAIT, **options)
    try:
        yield conn
    finally:
        conn.terminate()
        conn.wait_closed(WAIT)


def round_trips(conn: gaman_sync.ClientConnection, n: int = 3) -> None:
    for i in range(n):
        conn.send(f"m{i}")
        assert conn.recv(WAIT) == f"m{i}"


def wait_for(predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
    """Poll a state that no event announces (the reading given back)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def in_thread(function: Callable[[], Any]) -> Dict[str, Any]:
    """Run ``function`` in a thread; the dict gets its result or exception."""
    out: Dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = function()
        except BaseException as exc:
            out["error"] = exc
        finally:
            out["done"] = True

    out["thread"] = threading.Thread(target=run, daemon=True)
    out["thread"].start()
    return out


def test_recv_reads_in_the_applications_thread_and_gives_it_back(server):
    _, url = server
    with client(url) as conn:
        assert conn.reader == "thread"  # nobody asked yet
        # After a recv() the application may read again without a hand-over
        # (a check per round trip: a stall of the machine past the thread's
        # check could take it back once in a while, and that is right).
        seen = []
        for i in range(20):
            conn.send(str(i))
            assert conn.recv(WAIT) == str(i)
            seen.append(conn.reader)
        assert seen.count("lent") >= 10, seen
        # An application that stays away gets it taken back.
        assert wait_for(lambda: conn.reader == "thread")
        round_trips(conn)  # and lent again


def test_a_ping_is_answered_while_the_application_is_away(server):
    srv, url = server
    with client(url) as conn:
        round_trips(conn)
        conn.send("!ping")  # and no recv() until the server has its pong
        assert srv.pongs.wait(WAIT)
        round_trips(conn)


def test_the_servers_close_is_handled_while_the_application_is_away(server):
    _srv, url = server
    with client(url) as conn:
        round_trips(conn)
        conn.send("!close")
        assert conn.wait_closed(WAIT)
        assert conn.close_code == 4000 and conn.close_reason == "bye"
        with pytest.raises(ConnectionClosedError) as info:
            conn.recv(WAIT)
        assert info.value.code == 4000


def test_the_servers_close_reaches_a_waiting_recv(server):
    _, url = server
    with client(url) as conn:
        round_trips(conn)
        waiting = in_thread(lambda: conn.recv())
        assert wait_for(lambda: conn.reader == "borrowed")  # recv() reads the socket
        conn.send("!close")  # the server closes: recv() meets its close frame
        waiting["thread"].join(WAIT)
        assert isinstance(waiting.get("error"), ConnectionClosedError)
        assert waiting["error"].code == 4000
        assert conn.wait_closed(WAIT)


def test_terminate_from_another_thread_wakes_a_reading_recv(server):
    _, url = server
    with client(url) as conn:
        round_trips(conn)
        waiting = in_thread(lambda: conn.recv())
        assert wait_for(lambda: conn.reader == "borrowed")
        conn.terminate()
        waiting["thread"].join(WAIT)
        assert isinstance(waiting.get("error"), ConnectionClosedError)
        assert waiting["error"].code == 1006
        assert conn.wait_closed(WAIT)


def test_close_from_another_thread_ends_a_reading_recv(server):
    srv, url = server
    with client(url) as conn:
        round_trips(conn)
        waiting = in_thread(lambda: conn.recv())
        assert wait_for(lambda: conn.reader == "borrowed")
        closer = in_thread(lambda: conn.close(1000, "done"))
        closer["thread"].join(WAIT)
        waiting["thread"].join(WAIT)
        assert closer.get("done") and "error" not in closer
        assert isinstance(waiting.get("error"), ConnectionClosedOK)
        assert conn.close_code == 1000
        assert wait_for(lambda: srv.closed == [1000])


def test_a_timeout_while_reading_leaves_the_connection_usable(server):
    _, url = server
    with client(url) as conn:
        round_trips(conn)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            conn.recv(timeout=0.2)
        assert 0.15 < time.monotonic() - started < WAIT
        round_trips(conn)


def test_nothing_is_lost_or_reordered_across_the_ways_back(server):
    _, url = server
    with client(url, max_queue=16) as conn:
        round_trips(conn, 1)
        conn.send("!burst 3000")
        got = [conn.recv(WAIT) for _ in range(1000)]  # read here
        # Away: the thread takes the reading back and queues (up to max_queue,
        # then TCP holds the server).
        assert wait_for(lambda: conn.reader == "thread")
        got += [conn.recv(WAIT) for _ in range(2000)]  # the queue, then here again
        assert got == [str(i) for i in range(3000)]
        round_trips(conn)


def test_keepalive_holds_while_the_application_is_away(server):
    _, url = server
    with client(url, ping_interval=0.05, ping_timeout=0.2) as conn:
        round_trips(conn)
        # Away for five ping timeouts: the thread reads the pongs meanwhile.
        threading.Event().wait(1.0)
        assert conn.is_open
        round_trips(conn)
