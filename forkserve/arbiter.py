"""The arbiter: forkserve's primary process.

It loads the configuration, binds every listener, and forks the workers on
``forkserve.cluster`` with ``os.fork()``. With ``--preload`` the app is
imported by a template process and the workers are forked from it (shared
copy-on-write; ``cluster.TemplateStarter``), so the primary never imports
the app and a HUP can load new code. Then it waits: on cluster events (``'listening'`` marks a
worker ready, ``'exit'`` goes to ``restart.decide``) and on signals, whose
handlers only enqueue their name; the main loop reads the queue top to
bottom and dispatches to ``handle_<signal>``. Once a second it reads the workers'
scoreboard slots (``_supervise``): liveness, request deadlines, memory and
lifetime recycling (``forkserve/supervision.py`` decides, the arbiter acts).

Signals: TERM graceful stop (workers finish in-flight requests within
``--graceful-timeout``, then are killed; with ``--drain-delay`` the workers
first answer with ``Connection: close`` for that long while still
accepting), INT and QUIT fast stop, TTIN/TTOU one worker more/less, USR1
reopen log files, USR2 start a new primary on the same sockets (see
``forkserve/upgrade.py``), HUP reload the configuration and the app (new
workers, from a new template with ``--preload``; an old worker leaves as
each new one is ready; a failure keeps the old ones). With ``--reload`` a
change to the app's files is a HUP.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from forkserve import __version__, cluster, log, systemd, upgrade
from forkserve.apploader import detect_interface, load_app
from forkserve.config import Config
from forkserve.errors import ConfigError, ForkserveError
from forkserve.http.response import DateCache, error_response
from forkserve.monitor import Monitor
from forkserve.process import (
    daemonize,
    has_terminal,
    remove_pidfile,
    set_title,
    write_pidfile,
    zombie_children,
)
from forkserve.restart import Action, ExitFacts, decide
from forkserve.scoreboard import SLOT_ENV
from forkserve.sockets import BoundSocket, describe
from forkserve.supervisor import Supervisor
from forkserve.workers.base import (
    BOOT_ERROR_MESSAGE,
    DRAIN_MESSAGE,
    RECYCLE_MESSAGE,
    app_spec,
    boot,
    pick_worker_class,
)

if TYPE_CHECKING:
    from forkserve.reloader import Reloader

LOG = logging.getLogger("forkserve.arbiter")

SIGNALS = (
    "SIGTERM",
    "SIGINT",
    "SIGQUIT",
    "SIGHUP",
    "SIGTTIN",
    "SIGTTOU",
    "SIGUSR1",
    "SIGUSR2",
    "SIGWINCH",
)
FAST_STOP_GRACE = 2.0
# What --sched auto means, for every worker class: the policy that wins the
# measurements in the README (scripts/bench.py). SCHED_NONE serves about twice
# the new connections per second of SCHED_RR on 2 cores, and it is load-aware
# for these classes too, since a busy worker does not call accept().
DEFAULT_SCHED = "none"
# The most the primary buffers of a request head (--buffer-request-head); the
# worker reads any rest from the socket itself.
HEAD_BUFFER_MAX = 65536


class Arbiter:
    """Runs the server until it is told to stop; ``run()`` returns the exit code."""

    def __init__(self, config: Config, reload_config: Callable[[], Config] | None = None) -> None:
        self.config = config
        # Reads the configuration again as at startup (HUP); raises ConfigError.
        self.reload_config = reload_config
        self.app: Any = None  # only ever set in a template (--preload) and its workers
        self.app_interface: str | None = None  # as the template detected it
        self.binds: list[BoundSocket] = []
        # --preload: the template workers fork from, and one a HUP (or the
        # death of the template) is preparing.
        self.starter: cluster.TemplateStarter | None = None
        self.template: cluster.Template | None = None
        self.next_template: cluster.Template | None = None
        self.worker_templates: dict[int, cluster.Template] = {}  # worker id -> its template
        self.waiting_for_template = 0  # spawns put off until a template is ready
        # The reload under way: its new workers not yet ready, the workers it
        # replaces, and what to go back to if it fails.
        self.reload_pending: set[int] = set()
        self.reload_old: set[int] = set()
        self.previous: tuple[Config, int, cluster.Template | None] | None = None
        # Before any --chdir: how to start a new primary on SIGUSR2, and
        # whether this one is such a primary.
        self.upgrader = upgrade.Upgrader(config.pidfile)
        self.num_workers = int(config.workers)
        self.primary: cluster.Primary | None = None
        self.stopping = False
        self.exit_code = 0
        self.booted: set[int] = set()
        self.retiring: deque[cluster.Worker] = deque()
        self.reloading = False
        self.draining = False
        self.reloader: Reloader | None = None
        self.started_at: dict[int, float] = {}
        self.listening: dict[int, int] = {}
        self.crashes: deque[float] = deque()
        self.pending_spawns = 0
        self.boot_error_logged = False
        self.ready_logged = False
        self._queue: asyncio.Queue[str] | None = None
        self._pidfile_written = False
        self.attached_to_terminal = False
        self.bind_fds: list[int] = []
        self.supervisor = Supervisor(self)
        self._tasks: set[asyncio.Future[None]] = set()
        self.monitor = Monitor(self)

    # -- start ----------------------------------------------------------------

    def run(self) -> int:
        config = self.config
        log.setup_logging(config)
        os.umask(config.umask)
        for item in config.raw_env:
            key, _, value = item.partition("=")
            os.environ[key] = value
        if config.chdir:
            os.chdir(config.chdir)
        self._call_hook("on_starting", self)
        self.attached_to_terminal = not config.daemon and has_terminal()
        activated = systemd.listen_fds()
        binds = list(config.bind)
        if activated and config.sources.get("bind") == "default":
            # Socket activation without -b: serve every socket systemd passed.
            binds = [f"fd://{item.fd}" for item in activated]
        self.binds = self.upgrader.open_binds(
            binds,
            default=config.sources.get("bind") == "default",
            backlog=config.backlog,
            unix_mode=config.unix_socket_mode,
            named={item.name: item.fd for item in activated},
        )
        self.bind_fds = [bound.fileno() for bound in self.binds]
        if config.daemon and self.upgrader.handover is None:
            # A primary started by SIGUSR2 is already detached: its parent is the daemon.
            daemonize()
        try:
            self._pidfile_written = write_pidfile(self.config.pidfile, self.upgrader.from_pid)
            set_title(f"forkserve: primary [{config.proc_name or config.app}]")
            return self._serve()
        finally:
            shared = self.upgrader.shares_sockets()
            for bound in self.binds:
                bound.close(unlink=not shared)
            if self._pidfile_written:
                remove_pidfile(self.config.pidfile)
            self.upgrader.close()
            self._call_hook("on_exit", self)

    def _serve(self) -> int:
        # Before anything forks: every process forked later inherits the region.
        self.supervisor.open(self.num_workers)
        loop = asyncio.new_event_loop()
        starter: cluster.ForkStarter | cluster.TemplateStarter
        starter = cluster.ForkStarter(self._worker_main, self._after_fork)
        if self.config.preload_app:
            self.starter = starter = cluster.TemplateStarter(
                self._worker_main, self._after_fork, prepare=self._prepare_template, loop=loop
            )
        primary = cluster.Primary(loop=loop, starter=starter)
        self.primary = primary
        cluster.use_primary(primary)
        if self.starter is not None and not self._start_first_template():
            return 1
        sched = self.config.sched
        if sched == "auto":
            sched = DEFAULT_SCHED
        primary.scheduling_policy = cluster.SCHED_RR if sched == "rr" else cluster.SCHED_NONE
        primary.max_pending = self.config.backlog
        if sched == "rr":
            self.configure_round_robin(primary)
        elif self.config.buffer_request_head:
            LOG.warning("--buffer-request-head is ignored: it needs --sched rr")
        settings: dict[str, Any] = {"serialization": "json"}
        if self.config.user is not None:
            settings["uid"] = self.config.user
        if self.config.group is not None:
            settings["gid"] = self.config.group
        primary.setup_primary(**settings)
        primary.on("listening", self._on_listening)
        primary.on("message", self._on_message)
        primary.on("exit", self._on_exit)
        LOG.info("forkserve %s starting (pid %s)", __version__, os.getpid())
        scheme = "https" if self.config.certfile else "http"
        for bound in self.binds:
            LOG.info("listening at %s://%s (%s)", scheme, describe(bound), sched)
        asyncio.set_event_loop(loop)
        try:
            return loop.run_until_complete(self._main())
        finally:
            self.monitor.close()
            for name in SIGNALS:
                with contextlib.suppress(ValueError, RuntimeError):
                    loop.remove_signal_handler(getattr(signal, name))

    async def _main(self) -> int:
        loop = asyncio.get_running_loop()
        self.monitor.start(loop)  # control socket, /metrics, statsd: errors stop us here
        self._queue = asyncio.Queue()
        for name in SIGNALS:
            loop.add_signal_handler(getattr(signal, name), self._queue.put_nowait, name)
        if os.getpid() == 1 or self.starter is not None:
            # As PID 1 (a container's entrypoint), or as the subreaper the
            # template needs, orphans are re-parented to us.
            loop.add_signal_handler(signal.SIGCHLD, self.reap_orphans)
        for _ in range(self.num_workers):
            self.spawn_worker()
        interval = systemd.watchdog_interval()
        if interval:
            self._watchdog(loop, interval)
        self.supervisor.start(loop)
        if self.config.reload:
            self.start_reloader(loop)
        while True:
            name = await self._queue.get()
            handler = getattr(self, f"handle_{name[3:].lower()}", None)
            if handler is None:
                continue
            result = handler()
            if asyncio.iscoroutine(result):
                result = await result
            if result is not None:
                return int(result)

    def configure_round_robin(self, primary: cluster.Primary) -> None:
        """Give the primary's round-robin handles what depends on HTTP.

        A connection reaches a worker only once it has sent bytes (the whole
        request head with --buffer-request-head), within --header-timeout; a
        connection that finds every worker busy and --backlog connections
        waiting is answered 503 by the primary at once; connections waiting
        in the primary survive a moment without workers.
        """
        config = self.config
        date = DateCache()
        primary.keep_handles = True  # the pool refills: waiting connections outlive it
        primary.wait_for_data = float(config.header_timeout)
        # Idle keep-alive connections sync workers give back (see workers.sync).
        primary.park_timeout = float(config.keepalive)
        primary.on_overflow = lambda conn: answer_and_close(
            conn, error_response(503, "server busy; try again shortly", date)
        )

        def expired(conn: socket.socket, data: bytes) -> None:
            if not data:
                conn.close()  # never said a word: nothing to answer
                return
            answer_and_close(conn, error_response(408, "request head not received in time", date))

        primary.on_expired = expired
        if not config.buffer_request_head:
            return
        refused = self._head_buffering_refused()
        if refused:
            LOG.warning("--buffer-request-head is ignored: %s", refused)
            return
        primary.head_complete = head_complete_within(head_limit(config))

    def _head_buffering_refused(self) -> str | None:
        """Why the primary cannot read request heads for these workers, or None."""
        config = self.config
        if config.certfile:
            return "with TLS the primary would read encrypted bytes"
        chosen = str(config.worker_class)
        if chosen == "auto":
            interface = str(config.interface)
            if interface == "auto" and self.app_interface is not None:
                interface = self.app_interface  # what the template found (--preload)
            chosen = "sync" if interface == "wsgi" else "auto"
        if chosen not in ("sync", "threaded"):
            return (
                f"worker class {config.worker_class!r} may be asgi, which reads the socket "
                "itself; use -k sync or -k threaded, --interface wsgi, or --preload"
            )
        return None

    def reap_orphans(self) -> None:
        """Reap exited processes that are not workers (their exits are watched apart)."""
        assert self.primary is not None
        workers = {w.process.pid for w in self.primary.live_workers()}
        if self.starter is not None:
            workers |= {template.pid for template in self.starter.templates}
        waited = workers | self.upgrader.pids  # a new primary's exit is watched apart too
        for pid in zombie_children(os.getpid()):
            if pid not in waited:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)

    def _watchdog(self, loop: asyncio.AbstractEventLoop, interval: float) -> None:
        """``WATCHDOG=1`` every half ``WATCHDOG_USEC`` while the arbiter's loop runs."""
        systemd.notify("WATCHDOG=1")
        loop.call_later(interval, self._watchdog, loop, interval)

    # -- workers ----------------------------------------------------------------

    def spawn_worker(self) -> cluster.Worker | None:
        assert self.primary is not None
        if self.stopping:
            return None
        if self.starter is not None and (self.template is None or not self.template.is_ready):
            self.waiting_for_template += 1  # spawned once a template is ready
            return None
        slot = self.supervisor.allocate()
        try:
            worker = self.primary.fork({SLOT_ENV: slot} if slot is not None else None)
        except cluster.TemplateError as error:
            self.supervisor.release(slot)
            LOG.warning("cannot start a worker: %s; it starts with the next template", error)
            self.waiting_for_template += 1
            return None
        if self.template is not None:
            self.worker_templates[worker.id] = self.template
        if self.reloading:
            self.reload_pending.add(worker.id)
        self.supervisor.started(worker, slot)
        self.started_at[worker.id] = time.monotonic()
        self.listening[worker.id] = 0
        self._call_hook("post_fork", self, worker)
        if self.draining:
            self.tell_drain(worker)
        return worker

    def _worker_main(self) -> int:
        """In the forked worker."""
        worker = cluster.worker
        set_title(
            f"forkserve: worker {worker.id if worker else '?'} "
            f"[{self.config.proc_name or self.config.app}]"
        )
        return boot(
            self.config,
            self.app,
            self.bind_fds,
            self.config.worker_class,
            self.supervisor.slot_in_worker(),
        )

    def _after_fork(self) -> None:
        """In the forked worker, before boot: close the arbiter's copies of the binds.

        Workers get their sockets from the cluster, asking by the primary's fd
        numbers (``self.bind_fds``), so the inherited copies are not needed.
        With ``--preload`` this runs in the template as it starts, and again
        in each worker forked from it (the template's socketpair is closed
        there by the cluster).
        """
        for bound in self.binds:
            with contextlib.suppress(OSError):
                bound.sock.close()
        self.upgrader.close_in_child()
        self.monitor.close_in_child()

    def running_workers(self) -> int:
        """Workers alive or starting, less those being replaced (they are leaving)."""
        assert self.primary is not None
        return (
            sum(
                1
                for worker in self.primary.workers.values()
                if not worker.is_dead()
                and not worker.exited_after_disconnect
                and worker not in self.retiring
            )
            + self.pending_spawns
            + self.waiting_for_template
        )

    def _on_listening(self, worker: cluster.Worker, address: dict[str, Any]) -> None:
        self.listening[worker.id] = self.listening.get(worker.id, 0) + 1
        if self.listening[worker.id] == len(self.binds) and worker.id not in self.booted:
            self.booted.add(worker.id)
            LOG.debug("worker %s (pid %s) is ready", worker.id, worker.process.pid)
            if worker.id not in self.reload_old:  # one a HUP replaces replaces no one
                self._retire_one()
            if worker.id in self.reload_pending:
                self.reload_pending.discard(worker.id)
                if self._reload_complete():
                    self._finish_reload()
            if not self.ready_logged and len(self.booted) >= self.num_workers:
                self.ready_logged = True
                LOG.info("ready: %s workers serving", len(self.booted))
                # systemd's READY=1, and after SIGUSR2 the old primary's cue.
                self.upgrader.ready(f"{len(self.booted)} workers serving")
                self._call_hook("when_ready", self)

    def _retire_one(self) -> None:
        """A new worker is ready: let one worker being replaced leave."""
        while self.retiring:
            old = self.retiring.popleft()
            if old.is_connected() and not old.is_dead():
                self.supervisor.retiring(old, "reload")
                old.disconnect()
                self._kill_later(old, self.config.graceful_timeout + 5.0)
                return

    def _kill_later(self, worker: cluster.Worker, delay: float) -> None:
        """A worker told to leave that is still there after ``delay`` is killed."""
        assert self.primary is not None

        def kill() -> None:
            if not worker.is_dead() and not self.stopping:
                LOG.warning(
                    "worker %s (pid %s) did not leave within %.0fs; killing it",
                    worker.id,
                    worker.process.pid,
                    delay,
                )
                worker.process.kill(signal.SIGKILL)

        self.primary.loop.call_later(delay, kill)

    def _on_message(self, worker: cluster.Worker, message: Any, handle: Any) -> None:
        if isinstance(message, dict) and message.get("type") == RECYCLE_MESSAGE:
            self.supervisor.recycle(worker, str(message.get("reason") or "asked"))
            return
        is_boot_error = isinstance(message, dict) and message.get("type") == BOOT_ERROR_MESSAGE
        if is_boot_error and not self.boot_error_logged:
            self.boot_error_logged = True
            LOG.error("%s", message.get("message"))

    def _on_exit(self, worker: cluster.Worker, code: int | None, signame: str | None) -> None:
        self._call_hook("worker_exit", self, worker)
        self.supervisor.exited(worker)
        started = self.started_at.pop(worker.id, time.monotonic())
        booted = worker.id in self.booted
        self.booted.discard(worker.id)
        self.listening.pop(worker.id, None)
        reloading = worker.id in self.reload_pending
        self.reload_pending.discard(worker.id)
        self.reload_old.discard(worker.id)
        self.worker_templates.pop(worker.id, None)
        deliberate = bool(worker.exited_after_disconnect)
        now = time.monotonic()
        if not deliberate and not self.stopping:
            self.crashes.append(now)
        while self.crashes and now - self.crashes[0] > 10.0:
            self.crashes.popleft()
        decision = decide(
            ExitFacts(
                deliberate=deliberate,
                code=code,
                booted=booted,
                stopping=self.stopping,
                running=self.running_workers(),
                wanted=self.num_workers,
                recent_crashes=len(self.crashes),
                reloading=reloading,
                started=self.ready_logged,
            )
        )
        how = f"code {code}" if signame is None else f"signal {signame}"
        age = now - started
        if decision.action is Action.ABANDON_RELOAD:
            pid = worker.process.pid
            self.abandon_reload(f"new worker {worker.id} (pid {pid}) failed to boot ({how})")
            return
        if decision.action is Action.HALT:
            if not self.boot_error_logged:
                self.boot_error_logged = True
                LOG.error(
                    "worker %s (pid %s) failed to boot (%s)", worker.id, worker.process.pid, how
                )
            LOG.error("a worker failed to boot; stopping")
            self.exit_code = 1
            self._enqueue("SIGQUIT")
            return
        if decision.action is Action.SPAWN:
            level = logging.INFO if deliberate else logging.WARNING
            LOG.log(
                level,
                "worker %s (pid %s) exited with %s after %.1fs; %s, restarting in %.1fs",
                worker.id,
                worker.process.pid,
                how,
                age,
                decision.reason,
                decision.delay,
            )
            self._spawn_later(decision.delay)
        elif not self.stopping:
            LOG.info(
                "worker %s (pid %s) exited with %s after %.1fs (%s)",
                worker.id,
                worker.process.pid,
                how,
                age,
                decision.reason,
            )
        self._close_idle_templates()
        if self._reload_complete():
            self._finish_reload()

    def _spawn_later(self, delay: float) -> None:
        assert self.primary is not None
        self.pending_spawns += 1

        def spawn() -> None:
            self.pending_spawns -= 1
            if not self.stopping:
                self.spawn_worker()

        if delay <= 0:
            self.primary.loop.call_soon(spawn)
        else:
            self.primary.loop.call_later(delay, spawn)

    def background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _enqueue(self, name: str) -> None:
        if self._queue is not None:
            self._queue.put_nowait(name)

    # -- signals ------------------------------------------------------------------

    async def handle_term(self) -> int | None:
        delay = float(self.config.drain_delay)
        if delay > 0 and not self.draining:
            self.begin_drain(delay)
            return None
        LOG.info("graceful stop (SIGTERM): finishing in-flight requests")
        await self.stop(graceful=True)
        return self.exit_code

    def begin_drain(self, delay: float) -> None:
        """SIGTERM with --drain-delay: keep accepting for ``delay`` seconds while
        every response closes its connection, then the graceful stop.

        Load balancers and clients see ``Connection: close`` and move away
        before the listeners close. The stop comes as a second TERM, queued
        for the end of the delay; one sent meanwhile starts it at once, and
        INT or QUIT stop fast as usual.
        """
        assert self.primary is not None
        self.draining = True
        if not self.upgrader.handed_over():  # else the service goes on in the new primary
            systemd.stopping()
        LOG.info(
            "SIGTERM: draining for %.1fs (responses close their connections), then stopping",
            delay,
        )
        for worker in self.primary.workers.values():
            self.tell_drain(worker)
        self.primary.loop.call_later(delay, self._enqueue, "SIGTERM")

    def tell_drain(self, worker: cluster.Worker) -> None:
        if worker.is_connected():
            worker.send({"type": DRAIN_MESSAGE}, None, _ignore_send_error)

    async def handle_int(self) -> int:
        await self.stop(graceful=False)
        return self.exit_code

    handle_quit = handle_int

    def handle_ttin(self) -> None:
        self.num_workers += 1
        LOG.info("SIGTTIN: %s workers", self.num_workers)
        self.spawn_worker()

    def handle_ttou(self) -> None:
        assert self.primary is not None
        if self.num_workers <= 1:
            return
        self.num_workers -= 1
        LOG.info("SIGTTOU: %s workers", self.num_workers)
        workers = sorted(self.primary.workers.values(), key=lambda w: w.id)
        if workers:
            workers[0].disconnect()

    def handle_usr1(self) -> None:
        log.reopen_log_files()
        assert self.primary is not None
        for worker in self.primary.workers.values():
            worker.process.kill(signal.SIGUSR1)

    def handle_usr2(self) -> None:
        """Start a new primary on the same sockets; this one serves on until TERM."""
        assert self.primary is not None
        if self.stopping:
            LOG.info("SIGUSR2 ignored: stopping")
            return
        self.upgrader.start(self.primary.loop, self.binds, self.monitor.side_sockets())

    def handle_hup(self) -> None:
        """Reload the configuration and the app: new workers (from a new template with
        --preload) replace the old ones, an old one leaving as each new one is ready.

        An invalid configuration, or new code that cannot boot, changes nothing:
        the old workers serve on (see ``abandon_reload``).
        """
        assert self.primary is not None
        if self.stopping:
            return
        LOG.info("SIGHUP: reloading the configuration and the application")
        systemd.reloading()
        if not self.reload_configuration():
            systemd.ready(f"reload refused: {len(self.booted)} workers serving")
            return
        self.boot_error_logged = False  # the new code's first boot error is news
        if self.starter is not None:
            self.start_template(reload=True)
        else:
            self.replace_workers()

    # -- reload ----------------------------------------------------------------------

    def reload_configuration(self) -> bool:
        """Read the configuration again and switch to it; False (one error line) if invalid.

        Settings the primary holds keep their running value (one warning
        names them); log files and levels, the umask, ``--env`` and the pool
        size (when ``workers`` changed) apply now, everything else to the
        workers started from now on.
        """
        before = (self.config, self.num_workers, self.template)
        if self.reload_config is None:
            self.previous = self.previous or before
            return True
        assert self.primary is not None
        running = self.config
        try:
            loaded = self.reload_config()
        except ForkserveError as error:
            LOG.error("SIGHUP: %s; keeping the running configuration", error)
            return False
        except Exception as error:  # a HUP must never take the primary down
            LOG.error(
                "SIGHUP: cannot read the configuration: %s: %s; keeping the running one",
                type(error).__name__,
                error,
                exc_info=LOG.isEnabledFor(logging.DEBUG),
            )
            return False
        from forkserve.reconfigure import fixed_settings, reconfigure  # on SIGHUP only

        fixed = fixed_settings(
            running,
            round_robin=self.primary.scheduling_policy == cluster.SCHED_RR,
            head_buffering=self.primary.head_complete is not None,
        )
        result = reconfigure(running, loaded, fixed)
        try:
            log.setup_logging(result.config)
        except ConfigError as error:
            log.setup_logging(running)
            LOG.error("SIGHUP: %s; keeping the running configuration", error)
            return False
        if result.kept:
            LOG.warning(
                "SIGHUP: %s cannot change while running; restart or upgrade (USR2) to apply",
                ", ".join(result.kept),
            )
        # A reload still under way knows what ran before it: a failure goes back there.
        self.previous = self.previous or before
        self._apply_config(result.config, running)
        if int(result.config.workers) != int(running.workers):
            self.num_workers = int(result.config.workers)
        if result.changed:
            LOG.info("SIGHUP: new configuration: %s changed", ", ".join(result.changed))
        return True

    def _apply_config(self, config: Config, running: Config) -> None:
        """Switch to ``config`` in the primary (logging is set up by the caller)."""
        self.config = config
        os.umask(config.umask)
        old_env = dict(item.partition("=")[::2] for item in running.raw_env)
        new_env = dict(item.partition("=")[::2] for item in config.raw_env)
        for key in old_env.keys() - new_env.keys():
            os.environ.pop(key, None)
        os.environ.update(new_env)

    def replace_workers(self) -> None:
        """Start the new generation of workers; the reload completes once all are ready."""
        assert self.primary is not None
        old = [w for w in self.primary.workers.values() if w not in self.retiring]
        LOG.info("SIGHUP: starting %s new workers to replace %s", self.num_workers, len(old))
        self.reloading = True
        self.reload_pending.clear()  # a reload still under way is superseded: its workers are old
        self.reload_old.update(worker.id for worker in old)
        self.retiring.extend(old)
        self.waiting_for_template = 0  # the new generation replaces those too
        for _ in range(self.num_workers):
            self.spawn_worker()
        if self._reload_complete():
            self._finish_reload()

    def _reload_complete(self) -> bool:
        return (
            self.reloading
            and not self.reload_pending
            and not self.waiting_for_template
            and not self.pending_spawns
        )

    def _finish_reload(self) -> None:
        """Every new worker is ready: the old ones still there leave, and so does
        the old template once its last worker has."""
        while any(worker.id in self.reload_old for worker in self.retiring):
            self._retire_one()
        self.reloading = False
        self.reload_old.clear()
        self.previous = None
        LOG.info("reload complete: %s workers serving", self.num_workers)
        systemd.ready(f"reloaded: {len(self.booted)} workers serving")
        self._close_idle_templates()
        self.supervisor.recycle_next()

    def abandon_reload(self, reason: str) -> None:
        """The reload failed: its workers not yet ready leave, the old ones serve on
        with the old configuration (and template); nothing is halted."""
        assert self.primary is not None
        LOG.error("reload abandoned: %s; the old workers keep serving", reason)
        for worker_id in sorted(self.reload_pending):
            worker = self.primary.workers.get(worker_id)
            if worker is not None and not worker.is_dead():
                worker.kill("SIGTERM")
        self.reload_pending.clear()
        self.retiring = deque(w for w in self.retiring if w.id not in self.reload_old)
        self.reload_old.clear()
        self.reloading = False
        if self.previous is not None:
            config, num_workers, template = self.previous
            self.previous = None
            if config is not self.config:
                with contextlib.suppress(ConfigError):  # it was in use until this HUP
                    log.setup_logging(config)
                self._apply_config(config, self.config)
            self.num_workers = num_workers
            if self.starter is not None and self.template is not template:
                if template is not None and template.is_ready:
                    self._use_template(template, template.info or {})
                else:
                    self.start_template(reload=False)
        systemd.ready(f"reload abandoned: {len(self.booted)} workers serving")
        self._close_idle_templates()
        self.supervisor.recycle_next()

    # -- the template (--preload) -------------------------------------------------------

    def _prepare_template(self) -> dict[str, Any]:
        """In a new template process: import the app once, for every worker forked from it."""
        config = self.config
        set_title(f"forkserve: template [{config.proc_name or config.app}]")
        self.app = load_app(app_spec(config), factory=config.factory, pythonpath=config.pythonpath)
        interface = detect_interface(self.app, config.interface)
        _import_for_workers(config, interface)
        # Objects loaded so far stay shared: refcount updates would copy their pages.
        gc.freeze()
        return {"interface": interface}

    def _start_first_template(self) -> bool:
        """Startup with --preload: the template imports the app before any worker starts.

        An app that cannot be imported is logged (one line); False then.
        """
        assert self.starter is not None and self.primary is not None
        template = self._spawn_template()
        try:
            info = self.primary.loop.run_until_complete(template.ready())
        except cluster.TemplateError as error:
            LOG.error("%s", error)
            template.kill()
            return False
        self._use_template(template, info)
        return True

    def _spawn_template(self) -> cluster.Template:
        assert self.starter is not None and self.primary is not None
        template = self.starter.spawn_template(self.primary.close_inherited)
        template.on("exit", lambda code, sig: self._on_template_exit(template, code, sig))
        return template

    def start_template(self, reload: bool) -> None:
        """Prepare a new template; once ready it replaces the workers (``reload``) or
        forks those waiting. One HUP supersedes a template still preparing."""
        if self.next_template is not None:
            self.next_template.kill()
        template = self._spawn_template()
        self.next_template = template
        LOG.info("template (pid %s) is loading the application", template.pid)
        self.background(self._when_template_ready(template, reload))

    async def _when_template_ready(self, template: cluster.Template, reload: bool) -> None:
        try:
            info = await template.ready()
        except cluster.TemplateError as error:
            if template is not self.next_template:
                return  # superseded, or the server is stopping
            self.next_template = None
            template.kill()
            if reload and not self.stopping:
                self.abandon_reload(str(error))
            elif not self.stopping:
                LOG.error(
                    "%s; no template: workers that exit are replaced after a successful HUP",
                    error,
                )
            return
        if template is not self.next_template or self.stopping:
            template.close()
            return
        self.next_template = None
        refused = self._interface_refused(info)
        if refused and reload:
            template.close()
            self.abandon_reload(refused)
            return
        self._use_template(template, info)
        if reload:
            self.replace_workers()
            return
        waiting, self.waiting_for_template = self.waiting_for_template, 0
        for _ in range(waiting):
            self.spawn_worker()
        if self._reload_complete():
            self._finish_reload()

    def _interface_refused(self, info: dict[str, Any]) -> str | None:
        """New code the primary's request-head buffering cannot serve, or None."""
        assert self.primary is not None
        interface = info.get("interface")
        if self.primary.head_complete is None or self.config.interface != "auto":
            return None
        if interface == "wsgi":
            return None
        return (
            f"the application is now {str(interface).upper()}, and --buffer-request-head "
            "was set up for WSGI; restart to apply"
        )

    def _use_template(self, template: cluster.Template, info: dict[str, Any]) -> None:
        assert self.starter is not None
        self.starter.use(template)
        self.template = template
        interface = info.get("interface")
        self.app_interface = str(interface) if interface else None
        LOG.debug("workers fork from template (pid %s)", template.pid)
        self._close_idle_templates()

    def _close_idle_templates(self) -> None:
        """A template no longer in use leaves once the last worker forked from it has."""
        if self.starter is None:
            return
        in_use = set(map(id, self.worker_templates.values()))
        keep = {id(self.template), id(self.next_template)}
        if self.previous is not None:
            keep.add(id(self.previous[2]))  # a failing reload may go back to it
        for template in self.starter.templates:
            if id(template) not in in_use | keep and not template.closed:
                LOG.info("template (pid %s) is no longer used; it exits", template.pid)
                template.close()

    def _on_template_exit(
        self, template: cluster.Template, code: int | None, signame: str | None
    ) -> None:
        if template.closed or self.stopping or template is not self.template:
            return  # asked to leave, or still preparing (its error goes to ready())
        how = f"code {code}" if signame is None else f"signal {signame}"
        self.template = None
        if self.next_template is not None:
            LOG.warning("template (pid %s) exited with %s", template.pid, how)
            return  # the one being prepared takes over
        LOG.warning("template (pid %s) exited with %s; starting a new one", template.pid, how)
        self.start_template(reload=False)

    async def _close_templates(self) -> None:
        """At the end of a stop: every template leaves (bounded wait)."""
        if self.starter is None:
            return
        loop = asyncio.get_running_loop()
        exits = []
        for template in self.starter.templates:
            gone: asyncio.Future[None] = loop.create_future()
            template.once("exit", lambda code, sig, gone=gone: gone.done() or gone.set_result(None))
            exits.append(gone)
        self.next_template = None
        self.starter.close()
        if exits:
            await asyncio.wait(exits, timeout=FAST_STOP_GRACE)

    def handle_winch(self) -> None:
        """Retire every worker and keep the primary (TTIN brings workers back).

        A terminal sends WINCH to its foreground group on every resize, so it
        is ignored while forkserve runs attached to one, as gunicorn does.
        """
        assert self.primary is not None
        if self.attached_to_terminal:
            LOG.info("SIGWINCH ignored: attached to a terminal")
            return
        LOG.info("SIGWINCH: retiring all %s workers", self.num_workers)
        self.num_workers = 0
        self.retiring.clear()
        for worker in list(self.primary.workers.values()):
            worker.disconnect()

    async def stop(self, graceful: bool) -> None:
        """Stop every worker: disconnect and wait (graceful) or signal them (fast)."""
        assert self.primary is not None
        self.stopping = True
        if self.reloader is not None:
            self.reloader.stop()
        if not self.upgrader.handed_over():  # else the service goes on in the new primary
            systemd.stopping()
        primary = self.primary
        # Workers already disconnected have left ``workers`` but may still be running.
        alive = [w for w in primary.live_workers() if not w.is_dead()]
        deadline = self.config.graceful_timeout if graceful else FAST_STOP_GRACE
        if graceful:
            # Round robin: stop accepting and let the workers take every
            # connection the primary already holds before they are told to go.
            began = time.monotonic()
            unserved = await primary.pause_accepting(deadline)
            if unserved:
                LOG.warning(
                    "%d connection(s) accepted by the primary closed unserved: "
                    "no worker took them in time",
                    unserved,
                )
            deadline = max(1.0, deadline - (time.monotonic() - began))
        # The cluster's handles close with their last worker (round robin too).
        primary.keep_handles = False
        for worker in alive:
            if graceful:
                if worker.is_connected() and not worker.exited_after_disconnect:
                    worker.disconnect()
                else:
                    worker.process.kill(signal.SIGTERM)
            else:
                worker.process.kill(signal.SIGQUIT)
        self.close_listeners()
        waiter = asyncio.ensure_future(primary.wait_idle())
        done, _ = await asyncio.wait({waiter}, timeout=deadline)
        if not done:
            for worker in alive:
                if not worker.is_dead():
                    LOG.warning(
                        "worker %s (pid %s) did not stop within %.0fs; killing it",
                        worker.id,
                        worker.process.pid,
                        deadline,
                    )
                    worker.process.kill(signal.SIGKILL)
            await asyncio.wait({waiter}, timeout=5.0)
        waiter.cancel()
        await self._close_templates()
        LOG.info("stopped")

    def close_listeners(self) -> None:
        """Close the primary's copies of the listening sockets.

        Once the workers have closed theirs too, a new connection is refused
        at once, instead of waiting in the backlog to be reset when the
        primary exits. Closing (not shutting down) leaves a socket handed to
        a new primary alone.
        """
        for bound in self.binds:
            with contextlib.suppress(OSError):
                bound.close(unlink=False)

    # -- --reload -------------------------------------------------------------------

    def start_reloader(self, loop: asyncio.AbstractEventLoop) -> None:
        """Watch the app's files (see ``forkserve.reloader``); a change is a HUP."""
        # --reload only: imported here so that workers, forked from the
        # primary, do not inherit it.
        from forkserve.reloader import Reloader, reload_roots

        roots = reload_roots(os.getcwd(), self.config.pythonpath)
        try:
            self.reloader = Reloader(
                roots, self.config.reload_extra_files, self._on_files_changed, loop=loop
            )
        except ValueError as exc:
            LOG.error("--reload is off: %s", exc)
            return
        self.reloader.start()
        LOG.info("--reload: watching %s (%s)", ", ".join(roots) or "nothing", self.reloader.engine)

    def _on_files_changed(self, paths: list[str]) -> None:
        if self.stopping or self.draining:
            return
        LOG.info("reloading: %s changed", paths[0])
        self._enqueue("SIGHUP")

    # -- helpers --------------------------------------------------------------------

    def _call_hook(self, name: str, *args: Any) -> None:
        hook = getattr(self.config, name, None)
        if hook is None:
            return
        try:
            hook(*args)
        except Exception:
            LOG.exception("error in the %s hook", name)


def _ignore_send_error(exc: BaseException | None) -> None:
    """A worker gone before a message reached it: its exit is handled apart."""


def head_limit(config: Config) -> int:
    """Bytes the primary reads at most before handing a request head over."""
    line = int(config.limit_request_line) or 8190
    fields = int(config.limit_request_fields) or 32768
    size = int(config.limit_request_field_size) or 8190
    return min(line + 2 + fields * (size + 2) + 2, HEAD_BUFFER_MAX)


def _import_for_workers(config: Config, interface: str) -> None:
    """In the template: import what each worker forked from it would import
    on its own (its class, the parser): once, shared, and not on the path
    from a fork to serving. Best effort: a worker reports what fails."""
    import importlib

    from forkserve.workers import load_worker_class

    try:
        name = str(config.worker_class)
        if name == "auto":
            name = pick_worker_class(config, interface)
        load_worker_class(name)
        if interface != "asgi" and str(config.http) in ("auto", "httptools"):
            importlib.import_module("httptools")
    except (ImportError, ValueError, ForkserveError):
        pass


def head_complete_within(limit: int) -> Callable[[bytes], bool | None]:
    """The primary's test for a whole request head (RFC 9112 section 2.1).

    True once the empty line ends the head, or once ``limit`` bytes are in:
    the worker then answers an oversized head (431) from the bytes it gets.
    """

    def head_complete(buffer: bytes) -> bool | None:
        if b"\r\n\r\n" in buffer or b"\n\n" in buffer or len(buffer) >= limit:
            return True
        return None

    return head_complete


def answer_and_close(conn: socket.socket, response: bytes) -> None:
    """Send a short response without blocking the primary's loop, then close.

    What the client already sent is read first: closing a socket with unread
    bytes sends RST, which can destroy the answer before the client reads it.
    """
    try:
        conn.setblocking(False)
        with contextlib.suppress(BlockingIOError, InterruptedError):
            conn.recv(65536)
        conn.send(response)
        conn.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        conn.close()


def main(config: Config) -> int:
    return Arbiter(config).run()


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run forkserve through its command line: forkserve APP")
