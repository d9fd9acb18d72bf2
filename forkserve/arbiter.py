"""The arbiter: forkserve's primary process.

It loads the configuration, binds every listener, and forks the workers on
``forkserve.cluster`` with ``os.fork()`` (so a ``--preload``-ed app is shared
copy-on-write). Then it waits: on cluster events (``'listening'`` marks a
worker ready, ``'exit'`` goes to ``restart.decide``) and on signals, whose
handlers only enqueue their name; the main loop reads the queue top to
bottom and dispatches to ``handle_<signal>``. It never polls on a timer.

Signals: TERM graceful stop (workers finish in-flight requests within
``--graceful-timeout``, then are killed), INT and QUIT fast stop, TTIN/TTOU
one worker more/less, USR1 reopen log files.
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
from collections.abc import Callable
from typing import Any

from forkserve import __version__, cluster, log, systemd
from forkserve.apploader import detect_interface, load_app
from forkserve.config import Config
from forkserve.http.response import DateCache, error_response
from forkserve.restart import Action, ExitFacts, decide
from forkserve.sockets import BoundSocket, describe, open_binds
from forkserve.workers.base import BOOT_ERROR_MESSAGE, app_spec, boot

LOG = logging.getLogger("forkserve.arbiter")

SIGNALS = ("SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP", "SIGTTIN", "SIGTTOU", "SIGUSR1", "SIGWINCH")
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

    def __init__(self, config: Config) -> None:
        self.config = config
        self.app: Any = None
        self.binds: list[BoundSocket] = []
        self.num_workers = int(config.workers)
        self.primary: cluster.Primary | None = None
        self.stopping = False
        self.exit_code = 0
        self.booted: set[int] = set()
        self.retiring: deque[cluster.Worker] = deque()
        self.reloading = False
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
        if config.preload_app:
            self.app = load_app(
                app_spec(config), factory=config.factory, pythonpath=config.pythonpath
            )
        self.attached_to_terminal = not config.daemon and _has_terminal()
        activated = systemd.listen_fds()
        binds = list(config.bind)
        if activated and config.sources.get("bind") == "default":
            # Socket activation without -b: serve every socket systemd passed.
            binds = [f"fd://{item.fd}" for item in activated]
        self.binds = open_binds(
            binds,
            backlog=config.backlog,
            unix_mode=config.unix_socket_mode,
            named={item.name: item.fd for item in activated},
        )
        self.bind_fds = [bound.fileno() for bound in self.binds]
        if config.daemon:
            daemonize()
        try:
            self._write_pidfile()
            set_title(f"forkserve: primary [{config.proc_name or config.app}]")
            return self._serve()
        finally:
            for bound in self.binds:
                bound.close(unlink=True)
            self._remove_pidfile()
            self._call_hook("on_exit", self)

    def _serve(self) -> int:
        primary = cluster.Primary(starter=cluster.ForkStarter(self._worker_main, self._after_fork))
        self.primary = primary
        cluster.use_primary(primary)
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
        if self.app is not None:
            # Objects loaded so far stay shared: refcount updates would copy their pages.
            gc.freeze()
        loop = primary.loop
        asyncio.set_event_loop(loop)
        try:
            return loop.run_until_complete(self._main())
        finally:
            for name in SIGNALS:
                with contextlib.suppress(ValueError, RuntimeError):
                    loop.remove_signal_handler(getattr(signal, name))

    async def _main(self) -> int:
        loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        for name in SIGNALS:
            loop.add_signal_handler(getattr(signal, name), self._queue.put_nowait, name)
        if os.getpid() == 1:
            # As PID 1 (a container's entrypoint) orphans are re-parented to us.
            loop.add_signal_handler(signal.SIGCHLD, self.reap_orphans)
        for _ in range(self.num_workers):
            self.spawn_worker()
        interval = systemd.watchdog_interval()
        if interval:
            self._watchdog(loop, interval)
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
            if interface == "auto" and self.app is not None:
                interface = detect_interface(self.app, interface)
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
        for pid in zombie_children(os.getpid()):
            if pid not in workers:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)

    def _watchdog(self, loop: asyncio.AbstractEventLoop, interval: float) -> None:
        """``WATCHDOG=1`` every half ``WATCHDOG_USEC`` while the arbiter's loop runs."""
        systemd.notify("WATCHDOG=1")
        loop.call_later(interval, self._watchdog, loop, interval)

    # -- workers ----------------------------------------------------------------

    def spawn_worker(self) -> None:
        assert self.primary is not None
        if self.stopping:
            return
        worker = self.primary.fork()
        self.started_at[worker.id] = time.monotonic()
        self.listening[worker.id] = 0
        self._call_hook("post_fork", self, worker)

    def _worker_main(self) -> int:
        """In the forked worker."""
        worker = cluster.worker
        set_title(
            f"forkserve: worker {worker.id if worker else '?'} "
            f"[{self.config.proc_name or self.config.app}]"
        )
        return boot(self.config, self.app, self.bind_fds, self.config.worker_class)

    def _after_fork(self) -> None:
        """In the forked worker, before boot: close the arbiter's copies of the binds.

        Workers get their sockets from the cluster, asking by the primary's fd
        numbers (``self.bind_fds``), so the inherited copies are not needed.
        """
        for bound in self.binds:
            with contextlib.suppress(OSError):
                bound.sock.close()

    def running_workers(self) -> int:
        assert self.primary is not None
        return (
            sum(
                1
                for worker in self.primary.workers.values()
                if not worker.is_dead() and not worker.exited_after_disconnect
            )
            + self.pending_spawns
        )

    def _on_listening(self, worker: cluster.Worker, address: dict[str, Any]) -> None:
        self.listening[worker.id] = self.listening.get(worker.id, 0) + 1
        if self.listening[worker.id] == len(self.binds) and worker.id not in self.booted:
            self.booted.add(worker.id)
            LOG.debug("worker %s (pid %s) is ready", worker.id, worker.process.pid)
            self._retire_one()
            if self.reloading and not self.retiring:
                self.reloading = False
                systemd.ready(f"reloaded: {len(self.booted)} workers serving")
            if not self.ready_logged and len(self.booted) >= self.num_workers:
                self.ready_logged = True
                systemd.ready(f"{len(self.booted)} workers serving")
                LOG.info("ready: %s workers serving", len(self.booted))
                self._call_hook("when_ready", self)

    def _retire_one(self) -> None:
        """A new worker is ready: let one worker being replaced leave."""
        while self.retiring:
            old = self.retiring.popleft()
            if old.is_connected() and not old.is_dead():
                old.disconnect()
                return

    def _on_message(self, worker: cluster.Worker, message: Any, handle: Any) -> None:
        is_boot_error = isinstance(message, dict) and message.get("type") == BOOT_ERROR_MESSAGE
        if is_boot_error and not self.boot_error_logged:
            self.boot_error_logged = True
            LOG.error("%s", message.get("message"))

    def _on_exit(self, worker: cluster.Worker, code: int | None, signame: str | None) -> None:
        self._call_hook("worker_exit", self, worker)
        started = self.started_at.pop(worker.id, time.monotonic())
        booted = worker.id in self.booted
        self.booted.discard(worker.id)
        self.listening.pop(worker.id, None)
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
            )
        )
        how = f"code {code}" if signame is None else f"signal {signame}"
        age = now - started
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

    def _enqueue(self, name: str) -> None:
        if self._queue is not None:
            self._queue.put_nowait(name)

    # -- signals ------------------------------------------------------------------

    async def handle_term(self) -> int:
        LOG.info("graceful stop (SIGTERM): finishing in-flight requests")
        await self.stop(graceful=True)
        return self.exit_code

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

    def handle_hup(self) -> None:
        """Start a new worker per old one; each old one retires when a new one is ready."""
        assert self.primary is not None
        old = [w for w in self.primary.workers.values() if w not in self.retiring]
        LOG.info("SIGHUP: replacing %s workers", len(old))
        systemd.reloading()
        self.reloading = True
        self.retiring.extend(old)
        for _ in old:
            self.spawn_worker()

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
        systemd.stopping()
        primary = self.primary
        # Workers already disconnected have left ``workers`` but may still be running.
        alive = [w for w in primary.live_workers() if not w.is_dead()]
        deadline = self.config.graceful_timeout if graceful else FAST_STOP_GRACE
        for worker in alive:
            if graceful:
                if worker.is_connected() and not worker.exited_after_disconnect:
                    worker.disconnect()
                else:
                    worker.process.kill(signal.SIGTERM)
            else:
                worker.process.kill(signal.SIGQUIT)
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
        LOG.info("stopped")

    # -- helpers --------------------------------------------------------------------

    def _call_hook(self, name: str, *args: Any) -> None:
        hook = getattr(self.config, name, None)
        if hook is None:
            return
        try:
            hook(*args)
        except Exception:
            LOG.exception("error in the %s hook", name)

    def _write_pidfile(self) -> None:
        path = self.config.pidfile
        if not path:
            return
        with contextlib.suppress(FileNotFoundError, ValueError):
            with open(path) as handle:
                old = int(handle.read().strip() or 0)
            if old and old != os.getpid() and _alive(old):
                from forkserve.errors import ConfigError

                raise ConfigError(
                    f"pidfile {path}: process {old} is running; is forkserve already started?"
                )
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as handle:
            handle.write(f"{os.getpid()}\n")
        os.replace(tmp, path)
        self._pidfile_written = True

    def _remove_pidfile(self) -> None:
        if self._pidfile_written and self.config.pidfile:
            with contextlib.suppress(OSError), open(self.config.pidfile) as handle:
                if int(handle.read().strip() or 0) == os.getpid():
                    os.unlink(self.config.pidfile)


def _has_terminal() -> bool:
    try:
        os.tcgetpgrp(sys.stdin.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return True


def daemonize() -> None:
    """Detach: fork twice, start a new session, point stdio at /dev/null.

    The command returns at once with status 0; the server runs on in the
    grandchild, whose pid goes to ``--pid``.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)


def zombie_children(parent: int) -> list[int]:
    """Pids of exited, unreaped children of ``parent`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] == "Z" and int(fields[1]) == parent:
            found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def head_limit(config: Config) -> int:
    """Bytes the primary reads at most before handing a request head over."""
    line = int(config.limit_request_line) or 8190
    fields = int(config.limit_request_fields) or 32768
    size = int(config.limit_request_field_size) or 8190
    return min(line + 2 + fields * (size + 2) + 2, HEAD_BUFFER_MAX)


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


def set_title(title: str) -> None:
    """Set the process title when setproctitle is installed."""
    try:
        import setproctitle
    except ImportError:
        return
    setproctitle.setproctitle(title)


def main(config: Config) -> int:
    return Arbiter(config).run()


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run forkserve through its command line: forkserve APP")
