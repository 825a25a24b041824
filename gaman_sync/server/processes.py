"""Several server processes on one port: ``serve(..., workers=N)``.

A thread-per-connection server runs Python code on one core at a time (the
GIL). To use more cores on one machine, :func:`run_workers` starts N worker
processes, each a complete :class:`~gaman_sync.WebSocketServer` with its own
threads, and supervises them from the calling process, the parent.

Theory of operation:

- **One port, N listening sockets.** Each worker binds the same address with
  ``SO_REUSEPORT`` and has its own listening socket and accept queue; Linux
  spreads incoming connections over the sockets of the group by a hash of the
  connection's addresses, so every worker gets about 1/N of them and no
  worker's accept thread competes with another's. (Only processes of the
  same user may join a port's group.) The alternative, one
  listening socket made before the fork and inherited by every worker, lets
  the kernel hand each connection to whichever worker happens to be waiting
  in ``accept()``: on a loaded machine the least busy one, but on an idle one
  often the same one again, and every wake-up may wake them all. Other
  systems (macOS, the BSDs) accept ``SO_REUSEPORT`` without spreading the
  connections, so workers are refused there with a one-line error.

- **The port is the parent's first.** Before any worker starts, the parent
  binds the address itself with ``SO_REUSEPORT``, without listening (a
  socket that does not listen gets no connections). That reports a port in
  use at once, as one error in the parent, learns the port when 0 was asked,
  and keeps it reserved while a worker restarts, even when all of them are
  down for a moment.

- **Fork, not spawn.** Workers are made with ``os.fork()``: the blocks are
  Python objects (functions, closures) that the parent already has, and a
  fork hands them to the worker as they are, where ``spawn`` or a new
  interpreter would have to import them again by name and could not carry a
  block made at run time. Forking is safe only from a process with one
  thread, since a lock held by another thread at the fork stays locked
  forever in the child. The parent never starts a thread: the server object
  it builds (to check the arguments before any fork) starts nothing until
  ``start()``, which each worker calls after the fork, and the supervision
  below runs in the calling thread. A program that has started threads of
  its own before ``serve(workers=N)`` gets a warning naming them.

- **Supervision without threads.** The parent waits in ``select()`` on a pipe
  per worker (the worker writes one byte once it listens, or one line of
  error and exits) and on the wake-up pipe of its signal handlers
  (``signal.set_wakeup_fd``): SIGCHLD says a worker ended, SIGINT and SIGTERM
  ask for a shutdown. A worker that ends while the parent is not shutting
  down is started again, after a delay that doubles with each crash of that
  worker (0.1 s up to 10 s) and starts over once a worker has run for 10 s.
  A worker that ends before it listens has failed at start (it could not
  bind, its broker could not reach Redis, code run at the fork failed);
  after 3 such failures in a row, of any
  workers, the parent stops the others and raises :class:`WorkersFailed`
  instead of trying forever.

- **Shutdown.** The first SIGINT or SIGTERM to the parent is forwarded to
  every worker as SIGTERM; each shuts down like a single server (clients get
  1001, within the ``shutdown_timeout`` option) and exits, and the parent
  returns once all have. Workers ignore SIGINT, so that Ctrl-C in a terminal,
  which reaches the whole process group, is handled once, through the
  parent; a SIGTERM sent to the whole group (systemd does so) reaches a
  worker twice, which starts one shutdown. A worker still running
  ``shutdown_timeout`` + 5 s after the request is killed, and so are all of
  them on a second SIGINT or SIGTERM to the parent, which then raises
  ``KeyboardInterrupt`` like :func:`serve` in one process. A worker whose
  parent has gone (killed with SIGKILL) notices within half a second and
  shuts down the same way.

Each worker has its own copy of everything the blocks hold: its own clients,
its own module globals. Without a broker, a broadcast reaches the clients of
the worker it runs in only, and the parent warns about it at start when
N > 1. With one (``broker=RedisBroker(url)``), each worker's server starts
its own copy of the broker after the fork, as a server in a process of its
own would: its own connections to Redis, its own threads, its own process
number, so a broadcast reaches the clients of every worker once.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

if TYPE_CHECKING:  # the server imports this module
    from .server import WebSocketServer

__all__ = ["WorkersFailed", "check_workers", "reserve_port", "run_workers"]

logger = logging.getLogger("gaman_sync")

# The delay before a crashed worker starts again: it doubles with each crash
# of that worker, up to the most, and starts over once a worker ran STABLE s.
RESTART_DELAY = 0.1
RESTART_DELAY_MAX = 10.0
STABLE = 10.0
# Workers in a row that end before they listen: then the parent gives up.
START_FAILURES = 3
# How long past the shutdown_timeout option a worker may take to exit
# before it is killed.
KILL_GRACE = 5.0
# How often a worker checks that its parent is still there.
ORPHAN_CHECK = 0.5

_READY = b"R"
_ERROR = b"E"
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class WorkersFailed(RuntimeError):
    """The workers kept failing at start (:data:`START_FAILURES` in a row),
    so the parent stopped them all; the message says how the last one ended."""


def check_workers(workers: Any) -> int:
    """``workers`` if it is a usable number of worker processes here;
    ``TypeError`` or ``ValueError`` naming what it accepts otherwise."""
    if isinstance(workers, bool) or not isinstance(workers, int):
        raise TypeError(f"workers must be a whole number of processes (1 or more), "
                        f"not {workers!r}")
    if workers < 1:
        raise ValueError(f"workers must be 1 or more, not {workers!r}")
    if not sys.platform.startswith("linux") or not hasattr(socket, "SO_REUSEPORT"):
        raise ValueError(f"workers needs Linux, whose SO_REUSEPORT spreads connections "
                         f"over processes ({sys.platform} does not): run one server per "
                         f"port behind a load balancer instead")
    return workers


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host``/``port`` with ``SO_REUSEPORT``, not
    listening: it holds the port (the one picked, when ``port`` is 0) for
    workers that bind it with ``SO_REUSEPORT`` too. Raises ``OSError``
    when the port is taken."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    family, address = infos[0][0], infos[0][4]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # As socket.create_server sets them for the workers' listeners: the
        # same options, or the kernel refuses to share the port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


class _Worker:
    """One worker slot: the process that fills it now, and its history."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.pid: Optional[int] = None
        self.status_fd: Optional[int] = None  # read end of the worker's status pipe
        self.ready = False
        self.started = 0.0  # monotonic time it reported listening
        self.error = ""  # what the worker reported before it failed
        self.crashes = 0  # crashes in a row, for the restart delay
        self.restart_at: Optional[float] = None


def run_workers(server: WebSocketServer, count: int, reservation: socket.socket,
                *, warn_broadcast: bool = True,
                ready: Optional[Callable[[], Any]] = None) -> None:
    """Run ``count`` worker processes of ``server`` (built, not started,
    with ``reuse_port=True`` and the port of ``reservation``) until SIGINT
    or SIGTERM, as the module docstring describes; call it from the main
    thread of a process that has started no thread. Closes ``reservation``
    on return. Raises :class:`WorkersFailed` if the workers keep failing
    at start and ``KeyboardInterrupt`` on a second signal. ``ready()`` is
    called once every worker listens, the first time."""
    try:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("serve(workers=N) must run in the main thread: it forks "
                               "and handles signals")
        _Supervisor(server, count, reservation, warn_broadcast, ready).run()
    finally:
        reservation.close()


class _Supervisor:
    def __init__(self, server: WebSocketServer, count: int, reservation: socket.socket,
                 warn_broadcast: bool, ready: Optional[Callable[[], Any]] = None) -> None:
        self.server = server
        self.ready = ready
        self.reservation = reservation
        self.workers = [_Worker(i) for i in range(count)]
        self.warn_broadcast = warn_broadcast
        self.parent = os.getpid()
        self.signals: List[int] = []  # what the handlers caught, in order
        self.stopping = False
        self.stop_deadline = 0.0
        self.killed_by: Optional[str] = None  # the second signal's name
        self.failure: Optional[str] = None  # why the parent gave up
        self.start_failures = 0
        self.announced = False
        self.wake_r = self.wake_w = -1

    # -- The parent ------------------------------------------------------

    def run(self) -> None:
        others = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
        if others:
            logger.warning("serve(workers=N) forks while %d other thread(s) run (%s): a lock "
                           "one of them holds at a fork stays locked in the worker; start "
                           "threads in the blocks' callbacks instead", len(others),
                           ", ".join(others))
        address = self.reservation.getsockname()
        host = f"[{address[0]}]" if ":" in address[0] else address[0]
        logger.info("starting %d worker(s) on %s:%d (supervisor pid %d)",
                    len(self.workers), host, address[1], self.parent)
        if self.warn_broadcast and len(self.workers) > 1:
            logger.warning("%d workers and no broker: a broadcast reaches only the clients "
                           "of the worker it runs in (broker=RedisBroker(url), or --redis "
                           "URL, reaches them all)", len(self.workers))
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        previous: Dict[int, Any] = {}
        old_wakeup = -1
        try:
            for sig in (*_STOP_SIGNALS, signal.SIGCHLD):
                previous[sig] = signal.signal(sig, self._on_signal)
            old_wakeup = signal.set_wakeup_fd(self.wake_w)
            for worker in self.workers:
                self._spawn(worker)
            self._loop()
        finally:
            # Whatever happened (an error here, a KeyboardInterrupt), leave
            # no worker behind.
            for worker in self.workers:
                if worker.pid is not None:
                    _kill(worker.pid, signal.SIGKILL)
                    _reap(worker.pid, block=True)
                    self._close_status(worker)
            signal.set_wakeup_fd(old_wakeup)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            os.close(self.wake_r)
            os.close(self.wake_w)
        if self.killed_by is not None:
            raise KeyboardInterrupt(f"second {self.killed_by} during shutdown")
        if self.failure is not None:
            raise WorkersFailed(self.failure)

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Only a note: the loop acts on it (the wake-up fd ends its select()).
        self.signals.append(signum)

    def _loop(self) -> None:
        while True:
            self._handle_signals()
            for worker in self.workers:
                if worker.pid is not None:
                    status = _reap(worker.pid)
                    if status is not None:
                        self._ended(worker, status)
            now = time.monotonic()
            live = [w for w in self.workers if w.pid is not None]
            if self.stopping:
                if not live:
                    return
                if now >= self.stop_deadline:
                    logger.warning("shutdown: killing %d worker(s) still running after %.0f s",
                                   len(live), self.server.options.shutdown_timeout + KILL_GRACE)
                    for worker in live:
                        _kill(worker.pid, signal.SIGKILL)  # type: ignore[arg-type]
                    self.stop_deadline = float("inf")
            else:
                for worker in self.workers:
                    if worker.restart_at is not None and now >= worker.restart_at:
                        self._spawn(worker)
            due = [w.restart_at for w in self.workers if w.restart_at is not None]
            if self.stopping and self.stop_deadline != float("inf"):
                due.append(self.stop_deadline)
            timeout = max(min(due) - time.monotonic(), 0.0) if due else None
            fds = [self.wake_r] + [w.status_fd for w in self.workers if w.status_fd is not None]
            try:
                readable, _, _ = select.select(fds, [], [], timeout)
            except InterruptedError:  # pragma: no cover - retried by Python itself
                readable = []
            for fd in readable:
                if fd == self.wake_r:
                    _drain(fd)
                else:
                    self._status(next(w for w in self.workers if w.status_fd == fd))

    def _handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if signum == signal.SIGCHLD:
                continue  # the loop reaps
            name = signal.Signals(signum).name
            if not self.stopping:
                self._stop(f"{name} received")
            elif self.killed_by is None:
                self.killed_by = name
                logger.warning("second %s: killing the workers", name)
                for worker in self.workers:
                    if worker.pid is not None:
                        _kill(worker.pid, signal.SIGKILL)
                self.stop_deadline = float("inf")

    def _stop(self, why: str) -> None:
        """Ask every worker to shut down; the loop waits for them."""
        self.stopping = True
        self.stop_deadline = (time.monotonic() + self.server.options.shutdown_timeout
                              + KILL_GRACE)
        live = [w for w in self.workers if w.pid is not None]
        logger.info("%s: shutting down %d worker(s)", why, len(live))
        for worker in self.workers:
            worker.restart_at = None
            if worker.pid is not None:
                _kill(worker.pid, signal.SIGTERM)

    def _status(self, worker: _Worker) -> None:
        """The worker wrote to its status pipe, or closed it."""
        assert worker.status_fd is not None
        try:
            data = os.read(worker.status_fd, 4096)
        except BlockingIOError:
            return
        if not data:  # it exited (or is exiting): SIGCHLD follows
            self._close_status(worker)
            return
        if data.startswith(_READY) and not worker.ready:
            worker.ready = True
            worker.started = time.monotonic()
            self.start_failures = 0
            logger.info("worker %d listening (pid %d)", worker.index + 1, worker.pid)
            if not self.announced and all(w.ready for w in self.workers):
                self.announced = True
                address = self.reservation.getsockname()
                host = f"[{address[0]}]" if ":" in address[0] else address[0]
                logger.info("%d worker(s) listening on %s:%d", len(self.workers), host,
                            address[1])
                if self.ready is not None:
                    self.ready()
            data = data[len(_READY):]
        if data.startswith(_ERROR):
            worker.error = data[len(_ERROR):].decode(errors="replace").strip()

    def _ended(self, worker: _Worker, status: int) -> None:
        if worker.status_fd is not None:  # what it wrote before it exited
            self._status(worker)
            self._close_status(worker)
        pid, ready = worker.pid, worker.ready
        worker.pid = None
        worker.ready = False
        how = _describe(status)
        if self.stopping:
            log = logger.info if os.waitstatus_to_exitcode(status) == 0 else logger.warning
            log("worker %d (pid %d) %s", worker.index + 1, pid, how)
            return
        if not ready:
            self.start_failures += 1
            what = f"worker {worker.index + 1} (pid {pid}) {how} before it listened" \
                   + (f": {worker.error}" if worker.error else "")
            if self.start_failures >= START_FAILURES:
                self.failure = f"{what} ({self.start_failures} failures at start in a row)"
                logger.error("%s; giving up", self.failure)
                self._stop("giving up")
                return
        else:
            what = f"worker {worker.index + 1} (pid {pid}) {how}"
            if time.monotonic() - worker.started >= STABLE:
                worker.crashes = 0
        delay = min(RESTART_DELAY * 2 ** worker.crashes, RESTART_DELAY_MAX)
        worker.crashes += 1
        worker.restart_at = time.monotonic() + delay
        logger.warning("%s; starting it again in %.1f s", what, delay)

    def _spawn(self, worker: _Worker) -> None:
        worker.restart_at = None
        worker.error = ""
        status_r, status_w = os.pipe()
        # Flushed now, or the worker would print the parent's buffered output again.
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (AttributeError, OSError, ValueError):
                pass
        # Blocked across the fork: a signal to the new worker before it
        # replaced the parent's handlers would otherwise run them, in it.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {*_STOP_SIGNALS, signal.SIGCHLD})
        try:
            pid = os.fork()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            os.close(status_r)
            os.close(status_w)
            raise
        if pid == 0:  # pragma: no cover - runs in the worker (measured by the tests' runs)
            os.close(status_r)
            self._worker_main(status_w, mask)  # never returns
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(status_w)
        os.set_blocking(status_r, False)
        worker.pid, worker.status_fd, worker.ready = pid, status_r, False

    def _close_status(self, worker: _Worker) -> None:
        if worker.status_fd is not None:
            os.close(worker.status_fd)
            worker.status_fd = None

    # -- A worker (after the fork) ------------------------------------------

    def _worker_main(self, status_w: int, mask: Any) -> None:  # pragma: no cover
        """Serve until SIGTERM, a shutdown request or the parent's end; exit
        with 0 after a clean shutdown. Never returns into the caller's code."""
        code = 1
        try:
            code = self._serve_in_worker(status_w, mask)
        except BaseException as exc:
            logger.error("worker %d: %s", os.getpid(), exc, exc_info=True)
        finally:
            try:
                logging.shutdown()
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)

    def _serve_in_worker(self, status_w: int, mask: Any) -> int:  # pragma: no cover
        # The parent's signal plumbing and descriptors are not the worker's.
        signal.set_wakeup_fd(-1)
        for fd in [self.wake_r, self.wake_w] + [w.status_fd for w in self.workers
                                                if w.status_fd is not None]:
            os.close(fd)
        self.reservation.close()
        terminated: List[int] = []
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent's to forward
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        # The handler takes no lock (the main thread may hold any): a note,
        # and the wake-up fd ends the select() below.
        signal.signal(signal.SIGTERM, lambda signum, frame: terminated.append(signum))
        signal.set_wakeup_fd(wake_w)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        server = self.server
        try:
            server.start()
        except BaseException as exc:
            message = f"{type(exc).__name__}: {exc}".splitlines()[0]
            os.write(status_w, _ERROR + message.encode(errors="replace")[:1000])
            logger.error("worker %d could not start: %s", os.getpid(), message)
            return 3
        os.write(status_w, _READY)
        os.close(status_w)
        try:
            while not terminated and not server.wait_for_shutdown_request(0):
                if os.getppid() != self.parent:
                    logger.warning("worker %d: the supervisor (pid %d) is gone; shutting "
                                   "down", os.getpid(), self.parent)
                    break
                select.select([wake_r], [], [], ORPHAN_CHECK)
                _drain(wake_r)
        finally:
            server.shutdown()
        return 0


def _describe(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _reap(pid: int, block: bool = False) -> Optional[int]:
    """The wait status of our child ``pid`` if it has ended, else None."""
    try:
        done, status = os.waitpid(pid, 0 if block else os.WNOHANG)
    except ChildProcessError:
        return 0  # reaped already (by someone else's waitpid(-1))
    except OSError as exc:  # pragma: no cover
        if exc.errno == errno.EINTR:
            return None
        raise
    return status if done == pid else None


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except (BlockingIOError, InterruptedError):
        pass
