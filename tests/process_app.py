"""Blocks for the tests of ``--workers`` (tests/test_processes.py), served
by ``python -m gaman_sync tests.process_app:blocks``.

``/pid`` says which process serves the connection: its first message is the
worker's pid, and then it echoes. ``/broadcast`` sends every message it
receives to every client of ``/broadcast`` that its worker can reach.
"""

import os

from gaman_sync import define_block


def _pid(ctx):
    return {"on_open": lambda: ctx.send(str(os.getpid())), "on_message": ctx.send}


def _broadcast(ctx):
    return {"on_open": lambda: ctx.send(str(os.getpid())),
            "on_message": lambda message: ctx.server.broadcast(message)}


blocks = [define_block("/pid", _pid), define_block("/broadcast", _broadcast)]
