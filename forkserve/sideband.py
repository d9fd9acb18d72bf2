"""Small servers the primary runs beside the workers, on its own asyncio loop.

The control socket (``control.py``) and the metrics endpoint
(``metrics.py``) accept here: one task per client, at most ``max_clients``
at a time (more are closed at once), each client's handler bounded by its
own deadlines. The server keeps the socket objects it accepted, so that a
process forked from the primary can close every one it inherited
(``close_in_child``) without touching the parent's loop.

Imports nothing from forkserve.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Awaitable, Callable

LOG = logging.getLogger("forkserve.arbiter")

# Accept errors that say "no descriptor left for now": wait a moment, go on.
_PAUSE_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
PAUSE = 0.1


class SidebandServer:
    """Accepts on ``sock`` (listening, non-blocking) and runs ``handle(conn)`` per client."""

    def __init__(
        self,
        sock: socket.socket,
        handle: Callable[[socket.socket], Awaitable[None]],
        *,
        name: str,
        max_clients: int = 16,
    ) -> None:
        self.sock = sock
        self.handle = handle
        self.name = name
        self.max_clients = max_clients
        self.clients: set[socket.socket] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepting: asyncio.Task[None] | None = None
        self.closed = False

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._accepting = loop.create_task(self._accept_loop(loop))

    async def _accept_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        while not self.closed:
            try:
                conn, _ = await loop.sock_accept(self.sock)
            except OSError as exc:
                if self.closed:
                    return
                if exc.errno in _PAUSE_ERRNOS:
                    await asyncio.sleep(PAUSE)
                continue  # ECONNABORTED and friends: that client left
            if len(self.clients) >= self.max_clients:
                conn.close()
                continue
            conn.setblocking(False)
            self.clients.add(conn)
            task = loop.create_task(self._run(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, conn: socket.socket) -> None:
        try:
            await self.handle(conn)
        except (OSError, asyncio.TimeoutError):
            pass
        except Exception:
            LOG.exception("%s: error serving a client", self.name)
        finally:
            self.clients.discard(conn)
            conn.close()

    def close_in_child(self) -> None:
        """In a process forked from the primary: close every inherited socket."""
        self.closed = True
        for conn in list(self.clients):
            conn.close()
        self.clients.clear()
        self.sock.close()

    def close(self) -> None:
        """Stop accepting and drop every client."""
        if self.closed:
            return
        self.closed = True
        for task in [self._accepting, *self._tasks]:
            if task is not None:
                with contextlib.suppress(RuntimeError):  # the loop is closed
                    task.cancel()
        for conn in list(self.clients):
            conn.close()
        self.clients.clear()
        self.sock.close()


async def send_all(conn: socket.socket, data: bytes, timeout: float) -> None:
    """Send ``data`` within ``timeout`` seconds (a client that does not read is dropped)."""
    loop = asyncio.get_running_loop()
    await asyncio.wait_for(loop.sock_sendall(conn, data), timeout)


async def receive(conn: socket.socket, size: int, timeout: float) -> bytes:
    """Up to ``size`` bytes within ``timeout`` seconds; b"" when the client closed."""
    loop = asyncio.get_running_loop()
    return await asyncio.wait_for(loop.sock_recv(conn, size), timeout)
