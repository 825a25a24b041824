"""A compressed message exactly at ``max_message_size`` that does not
compress: its compressed form is larger than the limit (stored blocks carry
headers), and it must still be accepted, whatever the peer's zlib settings."""

from __future__ import annotations

import os

import pytest
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.sync.client import connect as ws_connect

from gaman_sync import define_block

from .conftest import WAIT


@pytest.mark.parametrize("mem_level", [1, 5, 8, 9])
def test_incompressible_message_at_the_limit_is_accepted(make_server, mem_level):
    def echo(ctx):
        return {"on_message": lambda message: ctx.send(message)}

    server = make_server(define_block(path="/", websocket=echo))
    limit = server.options.max_message_size
    factory = ClientPerMessageDeflateFactory(compress_settings={"memLevel": mem_level})
    message = os.urandom(limit)
    with ws_connect(server.url("/"), extensions=[factory], compression=None,
                    max_size=None, open_timeout=WAIT) as ws:
        assert ws.protocol.extensions, "permessage-deflate was not negotiated"
        ws.send(message)
        assert ws.recv(timeout=WAIT) == message
