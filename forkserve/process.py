"""Process-level helpers of the primary: detaching, pidfiles, titles, /proc.

Nothing here knows about workers, the cluster or HTTP.
"""

from __future__ import annotations

import contextlib
import os
import sys

from forkserve.errors import ConfigError


def write_pidfile(path: str | None, predecessor: int | None = None) -> bool:
    """Write this process's pid to ``path`` (atomically); True if written.

    A pidfile naming another live process is refused, unless it is
    ``predecessor`` (the primary this one upgrades, which moves its file aside).
    """
    if not path:
        return False
    with contextlib.suppress(FileNotFoundError, ValueError):
        with open(path) as handle:
            old = int(handle.read().strip() or 0)
        if old and old not in (os.getpid(), predecessor) and alive(old):
            raise ConfigError(
                f"pidfile {path}: process {old} is running; is forkserve already started?"
            )
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as handle:
        handle.write(f"{os.getpid()}\n")
    os.replace(tmp, path)
    return True


def remove_pidfile(path: str | None) -> None:
    """Remove ``path`` if it still names this process."""
    if not path:
        return
    with contextlib.suppress(OSError, ValueError), open(path) as handle:
        if int(handle.read().strip() or 0) == os.getpid():
            os.unlink(path)


def has_terminal() -> bool:
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
    """Pids of exited, unreaped children of ``parent`` (from /proc).

    The kernel's list of ``parent``'s children is read when it has one (it
    runs on every SIGCHLD: a scan of every process would cost a
    millisecond per hundred processes), else every process is looked at.
    """
    try:
        entries = [
            child
            for task in os.listdir(f"/proc/{parent}/task")
            for child in read_text(f"/proc/{parent}/task/{task}/children").split()
        ]
    except OSError:
        entries = os.listdir("/proc")
    found = []
    for entry in entries:
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


def read_text(path: str) -> str:
    with open(path) as handle:
        return handle.read()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def set_title(title: str) -> None:
    """Set the process title when setproctitle is installed."""
    try:
        import setproctitle
    except ImportError:
        return
    setproctitle.setproctitle(title)
