"""Workers forked from a template process, so they share what it loaded.

Theory of operation
-------------------
``TemplateStarter`` has the interface of ``ForkStarter``, but workers are not
forked from the primary. The primary forks a *template* process, connected
to it by a socketpair. The template runs ``prepare()`` once (a server imports
its application there), answers ``ready`` with what ``prepare()`` returned,
or ``failed`` with the error and exits, then serves fork requests until its
end of the socketpair closes::

    primary                       template                  intermediate   worker
    fork {env, settings} + fd --> fork ------------------> fork -------> run_worker(main)
                                  read pid from a pipe <-- write pid, exit
                                  reap the intermediate
           <-- {pid} ------------

The channel's child end (and any stdio pipe or descriptor the settings ask
for) travels as SCM_RIGHTS. The primary is a child
subreaper (``PR_SET_CHILD_SUBREAPER``), so when the intermediate exits the
worker is re-parented to the primary: it is the primary's child, as a
``ForkStarter`` worker is, and its exit status reaches the primary's pidfd
and ``waitpid``. Descendants a worker orphans come to the primary as well;
a server using this starter reaps them.

A new template can be forked while the current one serves
(``spawn_template``) and put in use once ready (``use``): workers forked from
then on share the new template's memory, and the old one can be closed. A
template ignores the signals a terminal or a supervisor sends to the whole
process group (the primary decides what those mean), and dies with the
primary (``PR_SET_PDEATHSIG``).

Imports nothing from forkserve outside this package.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from typing import IO, Any

from .events import EventEmitter
from .ipc import READ_SIZE, FrameDecoder, Kind, encode
from .starter import ChildProcess, Exited, _stdio
from .template_process import PR_SET_CHILD_SUBREAPER, Prepare, TemplateProcess, prctl

REQUEST_TIMEOUT = 10.0


class TemplateError(Exception):
    """A template could not prepare, or cannot fork a worker now."""


def become_subreaper() -> None:
    """Orphaned descendants of this process are re-parented to it, not to init."""
    prctl(PR_SET_CHILD_SUBREAPER, 1)


class Template(EventEmitter, Exited):
    """A template process, seen from the primary.

    ``await ready()`` gives what its ``prepare()`` returned (``info``) or
    raises ``TemplateError`` with its error. ``'exit'`` ``(code, signal)``
    is emitted once it has ended and been reaped; ``closed`` tells an exit
    asked for by ``close()`` or ``kill()`` from an unexpected one.
    """

    def __init__(self, pid: int, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.pid = pid
        self.sock = sock
        self.loop = loop
        self._loop = loop
        self.info: dict[str, Any] | None = None
        self.returncode: int | None = None
        self.closed = False
        self._broken = False  # stopped answering: killed, its exit is not a deliberate one
        self._decoder = FrameDecoder()
        self._ready: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._ready.add_done_callback(_retrieve)
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._on_readable)
        self._reading = True
        self._pidfd = os.pidfd_open(pid)
        loop.add_reader(self._pidfd, self._on_exit)

    def __repr__(self) -> str:
        return f"<Template pid={self.pid} ready={self.is_ready} returncode={self.returncode}>"

    # -- state ------------------------------------------------------------------

    @property
    def is_ready(self) -> bool:
        """Prepared, running and not closed: it can fork workers."""
        return (
            self.info is not None
            and self.returncode is None
            and not self.closed
            and not self._broken
        )

    async def ready(self) -> dict[str, Any]:
        """What ``prepare()`` returned, once it has; raises ``TemplateError``."""
        return await asyncio.shield(self._ready)

    # -- reading the first answer -----------------------------------------------

    def _on_readable(self) -> None:
        eof = False
        while True:
            try:
                data = self.sock.recv(READ_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                data = b""
            if not data:
                eof = True
                break
            self._decoder.feed(data)
        for frame in self._decoder.frames():
            self._settle(frame.body)
        if eof:
            self._stop_reading()
            self._fail(f"template (pid {self.pid}) closed its socket before it was ready")

    def _settle(self, body: Any) -> None:
        if self._ready.done() or not isinstance(body, dict):
            return
        if body.get("act") == "ready":
            self.info = dict(body.get("info") or {})
            self._stop_reading()
            self.sock.setblocking(True)
            self._ready.set_result(self.info)
        else:
            self._stop_reading()
            self._fail(str(body.get("error") or "the template failed to prepare"))

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(self.sock.fileno())

    def _fail(self, message: str) -> None:
        if not self._ready.done():
            self._ready.set_exception(TemplateError(message))

    # -- exit -------------------------------------------------------------------

    def _on_exit(self) -> None:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = self.pid, 0
        if pid == 0:
            return
        self.returncode = os.waitstatus_to_exitcode(status)
        self.loop.remove_reader(self._pidfd)
        _close_quietly(self._pidfd)
        self._pidfd = -1
        if self._reading:
            self._on_readable()  # its last words may explain the exit
        how = (
            f"signal {self.signal_code}"
            if self.signal_code is not None
            else f"code {self.exit_code}"
        )
        self._fail(f"template (pid {self.pid}) exited with {how} before it was ready")
        self._close_socket()
        self.emit("exit", self.exit_code, self.signal_code)

    def close(self) -> None:
        """Ask the template to exit: it does as soon as its socketpair closes."""
        self.closed = True
        self._fail(f"template (pid {self.pid}) was closed before it was ready")
        self._close_socket()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """End the template now (it ignores the usual stop signals)."""
        self.closed = True
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
        self._fail(f"template (pid {self.pid}) was killed before it was ready")
        self._close_socket()

    def _close_socket(self) -> None:
        self._stop_reading()
        with contextlib.suppress(OSError):
            self.sock.close()

    def _close_in_fork(self) -> None:
        """In a process forked from the primary: drop this template's descriptors."""
        with contextlib.suppress(OSError):
            self.sock.close()
        if self._pidfd >= 0:
            _close_quietly(self._pidfd)

    # -- fork requests -----------------------------------------------------------

    def request(self, body: dict[str, Any], fds: list[int], timeout: float) -> dict[str, Any]:
        """Send one fork request with ``fds`` and wait (blocking) for the answer.

        A template that does not answer within ``timeout`` is killed.
        """
        if not self.is_ready:
            raise TemplateError(f"template (pid {self.pid}) is not ready to fork workers")
        data = encode(Kind.INTERNAL, body, len(fds))
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        try:
            self.sock.settimeout(timeout)
            sent = self.sock.sendmsg([data], rights)
            if sent < len(data):
                self.sock.sendall(data[sent:])
            while True:
                frames = self._decoder.frames()
                if frames:
                    answer = frames[0].body
                    return answer if isinstance(answer, dict) else {}
                chunk = self.sock.recv(READ_SIZE)
                if not chunk:
                    raise ConnectionResetError("the template closed its socket")
                self._decoder.feed(chunk)
        except OSError as exc:
            self._broken = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self._close_socket()
            raise TemplateError(f"template (pid {self.pid}) did not answer: {exc}") from None


def _retrieve(future: asyncio.Future[dict[str, Any]]) -> None:
    """Mark a failure as seen, so an unawaited one is not reported as lost."""
    if not future.cancelled():
        future.exception()


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


class TemplateStarter:
    """Start workers by asking the template in use to fork them.

    ``prepare()`` runs once in each template and returns JSON-ready facts
    for the primary (``Template.info``); ``main()`` runs in each worker as
    with ``ForkStarter``. ``after_fork()`` runs in each template (to drop
    the caller's descriptors) and again in each worker, so it must be
    idempotent. Creating the starter makes this process a child subreaper.
    """

    def __init__(
        self,
        main: Callable[[], int | None],
        after_fork: Callable[[], None] | None = None,
        *,
        prepare: Prepare | None = None,
        loop: asyncio.AbstractEventLoop,
        timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.main = main
        self.after_fork = after_fork
        self.prepare = prepare
        self.loop = loop
        self.timeout = timeout
        self.current: Template | None = None
        self._templates: list[Template] = []
        become_subreaper()

    @property
    def templates(self) -> list[Template]:
        """Every template not yet reaped, the one in use included."""
        return list(self._templates)

    def spawn_template(self, close_inherited: Callable[[], None] | None = None) -> Template:
        """Fork a new template; ``close_inherited()`` runs in it first (the primary's
        descriptors). It forks no worker before ``use()``."""
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        primary_pid = os.getpid()
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError:
            parent_end.close()
            child_end.close()
            raise
        if pid == 0:
            parent_end.close()
            others = list(self._templates)

            def close_all() -> None:
                if close_inherited is not None:
                    close_inherited()
                for other in others:
                    other._close_in_fork()

            process = TemplateProcess(self.main, self.after_fork, self.prepare)
            process.run(child_end, primary_pid, close_all)
        child_end.close()
        template = Template(pid, parent_end, self.loop)
        self._templates.append(template)
        template.on("exit", lambda code, sig: self._forget(template))
        return template

    def use(self, template: Template | None) -> None:
        """Fork workers from ``template`` from now on (None: from none)."""
        self.current = template

    def close(self) -> None:
        """Close every template (they exit; workers are not affected)."""
        self.current = None
        for template in list(self._templates):
            template.close()

    def _forget(self, template: Template) -> None:
        if template in self._templates:
            self._templates.remove(template)
        if self.current is template:
            self.current = None

    def start(
        self,
        worker_id: int,
        settings: Mapping[str, Any],
        env: dict[str, str],
        child_fd: int,
        close_in_child: Callable[[], None],
    ) -> ChildProcess:
        # ``close_in_child`` is not needed: the template dropped the primary's
        # descriptors when it started, and never had those opened since.
        template = self.current
        if template is None:
            raise TemplateError("no template is ready to fork workers")
        # stdio travels as descriptors too: pipes' child ends, given fds or files.
        stdio: list[str] = []
        fds = [child_fd]
        pipes: list[tuple[int, int] | None] = []
        for index, entry in enumerate(_stdio(settings)):
            pair: tuple[int, int] | None = None
            if entry is None:
                stdio.append("inherit")
            elif entry == subprocess.DEVNULL:
                stdio.append("ignore")
            else:
                if entry == subprocess.PIPE:
                    r, w = os.pipe()
                    pair = (w, r) if index == 0 else (r, w)  # (parent end, child end)
                    fds.append(pair[1])
                else:
                    fds.append(entry if isinstance(entry, int) else entry.fileno())
                stdio.append("fd")
            pipes.append(pair)
        body = {
            "act": "fork",
            "id": worker_id,
            "env": dict(env),
            "settings": {
                "cwd": settings.get("cwd"),
                "uid": settings.get("uid"),
                "gid": settings.get("gid"),
                "stdio": stdio,
            },
        }
        ok = False
        try:
            answer = template.request(body, fds, self.timeout)
            if not isinstance(answer.get("pid"), int):
                raise TemplateError(
                    f"template (pid {template.pid}) cannot fork a worker: "
                    f"{answer.get('error') or 'no pid in its answer'}"
                )
            ok = True
        finally:
            for pair in pipes:
                if pair is not None:
                    _close_quietly(pair[1])
                    if not ok:
                        _close_quietly(pair[0])
        ends: list[IO[bytes] | None] = [
            None if pair is None else os.fdopen(pair[0], "wb" if index == 0 else "rb")
            for index, pair in enumerate(pipes)
        ]
        return ChildProcess(int(answer["pid"]), None, (ends[0], ends[1], ends[2]))
