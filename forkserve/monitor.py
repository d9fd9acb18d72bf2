"""Seeing inside a running server: the primary's control socket, ``/metrics``
and statsd, wired to the arbiter.

``Monitor.start`` runs once the arbiter's loop runs and before any worker
is forked: every socket is opened first (a path or port in use is one
clear error and the server does not start), then served on the loop. The
numbers come from ``snapshot()``: the scoreboard slots of the running
workers, the counts of those that have exited (``arbiter.supervisor.retired``), the
restarts by cause and, under round robin, the primary's queue. Commands of
the control socket act like the signals: ``scale`` like TTIN/TTOU,
``reload`` is a HUP and ``stop`` a TERM, both queued for the arbiter's loop.

Workers are forked from the primary: ``close_in_child`` closes what they
would inherit. ``close`` (at exit) sends statsd a last flush and removes
the control socket.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import TYPE_CHECKING, Any

from forkserve import cluster
from forkserve.control import CommandError, ControlServer, control_path, parse_scale
from forkserve.errors import BindError
from forkserve.scoreboard import Counts
from forkserve.sockets import HINTS
from forkserve.supervision import rss_of

# metrics and statsd are imported where they are used: workers are forked
# from the primary, and whatever it imports before forking sits in each one.
if TYPE_CHECKING:
    from forkserve.arbiter import Arbiter
    from forkserve.metrics import MetricsServer, Snapshot
    from forkserve.statsd import StatsdSender

LOG = logging.getLogger("forkserve.arbiter")
NO_STACK = "(no stack: the worker did not answer SIGUSR2)"


def open_metrics_socket(address: str) -> socket.socket:
    """A listening TCP socket for ``--metrics-bind``; ``BindError`` says why not."""
    from forkserve.statsd import split_address

    host, port = split_address(address)
    try:
        found = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) else str(exc)
        raise BindError(f"metrics bind {address}: cannot resolve {host!r} ({reason})") from None
    family, kind, proto, _, target = found[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(target)
        sock.listen(64)
    except OSError as exc:
        sock.close()
        reason = HINTS.get(exc.errno or 0, exc.strerror or str(exc))
        raise BindError(f"metrics bind {address}: {reason}") from None
    sock.set_inheritable(False)
    sock.setblocking(False)
    return sock


METRICS_SIDE = "metrics"


class Monitor:
    """The arbiter's control socket, metrics endpoint and statsd sender."""

    def side_sockets(self) -> list[tuple[str, socket.socket]]:
        """Listening sockets a new primary takes over on SIGUSR2."""
        if self.metrics is None:
            return []
        return [(METRICS_SIDE, self.metrics.sock)]

    def __init__(self, arbiter: Arbiter) -> None:
        self.arbiter = arbiter
        self.control: ControlServer | None = None
        self.metrics: MetricsServer | None = None
        self.statsd: StatsdSender | None = None
        self._timer: asyncio.TimerHandle | None = None

    # -- start and stop ----------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Open every socket, then serve them on ``loop`` (raises ``ForkserveError``)."""
        config = self.arbiter.config
        try:
            path = control_path(config.control_socket, config.pidfile, os.getpid())
            if path is not None:
                self.control = ControlServer(path, self.commands())
                # After SIGUSR2 the path moves from the old primary to this one.
                self.control.bind(successor_of=self.arbiter.upgrader.from_pid)
            if config.metrics_bind:
                # After SIGUSR2 the old primary's metrics socket is passed on.
                sock = self.arbiter.upgrader.take_side_socket(METRICS_SIDE)
                if sock is not None:
                    sock.set_inheritable(False)
                    sock.setblocking(False)
                else:
                    sock = open_metrics_socket(config.metrics_bind)
                from forkserve.metrics import MetricsServer, render

                self.metrics = MetricsServer(sock, lambda: render(self.snapshot()))
            self.arbiter.upgrader.close_side_sockets()
            if config.statsd_host:
                from forkserve.statsd import StatsdSender

                self.statsd = StatsdSender(config.statsd_host, config.statsd_prefix)
        except BaseException:
            self.close(flush=False)
            raise
        if self.control is not None:
            self.control.start(loop)
            LOG.info("control socket at %s (forkserve ctl)", self.control.path)
            control = self.control
            self.arbiter.upgrader.on_child_exit = lambda: control.reclaim(loop)
        if self.metrics is not None:
            self.metrics.start(loop)
            LOG.info("metrics at http://%s/metrics", config.metrics_bind)
        if self.statsd is not None:
            from forkserve.statsd import INTERVAL

            self._timer = loop.call_later(INTERVAL, self._flush_statsd, loop)
            LOG.info("sending statsd metrics to %s every %.0fs", config.statsd_host, INTERVAL)

    def _flush_statsd(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.statsd is None:
            return
        from forkserve.statsd import INTERVAL

        self.statsd.flush(self.snapshot())
        self._timer = loop.call_later(INTERVAL, self._flush_statsd, loop)

    def close_in_child(self) -> None:
        """In a process forked from the primary: close the inherited sockets."""
        if self.control is not None:
            self.control.close_in_child()
        if self.metrics is not None:
            self.metrics.close_in_child()
        if self.statsd is not None:
            self.statsd.close()
        self.control = self.metrics = self.statsd = None

    def close(self, flush: bool = True) -> None:
        """At exit: a last statsd flush, then close everything (the socket file too)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.statsd is not None:
            if flush and self.arbiter.primary is not None:
                self.statsd.flush(self.snapshot())
            self.statsd.close()
            self.statsd = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.control is not None:
            self.control.close()
            self.control = None

    # -- numbers -------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """Every counter, over the running workers and those that have exited."""
        from forkserve.metrics import Histogram, Snapshot, WorkerSample

        arbiter = self.arbiter
        primary = arbiter.primary
        assert primary is not None
        counts = Counts()
        counts.add(arbiter.supervisor.retired)
        in_flight = 0
        workers = []
        for worker in sorted(primary.live_workers(), key=lambda w: w.id):
            state = arbiter.supervisor.worker_state(worker)
            if state == "dead":
                continue
            view = arbiter.supervisor.read_slot(worker)
            requests = 0
            if view is not None:
                counts.add(view.counts)
                in_flight += view.in_flight
                requests = view.counts.requests
            pid = worker.process.pid
            workers.append(WorkerSample(worker.id, pid, state, rss_of(pid), requests))
        queue_length = None
        wait = None
        if primary.scheduling_policy == cluster.SCHED_RR:
            queue_length = primary.pending_connections()
            stats_ = primary.rr_wait
            wait = Histogram(stats_.bounds, tuple(stats_.counts), stats_.total)
        return Snapshot(
            start_time=arbiter.supervisor.started_at_wall,
            counts=counts,
            in_flight=in_flight,
            workers=tuple(workers),
            workers_wanted=arbiter.num_workers,
            restarts=dict(arbiter.supervisor.restarts),
            rr_queue_length=queue_length,
            rr_wait=wait,
        )

    # -- control commands ----------------------------------------------------------------

    def commands(self) -> dict[str, Any]:
        return {
            "status": self.cmd_status,
            "stats": self.cmd_stats,
            "scale": self.cmd_scale,
            "reload": self.cmd_reload,
            "stop": self.cmd_stop,
            "dump-stacks": self.cmd_dump_stacks,
        }

    def _no_args(self, name: str, args: list[Any]) -> None:
        if args:
            raise CommandError(f"{name} takes no arguments")

    def cmd_status(self, args: list[Any]) -> dict[str, Any]:
        self._no_args("status", args)
        arbiter = self.arbiter
        result = arbiter.supervisor.status()
        primary = arbiter.primary
        if primary is not None and primary.scheduling_policy == cluster.SCHED_RR:
            result["rr_queue_length"] = primary.pending_connections()
        return result

    def cmd_stats(self, args: list[Any]) -> dict[str, Any]:
        from forkserve.metrics import stats

        self._no_args("stats", args)
        return stats(self.snapshot())

    def cmd_scale(self, args: list[Any]) -> dict[str, Any]:
        count = parse_scale(args)
        arbiter = self.arbiter
        primary = arbiter.primary
        assert primary is not None
        if arbiter.stopping:
            raise CommandError("scale: the server is stopping")
        before = arbiter.num_workers
        arbiter.num_workers = count
        if count != before:
            LOG.info("forkserve ctl: scaling to %s workers (was %s)", count, before)
        if count > before:
            for _ in range(count - before):
                arbiter.spawn_worker()
        elif count < before:
            # Like TTOU: the oldest leave, deliberately (not a restart).
            for worker in sorted(primary.workers.values(), key=lambda w: w.id)[: before - count]:
                worker.disconnect()
        return {"workers_wanted": count, "was": before}

    def cmd_reload(self, args: list[Any]) -> dict[str, Any]:
        self._no_args("reload", args)
        if self.arbiter.stopping:
            raise CommandError("reload: the server is stopping")
        LOG.info("forkserve ctl: reload")
        self.arbiter._enqueue("SIGHUP")
        return {"reloading": True}

    def cmd_stop(self, args: list[Any]) -> dict[str, Any]:
        self._no_args("stop", args)
        LOG.info("forkserve ctl: stop")
        self.arbiter._enqueue("SIGTERM")
        return {"stopping": True}

    async def cmd_dump_stacks(self, args: list[Any]) -> list[dict[str, Any]]:
        self._no_args("dump-stacks", args)
        arbiter = self.arbiter
        assert arbiter.primary is not None
        workers = [
            worker
            for worker in sorted(arbiter.primary.live_workers(), key=lambda w: w.id)
            if not worker.is_dead()
        ]
        stacks = await asyncio.gather(*(arbiter.supervisor.stack_of(worker) for worker in workers))
        out = []
        for worker, stack in zip(workers, stacks, strict=True):
            text = stack.rstrip() or NO_STACK
            LOG.info(
                "stack of worker %s (pid %s) (forkserve ctl dump-stacks):\n%s",
                worker.id,
                worker.process.pid,
                text,
            )
            out.append({"id": worker.id, "pid": worker.process.pid, "stack": text})
        return out
