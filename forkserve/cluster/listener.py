"""``Listener``: what ``cluster.listen`` returns.

Workers see one Listener whatever the scheduling policy:

- ``own``/``shared``: a real listening socket (the worker's own, or the
  primary's shared one); ``accept()`` accepts on it.
- ``rr``: connections arrive from the primary over the IPC channel and wait
  in a queue; ``accept()`` takes the next one and acknowledges it, which
  tells the primary this worker is free again.

``fileno()`` is an epoll descriptor that is readable when the socket (or the
queue) has a connection *or* the cluster channel has a message, so a worker
that selects on its listeners also notices a disconnect. After such a wake-up
``accept()`` on a non-blocking listener processes the channel and raises
``BlockingIOError`` if no connection is there: the same contract as a shared
socket raced by several workers.

Under round robin the primary may have read the first bytes of a connection
already (the server's request-head buffering); ``take_initial_data(conn)``
returns them, once, to whoever serves the connection (``serve()`` feeds them
to the stream reader itself). Likewise ``take_accepted_at(conn)`` returns
when the primary accepted it (``time.monotonic()``, the same clock in every
process of the machine), so the worker can tell how long it waited there.

Imports nothing from forkserve outside this package.
"""

from __future__ import annotations

import asyncio
import errno
import os
import select
import socket
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .address import Acceptor
from .ipc import NONBLOCKING

if TYPE_CHECKING:
    from .child import Child
    from .ipc import Handoff


DEFAULT_BACKLOG = 511  # Node's default
# Seconds a worker accepting on a real socket goes without reading the
# cluster channel while connections keep coming (see Listener.accept).
CHANNEL_POLL_INTERVAL = 0.05


def _closed_error() -> OSError:
    return OSError(errno.EBADF, "listener is closed")


class ListenerServer:
    """What ``Listener.serve`` returns: ``close()`` and ``await wait_closed()``."""

    def __init__(self, listener: Listener) -> None:
        self._listener = listener
        self._server: asyncio.base_events.Server | None = None
        self._started: asyncio.Future[None] | None = None

    def close(self) -> None:
        self._listener.close()
        if self._server is not None:
            self._server.close()

    async def wait_closed(self) -> None:
        if self._started is not None and not self._started.done():
            await asyncio.wait([self._started], timeout=None)
        if self._server is not None:
            await self._server.wait_closed()

    @property
    def listener(self) -> Listener:
        return self._listener


class Listener:
    """A listening endpoint of the cluster. See the module docstring."""

    def __init__(
        self,
        mode: str,
        address: dict[str, Any],
        *,
        sock: socket.socket | None = None,
        child: Child | None = None,
        key: str | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.mode = mode
        self.address = address
        self._sock = sock
        self._acceptor: Acceptor | None = None
        self._child = child
        self.key = key
        self._loop = loop
        self.closed = False
        # serve() listens again through asyncio: keep the backlog asked for.
        self.backlog: int | None = None
        self._blocking = True
        self._next_poll = 0.0
        # Round robin: (conn, token, peer address, ipc flags) waiting to be taken.
        self._queue: deque[tuple[socket.socket, int, Any, int]] = deque()
        # Whether the eventfd is signalled (it is while the queue is not empty,
        # except inside accept(), which takes what it receives at once).
        self._signalled = False
        self._accepting = False
        self._initial: dict[socket.socket, bytes] = {}
        # Weak: a connection whose server never asks must not be kept open here.
        self._accepted_at: weakref.WeakKeyDictionary[socket.socket, float] = (
            weakref.WeakKeyDictionary()
        )
        self._eventfd = -1
        self._epoll: select.epoll | None = None
        self._waiters: deque[asyncio.Future[tuple[socket.socket, Any]]] = deque()
        self._serve_cb: Callable[..., Any] | None = None
        self._conn_tasks: set[asyncio.Task[Any]] = set()
        self._on_close: list[Callable[[], None]] = []
        if mode == "rr":
            self._eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    # -- socket-like surface ------------------------------------------------

    @property
    def raw_socket(self) -> socket.socket | None:
        """The real listening socket (None under round robin)."""
        return self._sock

    def getsockname(self) -> Any:
        if self._sock is not None and not self.closed:
            return self._sock.getsockname()
        if self.address["port"] is None:
            return self.address["address"]
        return (self.address["address"], self.address["port"])

    def setblocking(self, flag: bool) -> None:
        self._blocking = flag
        if self._sock is not None and not self.closed:
            self._sock.setblocking(flag)

    def fileno(self) -> int:
        """Readable when ``accept()`` has something to do; usable with selectors."""
        if self.closed:
            return -1
        if self._sock is not None and self._sock.type == socket.SOCK_DGRAM:
            # UDP: the bound datagram socket itself, for recvfrom/sendto.
            return self._sock.fileno()
        if self._epoll is None:
            ep = select.epoll()
            ep.register(
                self._sock.fileno() if self._sock is not None else self._eventfd, select.EPOLLIN
            )
            if self._child is not None and self._child.connected:
                ep.register(self._child.channel_fd, select.EPOLLIN)
            self._epoll = ep
        return self._epoll.fileno()

    def accept(self) -> tuple[socket.socket, Any]:
        """Take the next connection; blocks unless ``setblocking(False)``.

        A real socket in a worker is accepted on directly while the cluster
        channel was read less than ``CHANNEL_POLL_INTERVAL`` ago: reading it
        costs a system call, and a message (a disconnect) waits that long at
        most, or until nothing is left to accept.
        """
        child = self._child
        if self._sock is not None and child is not None and not self.closed:
            now = time.monotonic()
            if now < self._next_poll:
                try:
                    return self._accept_now()
                except BlockingIOError:
                    pass
            self._next_poll = now + CHANNEL_POLL_INTERVAL
        while True:
            if self._queue and not self.closed:
                # Round robin: handed over already (the cluster channel is
                # read again once the queue is empty).
                return self._take()
            if child is not None:
                self._accepting = True
                try:
                    child.poll()
                finally:
                    self._accepting = False
            if self.closed:
                raise _closed_error()
            if self.mode != "rr":
                return self._accept_now()
            if self._queue:
                return self._take()
            if not self._blocking:
                raise BlockingIOError(errno.EAGAIN, "no connection waiting")
            assert child is not None
            if not child.wait_readable(None):
                raise _closed_error()

    def _accept_now(self) -> tuple[socket.socket, Any]:
        """Accept on the real socket (``Acceptor``: made on first use)."""
        accept = self._acceptor
        if accept is None:
            assert self._sock is not None
            accept = self._acceptor = Acceptor(self._sock)
        return accept()

    def take_initial_data(self, conn: socket.socket) -> bytes:
        """Bytes of ``conn`` the primary read before handing it over (once; else b"")."""
        return self._initial.pop(conn, b"")

    def take_accepted_at(self, conn: socket.socket) -> float | None:
        """When the primary accepted ``conn`` (``time.monotonic()``; once), or None
        when it did not come through the primary (every policy but round robin)."""
        if self.mode != "rr":
            return None
        return self._accepted_at.pop(conn, None)

    def close(self) -> None:
        """Stop listening; under round robin, waiting connections go back to the primary."""
        if self.closed:
            return
        self.closed = True
        if self._sock is not None:
            self._sock.close()
        while self._queue:
            conn, token, _peer_addr, _flags = self._queue.popleft()
            self._initial.pop(conn, None)
            conn.close()
            if self._child is not None:
                self._child.ack(self.key or "", token, accepted=False)
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        if self._eventfd >= 0:
            os.close(self._eventfd)
            self._eventfd = -1
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(_closed_error())
        self._waiters.clear()
        callbacks, self._on_close = self._on_close, []
        for callback in callbacks:
            callback()

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Listener {self.mode} {self.address} closed={self.closed}>"

    # -- asyncio ------------------------------------------------------------

    def _get_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is not None:
            return self._loop
        return asyncio.get_running_loop()

    async def accept_async(self) -> tuple[socket.socket, Any]:
        """Await the next connection on the cluster's loop."""
        if self.closed:
            raise _closed_error()
        if self.mode != "rr":
            assert self._sock is not None
            self._sock.setblocking(False)
            conn, addr = await asyncio.get_running_loop().sock_accept(self._sock)
            return conn, addr
        if self._queue:
            return self._take()
        waiter: asyncio.Future[tuple[socket.socket, Any]] = (
            asyncio.get_running_loop().create_future()
        )
        self._waiters.append(waiter)
        return await waiter

    def serve(self, client_connected_cb: Callable[..., Any]) -> ListenerServer:
        """Serve like ``asyncio.start_server`` on the cluster's loop (at once if it runs)."""
        if self.closed:
            raise _closed_error()
        loop = self._get_loop()
        server = ListenerServer(self)
        if self.mode == "rr":
            self._serve_cb = client_connected_cb
            while self._queue:
                self._start_conn(*self._take())
            return server
        assert self._sock is not None
        self._sock.setblocking(False)

        async def start() -> None:
            server._server = await asyncio.start_server(
                client_connected_cb,
                sock=self._sock,
                backlog=self.backlog if self.backlog is not None else DEFAULT_BACKLOG,
            )

        task = loop.create_task(start())
        server._started = task
        return server

    # -- round robin (called by the child role) -----------------------------

    def waiting(self) -> int:
        """Round robin: connections handed to this worker and not yet taken.

        Reads the cluster channel first (without blocking). Under round robin
        a worker is handed a connection only while the primary has one
        waiting, so this tells a worker whether others are waiting for it.
        """
        if self.mode != "rr" or self.closed:
            return 0
        if self._child is not None:
            self._child.poll()
        return len(self._queue)

    def park(self, conn: socket.socket, addr: Any = None) -> bool:
        """Round robin: give an idle connection back to the primary.

        For a server that serves one connection at a time: instead of closing
        a keep-alive connection with nothing more to read, it hands it back;
        the primary watches it (closing it after its ``park_timeout``) and
        hands it to the next free worker once the client sends again. The
        caller still closes its ``conn`` (a plain close, no shutdown). False
        if the connection cannot be parked (not round robin, closed): close
        it as usual. ``addr``, the client's address as ``accept()`` gave
        it, travels with the connection.

        While another connection waits here to be taken, the connection
        goes back with that one's acknowledgement, in the same message.
        """
        if self.mode != "rr" or self.closed or self._child is None or self.key is None:
            return False
        return self._child.park(self.key, conn, addr, defer=bool(self._queue))

    def _deliver(self, conn: socket.socket, handoff: Handoff) -> None:
        """A connection arrived from the primary for this listener."""
        if handoff.data:
            self._initial[conn] = handoff.data
        if handoff.accepted_at:
            self._accepted_at[conn] = handoff.accepted_at
        token = handoff.token
        if self._serve_cb is not None:
            self._child_ack(token)
            self._start_conn(conn, _ready(conn, handoff.peer, handoff.flags))
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._child_ack(token)
                waiter.set_result((conn, _ready(conn, handoff.peer, handoff.flags)))
                return
        self._queue.append((conn, token, handoff.peer, handoff.flags))
        if not self._accepting:
            self._signal()

    def _take(self) -> tuple[socket.socket, Any]:
        conn, token, peer, flags = self._queue.popleft()
        self._signal()
        self._child_ack(token)
        return conn, _ready(conn, peer, flags)

    def _signal(self) -> None:
        """Keep the eventfd readable exactly while connections wait in the queue."""
        if self._queue:
            if not self._signalled:
                os.eventfd_write(self._eventfd, 1)
                self._signalled = True
        elif self._signalled:
            try:
                os.eventfd_read(self._eventfd)
            except BlockingIOError:
                pass
            self._signalled = False

    def _child_ack(self, token: int) -> None:
        if self._child is not None:
            self._child.ack(self.key or "", token, accepted=True)

    def _start_conn(self, conn: socket.socket, addr: Any) -> None:
        cb = self._serve_cb
        assert cb is not None

        initial = self.take_initial_data(conn)

        async def run() -> None:
            reader, writer = await asyncio.open_connection(sock=conn)
            if initial:
                reader.feed_data(initial)
            result = cb(reader, writer)
            if asyncio.iscoroutine(result):
                await result

        task = self._get_loop().create_task(run())
        self._conn_tasks.add(task)
        task.add_done_callback(self._conn_tasks.discard)

    def _channel_gone(self) -> None:
        """The cluster channel closed: stop watching it."""
        if self._epoll is not None and self._child is not None:
            try:
                self._epoll.unregister(self._child.channel_fd)
            except (OSError, ValueError):
                pass


def _ready(conn: socket.socket, peer: Any, flags: int) -> Any:
    """Make a handed-over connection blocking if it may not be; its peer address."""
    if flags & NONBLOCKING:
        conn.setblocking(True)
    if peer is not None:
        return peer
    try:
        return conn.getpeername()
    except OSError:
        return None
