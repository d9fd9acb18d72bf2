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

The writer's side runs twice per request, so it is kept to a handful of
operations (see ``Slot``): taking an entry is a ``list.pop`` (atomic under
the GIL) and one ``pack_into`` (one store when the entry already shows the
same request line and client); ending a request clears the entry's start and
bumps three counters, under a lock only in a worker with several serving
threads. The total of requests and the requests in flight are not written
at all: the reader derives them from the per-status counts and the live
entries.

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
# Signed 64-bit integers from offset 64. _Q_OVERFLOW: requests in flight
# beyond the ENTRIES listed ones (the reader adds the live entries).
_Q_OFFSET = 64
_Q_PID, _Q_OVERFLOW, _Q_FLAGS, _Q_STACK_FD, _Q_TIMEOUTS = range(5)
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
# Where entry n's start time is, counted in doubles from the slot's start.
_E_START_DOUBLE = [(_E_OFFSET + n * _E_SIZE + _E_START) // 8 for n in range(ENTRIES)]
# The first counter of each method's row; a method not listed counts as OTHER.
_ROW = {name: _Q_COUNTS + index * len(STATUS_CLASSES) for index, name in enumerate(METHODS)}
_ROW_OTHER = _ROW["OTHER"]
_LAST_CLASS = len(STATUS_CLASSES) - 1
_FIRST_BUCKET = BUCKETS[0]

FLAG_CANCELS_OWN = 1  # the worker enforces --request-timeout itself (asgi)

assert _Q_OFFSET + 8 * _Q_COUNT <= _E_OFFSET
assert _ENTRY.size <= _E_SIZE
assert _E_OFFSET + ENTRIES * _E_SIZE <= SLOT_SIZE
assert (_E_OFFSET + _E_START) % 8 == 0 and _E_SIZE % 8 == 0


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
        by_method_status = [
            list(words[_Q_COUNTS + m * width : _Q_COUNTS + (m + 1) * width])
            for m in range(len(METHODS))
        ]
        counts = Counts(
            requests=sum(map(sum, by_method_status)),
            timeouts=words[_Q_TIMEOUTS],
            latency_sum=doubles[_D_LATENCY_SUM],
            by_method_status=by_method_status,
            histogram=list(words[_Q_HIST:_Q_COUNT]),
        )
        now = time.monotonic()
        requests = []
        live = 0
        for entry in range(ENTRIES):
            offset = _E_OFFSET + entry * _E_SIZE
            (start,) = _START.unpack_from(view, offset + _E_START)
            if not start:
                continue
            live += 1
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
            in_flight=live + words[_Q_OVERFLOW],
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
    """A worker's own slot.

    ``begin``/``end`` may be called from several threads at once, unless
    ``set_single_thread()`` said otherwise; then ``end`` takes no lock.
    They run on every request, so each is a few C-level operations: the
    token is the entry's index (no per-request object), one clock read each,
    the entry's text rewritten only when it changes, and the request total
    and in-flight count left for the reader to derive.
    """

    def __init__(self, region: mmap.mmap, index: int) -> None:
        self.index = index
        self._view = memoryview(region)[index * SLOT_SIZE : (index + 1) * SLOT_SIZE]
        self._doubles = self._view[: 8 * _D_COUNT].cast("d")
        self._words = self._view[_Q_OFFSET : _Q_OFFSET + 8 * _Q_COUNT].cast("q")
        # The whole slot as doubles: an entry's start time is one item store.
        self._slot_doubles = self._view.cast("d")
        self._free = list(range(ENTRIES - 1, -1, -1))
        # Start times by token: the ENTRIES listed requests, then the ones
        # past them (tokens from ENTRIES up, reused through ``_spare``).
        self._starts = [0.0] * ENTRIES
        # What each entry's text says now: (method, target, client).
        self._texts: list[tuple[str, str, str] | None] = [None] * ENTRIES
        self._spare: list[int] = []
        self._lock: threading.Lock | None = threading.Lock()
        self._overflow_lock = threading.Lock()
        self._peer: tuple[str, bytes] = ("", b"")
        self._words[_Q_PID] = os.getpid()
        self._doubles[_D_STARTED] = time.monotonic()
        self.beat()

    def set_single_thread(self) -> None:
        """Only one thread calls ``begin``/``end`` from now on: no locking."""
        self._lock = None

    def beat(self) -> None:
        self._doubles[_D_HEARTBEAT] = time.monotonic()

    def set_flags(self, flags: int) -> None:
        self._words[_Q_FLAGS] = flags

    def set_stack_fd(self, fd: int) -> None:
        self._words[_Q_STACK_FD] = fd

    def count_timeout(self) -> None:
        with self._overflow_lock:
            self._words[_Q_TIMEOUTS] += 1

    def begin(self, method: str, target: str, client: str) -> int:
        """A request starts: returns the token ``end`` takes."""
        now = time.monotonic()
        try:
            entry = self._free.pop()  # atomic: no lock
        except IndexError:
            return self._begin_unlisted(now)
        self._starts[entry] = now
        text = (method, target, client)
        if self._texts[entry] == text:
            # The entry already shows this request line and client (a client
            # repeating a request): only its start time changes.
            self._slot_doubles[_E_START_DOUBLE[entry]] = now
            return entry
        self._texts[entry] = text
        line = f"{method} {target}".encode("latin-1", "replace")
        cached_client, peer = self._peer
        if client != cached_client:
            peer = client.encode("latin-1", "replace")
            self._peer = (client, peer)
        # "s" fields truncate; the start time goes in last, in the same call.
        _ENTRY.pack_into(
            self._view,
            _E_OFFSET + entry * _E_SIZE,
            min(len(line), LINE_MAX),
            min(len(peer), CLIENT_MAX),
            line,
            peer,
            now,
        )
        return entry

    def _begin_unlisted(self, now: float) -> int:
        with self._overflow_lock:
            self._words[_Q_OVERFLOW] += 1
            if self._spare:
                token = self._spare.pop()
            else:
                token = len(self._starts)
                self._starts.append(0.0)
            self._starts[token] = now
        return token

    def end(self, token: int, method: str, status: int) -> None:
        """The request ``begin`` returned ``token`` for has been answered (or failed)."""
        duration = time.monotonic() - self._starts[token]
        if token < ENTRIES:
            # Cleared before the entry is free again: the next begin rewrites it.
            self._slot_doubles[_E_START_DOUBLE[token]] = 0.0
        else:
            with self._overflow_lock:
                self._words[_Q_OVERFLOW] -= 1
                self._spare.append(token)
        cls = status // 100 - 1 if 100 <= status < 600 else _LAST_CLASS
        bucket = 0 if duration <= _FIRST_BUCKET else bisect.bisect_left(BUCKETS, duration)
        cell = _ROW.get(method, _ROW_OTHER) + cls
        words = self._words
        lock = self._lock
        if lock is not None:
            lock.acquire()
        try:
            words[cell] += 1
            words[_Q_HIST + bucket] += 1
            self._doubles[_D_LATENCY_SUM] += duration
        finally:
            if lock is not None:
                lock.release()
        if token < ENTRIES:
            self._free.append(token)


def slot_from_environ(board: Scoreboard | None) -> Slot | None:
    """In a worker: its slot, from ``FORKSERVE_SLOT`` (removed from the environment)."""
    raw = os.environ.pop(SLOT_ENV, "")
    if board is None or not raw.isdigit():
        return None
    return board.attach(int(raw))
