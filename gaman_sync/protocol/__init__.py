"""The protocol layer, sans-IO: frames, the opening handshake and the state
machine of an open connection, for either side. No socket, no thread, no
clock: everything here is driven by bytes in and bytes out.
"""

from .events import Closed, Event, Failed, MessageReceived, PongReceived
from .frames import CloseCode, Data, check_close_code, encode_frame, is_valid_close_code
from .handshake import ClientHandshake, HandshakeError, RequestParser
from .http import Headers, Request, Response
from .state import Protocol, Side, State

__all__ = ["Closed", "ClientHandshake", "CloseCode", "Data", "Event", "Failed",
           "HandshakeError", "Headers", "MessageReceived", "PongReceived", "Protocol",
           "Request", "RequestParser", "Response", "Side", "State", "check_close_code",
           "encode_frame", "is_valid_close_code"]
