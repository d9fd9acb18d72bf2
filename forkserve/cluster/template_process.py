"""Inside a template process: prepare once, then fork workers on request.

The primary's side, and the protocol, are described in ``template.py``. Here
the template runs ``prepare()``, answers ``ready`` (or ``failed`` and exits),
then reads fork requests from its socketpair, one at a time: each carries a
worker's environment and settings, and as SCM_RIGHTS its cluster channel
(then any stdio descriptors the settings ask for).
For each, an intermediate process forks the worker and exits at once, so
the worker is orphaned and re-parented to the primary, the subreaper. The
template answers with the worker's pid (or an error) and leaves when the
socketpair closes.

Imports nothing from forkserve outside this package.
"""

from __future__ import annotations

import array
import contextlib
import os
import signal
import socket
import sys
import traceback
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from .ipc import MAX_FDS, READ_SIZE, FrameDecoder, Kind, encode
from .starter import exit_now, reset_signals_after_fork, run_worker

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
# Sent to the whole process group by a terminal (Ctrl-C, Ctrl-\, resizes) or
# a supervisor: the primary acts on them; the template must outlive them.
IGNORED_SIGNALS = (
    "SIGTERM",
    "SIGINT",
    "SIGQUIT",
    "SIGHUP",
    "SIGUSR1",
    "SIGUSR2",
    "SIGTTIN",
    "SIGTTOU",
    "SIGWINCH",
)
_FD_SIZE = array.array("i").itemsize

Prepare = Callable[[], Mapping[str, Any] | None]


def prctl(option: int, value: int) -> None:
    """``prctl(2)`` with one argument; raises OSError."""
    import ctypes  # here: not worth its memory in every worker that never calls it

    libc = ctypes.CDLL(None, use_errno=True)
    zero = ctypes.c_ulong(0)
    if libc.prctl(ctypes.c_int(option), ctypes.c_ulong(value), zero, zero, zero) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}, {value}): {os.strerror(err)}")


class TemplateProcess:
    """The template's main: ``run()`` never returns."""

    def __init__(
        self,
        main: Callable[[], int | None],
        after_fork: Callable[[], None] | None,
        prepare: Prepare | None,
    ) -> None:
        self.main = main
        self.after_fork = after_fork
        self.prepare = prepare

    def run(
        self,
        sock: socket.socket,
        primary_pid: int,
        close_inherited: Callable[[], None],
    ) -> NoReturn:
        """Just forked from the primary: drop its descriptors, prepare, serve."""
        code = 1
        try:
            reset_signals_after_fork()
            for name in IGNORED_SIGNALS:
                signal.signal(getattr(signal, name), signal.SIG_IGN)
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() == primary_pid:  # else the primary died before the line above
                close_inherited()
                if self.after_fork is not None:
                    self.after_fork()
                code = self.serve(sock)
            else:
                code = 0
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            exit_now(code)

    def serve(self, sock: socket.socket) -> int:
        """Prepare, report, then fork workers until the socketpair closes; the exit code."""
        sock.setblocking(True)
        try:
            info = self.prepare() if self.prepare is not None else None
        except BaseException as exc:  # even SystemExit: the primary must hear why
            send(sock, {"act": "failed", "error": describe(exc)})
            return 1
        if not send(sock, {"act": "ready", "info": dict(info or {})}):
            return 0
        decoder = FrameDecoder()
        anc_size = socket.CMSG_SPACE(MAX_FDS * _FD_SIZE)
        while True:
            try:
                data, ancdata, _flags, _addr = sock.recvmsg(READ_SIZE, anc_size)
            except OSError:
                return 0
            fds = fds_of(ancdata)
            if not data:
                for fd in fds:
                    _close_quietly(fd)
                return 0  # the primary closed the socketpair: leave
            decoder.feed(data, fds)
            for frame in decoder.frames():
                if not send(sock, self.fork_worker(sock, frame.body, frame.fds)):
                    return 0

    def fork_worker(self, sock: socket.socket, body: Any, fds: tuple[int, ...]) -> dict[str, Any]:
        """Answer one fork request: ``{"pid": n}`` or ``{"error": text}``."""
        try:
            if not fds or not isinstance(body, dict) or body.get("act") != "fork":
                return {"error": "expected a fork request carrying a channel descriptor"}
            return self._double_fork(sock, body, fds)
        except OSError as exc:
            return {"error": f"fork failed: {exc.strerror or exc}"}
        finally:
            for fd in fds:  # the worker has its copies
                _close_quietly(fd)

    def _double_fork(
        self, sock: socket.socket, body: dict[str, Any], fds: tuple[int, ...]
    ) -> dict[str, Any]:
        """Fork an intermediate that forks the worker and exits at once: the worker is
        orphaned, so re-parented to the primary (the subreaper)."""
        read_end, write_end = os.pipe()
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            middle = os.fork()
            if middle == 0:
                self._intermediate(sock, body, fds, read_end, write_end)
            os.close(write_end)
            write_end = -1
            answer = b""
            while chunk := os.read(read_end, 64):
                answer += chunk
        finally:
            _close_quietly(read_end)
            if write_end >= 0:
                _close_quietly(write_end)
        os.waitpid(middle, 0)
        text = answer.decode(errors="replace")
        if text.isdigit():
            return {"pid": int(text)}
        return {"error": text or "the intermediate process died"}

    def _intermediate(
        self,
        sock: socket.socket,
        body: dict[str, Any],
        fds: tuple[int, ...],
        read_end: int,
        write_end: int,
    ) -> NoReturn:
        try:
            os.close(read_end)
            settings: dict[str, Any] = dict(body.get("settings") or {})
            env = {str(k): str(v) for k, v in (body.get("env") or {}).items()}
            pid = os.fork()
            if pid == 0:
                os.close(write_end)

                def setup() -> None:
                    sock.close()
                    if self.after_fork is not None:
                        self.after_fork()
                    given = list(fds[1:])
                    for index, entry in enumerate(settings.get("stdio") or ()):
                        if entry == "ignore":
                            null = os.open(os.devnull, os.O_RDWR)
                            os.dup2(null, index)
                            os.close(null)
                        elif entry == "fd" and given:
                            os.dup2(given.pop(0), index)
                    for fd in fds[1:]:
                        if fd > 2:
                            _close_quietly(fd)

                run_worker(self.main, setup, settings, env, fds[0], replace_env=True)
            os.write(write_end, str(pid).encode())
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.write(write_end, f"fork failed: {exc}".encode())
        finally:
            os._exit(0)


def send(sock: socket.socket, body: dict[str, Any]) -> bool:
    """Send one frame, blocking; False when the primary is gone."""
    try:
        sock.sendall(encode(Kind.INTERNAL, body))
    except OSError:
        return False
    return True


def fds_of(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors an SCM_RIGHTS message carried."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - (len(data) % _FD_SIZE)
            fds.extend(array.array("i", data[:usable]))
    return fds


def describe(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"prepare() called sys.exit({exc.code!r})"
    return str(exc) or type(exc).__name__


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
