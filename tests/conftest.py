"""Shared fixtures: servers on 127.0.0.1, port 0, always shut down."""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
from typing import Any, Callable, Iterator, List, Sequence

import pytest
from hypothesis import HealthCheck, settings

from gaman_sync import WebSocketServer, define_block
from gaman_sync.testing import run_server

settings.register_profile(
    "ci", derandomize=True, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile(
    "dev", deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

WAIT = 10.0  # seconds: the longest any test waits for an event


class Recorder:
    """Records a connection's callbacks, in order, and lets a test wait for them."""

    def __init__(self) -> None:
        self.events: List[tuple] = []
        self.cond = threading.Condition()

    def add(self, *event: Any) -> None:
        with self.cond:
            self.events.append(event)
            self.cond.notify_all()

    def wait_for(self, predicate: Callable[[List[tuple]], bool],
                 timeout: float = WAIT) -> List[tuple]:
        with self.cond:
            if not self.cond.wait_for(lambda: predicate(self.events), timeout):
                raise AssertionError(f"timed out waiting; events so far: {self.events!r}")
            return list(self.events)

    def wait_kind(self, kind: str, count: int = 1, timeout: float = WAIT) -> List[tuple]:
        return self.wait_for(lambda ev: sum(1 for e in ev if e[0] == kind) >= count, timeout)

    def kinds(self) -> List[str]:
        with self.cond:
            return [e[0] for e in self.events]


@pytest.fixture
def make_server():
    """``make_server(blocks, **options)``: a started server on 127.0.0.1 port 0
    (:func:`gaman_sync.testing.run_server`), shut down after the test, which
    fails if the server left a thread or its listening socket behind."""
    with contextlib.ExitStack() as stack:
        def factory(blocks: Any, **options: Any) -> WebSocketServer:
            return stack.enter_context(run_server(blocks, **options))

        yield factory


@pytest.fixture
def echo_server(make_server):
    """A server with an echo block at /echo."""
    return make_server(define_block("/echo", lambda ctx: {"on_message": ctx.send}))


@contextlib.contextmanager
def child(args: Sequence[str]) -> Iterator[subprocess.Popen]:
    """``subprocess.Popen(args)`` with stdin, stdout and stderr piped, as
    UTF-8 text; on exit, killed if still running and its pipes closed."""
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, encoding="utf-8")
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(WAIT)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()
