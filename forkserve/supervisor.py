"""The supervisor: the primary's side of the scoreboard.

It gives each worker a scoreboard slot, reads the slots once a second and
acts on what ``supervision.assess`` finds: a silent worker is killed after
its stack is logged, a late request is logged with the worker's stack,
and workers are recycled one at a time, each replacement ready before its
predecessor leaves (the arbiter's ``retiring`` queue). It also keeps the
counts of exited workers and the restarts by cause, and answers what the
control socket and the metrics show (``status``, ``totals``).

The arbiter owns the workers; this module asks it to spawn one and reads
its bookkeeping (which workers are ready, when each started).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from forkserve import __version__, cluster, systemd
from forkserve.scoreboard import Counts, Scoreboard, Slot, SlotView, slot_from_environ
from forkserve.sockets import describe
from forkserve.supervision import SILENT, Finding, Limits, Watch, assess, rss_of

if TYPE_CHECKING:
    from forkserve.arbiter import Arbiter

LOG = logging.getLogger("forkserve.arbiter")

# How often the primary reads the scoreboard (liveness, deadlines, memory).
SUPERVISE_INTERVAL = 1.0
# How long a stack dump may take to appear after SIGUSR2.
STACK_DUMP_WAIT = 1.0


class Supervisor:
    def __init__(self, arbiter: Arbiter) -> None:
        self.arbiter = arbiter
        self.scoreboard: Scoreboard | None = None
        self.slots: dict[int, int] = {}  # worker id -> scoreboard slot
        self.watches: dict[int, Watch] = {}
        self.retired = Counts()  # what workers that have exited served
        self.restarts: dict[str, int] = {}  # cause -> workers replaced for it
        self.exit_causes: dict[int, str] = {}  # worker id -> why it was made to leave
        self.recycle_queue: deque[tuple[cluster.Worker, str]] = deque()
        self.recycling: cluster.Worker | None = None
        self.started_at_wall = time.time()
        self._last_status = ""

    # -- the workers' slots -------------------------------------------------------

    def open(self, workers: int) -> None:
        """Map the scoreboard: before anything forks, so every process inherits it."""
        self.scoreboard = Scoreboard(max(64, 8 * workers))

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.call_later(SUPERVISE_INTERVAL, self.tick)

    def allocate(self) -> int | None:
        """A slot for a worker about to start (None: all taken, it goes unsupervised)."""
        assert self.scoreboard is not None
        slot = self.scoreboard.allocate()
        if slot is None:
            LOG.warning("no scoreboard slot left: the new worker will not be supervised")
        return slot

    def release(self, slot: int | None) -> None:
        """A slot allocated for a worker that did not start."""
        if slot is not None and self.scoreboard is not None:
            self.scoreboard.release(slot)

    def started(self, worker: cluster.Worker, slot: int | None) -> None:
        if slot is not None:
            self.slots[worker.id] = slot
        self.watches[worker.id] = Watch()

    def slot_in_worker(self) -> Slot | None:
        """In a worker process: its own slot (from its environment)."""
        return slot_from_environ(self.scoreboard)

    def retiring(self, worker: cluster.Worker, cause: str) -> None:
        """``worker`` is told to leave for ``cause``, unless a cause was set before."""
        self.exit_causes.setdefault(worker.id, cause)

    def exited(self, worker: cluster.Worker) -> None:
        """Count what the worker served and why it went; free its slot."""
        self._release_slot(worker.id)
        self.watches.pop(worker.id, None)
        cause = self.exit_causes.pop(worker.id, None)
        if cause is None and not worker.exited_after_disconnect and not self.arbiter.stopping:
            cause = "crash"
        if cause is not None:
            self.restarts[cause] = self.restarts.get(cause, 0) + 1
        if worker is self.recycling:
            self.recycling = None
            assert self.arbiter.primary is not None
            self.arbiter.primary.loop.call_soon(self.recycle_next)

    def _release_slot(self, worker_id: int) -> None:
        """Fold an exited worker's counts into the retired totals; free its slot."""
        slot = self.slots.pop(worker_id, None)
        if slot is None or self.scoreboard is None:
            return
        self.retired.add(self.scoreboard.read(slot).counts)
        self.scoreboard.release(slot)

    def read_slot(self, worker: cluster.Worker) -> SlotView | None:
        slot = self.slots.get(worker.id)
        if slot is None or self.scoreboard is None:
            return None
        return self.scoreboard.read(slot)

    def limits(self) -> Limits:
        config = self.arbiter.config
        return Limits(
            timeout=float(config.timeout),
            request_timeout=float(config.request_timeout),
            max_memory=int(config.max_worker_memory),
            max_lifetime=float(config.max_worker_lifetime),
        )

    def tick(self) -> None:
        """Read every ready worker's slot and act on what ``assess`` finds."""
        assert self.arbiter.primary is not None
        loop = self.arbiter.primary.loop
        if self.arbiter.stopping:
            return
        loop.call_later(SUPERVISE_INTERVAL, self.tick)
        limits = self.limits()
        now = time.monotonic()
        total = 0
        for worker in self.arbiter.primary.live_workers():
            view = self.read_slot(worker)
            watch = self.watches.get(worker.id)
            if view is None or watch is None or worker.is_dead():
                continue
            total += view.counts.requests
            if worker.id not in self.arbiter.booted or worker.exited_after_disconnect:
                continue  # booting or leaving: --graceful-timeout and _kill_later apply
            age = now - self.arbiter.started_at.get(worker.id, now)
            rss = rss_of(worker.process.pid) if limits.max_memory else None
            for finding in assess(watch, view, rss, age, now, limits):
                self._act(worker, watch, finding)
        served = total + self.retired.requests
        status = f"{len(self.arbiter.booted)} workers serving, {served} requests"
        if status != self._last_status:
            self._last_status = status
            systemd.status(status)

    def _act(self, worker: cluster.Worker, watch: Watch, finding: Finding) -> None:
        pid = worker.process.pid
        request = finding.request
        doing = (
            f"; in flight: {request.line} from {request.client or '-'} for {request.age:.1f}s"
            if request is not None
            else "; no request in flight"
        )
        if finding.kill:
            LOG.error("worker %s (pid %s): %s%s; killing it", worker.id, pid, finding.detail, doing)
            self.exit_causes[worker.id] = SILENT
            self.arbiter.background(self._dump_then_kill(worker))
            return
        if request is not None:
            LOG.error(
                "worker %s (pid %s): %s: %s from %s",
                worker.id,
                pid,
                finding.detail,
                request.line,
                request.client or "-",
            )
            if self.scoreboard is not None and worker.id in self.slots:
                self.scoreboard.count_timeout(self.slots[worker.id])
            self.arbiter.background(self._log_stack(worker, "at the request timeout"))
        if finding.recycle and not watch.recycling:
            watch.recycling = True
            self.recycle(worker, finding.kind, finding.detail if request is None else "")

    async def _dump_then_kill(self, worker: cluster.Worker) -> None:
        await self._log_stack(worker, "before it was killed")
        if not worker.is_dead():
            worker.process.kill(signal.SIGKILL)

    async def _log_stack(self, worker: cluster.Worker, when: str) -> None:
        stack = await self.stack_of(worker)
        LOG.error(
            "stack of worker %s (pid %s) %s:\n%s",
            worker.id,
            worker.process.pid,
            when,
            stack.rstrip() or "  (no stack: the worker did not answer SIGUSR2)",
        )

    async def stack_of(self, worker: cluster.Worker) -> str:
        """Every thread's Python stack in ``worker`` (faulthandler, on SIGUSR2)."""
        view = self.read_slot(worker)
        if view is None or view.stack_fd <= 0 or worker.is_dead():
            return ""
        path = f"/proc/{worker.process.pid}/fd/{view.stack_fd}"
        try:
            before = os.stat(path).st_size
            worker.process.kill(signal.SIGUSR2)
        except OSError:
            return ""
        deadline = time.monotonic() + STACK_DUMP_WAIT
        size = before
        while time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            try:
                now_size = os.stat(path).st_size
            except OSError:
                return ""
            if now_size > before and now_size == size:
                break  # written, and no longer growing
            size = now_size
        try:
            with open(path, "rb") as handle:
                handle.seek(before)
                return handle.read(size - before).decode("utf-8", "replace")
        except OSError:
            return ""

    # -- what the primary can tell ------------------------------------------------

    def worker_state(self, worker: cluster.Worker) -> str:
        if worker.is_dead():
            return "dead"
        if worker.exited_after_disconnect or not worker.is_connected():
            return "leaving"
        if worker.id not in self.arbiter.booted:
            return "booting"
        if worker is self.recycling or worker in self.arbiter.retiring:
            return "retiring"
        return "serving"

    def status(self) -> dict[str, Any]:
        """Everything ``forkserve ctl status`` shows, as JSON-ready data."""
        assert self.arbiter.primary is not None
        now = time.monotonic()
        workers = []
        for worker in sorted(self.arbiter.primary.live_workers(), key=lambda w: w.id):
            view = self.read_slot(worker)
            pid = worker.process.pid
            workers.append(
                {
                    "id": worker.id,
                    "pid": pid,
                    "state": self.worker_state(worker),
                    "uptime": round(now - self.arbiter.started_at.get(worker.id, now), 3),
                    "rss": rss_of(pid),
                    "requests": view.counts.requests if view else None,
                    "in_flight": view.in_flight if view else None,
                    "heartbeat_age": round(view.silent_for, 3) if view else None,
                    "requests_in_flight": [
                        {"line": r.line, "client": r.client, "age": round(r.age, 3)}
                        for r in (view.requests if view else [])
                    ],
                }
            )
        return {
            "pid": os.getpid(),
            "version": __version__,
            "app": self.arbiter.config.app,
            "worker_class": self.arbiter.config.worker_class,
            "sched": "rr" if self.arbiter.primary.scheduling_policy == cluster.SCHED_RR else "none",
            "listeners": [describe(bound) for bound in self.arbiter.binds],
            "workers_wanted": self.arbiter.num_workers,
            "uptime": round(time.time() - self.started_at_wall, 3),
            "requests": self.totals().requests,
            "restarts": dict(self.restarts),
            "workers": workers,
        }

    def totals(self) -> Counts:
        """Requests counted over every worker, the exited ones included."""
        assert self.arbiter.primary is not None
        total = Counts()
        total.add(self.retired)
        for worker in self.arbiter.primary.live_workers():
            view = self.read_slot(worker)
            if view is not None:
                total.add(view.counts)
        return total

    def recycle(self, worker: cluster.Worker, reason: str, detail: str = "") -> None:
        """Queue ``worker`` for replacement; one worker recycles at a time."""
        if any(queued is worker for queued, _ in self.recycle_queue) or worker is self.recycling:
            return
        if detail:
            LOG.info("worker %s (pid %s): %s", worker.id, worker.process.pid, detail)
        self.recycle_queue.append((worker, reason))
        self.recycle_next()

    def recycle_next(self) -> None:
        """Start the next recycling: the replacement first, the old one leaves when it is ready."""
        if self.arbiter.stopping or self.arbiter.reloading or self.recycling is not None:
            return
        while self.recycle_queue:
            worker, reason = self.recycle_queue.popleft()
            if worker.is_dead() or worker.exited_after_disconnect or not worker.is_connected():
                continue
            LOG.info("recycling worker %s (pid %s): %s", worker.id, worker.process.pid, reason)
            self.recycling = worker
            self.exit_causes[worker.id] = reason
            self.arbiter.retiring.append(worker)
            self.arbiter.spawn_worker()
            return
