"""How a worker process starts: a fresh interpreter, or ``os.fork()``.

Both starters give the primary a ``ChildProcess`` and the child the same
bootstrap: the IPC channel on an inherited descriptor, ``FORKSERVE_WORKER_ID``
in the environment, and the cluster module in the worker role, so every
event and guarantee holds whichever is used.

- ``ExecStarter`` (the library default, Node's way): ``sys.executable`` runs
  the ``exec`` script as ``__main__`` with ``args``, through ``boot.py``.
- ``ForkStarter(main)``: ``os.fork()`` and call ``main()`` in the child; the
  parent's loop, channels and handles are closed in the child first. Used by
  the pre-fork server.
- ``TemplateStarter`` (``template.py``): workers are forked from a template
  process rather than from the primary, then run ``main()`` as here
  (``run_worker``). Used by the pre-fork server with a preloaded app.

Imports nothing from forkserve outside this package.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable, Mapping
from typing import IO, Any, NoReturn, Protocol

from .worker_object import signal_name, signal_number

CHANNEL_FD_ENV = "FORKSERVE_CHANNEL_FD"
WORKER_ID_ENV = "FORKSERVE_WORKER_ID"
SERIALIZATION_ENV = "FORKSERVE_SERIALIZATION"
INSPECT_PORT_ENV = "FORKSERVE_INSPECT_PORT"

_PKG_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Exited:
    """``exit_code`` and ``signal_code`` (Node's ``code`` and ``signal``) from
    ``returncode``: the exit status, or minus the signal number."""

    returncode: int | None

    @property
    def exit_code(self) -> int | None:
        """The exit status if it exited normally, else None (Node's ``code``)."""
        if self.returncode is None or self.returncode < 0:
            return None
        return self.returncode

    @property
    def signal_code(self) -> str | None:
        """The name of the signal that ended it, else None (Node's ``signal``)."""
        if self.returncode is None or self.returncode >= 0:
            return None
        return signal_name(-self.returncode)


def exit_now(code: int) -> NoReturn:
    """End a forked process: flush what Python buffered, then ``os._exit``."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


class ChildProcess(Exited):
    """``worker.process`` in the primary: pid, kill, and how it ended."""

    def __init__(
        self,
        pid: int,
        popen: subprocess.Popen[bytes] | None = None,
        stdio: tuple[IO[bytes] | None, IO[bytes] | None, IO[bytes] | None] = (None, None, None),
    ) -> None:
        self.pid = pid
        self._popen = popen
        self.stdin, self.stdout, self.stderr = stdio
        self.returncode: int | None = None

    def poll(self) -> int | None:
        """Reap the process if it has ended; return ``returncode``."""
        if self.returncode is not None:
            return self.returncode
        if self._popen is not None:
            self.returncode = self._popen.poll()
            return self.returncode
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            self.returncode = 0 if self.returncode is None else self.returncode
            return self.returncode
        if pid == 0:
            return None
        self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def kill(self, sig: str | int = "SIGTERM") -> bool:
        """Send a signal (name or number); not a deliberate exit for the cluster."""
        signum = signal_number(sig)
        if self.returncode is not None:
            return False
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError:
            return False
        return True

    send_signal = kill

    def __repr__(self) -> str:
        return f"<ChildProcess pid={self.pid} returncode={self.returncode}>"


class Starter(Protocol):
    def start(
        self,
        worker_id: int,
        settings: Mapping[str, Any],
        env: dict[str, str],
        child_fd: int,
        close_in_child: Callable[[], None],
    ) -> ChildProcess: ...


def _stdio(settings: Mapping[str, Any]) -> list[Any]:
    """The three stdio entries for Popen from ``stdio`` / ``silent``."""
    stdio = settings.get("stdio")
    if stdio is None:
        return [None, subprocess.PIPE, subprocess.PIPE] if settings.get("silent") else [None] * 3
    if isinstance(stdio, str):
        stdio = [stdio] * 3
    entries = [entry for entry in stdio if entry != "ipc"][:3]
    entries += ["inherit"] * (3 - len(entries))
    out: list[Any] = []
    for entry in entries:
        if entry == "pipe":
            out.append(subprocess.PIPE)
        elif entry in ("inherit", None):
            out.append(None)
        elif entry == "ignore":
            out.append(subprocess.DEVNULL)
        elif isinstance(entry, int) or hasattr(entry, "fileno"):
            out.append(entry)
        else:
            raise ValueError(
                f"bad stdio entry {entry!r}: expected 'pipe', 'inherit', 'ignore', an fd or a file"
            )
    return out


class ExecStarter:
    """Start a fresh interpreter running ``settings['exec']`` as ``__main__``."""

    def start(
        self,
        worker_id: int,
        settings: Mapping[str, Any],
        env: dict[str, str],
        child_fd: int,
        close_in_child: Callable[[], None],
    ) -> ChildProcess:
        exec_path = settings["exec"]
        boot = (
            "import sys; sys.path.insert(0, sys.argv.pop(1)); "
            "from forkserve.cluster.boot import main; main()"
        )
        argv = [
            sys.executable,
            *settings.get("exec_argv", ()),
            "-c",
            boot,
            _PKG_ROOT,
            exec_path,
            *settings.get("args", ()),
        ]
        stdin, stdout, stderr = _stdio(settings)
        env = dict(env)
        env[CHANNEL_FD_ENV] = str(child_fd)
        popen = subprocess.Popen(
            argv,
            env=env,
            cwd=settings.get("cwd"),
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            pass_fds=(child_fd,),
            user=settings.get("uid"),
            group=settings.get("gid"),
        )
        return ChildProcess(popen.pid, popen, (popen.stdin, popen.stdout, popen.stderr))


_RESET_SIGNALS = (
    "SIGTERM",
    "SIGHUP",
    "SIGQUIT",
    "SIGUSR1",
    "SIGUSR2",
    "SIGCHLD",
    "SIGTTIN",
    "SIGTTOU",
    "SIGWINCH",
    "SIGALRM",
)


def reset_signals_after_fork() -> None:
    """Undo the parent's signal set-up: handlers back to default, no wakeup fd."""
    try:
        signal.set_wakeup_fd(-1)
    except (ValueError, OSError):
        pass
    for name in _RESET_SIGNALS:
        signum = getattr(signal, name, None)
        if signum is not None:
            signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)


class ForkStarter:
    """Start workers with ``os.fork()``; the child runs ``main()``.

    ``main`` returning an int exits with it; returning None serves the
    cluster loop until the worker is idle, as a script-started worker does.
    ``after_fork`` (optional) runs in the child first, to close the
    caller's own descriptors.
    """

    def __init__(
        self,
        main: Callable[[], int | None],
        after_fork: Callable[[], None] | None = None,
    ) -> None:
        self.main = main
        self.after_fork = after_fork

    def start(
        self,
        worker_id: int,
        settings: Mapping[str, Any],
        env: dict[str, str],
        child_fd: int,
        close_in_child: Callable[[], None],
    ) -> ChildProcess:
        stdin, stdout, stderr = _stdio(settings)
        pipes: list[tuple[int, int] | None] = []
        for index, entry in enumerate((stdin, stdout, stderr)):
            if entry == subprocess.PIPE:
                r, w = os.pipe()
                pipes.append((r, w) if index else (w, r))  # (parent end, child end)
            else:
                pipes.append(None)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            parent_ends: list[IO[bytes] | None] = []
            for index, pair in enumerate(pipes):
                if pair is None:
                    parent_ends.append(None)
                    continue
                os.close(pair[1])
                parent_ends.append(os.fdopen(pair[0], "wb" if index == 0 else "rb"))
            return ChildProcess(pid, None, (parent_ends[0], parent_ends[1], parent_ends[2]))

        def setup() -> None:
            close_in_child()
            if self.after_fork is not None:
                self.after_fork()
            for index, entry in enumerate((stdin, stdout, stderr)):
                pair = pipes[index]
                target: int | None = None
                if pair is not None:
                    os.close(pair[0])
                    target = pair[1]
                elif entry == subprocess.DEVNULL:
                    target = os.open(os.devnull, os.O_RDWR)
                elif isinstance(entry, int):
                    target = entry
                elif entry is not None and hasattr(entry, "fileno"):
                    target = entry.fileno()
                if target is not None:
                    os.dup2(target, index)

        run_worker(self.main, setup, settings, env, child_fd)


def run_worker(
    main: Callable[[], int | None],
    setup: Callable[[], None],
    settings: Mapping[str, Any],
    env: Mapping[str, str],
    child_fd: int,
    *,
    replace_env: bool = False,
) -> NoReturn:
    """In a freshly forked worker: become a worker, run ``main()``, exit with its status.

    ``setup()`` runs first, after the signal handlers are reset, to drop what
    the parent owns. Then ``cwd``, ``gid`` and ``uid`` from ``settings`` apply;
    ``env`` is added to the environment (or replaces it with
    ``replace_env``), and the cluster switches to the worker role on the
    channel ``child_fd``. Never returns.
    """
    code = 1
    try:
        reset_signals_after_fork()
        setup()
        if settings.get("cwd"):
            os.chdir(settings["cwd"])
        if settings.get("gid") is not None:
            os.setgid(settings["gid"])
        if settings.get("uid") is not None:
            os.setuid(settings["uid"])
        from . import _become_worker  # the package's role switch

        if replace_env:
            os.environ.clear()
        os.environ.update(env)
        os.environ[CHANNEL_FD_ENV] = str(child_fd)
        child = _become_worker()
        result = main()
        code = child.run_to_exit() if result is None else int(result)
    except SystemExit as exc:
        code = _exit_status(exc.code)
    except KeyboardInterrupt:
        code = 130
        _die_of_sigint()
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        exit_now(code)


def _die_of_sigint() -> None:
    """End by SIGINT, as the interpreter does after an unhandled KeyboardInterrupt.

    The primary then reports ``(None, 'SIGINT')`` whichever way the worker started.
    """
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)


def _exit_status(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1
