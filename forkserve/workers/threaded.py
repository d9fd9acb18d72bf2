"""The threaded worker: a pool of threads runs the WSGI app; idle connections hold none.

Theory of operation
-------------------
Every connection waiting for a request is armed, one-shot, in an epoll set
that the pool threads share. A pool thread waits on the set for one ready
connection, serves the request on it (and any the client pipelined behind
it), marks a keep-alive connection idle again, re-arms it, and waits again.
The thread that sees a request is the one that serves it: no hand-off
between threads and no wake-up of the main thread per request. A
connection waiting for its next request is in the set and in no thread, so
an idle keep-alive client costs a file descriptor, not a thread, and the
kernel hands ready connections out in the order they became ready, so a
new connection takes its turn with busy keep-alive ones.

Accepting. A shared socket (``--sched none``) is in the set too, one-shot
like a connection: a free thread takes one connection from it, arms it
again, and serves the connection at once if its request has arrived (else
the connection joins the set). So only a free thread accepts, in its turn
with the connections ready before, and a worker whose threads are all busy
leaves new connections to the other workers. Under round robin connections
arrive on the cluster channel, which only the main thread touches: it takes
one while a thread is free, or once a thread has finished a request since
it last found them all busy, so under load new connections come in at the
pace requests complete and then wait their turn. When every thread is stuck
in a slow handler nothing completes and nothing is taken: the connection
not accepted is not acknowledged, and the primary hands the next ones to
other workers. Past ``--worker-connections`` a connection is taken only if
an idle one can be closed to make room (the oldest idle keep-alive
connection first).

The main thread also watches the idle deadlines, signals and the cluster
channel.

A connection::

    accepted -> fresh            in the set; deadline --header-timeout
    accepted -> busy             its request is in: taken by the accepting thread,
                                 or with the head the primary read (the queue below)
    fresh    -> busy             readable: a pool thread took it
    busy     -> fresh            TLS handshake done, no request yet; deadline anew
    busy     -> kept             response sent, keep-alive; deadline --keep-alive
    kept     -> busy             readable: the next request, or the client closing
    busy     -> closed           not kept; its thread closes it
    fresh, kept -> closed        deadline, room needed, or shutdown (main thread)

A connection whose request head the primary already read
(``--buffer-request-head``) has its request in hand, not on the socket: it
goes to a queue that the next free thread takes from, then joins the set.

One lock guards the idle maps, the counts and the flags the two sides
exchange; a pool thread takes it twice a request, the main thread a few
times per wake-up. A pool thread that finds the idle entry of a ready
descriptor gone (the main thread closed it a moment before) ignores the
event.

Shutdown (SIGTERM, ``--max-requests`` reached, or the primary's disconnect
closing the listeners): close the listeners, close idle connections (but
answer a request that already arrived on one), answer the requests in
progress with ``Connection: close`` and wait for them, at most
``--graceful-timeout``; then leave the cluster.

Only the main thread touches the cluster (accept, acknowledgements, channel,
the request to be recycled); pool threads touch their connection and the
application only.
"""

from __future__ import annotations

import enum
import errno
import os
import select
import selectors
import socket
import ssl
import threading
import time
from collections import deque
from typing import Any

from forkserve import cluster
from forkserve.config import Config, effective_threads
from forkserve.http.wsgi import HTTPOptions, WSGIConnection
from forkserve.scoreboard import Slot

from .base import HEARTBEAT_INTERVAL, LOG, WorkerBase, queued_ms

_READ = selectors.EVENT_READ
# Report the next readiness once, then stay quiet until re-armed: a
# connection being served wakes no other thread.
_ONCE = select.EPOLLIN | select.EPOLLONESHOT
# accept() failures that leave the listener usable: the client left first, or
# the process is out of descriptors or memory for a moment.
_ACCEPT_RETRY = (errno.ECONNABORTED, errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class _Source(enum.Enum):
    """Main-thread selector keys that are not a listener."""

    WAKEUP = "signal wakeup pipe"
    THREADS = "pool threads asking the main thread to look again"
    CHANNEL = "cluster channel"


class _Conn:
    """One client connection and, once served, its HTTP state."""

    __slots__ = (
        "addr", "deadline", "fd", "initial", "queued_ms", "registered", "server", "sock",
        "used", "wsgi",
    )  # fmt: skip

    def __init__(self, sock: socket.socket, addr: Any, server: Any) -> None:
        self.sock = sock
        # The key in the epoll set and the idle maps; TLS keeps the descriptor.
        self.fd = sock.fileno()
        # Bytes the primary read before the hand-off (--buffer-request-head).
        self.initial = b""
        # Milliseconds it waited in the primary (round robin), else None.
        self.queued_ms: float | None = None
        self.addr = addr
        self.server = server
        self.wsgi: WSGIConnection | None = None
        self.deadline = 0.0
        # In the epoll set: from when it first waits there (a connection
        # served at once and closed never is).
        self.registered = False
        # When a thread last took it: the least recently used idle connection
        # is closed first at the cap. (The idle maps are in the order threads
        # finished, which a thread that lost the CPU after its response can
        # get wrong.)
        self.used = 0.0

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class ThreadedWorker(WorkerBase):
    name = "threaded"
    multithread = True

    def __init__(
        self,
        config: Config,
        app: Any,
        listeners: list[cluster.Listener],
        slot: Slot | None = None,
    ) -> None:
        super().__init__(config, app, listeners, slot)
        self.threads = effective_threads(config, "threaded")
        self.max_connections = int(config.worker_connections)
        self.keepalive = float(config.keepalive)
        self.header_timeout = float(config.header_timeout)
        # How long a new connection may stay silent (0: no limit).
        self._head_wait = self.header_timeout if self.header_timeout > 0 else float("inf")
        self.stopping = False
        # Everything below the lock is shared with the pool threads.
        self._lock = threading.Lock()
        self._connections = 0
        self._busy = 0  # threads serving a connection
        # Idle connections by descriptor, in the order they became idle: the
        # deadlines of each map grow with that order, so its first entry is
        # the next to expire.
        self._kept: dict[int, _Conn] = {}
        self._fresh: dict[int, _Conn] = {}
        self._ready: deque[_Conn] = deque()  # requests already in hand
        # The main thread found no thread free (or no room) and waits for one
        # to finish a request; the first to finish sets _turned_over and wakes it.
        self._want_wake = False
        self._turned_over = False
        # Main thread only: a listener had a connection and no budget; the
        # listeners are not watched until a pool thread wakes the main thread.
        self._blocked = False
        self._watched: dict[cluster.Listener, int] = {}
        self._server_names: dict[cluster.Listener, Any] = {}
        self._channel_fd = -1
        self._options = HTTPOptions()
        self._extra: dict[str, Any] = {}
        self._selector: selectors.BaseSelector | None = None
        self._epoll: select.epoll | None = None
        self._ready_fd = -1  # counts the queue's entries (a semaphore eventfd)
        self._stop_fd = -1  # readable once the pool threads must end
        self._poke_fd = -1  # pool threads -> main thread
        self._pool: list[threading.Thread] = []
        # Shared sockets the pool threads accept on: the descriptor of this
        # worker's duplicate -> (the duplicate, its listener).
        self._shared: dict[int, tuple[socket.socket, cluster.Listener]] = {}
        self._parked: list[int] = []  # shared sockets left unarmed at the cap
        # Idle deadlines are checked at least this often: a connection that
        # becomes idle while the main thread sleeps is seen by the next look.
        timeouts = [t / 4 for t in (self.keepalive, self.header_timeout) if t > 0]
        self._max_sleep = max(0.01, min([HEARTBEAT_INTERVAL, *timeouts]))

    # -- main thread ----------------------------------------------------------

    def run(self) -> int:
        self.init_signals()
        self._options = self.http_options()
        self._extra = self.extra_environ()
        self._selector = selectors.DefaultSelector()
        self._start_pool()
        try:
            self._selector.register(self.wakeup_fd, _READ, _Source.WAKEUP)
            self._selector.register(self._poke_fd, _READ, _Source.THREADS)
            self._watch_channel()
            for listener in self.listeners:
                listener.setblocking(False)
            self._watch_shared()
            self._serve()
            self._shut_down()
        finally:
            self._forget_shared(every=True)
            self._stop_pool()
            with self._lock:
                left = [*self._kept.values(), *self._fresh.values(), *self._ready]
                self._kept.clear()
                self._fresh.clear()
                self._ready.clear()
            for conn in left:
                conn.close()
            self._selector.close()
        if not self.fast_exit:
            self.leave()
        return 0

    def _serve(self) -> None:
        selector = self._selector
        assert selector is not None
        while self.alive and any(not listener.closed for listener in self.listeners):
            self._update_watching()
            ready: list[cluster.Listener] = []
            self.beat()
            for key, _ in selector.select(self._select_timeout()):
                data = key.data
                if data is _Source.WAKEUP:
                    self.drain_wakeup()
                elif data is _Source.THREADS:
                    _drain_eventfd(self._poke_fd)
                    self._blocked = False
                elif data is _Source.CHANNEL:
                    self._poll_channel()
                else:
                    ready.append(data)
            self._recycle_if_due()
            self._expire(time.monotonic())
            for listener in ready:
                self._accept_from(listener)

    def _not_draining(self) -> bool:
        # Stopping too: a response announced keep-alive must not be followed by a close.
        return not self.draining and not self.stopping

    def _shut_down(self) -> None:
        """Stop accepting, close idle connections, let requests in progress finish."""
        with self._lock:
            self.stopping = True
        selector = self._selector
        assert selector is not None
        self._forget_shared(every=True)
        for listener in self.listeners:
            self._unwatch(listener)
            # Under round robin, connections queued here go back to the primary.
            listener.close()
        self._sweep()
        with self._lock:
            idle = [*self._kept.values(), *self._fresh.values()]
            self._kept.clear()
            self._fresh.clear()
        # A request that already arrived on one is answered (with a close), as
        # if a thread had taken it a moment earlier; the others close now.
        arrived = _readable_fds(idle)
        for conn in idle:
            if conn.fd in arrived:
                with self._lock:
                    self._ready.append(conn)
                os.eventfd_write(self._ready_fd, 1)
            else:
                with self._lock:
                    self._connections -= 1
                self._close(conn)
        deadline = time.monotonic() + self.config.graceful_timeout
        while True:
            with self._lock:
                running = self._busy + len(self._ready)
            if not running:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                LOG.warning(
                    "worker %s (pid %s): %s requests still running after the graceful "
                    "timeout (%.0fs); exiting",
                    self.worker_id,
                    self.pid,
                    running,
                    self.config.graceful_timeout,
                )
                return
            self.beat()
            for key, _ in selector.select(min(remaining, HEARTBEAT_INTERVAL)):
                if key.data is _Source.WAKEUP:
                    self.drain_wakeup()
                elif key.data is _Source.THREADS:
                    _drain_eventfd(self._poke_fd)
                elif key.data is _Source.CHANNEL:
                    self._poll_channel()

    def _accept_budget(self) -> int:
        """How many connections to take now (see module doc); 0 asks to be woken."""
        with self._lock:
            if self._connections < self.max_connections or self._kept or self._fresh:
                if self._busy < self.threads:
                    return self.threads - self._busy
                if self._turned_over:
                    return 1
            self._want_wake = True
            return 0

    def _select_timeout(self) -> float:
        with self._lock:
            firsts = [next(iter(idle.values())) for idle in (self._kept, self._fresh) if idle]
        if not firsts:
            return self._max_sleep
        wait = min(conn.deadline for conn in firsts) - time.monotonic()
        return max(0.0, min(wait, self._max_sleep))

    def _recycle_if_due(self) -> None:
        """Past --max-requests, ask the primary to recycle this worker (main thread only)."""
        if not self.max_requests or self.recycle_asked:
            return
        with self._lock:
            if self.requests >= self.max_requests:
                # count_request() counts one request and asks past the limit:
                # let it count the last one the threads counted.
                self.requests -= 1
                self.count_request()

    # -- listeners and the cluster channel ------------------------------------

    def _update_watching(self) -> None:
        """Watch the round-robin listeners unless one had a connection this worker
        could not take."""
        want = self.alive and not self.stopping and not self._blocked
        for listener in self.listeners:
            if listener.closed or listener.raw_socket is not None:
                continue
            if want and listener not in self._watched:
                fd = listener.fileno()
                assert self._selector is not None
                self._selector.register(fd, _READ, listener)
                self._watched[listener] = fd
            elif not want and listener in self._watched:
                self._unwatch(listener)

    def _unwatch(self, listener: cluster.Listener) -> None:
        fd = self._watched.pop(listener, None)
        if fd is not None:
            _unregister(self._selector, fd)

    def _watch_channel(self) -> None:
        """Watch the channel itself, so a disconnect is seen while not accepting."""
        child = cluster.child
        if child is not None and child.connected:
            self._channel_fd = child.channel_fd
            assert self._selector is not None
            self._selector.register(self._channel_fd, _READ, _Source.CHANNEL)

    def _poll_channel(self) -> None:
        child = cluster.child
        if child is not None:
            child.poll()
        self._sweep()

    def _watch_shared(self) -> None:
        """Put a duplicate of each shared socket in the set, for the pool threads.

        A duplicate, so the worker removes it from the set and closes it when
        it chooses: the listener itself is closed by the cluster (on the
        primary's disconnect), and a socket the primary still holds open
        would stay in the set under a descriptor number free for reuse.
        """
        epoll = self._epoll
        assert epoll is not None
        for listener in self.listeners:
            raw = listener.raw_socket
            if raw is None or listener.closed:
                continue
            try:
                self._server_names[listener] = listener.getsockname()
            except OSError:
                self._server_names[listener] = None
            dup = raw.dup()
            dup.setblocking(False)
            self._shared[dup.fileno()] = (dup, listener)
            epoll.register(dup.fileno(), _ONCE)

    def _forget_shared(self, every: bool) -> None:
        """Stop accepting on the shared sockets whose listener closed (or on all)."""
        for fd, (dup, listener) in list(self._shared.items()):
            if every or listener.closed:
                del self._shared[fd]
                if self._epoll is not None:
                    try:
                        self._epoll.unregister(fd)
                    except (OSError, ValueError):
                        pass
                dup.close()

    def _sweep(self) -> None:
        """Forget closed listeners and a closed channel before their fds are reused."""
        self._forget_shared(every=False)
        for listener in [item for item in self._watched if item.closed]:
            self._unwatch(listener)
        if self._channel_fd >= 0:
            child = cluster.child
            if child is None or not child.connected:
                _unregister(self._selector, self._channel_fd)
                self._channel_fd = -1

    def _accept_from(self, listener: cluster.Listener) -> None:
        if not self.alive or self.stopping:
            return
        budget = self._accept_budget()
        if not budget:
            self._blocked = True
        while budget > 0 and not listener.closed:
            try:
                sock, addr = listener.accept()
            except BlockingIOError:
                break
            except OSError as exc:
                self._sweep()
                if listener.closed or exc.errno in _ACCEPT_RETRY:
                    break
                raise
            budget -= 1
            # A turn taken: with every thread busy, the next waits for the next one.
            self._turned_over = False
            self._sweep()
            self._admit(sock, addr, listener)
        self._sweep()

    # -- connections (main thread) --------------------------------------------

    def _admit(self, sock: socket.socket, addr: Any, listener: cluster.Listener) -> None:
        server = self._server_names.get(listener)
        if server is None:
            try:
                server = self._server_names[listener] = listener.getsockname()
            except OSError:
                server = None
        conn = _Conn(sock, addr, server)
        conn.initial = listener.take_initial_data(sock)
        conn.queued_ms = queued_ms(listener, sock)
        epoll = self._epoll
        assert epoll is not None
        with self._lock:
            self._connections += 1
            dropped = self._pop_oldest_idle() if self._connections > self.max_connections else None
            if not conn.initial:
                self._wait_in_set(conn, self._fresh, self._head_wait)
            else:
                self._ready.append(conn)
        if dropped is not None:
            self._close_for_room(dropped)
        if conn.initial:
            os.eventfd_write(self._ready_fd, 1)

    def _pop_oldest_idle(self) -> _Conn | None:
        """Under the lock: take the idle connection to close to make room."""
        idle = self._kept or self._fresh
        if not idle:
            return None
        conn = min(idle.values(), key=_last_used)
        del idle[conn.fd]
        self._connections -= 1
        return conn

    def _wait_in_set(self, conn: _Conn, idle: dict[int, _Conn], timeout: float) -> None:
        """Under the lock: make ``conn`` idle in ``idle`` and arm it in the set.

        In the map before the set, so a thread that sees it ready finds it;
        under the lock, so the main thread cannot close it (and its number be
        reused) before it is in the set. Only the first time registers; after
        that a pool thread re-arms it with ``_rearm_conn`` outside the lock.
        """
        conn.deadline = time.monotonic() + timeout
        idle[conn.fd] = conn
        if not conn.registered:
            assert self._epoll is not None
            self._epoll.register(conn.fd, _ONCE)
            conn.registered = True

    def _close_for_room(self, conn: _Conn) -> None:
        LOG.debug(
            "worker %s: more than %s connections (--worker-connections); closed the least "
            "recently used idle one, from %s",
            self.worker_id,
            self.max_connections,
            conn.addr,
        )
        self._close(conn)

    def _expire(self, now: float) -> None:
        expired: list[_Conn] = []
        with self._lock:
            for idle in (self._kept, self._fresh):
                while idle:
                    fd = next(iter(idle))
                    if idle[fd].deadline > now:
                        break
                    expired.append(idle.pop(fd))
            self._connections -= len(expired)
            parked: list[int] = []
            if expired:
                parked, self._parked = self._parked, []
        for conn in expired:
            self._close(conn)
        self._rearm(parked)

    def _rearm(self, fds: list[int]) -> None:
        """Arm shared sockets again (left unarmed at --worker-connections)."""
        for fd in fds:
            if fd in self._shared:
                try:
                    assert self._epoll is not None
                    self._epoll.modify(fd, _ONCE)
                except OSError:
                    pass  # closed since

    def _close(self, conn: _Conn) -> None:
        """Close a connection no thread holds and no idle map lists."""
        if conn.registered and self._epoll is not None:
            # Before the close: a copy of the socket still open elsewhere (the
            # primary's, under round robin) would keep it in the set.
            try:
                self._epoll.unregister(conn.fd)
            except (OSError, ValueError):
                pass
        conn.close()

    # -- the pool -------------------------------------------------------------

    def _start_pool(self) -> None:
        self._epoll = select.epoll()
        flags = os.EFD_NONBLOCK | os.EFD_CLOEXEC
        self._ready_fd = os.eventfd(0, flags | os.EFD_SEMAPHORE)
        self._stop_fd = os.eventfd(0, flags)
        self._poke_fd = os.eventfd(0, flags)
        # Level-triggered: every waiting thread sees these until they are read.
        self._epoll.register(self._ready_fd, select.EPOLLIN)
        self._epoll.register(self._stop_fd, select.EPOLLIN)
        # Daemon threads, so a request still running after --graceful-timeout
        # does not keep the process alive.
        self._pool = [
            threading.Thread(target=self._thread_main, name=f"forkserve-thread-{n}", daemon=True)
            for n in range(self.threads)
        ]
        for thread in self._pool:
            thread.start()

    def _stop_pool(self) -> None:
        """Let the threads end; the descriptors close only when no thread can still use them."""
        if self._epoll is None:
            return
        os.eventfd_write(self._stop_fd, 1)
        with self._lock:
            idle = self._busy == 0 and not self._ready
        if not idle:
            return
        deadline = time.monotonic() + 1.0
        for thread in self._pool:
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(thread.is_alive() for thread in self._pool):
            return
        self._epoll.close()
        for fd in (self._ready_fd, self._stop_fd, self._poke_fd):
            os.close(fd)

    def _thread_main(self) -> None:
        epoll = self._epoll
        assert epoll is not None
        lock = self._lock
        kept, fresh, ready = self._kept, self._fresh, self._ready
        ready_fd, stop_fd = self._ready_fd, self._stop_fd
        while True:
            try:
                events = epoll.poll(-1, 1)
            except (OSError, ValueError):
                return  # the set is closed: the worker is exiting
            for fd, _ in events:
                if fd == stop_fd:
                    return
                shared = self._shared.get(fd)
                if shared is not None:
                    try:
                        self._accept_shared(fd, *shared)
                    except Exception:
                        LOG.exception("worker %s: accepting a connection failed", self.worker_id)
                    continue
                if fd == ready_fd:
                    try:
                        os.eventfd_read(ready_fd)
                    except BlockingIOError:
                        continue  # another thread took it
                    with lock:
                        conn = ready.popleft()
                        self._busy += 1
                else:
                    with lock:
                        found = kept.pop(fd, None) or fresh.pop(fd, None)
                        if found is None:
                            continue  # closed by the main thread a moment ago
                        conn = found
                        self._busy += 1
                self._run(conn)

    def _accept_shared(self, fd: int, sock: socket.socket, listener: cluster.Listener) -> None:
        """A free thread takes one connection from a shared socket and serves it
        at once if its request has arrived."""
        epoll = self._epoll
        assert epoll is not None
        with self._lock:
            if self.stopping:
                return
            if self._connections >= self.max_connections and not (self._kept or self._fresh):
                self._parked.append(fd)  # armed again when a connection closes
                return
            self._connections += 1
        try:
            new, addr = sock.accept()
        except OSError as exc:
            with self._lock:
                self._connections -= 1
            if isinstance(exc, BlockingIOError) or exc.errno in _ACCEPT_RETRY:
                self._rearm([fd])  # another worker took it, or the client left
            elif fd in self._shared:
                LOG.error("worker %s: accept on %s failed: %s", self.worker_id, listener, exc)
                self.alive = False
                os.eventfd_write(self._poke_fd, 1)
            return
        self._rearm([fd])
        conn = _Conn(new, addr, self._server_names.get(listener))
        arrived = _has_arrived(new)
        with self._lock:
            dropped = self._pop_oldest_idle() if self._connections > self.max_connections else None
            if arrived:
                self._busy += 1
            else:
                try:
                    self._wait_in_set(conn, self._fresh, self._head_wait)
                except OSError:
                    self._fresh.pop(conn.fd, None)
                    self._connections -= 1
                    conn.close()
                    raise
        if dropped is not None:
            self._close_for_room(dropped)
        if arrived:
            self._run(conn)

    def _run(self, conn: _Conn) -> None:
        """Serve ``conn`` in this thread, then keep it idle or close it."""
        keep = False
        rearm = False
        served = 0
        conn.used = time.monotonic()
        try:
            keep, served = self._serve_connection(conn)
        except BaseException:
            LOG.exception("unexpected error serving a connection from %s", conn.addr)
        with self._lock:
            self._busy -= 1
            self.requests += served
            if keep and not self.stopping and self.alive:
                assert conn.wsgi is not None
                rearm = conn.registered
                if conn.wsgi.requests_served:
                    self._wait_in_set(conn, self._kept, self.keepalive)
                else:  # a TLS handshake done, the request still to come
                    self._wait_in_set(conn, self._fresh, self._head_wait)
            else:
                keep = False
                self._connections -= 1
            # Room again (one closed, or one idle to close): arm what the cap left unarmed.
            parked = self._parked
            if parked:
                self._parked = []
            wake = self._want_wake or self.stopping or not self.alive
            if self._want_wake:
                self._want_wake = False
                self._turned_over = True
            if self.max_requests and self.requests >= self.max_requests:
                wake = wake or not self.recycle_asked
        if keep:
            if rearm:
                self._rearm_conn(conn)
        else:
            # The count above no longer includes it when the client sees the close.
            self._close(conn)
        if parked:
            self._rearm(parked)
        if wake:
            os.eventfd_write(self._poke_fd, 1)

    def _rearm_conn(self, conn: _Conn) -> None:
        """Arm a registered connection for its next request (outside the lock).

        The main thread may have closed it since (shutdown, room), and its
        number may already be another connection's: arming that one too is
        harmless, its thread finds it busy and ignores the event.
        """
        assert self._epoll is not None
        try:
            self._epoll.modify(conn.fd, _ONCE)
        except OSError:
            pass

    def _serve_connection(self, conn: _Conn) -> tuple[bool, int]:
        """Serve the requests waiting on ``conn``: (keep it open?, requests served)."""
        keep = False
        tls = self.ssl_context is not None
        wsgi = conn.wsgi
        before = wsgi.requests_served if wsgi is not None else 0
        try:
            if wsgi is None:
                # TLS handshakes happen here, not in the main thread.
                conn.sock = self.prepare_connection(conn.sock)
                wsgi = conn.wsgi = WSGIConnection(
                    conn.sock,
                    self.app,
                    self._options,
                    conn.addr,
                    conn.server,
                    self._extra,
                    initial_data=conn.initial,
                    queued_ms=conn.queued_ms,
                )
                # Asked as each response head is built, so what the head says
                # (keep-alive or close) is what happens to the connection.
                wsgi.keep_alive_check = self._not_draining
                if tls and not conn.initial and not _tls_pending(conn.sock):
                    # The client may send its request only now: it waits in
                    # the set, not in this thread.
                    return True, 0
                conn.initial = b""
            if self.stopping or self.keepalive <= 0:
                wsgi.close_after_response = True
            while True:
                keep = wsgi.handle_request()
                if not keep:
                    break
                if not self.alive:
                    keep = False
                    break
                if not (wsgi.has_pending_data or (tls and _tls_pending(conn.sock))):
                    break
        except (OSError, ssl.SSLError) as exc:
            LOG.debug("connection from %s ended: %s", conn.addr, exc)
            keep = False
        served = wsgi.requests_served - before if wsgi is not None else 0
        return keep, served


def _last_used(conn: _Conn) -> float:
    return conn.used


def _has_arrived(sock: socket.socket) -> bool:
    """Whether the client sent something (or closed, or failed) already."""
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    except OSError:
        pass
    return True


def _readable_fds(conns: list[_Conn]) -> set[int]:
    """The descriptors among ``conns`` with something to read now."""
    if not conns:
        return set()
    poller = select.poll()
    for conn in conns:
        poller.register(conn.fd, select.POLLIN)
    return {fd for fd, _ in poller.poll(0)}


def _drain_eventfd(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


def _tls_pending(sock: socket.socket) -> bool:
    return isinstance(sock, ssl.SSLSocket) and sock.pending() > 0


def _unregister(selector: selectors.BaseSelector | None, fd: int) -> None:
    if selector is None:
        return
    try:
        selector.unregister(fd)
    except (KeyError, ValueError):
        pass
