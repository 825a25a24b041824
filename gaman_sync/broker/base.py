"""The broker interface, and the in-process default.

A broker is made unstarted (no connection, no thread) and started by the
server that uses it, in the process that serves: one broker object passed to
a program that forks its workers gives each worker a broker of its own.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import Callable, List, Optional, Sequence

__all__ = ["Broker", "BrokerUnavailable", "Deliver", "LocalBroker"]

Deliver = Callable[[str, bytes], None]
"""``deliver(channel, payload)``: what a broker calls, from its own thread,
for each payload another process published on one of its channels."""


class BrokerUnavailable(ConnectionError):
    """A broker could not reach its service when it started (Redis down, a
    wrong URL): the server does not start."""


class Broker(ABC):
    """Carries payloads published on named channels to the other processes
    that subscribed to them.

    The contract, which a server relies on:

    - :meth:`start` subscribes to ``channels`` and returns once the
      subscription is in place, or raises :class:`BrokerUnavailable`; from
      then on, every payload another process publishes on one of them is
      passed to ``deliver(channel, payload)``, once, from one thread of the
      broker's own (never a connection's), in the order that process
      published them.
    - :meth:`publish` never blocks and never raises for a lost service: the
      payload goes to every *other* process subscribed to ``channel``, not to
      this one (the server has delivered it here already). While the service
      is unreachable, payloads are dropped, not queued (at most once).
    - :meth:`stop` ends the broker's threads and connections.

    ``node`` is set by :meth:`start`: a number unique among the processes
    that share the broker's service (the server makes connection ids from
    it, so that an id names one connection across processes), or None for a
    broker that spans one process.
    """

    remote: bool = True
    """False for a broker that reaches no other process: the server then
    skips publishing altogether."""

    node: Optional[int] = None

    def channel(self, name: str) -> str:
        """The channel of ``name`` (a block's path)."""
        return name

    @abstractmethod
    def start(self, channels: Sequence[str], deliver: Deliver) -> None:
        """Subscribe to ``channels`` and start delivering (see the class)."""

    @abstractmethod
    def publish(self, channel: str, payload: bytes) -> None:
        """Send ``payload`` to the other processes subscribed to ``channel``."""

    @abstractmethod
    def stop(self, timeout: float = 5.0) -> None:
        """End the broker's threads and connections, within ``timeout`` seconds."""

    @property
    def threads(self) -> List[threading.Thread]:
        """The broker's live threads (none once stopped)."""
        return []

    def check(self) -> None:
        """Raise :class:`BrokerUnavailable` if the service cannot be reached
        now, in the calling thread and starting none (a supervisor checks
        before it forks its workers). The default checks nothing."""
        return None  # a service-less broker is always reachable


class LocalBroker(Broker):
    """The default: one process, so nothing to carry. A broadcast reaches the
    clients of this process only, exactly as without a broker."""

    remote = False

    def start(self, channels: Sequence[str], deliver: Deliver) -> None:
        pass

    def publish(self, channel: str, payload: bytes) -> None:
        pass  # no other process

    def stop(self, timeout: float = 5.0) -> None:
        pass

    def __repr__(self) -> str:
        return "<LocalBroker>"
