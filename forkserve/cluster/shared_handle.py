"""``SCHED_NONE``: one listening socket the primary passes to every worker.

The primary binds once per key and hands the same socket (as SCM_RIGHTS) to
each worker that asks; the workers accept on it directly. When the last
worker lets go, the primary closes its copy. UDP always uses this handle.

Imports nothing from forkserve outside this package.
"""

from __future__ import annotations

import socket
from typing import Any


class SharedHandle:
    mode = "shared"

    def __init__(self, key: str, sock: socket.socket) -> None:
        self.key = key
        self.sock = sock
        self.workers: set[int] = set()
        self.closed = False

    def add(self, worker_id: int, credits: int = 1) -> None:
        self.workers.add(worker_id)

    def remove(self, worker_id: int) -> bool:
        """Forget a worker; True when none is left (the socket is closed)."""
        self.workers.discard(worker_id)
        if not self.workers:
            self.close()
            return True
        return False

    def ack(self, worker_id: int, token: int, accepted: bool) -> None:
        """Shared handles hand out no connections."""

    def sockname(self) -> Any:
        return self.sock.getsockname()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()

    def fds(self) -> list[int]:
        fd = self.sock.fileno()
        return [fd] if fd >= 0 else []
