"""The scoreboard: what every worker is doing, in memory the primary can read.

The primary maps one shared anonymous region before it forks anything, cut
into fixed-size slots; each worker gets a slot (``FORKSERVE_SLOT`` in its
environment) and writes into it, the primary only reads. Nothing is sent
per request and nothing is lost when a worker dies, even by SIGKILL: its
slot stays readable in the primary, which folds the counts into the totals
of retired workers before handing the slot to the next worker.

A slot holds
- the worker's heartbeat (``time.monotonic()``, the same clock in every
  process): the serve loop beats while it runs, so a worker stuck in an app
  or in C code stops beating;
- counters: requests by method and status class, a latency histogram with
  Prometheus' default buckets, requests in flight, request timeouts;
- up to ``ENTRIES`` requests in flight: start time, request line, client.

Writers update plain machine words in place; a reader may see a counter
one request behind, never a torn request line (an entry's start time is
cleared while its text is rewritten, and the reader checks it twice).

This module knows nothing about HTTP parsing, sockets or the cluster.
"""

from __future__ import annotations

import bisect
import mmap
import os
import struct
import threading
import time
from dataclasses import dataclass, field

SLOT_ENV = "FORKSERVE_SLOT"
SLOT_SIZE = 8192
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "OTHER")
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
# Upper bounds in seconds (Prometheus' defaults); one more bucket for +Inf.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ENTRIES = 24
LINE_MAX = 184
CLIENT_MAX = 60

_METHOD_INDEX = {name: index for index, name in enumerate(METHODS)}
_OTHER = len(METHODS) - 1

# Doubles at offset 0.
_D_HEARTBEAT, _D_STARTED, _D_LATENCY_SUM = 0, 1, 2
_D_COUNT = 8
# Signed 64-bit integers from offset 64.
_Q_OFFSET = 64
_Q_PID, _Q_REQUESTS, _Q_IN_FLIGHT, _Q_FLAGS, _Q_STACK_FD, _Q_TIMEOUTS = range(6)
_Q_COUNTS = 8
_Q_HIST = _Q_COUNTS + len(METHODS) * len(STATUS_CLASSES)
_Q_COUNT = _Q_HIST + len(BUCKETS) + 1
# In-flight entries from offset 1024: line length, client length (unsigned
# shorts), line, client, and last the start time (a double; 0 when free),
# written in one go with the start last.
_E_OFFSET = 1024
_E_SIZE = 256
_ENTRY = struct.Struct(f"=HH{LINE_MAX}s{CLIENT_MAX}sd")
_E_START = _ENTRY.size - 8
_E_LINE = 4
_E_CLIENT = _E_LINE + LINE_MAX
_START = struct.Struct("=d")

FLAG_CANCELS_OWN = 1  # the worker enforces --request-timeout itself (asgi)

assert _Q_OFFSET + 8 * _Q_COUNT <= _E_OFFSET
assert _ENTRY.size <= _E_SIZE
assert _E_OFFSET + ENTRIES * _E_SIZE <= SLOT_SIZE


def method_index(method: str) -> int:
    return _METHOD_INDEX.get(method, _OTHER)


def status_index(status: int) -> int:
    if 100 <= status < 600:
        return status // 100 - 1
    return len(STATUS_CLASSES) - 1


def bucket_index(seconds: float) -> int:
    return bisect.bisect_left(BUCKETS, seconds)


@dataclass(slots=True)
class InFlight:
    line: str
    client: str
    age: float  # seconds


@dataclass(slots=True)
class Counts:
    """Counters that add up across workers (``+=``)."""

    requests: int = 0
    timeouts: int = 0
    latency_sum: float = 0.0
    # by_method_status[method_index][status_index]
    by_method_status: list[list[int]] = field(
        default_factory=lambda: [[0] * len(STATUS_CLASSES) for _ in METHODS]
    )
    histogram: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))

    def add(self, other: Counts) -> None:
        self.requests += other.requests
        self.timeouts += other.timeouts
        self.latency_sum += other.latency_sum
        for mine, theirs in zip(self.by_method_status, other.by_method_status, strict=True):
            for index, value in enumerate(theirs):
                mine[index] += value
        for index, value in enumerate(other.histogram):
            self.histogram[index] += value

    def by_status_class(self) -> dict[str, int]:
        return {
            name: sum(row[index] for row in self.by_method_status)
            for index, name in enumerate(STATUS_CLASSES)
        }


@dataclass(slots=True)
class SlotView:
    """A reading of one slot, taken by the primary."""

    pid: int
    heartbeat: float  # monotonic; 0 before the first beat
    started: float
    in_flight: int
    flags: int
    stack_fd: int
    counts: Counts
    requests: list[InFlight]

    @property
    def silent_for(self) -> float:
        """Seconds since the last heartbeat (0 before the first one)."""
        return time.monotonic() - self.heartbeat if self.heartbeat else 0.0


class Scoreboard:
    """The shared region: created by the primary before it forks anything."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._map = mmap.mmap(-1, slots * SLOT_SIZE)  # MAP_SHARED | MAP_ANONYMOUS
        self._free = list(range(slots - 1, -1, -1))

    def close(self) -> None:
        self._map.close()

    # -- the primary ------------------------------------------------------------

    def allocate(self) -> int | None:
        """A cleared slot for a worker about to start, or None when all are taken."""
        if not self._free:
            return None
        index = self._free.pop()
        start = index * SLOT_SIZE
        self._map[start : start + SLOT_SIZE] = bytes(SLOT_SIZE)
        return index

    def release(self, index: int) -> None:
        if index not in self._free:
            self._free.append(index)

    def count_timeout(self, index: int) -> None:
        """A request timeout the primary found (sync and threaded workers)."""
        view = memoryview(self._map)[index * SLOT_SIZE : (index + 1) * SLOT_SIZE]
        words = view[_Q_OFFSET : _Q_OFFSET + 8 * _Q_COUNT].cast("q")
        words[_Q_TIMEOUTS] += 1
        words.release()
        view.release()

    def read(self, index: int) -> SlotView:
        view = memoryview(self._map)[index * SLOT_SIZE : (index + 1) * SLOT_SIZE]
        doubles = view[: 8 * _D_COUNT].cast("d")
        words = view[_Q_OFFSET : _Q_OFFSET + 8 * _Q_COUNT].cast("q")
        width = len(STATUS_CLASSES)
        counts = Counts(
            requests=words[_Q_REQUESTS],
            timeouts=words[_Q_TIMEOUTS],
            latency_sum=doubles[_D_LATENCY_SUM],
            by_method_status=[
                list(words[_Q_COUNTS + m * width : _Q_COUNTS + (m + 1) * width])
                for m in range(len(METHODS))
            ],
            histogram=list(words[_Q_HIST:_Q_COUNT]),
        )
        now = time.monotonic()
        requests = []
        for entry in range(ENTRIES):
            offset = _E_OFFSET + entry * _E_SIZE
            (start,) = _START.unpack_from(view, offset + _E_START)
            if not start:
                continue
            line_len, client_len, line, client, _ = _ENTRY.unpack_from(view, offset)
            line, client = line[: min(line_len, LINE_MAX)], client[: min(client_len, CLIENT_MAX)]
            if _START.unpack_from(view, offset + _E_START)[0] != start:
                continue  # rewritten while read: the next reading will have it
            requests.append(
                InFlight(line.decode("latin-1"), client.decode("latin-1"), max(0.0, now - start))
            )
        requests.sort(key=lambda item: -item.age)
        result = SlotView(
            pid=words[_Q_PID],
            heartbeat=doubles[_D_HEARTBEAT],
            started=doubles[_D_STARTED],
            in_flight=words[_Q_IN_FLIGHT],
            flags=words[_Q_FLAGS],
            stack_fd=words[_Q_STACK_FD],
            counts=counts,
            requests=requests,
        )
        del doubles, words
        view.release()
        return result

    # -- a worker ---------------------------------------------------------------

    def attach(self, index: int) -> Slot:
        """In a worker: the writer of slot ``index``."""
        return Slot(self._map, index)


class Slot:
    """A worker's own slot. ``begin``/``end`` may be called from several threads."""

    def __init__(self, region: mmap.mmap, index: int) -> None:
        self.index = index
        self._view = memoryview(region)[index * SLOT_SIZE : (index + 1) * SLOT_SIZE]
        self._doubles = self._view[: 8 * _D_COUNT].cast("d")
        self._words = self._view[_Q_OFFSET : _Q_OFFSET + 8 * _Q_COUNT].cast("q")
        self._free = list(range(ENTRIES - 1, -1, -1))
        self._lock = threading.Lock()
        self._words[_Q_PID] = os.getpid()
        self._doubles[_D_STARTED] = time.monotonic()
        self.beat()

    def beat(self) -> None:
        self._doubles[_D_HEARTBEAT] = time.monotonic()

    def set_flags(self, flags: int) -> None:
        self._words[_Q_FLAGS] = flags

    def set_stack_fd(self, fd: int) -> None:
        self._words[_Q_STACK_FD] = fd

    def count_timeout(self) -> None:
        with self._lock:
            self._words[_Q_TIMEOUTS] += 1

    def begin(self, method: str, target: str, client: str) -> tuple[int, float]:
        """A request starts: returns the token ``end`` takes."""
        now = time.monotonic()
        with self._lock:
            self._words[_Q_IN_FLIGHT] += 1
            entry = self._free.pop() if self._free else -1
        if entry >= 0:
            line = f"{method} {target}".encode("latin-1", "replace")[:LINE_MAX]
            peer = client.encode("latin-1", "replace")[:CLIENT_MAX]
            _ENTRY.pack_into(
                self._view, _E_OFFSET + entry * _E_SIZE, len(line), len(peer), line, peer, now
            )
        return entry, now

    def end(self, token: tuple[int, float], method: str, status: int) -> None:
        """The request ``begin`` returned ``token`` for has been answered (or failed)."""
        entry, started = token
        duration = time.monotonic() - started
        words = self._words
        with self._lock:
            if entry >= 0:
                _START.pack_into(self._view, _E_OFFSET + entry * _E_SIZE + _E_START, 0.0)
                self._free.append(entry)
            words[_Q_IN_FLIGHT] -= 1
            words[_Q_REQUESTS] += 1
            words[
                _Q_COUNTS + method_index(method) * len(STATUS_CLASSES) + status_index(status)
            ] += 1
            words[_Q_HIST + bucket_index(duration)] += 1
            self._doubles[_D_LATENCY_SUM] += duration


def slot_from_environ(board: Scoreboard | None) -> Slot | None:
    """In a worker: its slot, from ``FORKSERVE_SLOT`` (removed from the environment)."""
    raw = os.environ.pop(SLOT_ENV, "")
    if board is None or not raw.isdigit():
        return None
    return board.attach(int(raw))
