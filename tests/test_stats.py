"""``server.stats()``, the per-connection traffic counters, the access log and
the periodic stats line, on real sockets over 127.0.0.1.

Expected byte counts come from RFC 6455's frame layout (section 5.2), written
out here independently of the package: a header of 2 bytes, 2 or 8 more for
a length of 126 or more (65536 or more), 4 more for a client's mask.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, List

import pytest

from gaman_sync import InvalidStatus, Reject, connect, define_block
from gaman_sync.server import ServerStats

from .conftest import WAIT, Recorder


def frame_size(payload: int, masked: bool) -> int:
    """Bytes on the wire of one frame with ``payload`` bytes (RFC 6455 5.2)."""
    extended = 0 if payload < 126 else 2 if payload < 65536 else 8
    return 2 + extended + (4 if masked else 0) + payload


def close_size(masked: bool, reason: str = "") -> int:
    """A close frame with a code and ``reason``."""
    return frame_size(2 + len(reason.encode()), masked)


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Poll a condition that no event announces (the server's tally is
    updated just after ``on_close`` returns, in the connection's thread)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def doubling_block(path: str = "/room", **kwargs):
    """Answers each message with the message twice: replies differ in size
    from what came in, so a count that mixes the directions shows."""
    closes = Recorder()

    def handler(ctx):
        return {"on_message": lambda m: ctx.send(m + m),
                "on_close": lambda code, reason: closes.add("close", code)}

    return define_block(path, handler, **kwargs), closes


# Sizes in bytes of UTF-8: 1, 125 and 300 (the three header sizes of the
# frames each way), 70,000 (the large-frame write path), and a non-ASCII text
# whose bytes are twice its characters.
MESSAGES = ["a", "b" * 125, "c" * 300, "d" * 70000, "\u00e9" * 50]


def test_stats_count_exactly_a_known_traffic_pattern(make_server):
    # Without compression, so that the bytes counted are the frames as written
    # here (with it, they are the compressed frames on the wire).
    block, closes = doubling_block(origins=["https://ok.example"])
    server = make_server(block, ping_interval=None, compression=None)
    empty = server.stats()
    assert isinstance(empty, ServerStats)
    assert empty.as_dict() == {"open": 0, "accepted": 0, "rejected": {}, "messages_in": 0,
                               "bytes_in": 0, "messages_out": 0, "bytes_out": 0, "closes": {}}

    # Two refused handshakes, never counted as accepted: no block (404) and
    # an origin the block does not allow (403).
    with pytest.raises(InvalidStatus) as info:
        connect(server.url("/nowhere"), ping_interval=None)
    assert info.value.status == 404
    with pytest.raises(InvalidStatus) as info:
        connect(server.url("/room"), origin="https://evil.example", ping_interval=None)
    assert info.value.status == 403

    a = connect(server.url("/room"), ping_interval=None)
    b = connect(server.url("/room"), origin="https://ok.example", ping_interval=None)
    try:
        for message in MESSAGES:
            a.send(message)
        for message in MESSAGES:
            assert a.recv(timeout=WAIT) == message + message
        in_bytes = [len(m.encode()) for m in MESSAGES]
        expect_in = sum(frame_size(n, masked=True) for n in in_bytes)
        expect_out = sum(frame_size(2 * n, masked=False) for n in in_bytes)

        # While both are open, their live counters are in the totals.
        wait_until(lambda: server.stats().rejected == {404: 1, 403: 1}, "both refusals")
        middle = server.stats()
        assert (middle.open, middle.accepted, middle.closes) == (2, 2, {})
        assert (middle.messages_in, middle.messages_out) == (5, 5)
        assert (middle.bytes_in, middle.bytes_out) == (expect_in, expect_out)

        # One broadcast: one message sent per client it reached.
        wait_until(lambda: len(server.clients) == 2, "two clients")
        assert server.broadcast("z" * 10) == 2
        assert a.recv(timeout=WAIT) == "z" * 10
        assert b.recv(timeout=WAIT) == "z" * 10
    finally:
        a.close(1000)
        b.close(1001, "bye")
    closes.wait_kind("close", 2)
    wait_until(lambda: server.stats().open == 0, "both connections to be counted closed")

    stats = server.stats()
    assert stats.open == 0
    assert stats.accepted == 2
    assert stats.rejected == {404: 1, 403: 1}
    assert stats.closes == {1000: 1, 1001: 1}
    assert stats.messages_in == len(MESSAGES)
    assert stats.messages_out == len(MESSAGES) + 2
    # The close frames: each client's (masked), and the server's echo of it.
    assert stats.bytes_in == expect_in + close_size(True) + close_size(True, "bye")
    assert stats.bytes_out == (expect_out + 2 * frame_size(10, masked=False)
                               + close_size(False) + close_size(False, "bye"))
    # Each end counts the same frames from its side.
    assert a.bytes_out + b.bytes_out == stats.bytes_in
    assert a.bytes_in + b.bytes_in == stats.bytes_out
    assert (a.messages_out, a.messages_in, b.messages_out, b.messages_in) == (5, 6, 0, 1)
    line = str(stats)
    assert "\n" not in line
    assert "open=0 accepted=2 rejected=403:1,404:1" in line
    assert "closes=1000:1,1001:1" in line


def test_refusals_and_redirects_of_on_request_count_by_status_not_as_accepted(make_server):
    def check(request):
        if request.query.get("token") != "ok":
            return Reject(401, "a token is needed")
        return None

    guarded, _ = doubling_block("/private", on_request=check)
    moved = define_block("/old", redirect="/private", redirect_status=307)
    server = make_server([guarded, moved], ping_interval=None, compression=None)
    with pytest.raises(InvalidStatus) as info:
        connect(server.url("/private"), ping_interval=None)
    assert info.value.status == 401
    with pytest.raises(InvalidStatus) as info:
        connect(server.url("/old"), follow_redirects=False, ping_interval=None)
    assert info.value.status == 307
    with connect(server.url("/private?token=ok"), ping_interval=None) as ws:
        ws.send("x")
        assert ws.recv(timeout=WAIT) == "xx"
    wait_until(lambda: sum(server.stats().rejected.values()) == 2
               and server.stats().open == 0, "the refusals and the close")
    stats = server.stats()
    assert stats.rejected == {401: 1, 307: 1}
    assert stats.accepted == 1
    assert stats.closes == {1000: 1}
    assert (stats.messages_in, stats.messages_out) == (1, 1)


def test_a_lost_connection_counts_as_1006_and_keeps_its_traffic(make_server):
    block, closes = doubling_block()
    server = make_server(block, ping_interval=None, compression=None)
    ws = connect(server.url("/room"), ping_interval=None)
    ws.send("hello")
    assert ws.recv(timeout=WAIT) == "hellohello"
    ws.terminate()
    closes.wait_kind("close")
    wait_until(lambda: server.stats().closes, "the close to be counted")
    stats = server.stats()
    assert stats.closes == {1006: 1}
    assert (stats.bytes_in, stats.bytes_out) == (frame_size(5, True), frame_size(10, False))


class Records(logging.Handler):
    """Collects one logger's records and lets a test wait for them."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: List[logging.LogRecord] = []
        self.cond = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self.cond:
            self.records.append(record)
            self.cond.notify_all()

    def wait(self, predicate: Callable[[logging.LogRecord], bool],
             timeout: float = WAIT) -> logging.LogRecord:
        with self.cond:
            found: List[logging.LogRecord] = []

            def seen() -> bool:
                found[:] = [r for r in self.records if predicate(r)]
                return bool(found)

            if not self.cond.wait_for(seen, timeout):
                got = [r.getMessage() for r in self.records]
                raise AssertionError(f"no such record; got {got}")
            return found[0]


@pytest.fixture
def records():
    """``records("gaman_sync.access")``: a collecting handler on that logger, at INFO."""
    attached = []

    def attach(name: str) -> Records:
        handler = Records()
        log = logging.getLogger(name)
        attached.append((log, handler, log.level))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        return handler

    yield attach
    for log, handler, level in attached:
        log.removeHandler(handler)
        log.setLevel(level)


def test_access_log_option_logs_one_line_per_connection_with_its_fields(make_server, records):
    access = records("gaman_sync.access")
    block, _ = doubling_block()
    server = make_server(block, ping_interval=None, compression=None, access_log=True)
    ws = connect(server.url("/room?secret=1"), ping_interval=None)
    local = ws.transport.sock.getsockname()
    ws.send("hey")
    ws.send("you")
    assert ws.recv(timeout=WAIT) == "heyhey"
    assert ws.recv(timeout=WAIT) == "youyou"
    time.sleep(0.05)  # a duration long enough to tell from zero
    ws.close(4000, "done")
    record = access.wait(lambda r: True)
    assert record.levelno == logging.INFO
    assert record.peer == f"{local[0]}:{local[1]}"
    assert record.path == "/room"  # the query (a token, say) stays out of the log
    assert record.code == 4000
    assert 0.05 <= record.duration < WAIT
    assert (record.messages_in, record.messages_out) == (2, 2)
    assert record.bytes_in == 2 * frame_size(3, True) + close_size(True, "done")
    assert record.bytes_out == 2 * frame_size(6, False) + close_size(False, "done")
    line = record.getMessage()
    assert line == (f"peer={local[0]}:{local[1]} path=/room code=4000 "
                    f"duration={record.duration}s messages_in=2 bytes_in={record.bytes_in} "
                    f"messages_out=2 bytes_out={record.bytes_out}")
    assert len(access.records) == 1


def test_no_access_log_by_default(make_server, records):
    access = records("gaman_sync.access")
    block, closes = doubling_block()
    server = make_server(block, ping_interval=None, compression=None)
    with connect(server.url("/room"), ping_interval=None):
        pass
    closes.wait_kind("close")
    wait_until(lambda: server.stats().closes, "the close to be counted")
    assert access.records == []


def test_stats_interval_logs_stats_from_the_timer_thread(make_server, records):
    lines = records("gaman_sync.stats")
    block, _ = doubling_block()
    server = make_server(block, ping_interval=None, compression=None, stats_interval=0.05)
    with connect(server.url("/room"), ping_interval=None) as ws:
        ws.send("x")
        assert ws.recv(timeout=WAIT) == "xx"
        record = lines.wait(
            lambda r: "open=1 accepted=1 rejected=- messages_in=1 " in r.getMessage())
    assert record.threadName == "gaman_sync-timers"
    assert record.getMessage().startswith("stats: open=1 accepted=1 rejected=- messages_in=1")
    assert "\n" not in record.getMessage()


@pytest.mark.parametrize("bad", [0, -1, float("inf"), float("nan"), "5", True])
def test_stats_interval_must_be_a_positive_number(bad):
    from gaman_sync import WebSocketServer

    with pytest.raises(ValueError, match="stats_interval"):
        WebSocketServer(define_block("/", lambda ctx: {}), port=0, stats_interval=bad)


def test_access_log_must_be_a_bool():
    from gaman_sync import WebSocketServer

    with pytest.raises(TypeError, match="access_log"):
        WebSocketServer(define_block("/", lambda ctx: {}), port=0, access_log="yes")
