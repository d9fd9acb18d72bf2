"""Round-robin distribution of accepted connections (``SCHED_RR``).

Theory of operation
-------------------
``RoundRobinQueue`` is the pure part: workers, their free *credits*, the
pending connections and the ones handed over but not yet acknowledged. A
worker is free while it has a credit; handing it a connection spends one and
its acknowledgement returns it. Free workers are served in turn (a worker
with credits left goes to the back of the line), so a busy worker is skipped
and order over workers is round robin. The library default is Node's: one
credit, i.e. one connection in hand per worker. A refused connection, or one
still unacknowledged when its worker goes away, goes back to the front of
the pending queue: nothing is lost or handed out twice.

``RoundRobinHandle`` is the I/O edge: it owns the listening socket in the
primary, accepts in a loop until EAGAIN and sends each assignment through
the primary's channel to the worker.

Imports nothing from forkserve outside this package.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

C = TypeVar("C")

ACCEPT_BATCH = 64


@dataclass(slots=True)
class _Slot(Generic[C]):
    credits: int
    in_flight: dict[int, C] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Assignment(Generic[C]):
    worker_id: int
    token: int
    conn: C


class RoundRobinQueue(Generic[C]):
    """Pure bookkeeping of who gets the next connection."""

    def __init__(self, max_pending: int = 0) -> None:
        self._slots: dict[int, _Slot[C]] = {}
        self._free: deque[int] = deque()
        self.pending: deque[C] = deque()
        self.max_pending = max_pending
        self._token = 0

    def __contains__(self, worker_id: int) -> bool:
        return worker_id in self._slots

    @property
    def workers(self) -> list[int]:
        return list(self._slots)

    @property
    def full(self) -> bool:
        return bool(self.max_pending) and len(self.pending) >= self.max_pending

    def is_free(self, worker_id: int) -> bool:
        slot = self._slots.get(worker_id)
        return slot is not None and slot.credits > 0

    def add(self, worker_id: int, credits: int = 1) -> list[Assignment[C]]:
        if worker_id in self._slots:
            return []
        self._slots[worker_id] = _Slot(max(1, credits))
        self._free.append(worker_id)
        return self._distribute()

    def remove(self, worker_id: int) -> list[Assignment[C]]:
        """Forget a worker; its unacknowledged connections are handed out again."""
        slot = self._slots.pop(worker_id, None)
        if slot is None:
            return []
        try:
            self._free.remove(worker_id)
        except ValueError:
            pass
        for token in sorted(slot.in_flight, reverse=True):
            self.pending.appendleft(slot.in_flight[token])
        return self._distribute()

    def push(self, conn: C) -> list[Assignment[C]]:
        self.pending.append(conn)
        return self._distribute()

    def ack(
        self, worker_id: int, token: int, accepted: bool
    ) -> tuple[C | None, list[Assignment[C]]]:
        """A worker took (or refused) a connection: return it and what to send next."""
        slot = self._slots.get(worker_id)
        if slot is None:
            return None, []
        conn = slot.in_flight.pop(token, None)
        if conn is None:
            return None, []
        slot.credits += 1
        if slot.credits == 1:
            self._free.append(worker_id)
        if not accepted:
            self.pending.appendleft(conn)
        return conn, self._distribute()

    def drain(self) -> list[C]:
        """Every connection still held (pending or in flight), for closing."""
        out = list(self.pending)
        self.pending.clear()
        for slot in self._slots.values():
            out.extend(slot.in_flight.values())
            slot.in_flight.clear()
        return out

    def _distribute(self) -> list[Assignment[C]]:
        out: list[Assignment[C]] = []
        while self.pending and self._free:
            worker_id = self._free.popleft()
            slot = self._slots[worker_id]
            conn = self.pending.popleft()
            self._token += 1
            slot.in_flight[self._token] = conn
            slot.credits -= 1
            if slot.credits > 0:
                self._free.append(worker_id)
            out.append(Assignment(worker_id, self._token, conn))
        return out


SendConn = Callable[[int, str, int, socket.socket], bool]


class RoundRobinHandle:
    """The primary's listening socket under SCHED_RR and its queue."""

    mode = "rr"

    def __init__(
        self,
        key: str,
        sock: socket.socket,
        loop: asyncio.AbstractEventLoop,
        send_conn: SendConn,
        max_pending: int = 0,
    ) -> None:
        self.key = key
        self.sock = sock
        self.loop = loop
        self._send_conn = send_conn
        self.queue: RoundRobinQueue[socket.socket] = RoundRobinQueue(max_pending)
        self._reading = False
        self.closed = False
        sock.setblocking(False)

    def add(self, worker_id: int, credits: int = 1) -> None:
        self._dispatch(self.queue.add(worker_id, credits))
        self._update_reading()

    def remove(self, worker_id: int) -> bool:
        """Forget a worker; True when no worker is left (the handle closed)."""
        if worker_id not in self.queue:
            return not self.queue.workers
        self._dispatch(self.queue.remove(worker_id))
        if not self.queue.workers:
            self.close()
            return True
        return False

    def ack(self, worker_id: int, token: int, accepted: bool) -> None:
        conn, assignments = self.queue.ack(worker_id, token, accepted)
        if conn is not None and accepted:
            conn.close()
        self._dispatch(assignments)
        self._update_reading()

    def _on_readable(self) -> None:
        for _ in range(ACCEPT_BATCH):
            if self.queue.full:
                break
            try:
                conn, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                # ECONNABORTED and friends: the client left before we took it.
                continue
            self._dispatch(self.queue.push(conn))
        self._update_reading()

    def _dispatch(self, assignments: list[Assignment[socket.socket]]) -> None:
        for item in assignments:
            if not self._send_conn(item.worker_id, self.key, item.token, item.conn):
                # The channel is gone; the worker's removal hands the conn out again.
                continue

    def _update_reading(self) -> None:
        want = not self.closed and bool(self.queue.workers) and not self.queue.full
        if want and not self._reading:
            self.loop.add_reader(self.sock.fileno(), self._on_readable)
            self._reading = True
        elif not want and self._reading:
            self.loop.remove_reader(self.sock.fileno())
            self._reading = False

    def sockname(self) -> Any:
        return self.sock.getsockname()

    def close(self) -> None:
        if self.closed:
            return
        if self._reading:
            self.loop.remove_reader(self.sock.fileno())
            self._reading = False
        self.closed = True
        for conn in self.queue.drain():
            conn.close()
        self.sock.close()

    def fds(self) -> list[int]:
        """Descriptors a forked child must close."""
        fds = [self.sock.fileno()]
        fds.extend(c.fileno() for c in self.queue.pending)
        return [fd for fd in fds if fd >= 0]
