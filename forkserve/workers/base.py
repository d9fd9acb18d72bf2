"""What every worker class shares: boot, signals, HTTP options, recycling.

A worker process starts in ``boot()``: it loads the application (unless the
arbiter preloaded it), tells the arbiter once and exits with
``APP_LOAD_ERROR`` if that fails, builds the chosen class and runs its
``before_listen()``, asks the cluster for its listeners (the arbiter's
sockets, by their fd in the primary; this makes the worker ready), then runs
the class.

Signals in a worker: TERM is a graceful stop (finish what is in flight,
then leave deliberately), INT and QUIT a fast one, USR1 reopens log files.
Handlers only set flags and poke a wakeup pipe the serve loop watches.
The primary's ``DRAIN_MESSAGE`` (a cluster message, pumped by each class's
serve loop) calls ``begin_drain()``.

This is where the cluster and the HTTP layer meet; the classes in this
package are the only modules that import both.
"""

from __future__ import annotations

import faulthandler
import gc
import logging
import os
import random
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from forkserve import cluster, log
from forkserve.apploader import detect_interface, load_app, pick_worker_class
from forkserve.config import Config
from forkserve.errors import APP_LOAD_ERROR, WORKER_BOOT_ERROR, AppImportError, ConfigError
from forkserve.http.accesslog import AccessRecord, format_access
from forkserve.http.parser import ParserLimits
from forkserve.http.wsgi import HTTPOptions
from forkserve.scoreboard import Slot

LOG = logging.getLogger("forkserve.worker")
ACCESS_LOG = logging.getLogger("forkserve.access")

BOOT_ERROR_MESSAGE = "forkserve:boot_error"
RECYCLE_MESSAGE = "forkserve:recycle"
# Primary -> worker: --drain-delay began; every response closes its connection.
DRAIN_MESSAGE = "forkserve:drain"
# How often a serve loop beats at least, while it runs (the primary's
# --timeout watch reads the beats).
HEARTBEAT_INTERVAL = 1.0


class WorkerBase:
    """A worker class: ``run()`` serves until told to stop and returns an exit code."""

    name = "base"
    multithread = False

    def __init__(
        self,
        config: Config,
        app: Any,
        listeners: list[cluster.Listener],
        slot: Slot | None = None,
    ) -> None:
        self.config = config
        self.app = app
        self.listeners = listeners
        self.worker = cluster.worker
        self.worker_id = self.worker.id if self.worker is not None else 0
        self.pid = os.getpid()
        self.alive = True
        self.fast_exit = False
        self.requests = 0
        self.max_requests = recycle_after(config.max_requests, config.max_requests_jitter)
        self.recycle_asked = False
        self.slot = slot
        if slot is not None and not self.multithread:
            # One thread serves every request: the scoreboard needs no lock.
            slot.set_single_thread()
        self.draining = False
        # Whether accepted connections inherit TCP_NODELAY from the
        # listening sockets (None: not looked at yet; see prepare_connection).
        self._nodelay_inherited: bool | None = None
        if self.worker is not None:
            self.worker.on("message", self._on_primary_message)
        self.ssl_context = make_ssl_context(config)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    # -- signals --------------------------------------------------------------

    def init_signals(self) -> None:
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_quit)
        signal.signal(signal.SIGQUIT, self._on_quit)
        signal.signal(signal.SIGUSR1, self._on_usr1)
        for name in ("SIGHUP", "SIGTTIN", "SIGTTOU", "SIGWINCH"):
            signal.signal(getattr(signal, name), signal.SIG_IGN)

    def _on_term(self, signum: int, frame: FrameType | None) -> None:
        self.alive = False

    def _on_quit(self, signum: int, frame: FrameType | None) -> None:
        self.alive = False
        self.fast_exit = True
        raise SystemExit(0)

    def _on_usr1(self, signum: int, frame: FrameType | None) -> None:
        self._reopen = True

    _reopen = False

    def drain_wakeup(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        if self._reopen:
            self._reopen = False
            log.reopen_log_files()

    @property
    def wakeup_fd(self) -> int:
        return self._wake_r

    # -- HTTP -----------------------------------------------------------------

    def http_options(self) -> HTTPOptions:
        config = self.config
        return HTTPOptions(
            backend=config.http,
            limits=ParserLimits(
                max_request_line=config.limit_request_line or 65536,
                max_header_fields=config.limit_request_fields,
                max_header_field_size=config.limit_request_field_size or 65536,
                max_body=config.limit_request_body,
            ),
            root_path=config.root_path,
            url_scheme="https" if self.ssl_context is not None else "http",
            forwarded_allow_ips=tuple(config.forwarded_allow_ips),
            header_timeout=config.header_timeout,
            keepalive_timeout=config.keepalive,
            body_timeout=config.timeout or 30.0,
            multithread=self.multithread,
            multiprocess=True,
            access_log=self.access_logger(),
            observer=self.slot,
            # TLS sockets take no flags; plain ones try each call once first.
            dontwait=socket.MSG_DONTWAIT if self.ssl_context is None else 0,
        )

    def access_logger(self) -> Callable[[AccessRecord], None] | None:
        if not self.config.access_logfile or not ACCESS_LOG.isEnabledFor(logging.INFO):
            return None
        fmt = self.config.access_log_format

        def write(record: AccessRecord) -> None:
            ACCESS_LOG.info(format_access(fmt, record))

        return write

    def extra_environ(self) -> dict[str, Any]:
        return {"forkserve.worker_id": self.worker_id, "forkserve.pid": self.pid}

    def prepare_connection(self, conn: socket.socket) -> socket.socket:
        """Per-connection socket options, and TLS when configured."""
        inherited = self._nodelay_inherited
        if inherited is None:
            inherited = self._nodelay_inherited = self._set_listeners_nodelay()
        if not inherited and conn.family in (socket.AF_INET, socket.AF_INET6):
            try:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        if self.ssl_context is not None:
            conn.settimeout(self.config.header_timeout)
            return self.ssl_context.wrap_socket(conn, server_side=True)
        return conn

    def _set_listeners_nodelay(self) -> bool:
        """Set TCP_NODELAY once on the listening sockets; True when every
        connection comes from one of them, so each inherits it on accept
        (Linux copies it to the accepted socket) and needs no setsockopt."""
        if sys.platform != "linux" or not self.listeners:
            return False
        for listener in self.listeners:
            sock = listener.raw_socket
            if sock is None:
                # Round robin: the primary accepts on the arbiter's socket,
                # which has TCP_NODELAY from the bind (sockets.open_bind).
                continue
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:
                    return False
        return True

    # -- lifecycle ------------------------------------------------------------

    def beat(self) -> None:
        """Tell the primary this worker's serve loop is running."""
        if self.slot is not None:
            self.slot.beat()

    def count_request(self) -> None:
        """One more request served; past --max-requests, ask the primary to recycle us.

        The primary starts the replacement first and then disconnects this
        worker, one recycling worker at a time; until then it keeps serving.
        """
        self.requests += 1
        if not self.max_requests or self.requests < self.max_requests or self.recycle_asked:
            return
        self.recycle_asked = True
        worker = self.worker
        if worker is not None and worker.is_connected():
            LOG.info(
                "worker %s (pid %s) served %s requests; asking to be recycled",
                self.worker_id,
                self.pid,
                self.requests,
            )
            try:
                worker.send({"type": RECYCLE_MESSAGE, "reason": "max-requests"})
                return
            except OSError:
                pass
        self.alive = False

    def _on_primary_message(self, message: Any, handle: Any) -> None:
        if isinstance(message, dict) and message.get("type") == DRAIN_MESSAGE:
            self.begin_drain()

    def begin_drain(self) -> None:
        """The primary drains (--drain-delay): from now on every response says
        ``Connection: close`` and its connection closes after it; accepting goes on."""
        self.draining = True

    def leave(self) -> None:
        """Stop accepting and tell the primary this exit is deliberate."""
        for listener in self.listeners:
            listener.close()
        worker = self.worker
        if worker is not None and worker.is_connected():
            try:
                worker.disconnect()
            except OSError:
                pass

    def before_listen(self) -> None:
        """Runs before the listeners open, i.e. before the worker is ready.

        Raise ``AppImportError`` to fail the boot with ``APP_LOAD_ERROR``.
        """

    def run(self) -> int:
        raise RuntimeError(f"worker class {self.name!r} does not implement run()")


def queued_ms(listener: cluster.Listener, conn: socket.socket) -> float | None:
    """Milliseconds ``conn`` waited in the primary before this worker took it
    (round robin), or None when it did not pass through the primary."""
    accepted = listener.take_accepted_at(conn)
    if accepted is None:
        return None
    return max(0.0, (time.monotonic() - accepted) * 1000.0)


def recycle_after(max_requests: int, jitter: int) -> int:
    """Requests before a worker recycles itself (0: never)."""
    if max_requests <= 0:
        return 0
    return max_requests + (random.randint(0, jitter) if jitter > 0 else 0)


def make_ssl_context(config: Config) -> ssl.SSLContext | None:
    if not config.certfile:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.certfile, config.keyfile)
    if config.ca_certs:
        context.load_verify_locations(config.ca_certs)
    return context


def report_boot_error(message: str, code: int) -> int:
    """Tell the arbiter why this worker cannot start (it logs it once)."""
    worker = cluster.worker
    if worker is not None and worker.is_connected():
        worker.send({"type": BOOT_ERROR_MESSAGE, "message": message, "code": code})
        child = cluster.child
        if child is not None:
            child.channel.flush(5.0)
    else:
        print(f"forkserve: error: {message}", file=sys.stderr)
    return code


def app_spec(config: Config) -> str:
    if not config.app:
        raise AppImportError("no application given; usage: forkserve MODULE:APP")
    return str(config.app)


def install_stack_dump(slot: Slot | None) -> None:
    """SIGUSR2 writes every thread's Python stack to a file the primary reads.

    faulthandler's handler runs at the C level, so it answers even when the
    worker is stuck in C code or holds the GIL in a busy loop.
    """
    if slot is None:
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        return
    # The primary reads it through /proc/<pid>/fd/<fd>. An anonymous memory
    # file spares every worker the tempfile module (and what it imports).
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("forkserve-stacks")
    else:
        import tempfile

        fd, path = tempfile.mkstemp(prefix="forkserve-stacks-")
        os.unlink(path)
    faulthandler.register(signal.SIGUSR2, file=fd, all_threads=True, chain=False)
    slot.set_stack_fd(fd)


def boot(
    config: Config,
    app: Any,
    bind_fds: list[int],
    worker_class: str,
    slot: Slot | None = None,
) -> int:
    """A worker process's main: load the app, get listeners, serve. Returns the exit code."""
    started = time.monotonic()
    # Everything inherited from the primary (or template) is long-lived: out of
    # the collector's sight, full collections stay short and do not write to
    # (and so copy) the shared pages.
    gc.freeze()
    install_stack_dump(slot)
    if app is None:
        try:
            app = load_app(app_spec(config), factory=config.factory, pythonpath=config.pythonpath)
        except (AppImportError, ConfigError) as exc:
            return report_boot_error(str(exc), APP_LOAD_ERROR)
    try:
        interface = detect_interface(app, config.interface)
        if worker_class == "auto":
            worker_class = pick_worker_class(config, interface)
        else:
            pick_worker_class(config, interface)  # refuses a class that cannot serve it
    except (AppImportError, ConfigError) as exc:
        return report_boot_error(str(exc), APP_LOAD_ERROR)
    from forkserve.workers import load_worker_class

    try:
        cls = load_worker_class(worker_class)
    except (ValueError, ImportError) as exc:
        return report_boot_error(str(exc), WORKER_BOOT_ERROR)
    # The class is built before the listeners open (it sees the list filled in
    # later): asking for them reports the worker ready, so whatever must happen
    # first (an ASGI app's lifespan startup) runs in before_listen().
    listeners: list[cluster.Listener] = []
    try:
        instance = cls(config, app, listeners, slot)
    except (OSError, ssl.SSLError, ValueError) as exc:
        return report_boot_error(
            f"cannot start the {worker_class} worker: {exc}", WORKER_BOOT_ERROR
        )
    try:
        instance.before_listen()
    except AppImportError as exc:
        return report_boot_error(str(exc), APP_LOAD_ERROR)
    try:
        for fd in bind_fds:
            listeners.append(cluster.listen({"fd": fd}, backlog=config.backlog))
    except OSError as exc:
        worker = cluster.worker
        if worker is not None and worker.exited_after_disconnect:
            return 0  # told to leave while booting: a deliberate exit, not a failure
        return report_boot_error(f"cannot get a listener: {exc}", WORKER_BOOT_ERROR)
    LOG.debug(
        "worker %s (pid %s) booted as %s in %.3fs",
        instance.worker_id,
        os.getpid(),
        worker_class,
        time.monotonic() - started,
    )
    return int(instance.run())
