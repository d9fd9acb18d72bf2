"""The threaded worker: a pool of threads runs the WSGI app; idle connections hold none.

Theory of operation
-------------------
The main thread owns every connection that is not being served. It selects on
the listeners, the signal wakeup pipe, the cluster channel, a pipe on which
pool threads hand connections back, and the idle connections. A connection
goes to a pool thread only when it is readable (a request is arriving); the
thread serves that request, and any the client pipelined behind it, then hands
the connection back with its parser state. An idle keep-alive client costs a
file descriptor, not a thread.

Load awareness: the main thread calls ``Listener.accept()`` only while a
thread is free and the worker holds fewer than ``--worker-connections``
connections, or holds an idle one it can close to make room (the oldest idle
keep-alive connection goes first). Under round robin a connection not
accepted is not acknowledged, so the primary hands the next one to another
worker; on a shared socket another worker accepts it.

A connection, as the main thread sees it::

    accepted -> active                 readable at once and a thread free
    accepted -> idle                   nothing sent yet (deadline: --header-timeout)
    idle     -> active | waiting       readable; waiting while no thread is free
    waiting  -> active                 a thread became free
    active   -> idle                   response sent, keep-alive (deadline: --keep-alive)
    active   -> closed                 the thread closed it
    idle     -> closed                 deadline, room needed, or shutdown

Shutdown (SIGTERM, ``--max-requests`` reached, or the primary's disconnect
closing the listeners): close the listeners, close idle connections, answer
the requests in progress with ``Connection: close`` and wait for them, at most
``--graceful-timeout``; then leave the cluster.

Only the main thread touches the cluster (accept, acknowledgements, channel);
pool threads touch their connection and the application only.
"""

from __future__ import annotations

import enum
import errno
import os
import queue
import select
import selectors
import socket
import ssl
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from forkserve import cluster
from forkserve.config import Config, effective_threads
from forkserve.http.wsgi import HTTPOptions, WSGIConnection
from forkserve.scoreboard import Slot

from .base import HEARTBEAT_INTERVAL, LOG, WorkerBase, queued_ms

_READ = selectors.EVENT_READ
# accept() failures that leave the listener usable: the client left first, or
# the process is out of descriptors or memory for a moment.
_ACCEPT_RETRY = (errno.ECONNABORTED, errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class _Source(enum.Enum):
    """Selector keys that are not a listener or a connection."""

    WAKEUP = "signal wakeup pipe"
    RETURNED = "connections handed back by pool threads"
    CHANNEL = "cluster channel"


class _Conn:
    """One client connection and, once served, its HTTP state."""

    __slots__ = ("addr", "deadline", "initial", "queued_ms", "server", "sock", "used", "wsgi")

    def __init__(self, sock: socket.socket, addr: Any, server: Any) -> None:
        self.sock = sock
        # Bytes the primary read before the hand-off (--buffer-request-head).
        self.initial = b""
        # Milliseconds it waited in the primary (round robin), else None.
        self.queued_ms: float | None = None
        self.addr = addr
        self.server = server
        self.wsgi: WSGIConnection | None = None
        self.deadline = 0.0
        # When the main thread last handed it to a pool thread: orders the
        # kept-alive connections by last use, whichever thread finishes first.
        self.used = 0.0

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class _Pool:
    """Daemon threads serving connections; finished ones come back through a pipe.

    Daemon threads, so a request still running after ``--graceful-timeout``
    does not keep the process alive.
    """

    def __init__(self, size: int, serve: Callable[[_Conn], bool]) -> None:
        self.size = size
        self._serve = serve
        self._jobs: queue.SimpleQueue[_Conn | None] = queue.SimpleQueue()
        self._done: deque[tuple[_Conn, bool]] = deque()
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._threads = [
            threading.Thread(target=self._main, name=f"forkserve-thread-{n}", daemon=True)
            for n in range(size)
        ]
        for thread in self._threads:
            thread.start()

    def fileno(self) -> int:
        return self._read_fd

    def submit(self, conn: _Conn) -> None:
        self._jobs.put(conn)

    def finished(self) -> list[tuple[_Conn, bool]]:
        """Connections served since the last call, with whether to keep them."""
        try:
            while os.read(self._read_fd, 4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        out: list[tuple[_Conn, bool]] = []
        while self._done:
            out.append(self._done.popleft())
        return out

    def _main(self) -> None:
        while True:
            conn = self._jobs.get()
            if conn is None:
                return
            keep = False
            try:
                keep = self._serve(conn)
            except BaseException:
                LOG.exception("unexpected error serving a connection from %s", conn.addr)
                conn.close()
            self._done.append((conn, keep))
            try:
                os.write(self._write_fd, b"\0")
            except (BlockingIOError, InterruptedError):
                pass  # the pipe is full: the main thread is woken already

    def stop(self, idle: bool) -> None:
        """Let the threads end; the pipe closes only when no thread can still write to it."""
        for _ in self._threads:
            self._jobs.put(None)
        if idle:
            os.close(self._read_fd)
            os.close(self._write_fd)


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
        self.stopping = False
        self._count_lock = threading.Lock()
        self._connections = 0
        self._active: set[_Conn] = set()
        self._waiting: deque[_Conn] = deque()
        # Idle connections in the order they became idle: each map's deadlines
        # grow with that order, so the first entry is the next to expire.
        self._kept: OrderedDict[_Conn, None] = OrderedDict()
        self._fresh: OrderedDict[_Conn, None] = OrderedDict()
        self._watched: dict[cluster.Listener, int] = {}
        self._server_names: dict[cluster.Listener, Any] = {}
        self._channel_fd = -1
        self._options = HTTPOptions()
        self._extra: dict[str, Any] = {}
        self._selector: selectors.BaseSelector | None = None
        self._pool: _Pool | None = None

    # -- main thread ----------------------------------------------------------

    def run(self) -> int:
        self.init_signals()
        self._options = self.http_options()
        self._extra = self.extra_environ()
        self._selector = selectors.DefaultSelector()
        self._pool = _Pool(self.threads, self._serve_in_thread)
        try:
            self._selector.register(self.wakeup_fd, _READ, _Source.WAKEUP)
            self._selector.register(self._pool.fileno(), _READ, _Source.RETURNED)
            self._watch_channel()
            for listener in self.listeners:
                listener.setblocking(False)
            self._serve()
            self._shut_down()
        finally:
            self._pool.stop(idle=not self._active)
            for conn in [*self._kept, *self._fresh, *self._waiting]:
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
                elif data is _Source.RETURNED:
                    self._collect()
                elif data is _Source.CHANNEL:
                    self._poll_channel()
                elif isinstance(data, _Conn):
                    self._readable(data)
                else:
                    ready.append(data)
            self._expire(time.monotonic())
            self._dispatch_waiting()
            for listener in ready:
                self._accept_from(listener)

    def _not_draining(self) -> bool:
        # Stopping too: a response announced keep-alive must not be followed by a close.
        return not self.draining and not self.stopping

    def _shut_down(self) -> None:
        """Stop accepting, close idle connections, let requests in progress finish."""
        self.stopping = True
        selector = self._selector
        assert selector is not None
        for listener in self.listeners:
            self._unwatch(listener)
            # Under round robin, connections queued here go back to the primary.
            listener.close()
        self._sweep()
        for idle in (self._kept, self._fresh):
            while idle:
                self._drop(next(iter(idle)))
        deadline = time.monotonic() + self.config.graceful_timeout
        while True:
            self._dispatch_waiting()
            if not self._active and not self._waiting:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                LOG.warning(
                    "worker %s (pid %s): %s requests still running after the graceful "
                    "timeout (%.0fs); exiting",
                    self.worker_id,
                    self.pid,
                    len(self._active) + len(self._waiting),
                    self.config.graceful_timeout,
                )
                return
            for key, _ in selector.select(remaining):
                if key.data is _Source.WAKEUP:
                    self.drain_wakeup()
                elif key.data is _Source.RETURNED:
                    self._collect()
                elif key.data is _Source.CHANNEL:
                    self._poll_channel()

    def _free_threads(self) -> int:
        return self.threads - len(self._active)

    def _has_idle(self) -> bool:
        return bool(self._kept or self._fresh)

    def _may_accept(self) -> bool:
        return (
            self.alive
            and self._free_threads() > 0
            and (self._connections < self.max_connections or self._has_idle())
        )

    def _select_timeout(self) -> float | None:
        deadlines = [next(iter(idle)).deadline for idle in (self._kept, self._fresh) if idle]
        beat = HEARTBEAT_INTERVAL if self.slot is not None else None
        if not deadlines:
            return beat
        wait = max(0.0, min(deadlines) - time.monotonic())
        return wait if beat is None else min(wait, beat)

    # -- listeners and the cluster channel ------------------------------------

    def _update_watching(self) -> None:
        """Watch the listeners only while this worker would accept (see module doc)."""
        want = self._may_accept()
        for listener in self.listeners:
            if listener.closed:
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

    def _sweep(self) -> None:
        """Forget closed listeners and a closed channel before their fds are reused."""
        for listener in [item for item in self._watched if item.closed]:
            self._unwatch(listener)
        if self._channel_fd >= 0:
            child = cluster.child
            if child is None or not child.connected:
                _unregister(self._selector, self._channel_fd)
                self._channel_fd = -1

    def _accept_from(self, listener: cluster.Listener) -> None:
        while not listener.closed and self._may_accept():
            try:
                sock, addr = listener.accept()
            except BlockingIOError:
                break
            except OSError as exc:
                self._sweep()
                if listener.closed or exc.errno in _ACCEPT_RETRY:
                    break
                raise
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
        sock.setblocking(True)
        conn = _Conn(sock, addr, server)
        conn.initial = listener.take_initial_data(sock)
        conn.queued_ms = queued_ms(listener, sock)
        self._connections += 1
        if self._connections > self.max_connections:
            # Count what pool threads already finished (closed or kept) before
            # deciding that an idle connection must go.
            self._collect()
        if self._connections > self.max_connections:
            self._make_room()
        if conn.initial or _readable_now(sock):
            self._start(conn)
        else:
            timeout = self.header_timeout
            self._park(conn, self._fresh, timeout if timeout > 0 else float("inf"))

    def _make_room(self) -> None:
        idle = self._kept or self._fresh
        if idle:
            oldest = next(iter(idle))
            LOG.debug(
                "worker %s: %s connections (--worker-connections %s); closing the oldest "
                "idle one, from %s",
                self.worker_id,
                self._connections,
                self.max_connections,
                oldest.addr,
            )
            self._drop(oldest)

    def _park(self, conn: _Conn, idle: OrderedDict[_Conn, None], timeout: float) -> None:
        conn.deadline = time.monotonic() + timeout
        idle[conn] = None
        assert self._selector is not None
        self._selector.register(conn.sock, _READ, conn)

    def _unpark(self, conn: _Conn) -> None:
        self._kept.pop(conn, None)
        self._fresh.pop(conn, None)
        assert self._selector is not None
        try:
            self._selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass

    def _drop(self, conn: _Conn) -> None:
        self._unpark(conn)
        conn.close()
        self._connections -= 1

    def _readable(self, conn: _Conn) -> None:
        self._unpark(conn)
        if self._free_threads() > 0 and not self._waiting:
            self._start(conn)
        else:
            self._waiting.append(conn)

    def _dispatch_waiting(self) -> None:
        while self._waiting and self._free_threads() > 0:
            self._start(self._waiting.popleft())

    def _start(self, conn: _Conn) -> None:
        conn.used = time.monotonic()
        self._active.add(conn)
        assert self._pool is not None
        self._pool.submit(conn)

    def _collect(self) -> None:
        assert self._pool is not None
        for conn, keep in sorted(self._pool.finished(), key=lambda item: item[0].used):
            self._active.discard(conn)
            if not keep or self.stopping or not self.alive or self.keepalive <= 0:
                conn.close()
                self._connections -= 1
            else:
                kept = self._kept
                newest = next(reversed(kept)) if kept else None
                self._park(conn, kept, self.keepalive)
                if newest is not None and newest.used > conn.used:
                    # Threads can hand connections back out of order: keep the
                    # least recently used first, the one closed at the cap.
                    ordered = sorted(kept, key=lambda item: item.used)
                    kept.clear()
                    kept.update(dict.fromkeys(ordered))

    def _expire(self, now: float) -> None:
        for idle in (self._kept, self._fresh):
            while idle:
                conn = next(iter(idle))
                if conn.deadline > now:
                    break
                self._drop(conn)

    # -- pool threads ---------------------------------------------------------

    def _serve_in_thread(self, conn: _Conn) -> bool:
        """Serve the requests waiting on ``conn``; True to keep it open (it stays open then)."""
        keep = False
        try:
            wsgi = conn.wsgi
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
                conn.initial = b""
                # Asked as each response head is built, so what the head says
                # (keep-alive or close) is what happens to the connection.
                wsgi.keep_alive_check = self._not_draining
            if self.stopping or self.keepalive <= 0:
                wsgi.close_after_response = True
            while True:
                served = wsgi.requests_served
                keep = wsgi.handle_request()
                if wsgi.requests_served != served:
                    with self._count_lock:
                        self.count_request()
                if not keep:
                    break
                if not self.alive:
                    keep = False
                    break
                if not (wsgi.has_pending_data or _tls_pending(conn.sock)):
                    break
        except (OSError, ssl.SSLError) as exc:
            LOG.debug("connection from %s ended: %s", conn.addr, exc)
            keep = False
        # A connection not kept is closed by the main thread when it collects
        # it, so the client sees the close only once the worker's count of
        # connections no longer includes it.
        return keep


def _readable_now(sock: socket.socket) -> bool:
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def _tls_pending(sock: socket.socket) -> bool:
    return isinstance(sock, ssl.SSLSocket) and sock.pending() > 0


def _unregister(selector: selectors.BaseSelector | None, fd: int) -> None:
    if selector is None:
        return
    try:
        selector.unregister(fd)
    except (KeyError, ValueError):
        pass
