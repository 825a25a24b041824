"""Every access to wsproto's internals, in one place, checked at import.

The protocol state machine drives wsproto's ``FrameProtocol`` directly and
needs four things wsproto does not make public:

- its input buffer (the bytearray itself, which wsproto grows and trims in
  place), to know when every frame that can be parsed has been (asking
  again would only cost time), and to add received bytes to it;
- the generator its ``received_frames()`` wraps, to take one frame per call
  (``None`` when more bytes are needed) without a wrapping generator per
  read: wsproto still parses and validates every frame;
- the header of the frame being received, so that a frame announcing more
  than ``max_message_size`` fails at its header, before its payload is
  buffered;
- the bytes its UTF-8 decoder holds back between fragments, so that an
  encoded surrogate fails at the fragment that made it invalid;
- its unmasker and its close-frame parser, to unmask in C and to check close
  codes against the current registry.

:func:`_check` exercises each of them once when this module is imported. A
wsproto whose internals moved makes the import fail with a message naming
the version, rather than silently turning a limit off.
"""

from __future__ import annotations

import struct
from typing import Any, Callable, Optional, Union, cast

import wsproto
from wsproto.frame_protocol import (
    Frame,
    FrameDecoder,
    FrameProtocol,
    Opcode,
    ParseFailed,
    XorMaskerNull,
    XorMaskerSimple,
)

try:
    from .._speedups import xor_mask
except ImportError:  # not built: wsproto's own unmasking is used
    xor_mask = None  # type: ignore[assignment]

from .frames import CloseCode, is_valid_close_code

__all__ = ["Decoder", "ParseFailed", "Opcode", "SUPPORTED"]

SUPPORTED = "wsproto >= 1.2, < 2"

# wsproto 1.2's masker returns bytes, 1.3's the bytearray (which 1.3 then
# copies into bytes itself): ours returns what wsproto's does.
# (typed object: wsproto's annotations describe only one of the two.)
_MASKED: object = XorMaskerSimple(b"\0\0\0\0").process(bytearray(b"x"))
_MASKER_GIVES_BYTES = type(_MASKED) is bytes


class _Unmasker:
    """wsproto's ``XorMaskerSimple`` with the XOR done in C and in place.

    wsproto hands the masker a fresh ``bytearray`` slice of its buffer and
    uses what it returns, so XORing that slice in place is safe and saves
    wsproto's copy; the key turns as wsproto's does, so that a frame whose
    payload arrives in several reads is unmasked as one.
    """

    __slots__ = ("key",)

    def __init__(self, key: Union[bytes, bytearray]) -> None:
        self.key = bytes(key)

    def process(self, data: bytearray) -> bytearray:
        if data:
            if type(data) is not bytearray:
                data = bytearray(data)
            key = self.key
            xor_mask(data, key)
            turn = len(data) & 3
            if turn:
                self.key = key[turn:] + key[:turn]
        if _MASKER_GIVES_BYTES:  # wsproto 1.2 (see _Bytes), also when empty
            return bytes(data)  # type: ignore[return-value]
        return data


class _FrameDecoder(FrameDecoder):
    """wsproto's frame decoder, unmasking with :class:`_Unmasker`: wsproto
    still parses and validates every header and payload."""

    def parse_header(self) -> bool:
        if not super().parse_header():
            return False
        if type(self.masker) is XorMaskerSimple:
            self.masker = _Unmasker(self.masker._masking_key)  # type: ignore[assignment]
        return True


class _Bytes:
    """wsproto 1.2's masker, returning bytes as wsproto 1.3 does for every
    payload: 1.2 hands out the bytearray slice of its buffer for an unmasked
    frame (what a client receives) and for an empty masked one."""

    __slots__ = ("masker",)

    def __init__(self, masker: Union[XorMaskerNull, XorMaskerSimple]) -> None:
        self.masker = masker

    def process(self, data: bytearray) -> bytes:
        return bytes(self.masker.process(data))


class _BytesFrameDecoder(FrameDecoder):
    """wsproto 1.2's frame decoder with payloads as bytes (see :class:`_Bytes`)."""

    def parse_header(self) -> bool:
        if not super().parse_header():
            return False
        if self.masker is not None:
            self.masker = _Bytes(self.masker)  # type: ignore[assignment]
        return True


class Decoder(FrameProtocol):
    """wsproto's frame protocol, with the few things it keeps private made
    into methods, and the close payload checked against the current registry
    (wsproto refuses 1014, and reports an invalid UTF-8 reason as 1007 where a
    malformed close frame is a protocol error, 1002). With the C helper built,
    frames are unmasked in C."""

    def __init__(self, client: bool, unmask_in_c: bool = True,
                 extension: Optional[Any] = None) -> None:
        # ``extension``: a wsproto extension that receives every frame (the
        # permessage-deflate inflater), or None.
        super().__init__(client, [extension] if extension is not None else [])
        if xor_mask is not None and unmask_in_c and not client:
            self._frame_decoder = _FrameDecoder(self.client, self.extensions)
        elif _MASKER_GIVES_BYTES:  # wsproto 1.2 (see _Bytes)
            self._frame_decoder = _BytesFrameDecoder(self.client, self.extensions)
        self._inbox = self._frame_decoder.buffer
        self.inbox: bytearray = self._inbox.buffer
        """wsproto's input buffer, grown (``+=``) and trimmed (``del``) in
        place by wsproto: bytes received and not parsed yet."""
        self.next_frame: Callable[[], Optional[Frame]] = self._parse_more.__next__
        """The next frame parsed and validated by wsproto, or ``None`` when
        more bytes are needed (``StopIteration`` after a close frame or a
        ``ParseFailed``: wsproto parses no further)."""

    @property
    def unmasks_in_c(self) -> bool:
        """True when received payloads are unmasked by the C helper."""
        return type(self._frame_decoder) is _FrameDecoder

    def feed(self, data: bytes) -> None:
        """Add received bytes to wsproto's input buffer."""
        self.inbox += data

    def has_input(self) -> bool:
        """Are there buffered bytes wsproto has not parsed yet?"""
        return bool(self.inbox)

    def held_utf8(self) -> int:
        """Bytes the UTF-8 decoder holds back for the next fragment, or -1 if
        they already cannot start a valid character.

        Python's decoder waits for the third byte before it rejects an encoded
        surrogate (ED A0-BF): checking here makes a fragmented message fail at
        the fragment that made it invalid.
        """
        decoder = self._message_decoder.decoder
        if decoder is None:
            return 0
        held = decoder.getstate()[0]
        if len(held) >= 2 and held[0] == 0xED and held[1] >= 0xA0:
            return -1
        return len(held)

    def announced_size(self, so_far: int) -> int:
        """Bytes the current message will have once the frame being received
        is in, given the ``so_far`` bytes of its earlier frames."""
        decoder = self._frame_decoder
        header = decoder.header
        if header is None or header.opcode.iscontrol():
            return so_far
        extensions = self.extensions
        if extensions and getattr(extensions[0], "compressing", False):
            # Its headers announce compressed bytes: the inflater bounds it.
            return so_far
        if header.opcode is not Opcode.CONTINUATION:
            # A new message (or a protocol error wsproto reports next): this
            # frame is all of it, whatever part of it was consumed already.
            return header.payload_len
        return so_far + header.payload_len - decoder.payload_consumed

    def _process_close(self, frame: Frame) -> Frame:
        data = cast(bytes, frame.payload)
        if not data:
            return Frame(frame.opcode, (CloseCode.NO_STATUS_RCVD, ""), frame.frame_finished,
                         frame.message_finished)
        if len(data) == 1:
            raise ParseFailed("close frame with a 1-byte payload")
        (code,) = struct.unpack("!H", data[:2])
        if not is_valid_close_code(code):
            raise ParseFailed(f"invalid close code {code}")
        try:
            reason = bytes(data[2:]).decode("utf-8")
        except UnicodeDecodeError:
            raise ParseFailed("close reason is not valid UTF-8") from None
        return Frame(frame.opcode, (code, reason), frame.frame_finished, frame.message_finished)


def _check() -> None:
    """Exercise every internal this module uses, once; fail the import if one moved."""
    try:
        decoder = Decoder(client=False)
        # A masked text frame announcing 10 bytes, its payload cut after 4
        # of them, the last two of which open a 3-byte character.
        key = b"\x01\x02\x03\x04"
        payload = b"ab\xe2\x82"
        masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        inbox = decoder.inbox
        decoder.feed(b"\x01\x8a" + key + masked)
        assert decoder._frame_decoder.buffer.buffer is inbox, "input buffer"
        assert len(inbox) == 10, "input buffer"
        frames = list(iter(decoder.next_frame, None))
        assert decoder.announced_size(0) == 10, "frame header"
        assert not decoder.has_input(), "input buffer"
        # Trimmed in place: still the buffer wsproto reads.
        assert decoder._frame_decoder.buffer.buffer is inbox, "input buffer"
        if frames:  # wsproto hands out the part received as a frame of its own
            assert frames[0].payload == "ab", frames
            assert decoder.held_utf8() == 2, "UTF-8 decoder state"
        masker = decoder._frame_decoder.masker
        if isinstance(masker, _Bytes):
            masker = masker.masker
        assert isinstance(masker, (XorMaskerSimple, _Unmasker)), "masker"
        if not isinstance(masker, _Unmasker):
            assert masker._masking_key == key
        # Our close parser replaces wsproto's.
        closer = Decoder(client=True)
        closer.feed(b"\x82\x01x\x89\x01p\x88\x02" + struct.pack("!H", 1014))
        binary, ping, close = list(iter(closer.next_frame, None))
        try:
            closer.next_frame()
        except StopIteration:
            pass  # no frame after a close
        else:
            raise AssertionError("a frame after a close frame")
        # Payloads are bytes, as wsproto 1.3 gives them (not 1.2).
        assert type(binary.payload) is bytes and type(ping.payload) is bytes, \
            (binary, ping)
        empty = Decoder(client=False, unmask_in_c=False)
        empty.feed(b"\x82\x80" + key)
        (nothing,) = list(empty.received_frames())
        assert type(nothing.payload) is bytes, nothing
        assert close.payload == (1014, ""), close.payload
    except Exception as exc:  # AssertionError, AttributeError, TypeError...
        raise ImportError(
            f"gaman_sync does not support wsproto {getattr(wsproto, '__version__', '?')}: "
            f"its internals changed ({type(exc).__name__}: {exc}); "
            f"install {SUPPORTED}") from exc


_check()


