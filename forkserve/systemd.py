"""systemd integration without libsystemd: notifications and socket activation.

``notify()`` sends ``sd_notify`` datagrams (``READY=1``, ``STATUS=...``,
``RELOADING=1``, ``STOPPING=1``, ``MAINPID=``, ``WATCHDOG=1``) to
``$NOTIFY_SOCKET``, a no-op when it is unset. ``listen_fds()`` returns the
sockets systemd passed (``LISTEN_FDS``/``LISTEN_PID``/``LISTEN_FDNAMES``),
starting at fd 3. A leaf: imports nothing from forkserve.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Mapping, MutableMapping
from typing import NamedTuple

SD_LISTEN_FDS_START = 3


def notify(*fields: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``fields`` (``"READY=1"``, ...) as one notification; True if sent."""
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET")
    if not address or not fields:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    payload = "\n".join(fields).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(address)
            sock.sendall(payload)
        except OSError:
            return False
    return True


def ready(status: str = "", *, mainpid: int | None = None) -> bool:
    """``READY=1`` with ``STATUS=``; ``mainpid`` also makes that process the main one.

    With ``mainpid`` both go in one message, so systemd never sees the
    service ready under a main process that is about to exit (the unit needs
    ``NotifyAccess=all`` to take it from a process that is not the main one).
    """
    fields = [f"MAINPID={mainpid}"] if mainpid else []
    fields.append("READY=1")
    if status:
        fields.append("STATUS=" + status)
    return notify(*fields)


def reloading() -> bool:
    """``RELOADING=1`` with ``MONOTONIC_USEC``, as ``Type=notify-reload`` expects."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}")


def stopping() -> bool:
    return notify("STOPPING=1")


def status(text: str) -> bool:
    return notify("STATUS=" + text)


def main_pid(pid: int) -> bool:
    return notify(f"MAINPID={pid}")


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``), or None."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2_000_000 if value > 0 else None


class ActivatedSocket(NamedTuple):
    fd: int
    name: str


def listen_fds(
    environ: MutableMapping[str, str] | None = None, *, unset: bool = True
) -> list[ActivatedSocket]:
    """The sockets systemd passed to this process; [] when there are none.

    Checks ``LISTEN_PID`` against this process, marks the descriptors
    close-on-exec, and (``unset``) removes the variables so children do not
    take them for their own.
    """
    env = os.environ if environ is None else environ
    raw_pid = env.get("LISTEN_PID")
    raw_count = env.get("LISTEN_FDS")
    names = env.get("LISTEN_FDNAMES", "")
    if unset:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(key, None)
    if not raw_pid or not raw_count:
        return []
    try:
        if int(raw_pid) != os.getpid():
            return []
        count = int(raw_count)
    except ValueError:
        return []
    labels = names.split(":") if names else []
    out = []
    for index in range(count):
        fd = SD_LISTEN_FDS_START + index
        with contextlib.suppress(OSError):
            os.set_inheritable(fd, False)
        name = labels[index] if index < len(labels) and labels[index] else f"fd{fd}"
        out.append(ActivatedSocket(fd, name))
    return out
