"""Broadcasts between processes through Redis pub/sub (redis-py).

Channels and bytes
------------------

Each block has one channel, ``PREFIX:PATH`` (``gaman_sync:/chat`` for the
block ``/chat`` with the default prefix): give each application that shares
a Redis its own ``prefix`` (``RedisBroker(url, prefix="chat-app")``). A room
is not a channel of its own: it travels in the envelope
(:mod:`gaman_sync.broker.envelope`), so that joining a room is instant and
never misses a message published while a subscription is on its way. On
Redis, a payload is 16 bytes naming the process that sent it (random, drawn
at start), then the envelope; each process skips its own.

Threads and connections
-----------------------

Two threads per process, whatever the number of WebSocket connections, and
two Redis connections:

- the publisher: :meth:`RedisBroker.publish` appends to a queue and returns
  (a broadcast never waits for Redis); the thread sends what has queued up
  in one pipeline of ``PUBLISH`` commands, in order;
- the subscriber: it holds the subscription and hands every payload of
  another process to the server, which delivers it to its clients.

Faults
------

Redis unreachable at start: :meth:`~RedisBroker.start` raises
:class:`~gaman_sync.broker.BrokerUnavailable` (the server does not start: a
wrong URL shows at once rather than as a server that silently reaches its
own clients only). Redis lost while running: the server's own clients still
get every broadcast, since each process delivers its own at once; one
warning is logged for the outage (not one per message); both threads
reconnect with a backoff (50 ms, doubling up to 2 s) and the subscription is
made again; an ``info`` line says when Redis is back and how many broadcasts
did not reach the other processes meanwhile. What is broadcast while Redis is
unreachable is dropped for the other processes, not queued: pub/sub is at
most once across processes (see the README for Redis Streams).
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple
from urllib.parse import urlsplit

from .base import Broker, BrokerUnavailable, Deliver

__all__ = ["RedisBroker"]

logger = logging.getLogger("gaman_sync")

_ORIGIN = 16  # bytes that name the sending process
_FIRST_BACKOFF = 0.05
_MAX_BACKOFF = 2.0
_POLL = 0.1  # how long the subscriber waits for a message before it looks at stop()
_BATCH = 1000  # PUBLISH commands per pipeline at most
_SUBSCRIBER, _PUBLISHER = "subscriber", "publisher"


def _redis() -> Any:
    try:
        import redis
    except ImportError:
        raise ImportError("RedisBroker needs the redis package: "
                          "pip install 'gaman_sync[redis]'") from None
    return redis


def _describe(url: str) -> str:
    """``url`` without its user and password, for the logs."""
    parts = urlsplit(url)
    where = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{where}{parts.path}"


class RedisBroker(Broker):
    """Carries broadcasts between processes through Redis pub/sub.

    ``url`` is a redis-py URL (``redis://host:6379/0``,
    ``rediss://...`` for TLS, ``unix:///path/redis.sock``); ``prefix``
    begins every channel and key it uses (one per application sharing a
    Redis); ``connect_timeout`` bounds each connection attempt;
    ``max_pending`` is how many broadcasts may wait for the publisher
    thread before more are dropped for the other processes (never for this
    one's clients). Nothing connects before :meth:`start`.
    """

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, prefix: str = "gaman_sync",
                 connect_timeout: float = 2.0, max_pending: int = 10000) -> None:
        redis = _redis()
        if not isinstance(url, str):
            raise TypeError(f"url must be a str like redis://127.0.0.1:6379/0, not {url!r}")
        try:
            redis.connection.parse_url(url)
        except ValueError as exc:
            raise ValueError(f"url must be a Redis URL like redis://127.0.0.1:6379/0 "
                             f"(or rediss://, unix://), not {url!r}: {exc}") from None
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix must be a non-empty str, not {prefix!r}")
        if isinstance(connect_timeout, bool) or not isinstance(connect_timeout, (int, float)) \
                or not 0 < connect_timeout < float("inf"):
            raise ValueError(f"connect_timeout must be a positive number of seconds, "
                             f"not {connect_timeout!r}")
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be a positive int, not {max_pending!r}")
        self.url = url
        """The Redis URL."""
        self.prefix = prefix
        """What every channel and key begins with."""
        self.where = _describe(url)
        """The URL without credentials (what the logs name)."""
        self._connect_timeout = float(connect_timeout)
        self._max_pending = max_pending
        self._lock = threading.Lock()
        self._started = False
        self._stopping = threading.Event()
        self._client: Any = None
        self._origin = b""
        self._channels: Tuple[str, ...] = ()
        self._deliver: Optional[Deliver] = None
        # The publisher's queue: a list swapped out whole under the condition.
        self._cond = threading.Condition(threading.Lock())
        self._pending: List[Tuple[str, bytes]] = []
        self._publisher: Optional[threading.Thread] = None
        self._subscriber: Optional[threading.Thread] = None
        self._subscribed = threading.Event()
        self._subscribe_error: Optional[BaseException] = None
        # Outage bookkeeping: which threads find Redis unreachable right now.
        self._health = threading.Lock()
        self._down: Set[str] = set()
        self._dropped = 0  # broadcasts not sent to the other processes this outage
        self._overflowed = False
        self._bad_payload_logged = False

    # -- The Broker interface ---------------------------------------------

    def channel(self, name: str) -> str:
        """``PREFIX:NAME``: the channel of the block whose path is ``name``."""
        return f"{self.prefix}:{name}"

    def start(self, channels: Sequence[str], deliver: Deliver) -> None:
        """Connect, take a process number (``node``, from the Redis counter
        ``PREFIX:nodes``), subscribe to ``channels`` and start both threads;
        returns once subscribed. :class:`BrokerUnavailable` if Redis cannot
        be reached within ``connect_timeout``."""
        redis = _redis()
        with self._lock:
            if self._started and not self._stopping.is_set():
                raise RuntimeError("this RedisBroker is running already; make one per server")
            # A stopped broker starts afresh (a server whose start failed, retried).
            self._started = True
            self._stopping.clear()
            self._subscribed.clear()
            self._subscribe_error = None
            self._pending = []
            self._down.clear()
            self._dropped = 0
        # Drawn here, not in __init__: workers forked from one broker object
        # each get their own.
        self._origin = os.urandom(_ORIGIN)
        self._channels = tuple(dict.fromkeys(channels))
        self._deliver = deliver
        self._client = redis.Redis.from_url(
            self.url, socket_connect_timeout=self._connect_timeout,
            socket_timeout=max(self._connect_timeout, 5.0), socket_keepalive=True,
            health_check_interval=30,
            # Our threads retry, with their backoff and one warning per outage.
            retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0))
        try:
            self.node = int(self._client.incr(f"{self.prefix}:nodes"))
        except (redis.RedisError, OSError) as exc:
            self._client.close()
            raise BrokerUnavailable(f"cannot reach Redis at {self.where}: {exc} (start Redis, "
                                    f"or run without a broker)") from exc
        self._subscriber = threading.Thread(target=self._subscribe_loop,
                                            name="gaman_sync-redis-subscriber", daemon=True)
        self._publisher = threading.Thread(target=self._publish_loop,
                                           name="gaman_sync-redis-publisher", daemon=True)
        self._subscriber.start()
        self._publisher.start()
        if not self._subscribed.wait(self._connect_timeout + 5.0) \
                or self._subscribe_error is not None:
            error = self._subscribe_error
            self.stop()
            raise BrokerUnavailable(f"cannot subscribe on Redis at {self.where}: "
                                    f"{error or 'no answer'}")
        logger.info("broker: Redis at %s, process number %s, channels %s", self.where,
                    self.node, ", ".join(self._channels))

    def publish(self, channel: str, payload: bytes) -> None:
        """Queue ``payload`` for the publisher thread; never blocks."""
        item = (channel, self._origin + payload)
        with self._cond:
            pending = self._pending
            if len(pending) >= self._max_pending:
                self._dropped += 1
                if not self._overflowed:
                    self._overflowed = True
                    logger.warning("broker: %d broadcasts wait for Redis at %s; more are "
                                   "dropped for the other processes until they are sent",
                                   self._max_pending, self.where)
                return
            pending.append(item)
            if len(pending) == 1:
                self._cond.notify()

    def stop(self, timeout: float = 5.0) -> None:
        """Send what is queued (if Redis is there), end both threads, close
        the connections."""
        with self._lock:
            if not self._started or self._stopping.is_set():
                return
            self._stopping.set()
        with self._cond:
            self._cond.notify()
        deadline = time.monotonic() + timeout
        for thread in (self._publisher, self._subscriber):
            if thread is not None and thread is not threading.current_thread():
                thread.join(max(deadline - time.monotonic(), 0.0))
        if self._client is not None:
            self._client.close()

    @property
    def threads(self) -> List[threading.Thread]:
        return [t for t in (self._publisher, self._subscriber) if t is not None and t.is_alive()]

    @property
    def connected(self) -> bool:
        """Started, and neither thread finds Redis unreachable right now."""
        return self._started and not self._stopping.is_set() and not self._down

    def __repr__(self) -> str:
        state = ("not started" if not self._started else "stopped" if self._stopping.is_set()
                 else "connected" if not self._down else "reconnecting")
        return f"<RedisBroker {self.where} prefix={self.prefix!r} {state}>"

    # -- Outages ----------------------------------------------------------

    def _lost(self, role: str, exc: BaseException) -> None:
        with self._health:
            first = not self._down
            self._down.add(role)
        if first:
            logger.warning("broker: Redis at %s is unreachable (%s: %s); broadcasts reach this "
                           "process's clients only until it is back, reconnecting", self.where,
                           type(exc).__name__, exc)
        else:
            logger.debug("broker: %s: Redis at %s still unreachable: %s", role, self.where, exc)

    def _back(self, role: str) -> None:
        with self._health:
            if role not in self._down:
                return
            self._down.discard(role)
            if self._down:
                return
            dropped, self._dropped = self._dropped, 0
        logger.info("broker: Redis at %s is reachable again; %d broadcast(s) did not reach the "
                    "other processes meanwhile", self.where, dropped)

    def _count_dropped(self, count: int) -> None:
        with self._health:
            self._dropped += count

    # -- The subscriber thread ----------------------------------------------

    def _subscribe(self) -> Any:
        """A PubSub subscribed to our channels, once Redis confirmed each."""
        pubsub = self._client.pubsub()
        try:
            pubsub.subscribe(*self._channels)
            confirmed = 0
            deadline = time.monotonic() + self._connect_timeout + 5.0
            while confirmed < len(self._channels):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _redis().TimeoutError("no confirmation of SUBSCRIBE")
                message = pubsub.get_message(timeout=min(left, _POLL))
                if message is None:
                    continue
                if message["type"] == "subscribe":
                    confirmed += 1
                else:
                    self._handle(message)
        except BaseException:
            pubsub.close()
            raise
        return pubsub

    def _subscribe_loop(self) -> None:
        redis = _redis()
        errors = (redis.RedisError, OSError)
        try:
            pubsub = self._subscribe()
        except errors as exc:
            self._subscribe_error = exc
            self._subscribed.set()
            return
        self._subscribed.set()
        backoff = _FIRST_BACKOFF
        stopping = self._stopping
        try:
            while not stopping.is_set():
                if pubsub is None:
                    if stopping.wait(backoff * random.uniform(0.5, 1.0)):
                        break
                    try:
                        pubsub = self._subscribe()
                    except errors as exc:
                        self._lost(_SUBSCRIBER, exc)
                        backoff = min(backoff * 2, _MAX_BACKOFF)
                        continue
                    backoff = _FIRST_BACKOFF
                    self._back(_SUBSCRIBER)
                try:
                    message = pubsub.get_message(timeout=_POLL)
                except errors as exc:
                    self._lost(_SUBSCRIBER, exc)
                    pubsub.close()
                    pubsub = None
                    continue
                if message is not None:
                    self._handle(message)
        finally:
            if pubsub is not None:
                pubsub.close()

    def _handle(self, message: Dict[str, Any]) -> None:
        if message["type"] != "message":
            return
        data = message["data"]
        if data[:_ORIGIN] == self._origin:
            return  # our own: delivered here when it was broadcast
        channel = message["channel"]
        if isinstance(channel, bytes):
            channel = channel.decode("utf-8", "replace")
        if len(data) <= _ORIGIN:
            self._bad_payload(channel, "shorter than its 16-byte sender")
            return
        assert self._deliver is not None
        try:
            self._deliver(channel, data[_ORIGIN:])
        except ValueError as exc:  # not an envelope: someone else's publisher
            self._bad_payload(channel, str(exc))
        except Exception:
            logger.exception("broker: delivering a broadcast from %s failed", channel)

    def _bad_payload(self, channel: str, why: str) -> None:
        level = logging.DEBUG if self._bad_payload_logged else logging.WARNING
        self._bad_payload_logged = True
        logger.log(level, "broker: skipped a payload on %s: %s (logged once; more at debug "
                   "level)", channel, why)

    # -- The publisher thread -----------------------------------------------

    @staticmethod
    def _send(client: Any, batch: List[Tuple[str, bytes]]) -> None:
        """PUBLISH each of ``batch``, in order, in pipelines; PING if empty."""
        if not batch:
            client.ping()
        for start in range(0, len(batch), _BATCH):
            pipe = client.pipeline(transaction=False)
            for channel, payload in batch[start:start + _BATCH]:
                pipe.publish(channel, payload)
            pipe.execute()

    def _publish_loop(self) -> None:
        redis = _redis()
        errors = (redis.RedisError, OSError)
        client = self._client
        cond = self._cond
        backoff = _FIRST_BACKOFF
        retry_at = 0.0  # while Redis is lost: when to try it again
        lost = False
        while True:
            with cond:
                while not self._pending and not self._stopping.is_set():
                    if lost:
                        left = retry_at - time.monotonic()
                        if left <= 0:
                            break
                        cond.wait(left)
                    else:
                        cond.wait()
                batch, self._pending = self._pending, []
                self._overflowed = False
                stopping = self._stopping.is_set()
            if lost and time.monotonic() < retry_at:
                self._count_dropped(len(batch))  # at most once: not kept for later
                if stopping:
                    break
                continue
            if not batch and (not lost or stopping):
                if stopping:
                    break
                continue
            try:
                try:
                    self._send(client, batch)
                except redis.ConnectionError:
                    if lost:
                        raise
                    # The pooled connection may be one a restarted Redis
                    # dropped while we were idle: a new one, once, before
                    # calling Redis lost (a restarted Redis never saw the batch).
                    self._send(client, batch)
            except errors as exc:
                self._count_dropped(len(batch))
                self._lost(_PUBLISHER, exc)
                lost = True
                retry_at = time.monotonic() + backoff * random.uniform(0.5, 1.0)
                backoff = min(backoff * 2, _MAX_BACKOFF)
            else:
                if lost:
                    lost = False
                    backoff = _FIRST_BACKOFF
                    self._back(_PUBLISHER)
            if stopping:
                break
