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
the primary's channel to the worker. Three options, all off by default,
protect the workers; the handle knows nothing of the protocol spoken, so the
server injects whatever depends on it:

- ``wait_for_data`` (seconds): an accepted connection is watched on the
  primary's loop and queued only once readable. One still silent at the
  deadline goes to ``on_expired`` (default: closed); one that only closes
  is closed here. A client that connects and waits never holds a worker.
- ``head_complete``: the handle reads from the connection and asks this
  predicate about the bytes so far: ``None`` keep reading, ``True`` hand
  off (the bytes travel with the connection), ``False`` close. With
  ``wait_for_data`` as the deadline, a client trickling its first bytes
  never reaches a worker either.
- ``on_overflow``: with ``max_pending`` reached (no worker free and the
  queue full), a new connection goes to ``on_overflow`` (which owns it and
  must close it) instead of waiting in the kernel's backlog, so it can be
  answered at once. Connections already queued keep their order.

``fds()`` lists every descriptor the primary holds (listening, watched,
pending, in flight): a child started with ``os.fork()`` must close them all,
or a connection a worker finished stays open through its copy.

Timing: the handle notes when it accepted each connection
(``time.monotonic()``, one clock for every process on the machine). The
time travels with the connection to the worker, which can tell how long it
waited; ``queue_length`` is how many wait for a free worker now, and
``wait`` (a ``WaitStats``, possibly shared by every handle of a primary)
collects how long each one took from accept to being taken by a worker.

Imports nothing from forkserve outside this package.
"""

from __future__ import annotations

import asyncio
import bisect
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, TypeVar

from .address import Acceptor
from .ipc import Handoff

C = TypeVar("C")

ACCEPT_BATCH = 64
# Upper bounds in seconds of the queue wait histogram: waits are usually
# well under a millisecond, and grow to seconds when every worker is busy.
WAIT_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)  # fmt: skip


@dataclass(slots=True)
class WaitStats:
    """How long connections waited, from accept to being taken by a worker.

    ``counts[i]`` counts waits of at most ``bounds[i]`` seconds and more
    than the bound before; the last entry counts the rest.
    """

    bounds: tuple[float, ...] = WAIT_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0  # seconds, summed

    def __post_init__(self) -> None:
        if len(self.counts) != len(self.bounds) + 1:
            self.counts = [0] * (len(self.bounds) + 1)

    @property
    def count(self) -> int:
        return sum(self.counts)

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds


@dataclass(slots=True)
class _Slot(Generic[C]):
    credits: int
    in_flight: dict[int, C] = field(default_factory=dict)


class Assignment(NamedTuple, Generic[C]):
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

    def held(self) -> list[C]:
        """Every connection still held (pending or in flight), left in place."""
        out = list(self.pending)
        for slot in self._slots.values():
            out.extend(slot.in_flight.values())
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


# (worker_id, conn, what travels with it) -> sent?
SendConn = Callable[[int, socket.socket, Handoff], bool]
HeadComplete = Callable[[bytes], bool | None]
OnOverflow = Callable[[socket.socket], None]
OnExpired = Callable[[socket.socket, bytes], None]

# Bytes read from a watched connection per readiness event.
READ_CHUNK = 16384
# recv() flags as plain ints: or-ing the enum members costs on every call.
_PEEK_NOW = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)
_READ_NOW = int(socket.MSG_DONTWAIT)
_NO_INFO: tuple[bytes, float, Any, int] = (b"", 0.0, None, 0)


@dataclass(slots=True)
class _Watch:
    """A connection the primary holds until it is readable (or its head is in)."""

    accepted: float = 0.0  # time.monotonic() at accept (or at park)
    buffer: bytearray = field(default_factory=bytearray)
    timer: asyncio.TimerHandle | None = None
    parked: bool = False  # given back idle by a worker
    peer: Any = None  # the client's address, as accept() gave it
    flags: int = 0  # ipc.NONBLOCKING: a worker may have left it non-blocking


def _close(conn: socket.socket) -> None:
    try:
        conn.close()
    except OSError:
        pass


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
        *,
        wait_for_data: float = 0.0,
        head_complete: HeadComplete | None = None,
        on_overflow: OnOverflow | None = None,
        on_expired: OnExpired | None = None,
        wait: WaitStats | None = None,
        park_timeout: float = 0.0,
    ) -> None:
        self.key = key
        self.sock = sock
        self.loop = loop
        self._send_conn = send_conn
        self.queue: RoundRobinQueue[socket.socket] = RoundRobinQueue(max_pending)
        self.wait_for_data = wait_for_data
        self.head_complete = head_complete
        self.on_overflow = on_overflow
        self.on_expired = on_expired
        self.park_timeout = park_timeout
        self.watching: dict[socket.socket, _Watch] = {}
        # What travels with each queued or in-flight connection: bytes already
        # read from it, when it was accepted (time.monotonic()), the client's
        # address, ipc flags.
        self._info: dict[socket.socket, tuple[bytes, float, Any, int]] = {}
        self._family = int(sock.family)
        self._accept = Acceptor(sock)
        self.wait = wait if wait is not None else WaitStats()
        self._reading = False
        self.closed = False
        self.paused = False
        sock.setblocking(False)

    @property
    def queue_length(self) -> int:
        """Connections waiting for a free worker."""
        return len(self.queue.pending)

    @property
    def _watches(self) -> bool:
        return self.wait_for_data > 0 or self.head_complete is not None

    def add(self, worker_id: int, credits: int = 1) -> None:
        self._dispatch(self.queue.add(worker_id, credits))
        self._update_reading()

    def remove(self, worker_id: int, keep: bool = False) -> bool:
        """Forget a worker; True when no worker is left (the handle closed).

        Its unacknowledged connections go to the next free workers, with the
        bytes already read from them. With ``keep`` a handle left without
        workers stays open: it stops accepting and holds what it has for the
        next worker that listens on it.
        """
        if worker_id not in self.queue:
            return not self.queue.workers and not keep
        self._dispatch(self.queue.remove(worker_id))
        if not self.queue.workers:
            if keep:
                self._update_reading()
                return False
            self.close()
            return True
        return False

    def ack(self, worker_id: int, token: int, accepted: bool) -> None:
        conn, assignments = self.queue.ack(worker_id, token, accepted)
        if conn is not None and accepted:
            info = self._info.pop(conn, None)
            if info is not None:
                self.wait.observe(time.monotonic() - info[1])
            conn.close()
        self._dispatch(assignments)
        self._update_reading()

    # -- accepting ----------------------------------------------------------------

    def _on_readable(self) -> None:
        for _ in range(ACCEPT_BATCH):
            if self.queue.full and self.on_overflow is None:
                break
            try:
                conn, addr = self._accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                # ECONNABORTED and friends: the client left before we took it.
                continue
            now = time.monotonic()
            if not self._watches:
                self._admit(conn, (b"", now, addr, 0))
                continue
            self._take_in(conn, _Watch(accepted=now, peer=addr))
        self._update_reading()

    def _take_in(self, conn: socket.socket, watch: _Watch) -> None:
        """Queue ``conn`` if its bytes are there, else watch it until they are.

        Under load the client's bytes are usually there already: one look
        spares the watch (a reader and a timer)."""
        verdict = self._look(conn, watch)
        if verdict is None:
            self._watch(conn, watch)
        else:
            self._settle(conn, watch, verdict)

    def _admit(self, conn: socket.socket, info: tuple[bytes, float, Any, int]) -> None:
        """Queue a connection, or hand it to ``on_overflow`` when the queue is full.

        ``info``: bytes already read, accept time, peer address, ipc flags."""
        if self.queue.full and self.on_overflow is not None:
            try:
                self.on_overflow(conn)
            except Exception:
                _close(conn)
            return
        self._info[conn] = info
        self._dispatch(self.queue.push(conn))

    # -- watching (wait_for_data, head_complete) ------------------------------------

    def _watch(self, conn: socket.socket, watch: _Watch) -> None:
        try:
            self.loop.add_reader(conn.fileno(), self._on_conn_readable, conn)
        except (OSError, ValueError):
            _close(conn)
            return
        deadline = self.park_timeout if watch.parked else self.wait_for_data
        if deadline > 0:
            watch.timer = self.loop.call_later(deadline, self._on_deadline, conn)
        self.watching[conn] = watch

    def _unwatch(self, conn: socket.socket) -> _Watch | None:
        watch = self.watching.pop(conn, None)
        if watch is None:
            return None
        if watch.timer is not None:
            watch.timer.cancel()
        try:
            self.loop.remove_reader(conn.fileno())
        except (OSError, ValueError):
            pass
        return watch

    def park(self, conn: socket.socket, peer: Any = None, flags: int = 0) -> None:
        """A worker gave back an idle connection: watch it like a new one.

        Once the client sends again it joins the queue behind the
        connections already waiting; idle for ``park_timeout`` seconds (or
        at a stop), it is closed. ``peer`` and ``flags`` (as the worker
        told them) travel on with it.
        """
        if self.closed or self.paused or self.park_timeout <= 0:
            _close(conn)
            return
        watch = _Watch(accepted=time.monotonic(), parked=True, peer=peer, flags=flags)
        self._take_in(conn, watch)
        self._update_reading()

    def _look(self, conn: socket.socket, watch: _Watch) -> bool | None:
        """Read what the connection has now: hand it off (True), close it
        (False), or wait for more (None). Never blocks."""
        try:
            if self.head_complete is None:
                # Peek: the worker reads the bytes itself; b"" means the client left.
                chunk = conn.recv(1, _PEEK_NOW)
            else:
                chunk = conn.recv(READ_CHUNK, _READ_NOW)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            chunk = b""
        if not chunk:
            return False
        if self.head_complete is None:
            return True
        watch.buffer += chunk
        try:
            return self.head_complete(bytes(watch.buffer))
        except Exception:
            return False

    def _settle(self, conn: socket.socket, watch: _Watch, verdict: bool) -> None:
        if verdict:
            self._admit(conn, (bytes(watch.buffer), watch.accepted, watch.peer, watch.flags))
        else:
            _close(conn)

    def _on_conn_readable(self, conn: socket.socket) -> None:
        watch = self.watching.get(conn)
        if watch is None:
            return
        verdict = self._look(conn, watch)
        if verdict is None:
            return
        self._unwatch(conn)
        if watch.parked:
            watch.accepted = time.monotonic()  # it waits from its next request on
        self._settle(conn, watch, verdict)
        self._update_reading()

    def _on_deadline(self, conn: socket.socket) -> None:
        watch = self._unwatch(conn)
        if watch is None:
            return
        if self.on_expired is None:
            _close(conn)
            return
        try:
            self.on_expired(conn, bytes(watch.buffer))
        except Exception:
            _close(conn)

    # -- hand-off -------------------------------------------------------------------

    def _dispatch(self, assignments: list[Assignment[socket.socket]]) -> None:
        key = self.key
        family = self._family
        for item in assignments:
            conn = item.conn
            data, accepted, peer, flags = self._info.get(conn, _NO_INFO)
            handoff = Handoff(key, item.token, accepted, data, family, peer, flags)
            if not self._send_conn(item.worker_id, conn, handoff):
                # The channel is gone; the worker's removal hands the conn out again.
                continue

    def pause(self) -> None:
        """Stop accepting; connections already accepted are still handed out.

        The listening socket stays open: its backlog waits for whoever else
        accepts on it (a new primary after an upgrade), or is reset at close.
        """
        self.paused = True
        # Idle keep-alive connections given back by workers: nothing to finish.
        for conn, watch in list(self.watching.items()):
            if watch.parked:
                self._unwatch(conn)
                _close(conn)
        self._update_reading()

    def drop_held(self) -> int:
        """Close every connection held here (watched, pending, in flight); how many."""
        held = list(self.watching)
        for conn in held:
            self._unwatch(conn)
        held.extend(self.queue.drain())
        for conn in held:
            self._info.pop(conn, None)
            _close(conn)
        return len(held)

    @property
    def held_count(self) -> int:
        """Connections accepted here and not yet taken by a worker."""
        return len(self.watching) + len(self.queue.held())

    @property
    def drained(self) -> bool:
        """Nothing accepted here is waiting: not for bytes, a worker or an ack."""
        return not self.watching and not self.queue.held()

    def _update_reading(self) -> None:
        want = (
            not self.closed
            and not self.paused
            and bool(self.queue.workers)
            and (not self.queue.full or self.on_overflow is not None)
        )
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
        for conn in list(self.watching):
            self._unwatch(conn)
            _close(conn)
        for conn in self.queue.drain():
            conn.close()
        self._info.clear()
        self.sock.close()

    def fds(self) -> list[int]:
        """Descriptors a forked child must close: every socket the primary holds."""
        fds = [self.sock.fileno()]
        fds.extend(c.fileno() for c in self.watching)
        fds.extend(c.fileno() for c in self.queue.held())
        return [fd for fd in fds if fd >= 0]
