"""Brokers: what carries a block's broadcasts to the other processes of an
application (several workers on one machine, several machines behind a load
balancer), so that every client of every process receives them.

Theory of operation
-------------------

A server delivers each broadcast to its own clients at once (the frame
encoded once, queued for each client, never waiting), then hands it to its
broker, which carries it to the other processes; each of those delivers it
to its own clients, encoding the frame once. So every client receives every
broadcast exactly once, its own process's included, and the broadcasts made
by one thread (one connection's handler, say) reach every client in the
order they were made. Two broadcasts made by different threads or processes
may reach the clients of different processes in different orders.

- :class:`Broker`: the interface (``start``, ``publish``, ``stop``);
- :class:`LocalBroker`: the default, one process, nothing to carry (a
  broadcast costs what it did before brokers existed);
- :class:`RedisBroker`: Redis pub/sub through the ``redis`` client library
  (``pip install 'gaman_sync[redis]'``), with one publisher and one
  subscriber thread per process, whatever the number of connections;
- :mod:`.envelope`: what a broadcast looks like on the way (its text or
  binary message, its room, the connections it skips).

This layer knows nothing of servers or connections: it carries bytes on
named channels. The server names one channel per block.
"""

from .base import Broker, BrokerUnavailable, Deliver, LocalBroker
from .redis_broker import RedisBroker

__all__ = ["Broker", "BrokerUnavailable", "Deliver", "LocalBroker", "RedisBroker"]
