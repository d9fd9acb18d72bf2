"""Upgrading forkserve in place (SIGUSR2): a new primary on the same sockets.

Theory of operation
-------------------
The old primary (``Upgrader.start``) renames ``PIDFILE`` to ``PIDFILE.oldbin``
and starts ``python -m forkserve`` with its original arguments, in its
original directory, as its own child. The child gets the listening sockets
and nothing else (same descriptor numbers), and learns what it is from three
environment variables, which it removes on reading them:

    FORKSERVE_UPGRADE_FROM=<old pid>
    FORKSERVE_INHERITED_FDS=[[fd, "<bind as the old primary served it>"], ...]
    FORKSERVE_UPGRADE_NOTIFY=@<a datagram socket of the old primary>

The new primary (``Upgrader.open_binds``) takes the inherited socket of every
bind whose address matches (the socket stays open, so no "address in use" and
no refused connection), binds the others and closes the rest. Once all its
workers serve (``Upgrader.ready``) it sends ``READY=1`` to the old primary's
socket, whose receiver checks the sender's pid (``SCM_CREDENTIALS``). Under
systemd it then sends ``MAINPID=`` with ``READY=1`` and SIGTERM to the old
primary, so systemd follows the new main process. Without systemd both serve
until the operator sends TERM to the old one (the upgrade is done) or to the
new one (it is rolled back).

The old primary watches its child with a pidfd. When the child exits, before
or after it was ready, the old one restores ``PIDFILE`` and serves on. While
another primary shares the sockets, neither removes a unix socket's file.

Linux only (``pidfd_open``, ``SO_PASSCRED``, abstract socket names). Imports
``sockets``, ``systemd``, ``errors`` and ``cluster.address``; never the
arbiter, the workers or ``http``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from forkserve import systemd
from forkserve.cluster import address as cluster_address
from forkserve.errors import BindError, ConfigError
from forkserve.sockets import BoundSocket, open_binds, socket_inode

LOG = logging.getLogger("forkserve.arbiter")

UPGRADE_FROM_ENV = "FORKSERVE_UPGRADE_FROM"
INHERITED_FDS_ENV = "FORKSERVE_INHERITED_FDS"
UPGRADE_NOTIFY_ENV = "FORKSERVE_UPGRADE_NOTIFY"
# Not passed on: systemd's sockets reach the new primary as inherited binds
# (LISTEN_PID would name the old primary anyway), and the watchdog follows
# the main process.
_NOT_INHERITED = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
# Inherited sockets that are not binds (the metrics listener) carry this prefix.
SIDE_PREFIX = "side:"
OLDBIN_SUFFIX = ".oldbin"
_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid


# -- the environment protocol ------------------------------------------------------


class Command(NamedTuple):
    """How this primary was started, to start the next one the same way."""

    argv: tuple[str, ...]
    cwd: str


def capture_command() -> Command:
    """The command line and directory now; call it before any ``--chdir``."""
    return Command((sys.executable, "-m", "forkserve", *sys.argv[1:]), os.getcwd())


class Inherited(NamedTuple):
    """A listening socket passed by the old primary: its fd and bind name.

    ``family`` and ``address`` (from ``getsockname()``) are filled in once
    the new primary has looked at the descriptor.
    """

    fd: int
    name: str
    family: int = 0
    address: Any = None


@dataclass(slots=True)
class Handover:
    """What a primary started by SIGUSR2 learns from its environment."""

    from_pid: int
    inherited: tuple[Inherited, ...]
    notify: str


def encode_inherited(items: Sequence[tuple[int, str]]) -> str:
    """``FORKSERVE_INHERITED_FDS``: a JSON list of ``[fd, bind name]`` pairs."""
    return json.dumps([[fd, name] for fd, name in items])


def decode_inherited(text: str) -> tuple[Inherited, ...]:
    """The inverse of ``encode_inherited``; ValueError names what is wrong."""
    try:
        raw = json.loads(text)
    except ValueError:
        raise ValueError("not JSON") from None
    if not isinstance(raw, list):
        raise ValueError("expected a list of [fd, name] pairs")
    out = []
    for entry in raw:
        ok = isinstance(entry, list) and len(entry) == 2
        if not ok or not isinstance(entry[1], str) or type(entry[0]) is not int or entry[0] < 0:
            raise ValueError(f"bad entry {entry!r}: expected [fd, name]")
        out.append(Inherited(entry[0], entry[1]))
    return tuple(out)


def child_environ(
    environ: Mapping[str, str],
    *,
    from_pid: int,
    inherited: Sequence[tuple[int, str]],
    notify: str,
) -> dict[str, str]:
    """The new primary's environment: this one's, plus the upgrade variables."""
    env = {key: value for key, value in environ.items() if key not in _NOT_INHERITED}
    if env.get("WATCHDOG_PID") == str(from_pid):
        del env["WATCHDOG_PID"]  # the new main process pings from now on
    env[UPGRADE_FROM_ENV] = str(from_pid)
    env[INHERITED_FDS_ENV] = encode_inherited(inherited)
    env[UPGRADE_NOTIFY_ENV] = notify
    return env


def take_handover(environ: MutableMapping[str, str]) -> Handover | None:
    """Read and remove the upgrade variables; None when not started by SIGUSR2.

    Removed so that workers, and the next upgrade, never see stale values.
    """
    raw_pid = environ.pop(UPGRADE_FROM_ENV, None)
    raw_fds = environ.pop(INHERITED_FDS_ENV, None)
    notify = environ.pop(UPGRADE_NOTIFY_ENV, None)
    if raw_pid is None:
        return None
    try:
        from_pid = int(raw_pid)
    except ValueError:
        raise ConfigError(
            f"environment {UPGRADE_FROM_ENV}={raw_pid!r}: expected a pid; "
            "this variable is set by forkserve on SIGUSR2, unset it"
        ) from None
    try:
        inherited = decode_inherited(raw_fds or "[]")
    except ValueError as exc:
        raise ConfigError(
            f"environment {INHERITED_FDS_ENV}: {exc}; "
            "this variable is set by forkserve on SIGUSR2, unset it"
        ) from None
    return Handover(from_pid, inherited, notify or "")


# -- matching inherited sockets to binds -------------------------------------------


def _resolve(host: str, family: int) -> set[str]:
    try:
        found = socket.getaddrinfo(host, None, family, socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return {host}
    return {str(item[4][0]) for item in found} | {host}


def serves(bind: str, item: Inherited) -> bool:
    """True if the inherited socket ``item`` is what ``bind`` would open.

    ``fd://`` binds match by name (the descriptor numbers are the old
    primary's); unix binds by path; TCP binds by family, address and port,
    port 0 matching any port.
    """
    if bind.startswith("fd://"):
        return bind == item.name
    try:
        addr = cluster_address.parse(bind)
    except ValueError:
        return False
    if addr.kind == "unix":
        return item.family == socket.AF_UNIX and item.address == addr.path
    if addr.kind != "tcp" or addr.udp or not isinstance(item.address, tuple):
        return False
    host = addr.host or cluster_address.default_host()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if item.family != family:
        return False
    bound_host, bound_port = item.address[:2]
    if addr.port and addr.port != bound_port:
        return False
    return str(bound_host) in _resolve(host, family)


def match_binds(binds: Sequence[str], inherited: Sequence[Inherited]) -> list[Inherited | None]:
    """For each bind, the inherited socket that serves it, or None (bind afresh).

    Each inherited socket serves one bind at most, the first that matches.
    """
    left = list(inherited)
    out: list[Inherited | None] = []
    for bind in binds:
        found = next((item for item in left if serves(bind, item)), None)
        if found is not None:
            left.remove(found)
        out.append(found)
    return out


def binds_for(binds: Sequence[str], default: bool, inherited: Sequence[Inherited]) -> list[str]:
    """The binds a new primary serves.

    Without ``-b`` a primary started by systemd socket activation serves every
    socket systemd passed, named ``fd://N``; its successor gets no
    ``LISTEN_FDS``, so it serves the same inherited sockets instead.
    """
    activated = [item.name for item in inherited if item.name.startswith("fd://")]
    if default and activated:
        return activated
    return list(binds)


def adopt_binds(
    binds: Sequence[str],
    inherited: Sequence[Inherited],
    *,
    backlog: int,
    unix_mode: int,
    named: dict[str, int] | None = None,
) -> list[BoundSocket]:
    """Open ``binds``, taking matching inherited sockets; close the unused ones."""
    socks: dict[int, socket.socket] = {}
    described: list[Inherited] = []
    for item in inherited:
        try:
            sock = socket.socket(fileno=item.fd)
        except OSError as exc:
            LOG.warning(
                "upgrade: inherited fd %s (%s) is not a socket: %s",
                item.fd,
                item.name,
                exc.strerror or exc,
            )
            continue
        sock.set_inheritable(False)
        socks[item.fd] = sock
        try:
            described.append(Inherited(item.fd, item.name, sock.family, sock.getsockname()))
        except OSError:
            described.append(Inherited(item.fd, item.name))
    chosen = match_binds(binds, described)
    try:
        fresh = iter(
            open_binds(
                [bind for bind, found in zip(binds, chosen, strict=True) if found is None],
                backlog=backlog,
                unix_mode=unix_mode,
                named=named,
            )
        )
    except BindError:
        for sock in socks.values():
            sock.close()
        raise
    out: list[BoundSocket] = []
    for bind, found in zip(binds, chosen, strict=True):
        if found is None:
            out.append(next(fresh))
            continue
        sock = socks.pop(found.fd)
        with contextlib.suppress(OSError):
            sock.listen(backlog)  # a changed --backlog applies to the shared socket
        path = found.address if found.family == socket.AF_UNIX else None
        out.append(BoundSocket(bind, sock, path or None, socket_inode(path or None)))
    for item in described:
        if item.fd in socks:
            LOG.info("upgrade: closing inherited socket %s: no bind matches it", item.name)
            socks.pop(item.fd).close()
    return out


# -- the pidfile ---------------------------------------------------------------------


def oldbin_path(pidfile: str) -> str:
    return pidfile + OLDBIN_SUFFIX


def _holds(path: str, pid: int) -> bool:
    try:
        with open(path) as handle:
            return int(handle.read().strip() or 0) == pid
    except (OSError, ValueError):
        return False


def set_pidfile_aside(pidfile: str | None, pid: int) -> bool:
    """Rename ``pidfile`` to ``pidfile.oldbin`` if it holds ``pid``; OSError if that fails."""
    if not pidfile or not _holds(pidfile, pid):
        return False
    os.replace(pidfile, oldbin_path(pidfile))
    return True


def restore_pidfile(pidfile: str | None, pid: int) -> None:
    """Put ``pidfile.oldbin`` back as ``pidfile`` if it holds ``pid``."""
    if pidfile and _holds(oldbin_path(pidfile), pid):
        try:
            os.replace(oldbin_path(pidfile), pidfile)
        except OSError as exc:
            LOG.error("cannot restore the pidfile %s: %s", pidfile, exc.strerror or exc)


def remove_oldbin(pidfile: str | None, pid: int) -> None:
    if pidfile and _holds(oldbin_path(pidfile), pid):
        with contextlib.suppress(OSError):
            os.unlink(oldbin_path(pidfile))


# -- the readiness message ---------------------------------------------------------


def open_notify_socket() -> tuple[socket.socket, str]:
    """A datagram socket in the abstract namespace that reports its senders' pids."""
    import secrets  # on SIGUSR2 only: hmac and hashlib stay out of the workers

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"forkserve-upgrade-{os.getpid()}-{secrets.token_hex(8)}"
    try:
        sock.bind("\0" + name)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock, "@" + name


def sender_pid(ancdata: Sequence[tuple[int, int, bytes]]) -> int | None:
    """The sender's pid from a datagram's ``SCM_CREDENTIALS``, or None."""
    for level, kind, data in ancdata:
        is_ucred = level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
        if is_ucred and len(data) >= _UCRED.size:
            return int(_UCRED.unpack_from(data)[0])
    return None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


# -- both sides ----------------------------------------------------------------------


@dataclass(slots=True)
class _Child:
    """A new primary this one started and waits for."""

    process: subprocess.Popen[bytes]
    pidfd: int
    notify: socket.socket
    ready: bool = False


class Upgrader:
    """One primary's part in upgrades: the primary it replaces, and the one it starts.

    Built before any ``--chdir``: it records how this primary was started and
    reads (and removes) the upgrade variables from ``os.environ``.
    """

    def __init__(self, pidfile: str | None) -> None:
        self.pidfile = pidfile
        self.command = capture_command()
        self.handover = take_handover(os.environ)
        self.child: _Child | None = None
        self.pids: set[int] = set()  # children waited for here, not by the cluster
        self._loop: asyncio.AbstractEventLoop | None = None
        self._announced = False
        # Called when a new primary started here has exited (failed or rolled back).
        self.on_child_exit: Callable[[], None] | None = None

    @property
    def from_pid(self) -> int | None:
        return self.handover.from_pid if self.handover else None

    # -- the new primary ---------------------------------------------------------

    def open_binds(
        self,
        binds: Sequence[str],
        *,
        default: bool,
        backlog: int,
        unix_mode: int,
        named: dict[str, int] | None = None,
    ) -> list[BoundSocket]:
        """``sockets.open_binds``; after an upgrade, inherited sockets first."""
        handover = self.handover
        if handover is None:
            return open_binds(list(binds), backlog=backlog, unix_mode=unix_mode, named=named)
        LOG.info(
            "upgrade: taking over from the primary with pid %s (%s inherited sockets)",
            handover.from_pid,
            len(handover.inherited),
        )
        inherited = [i for i in handover.inherited if not i.name.startswith(SIDE_PREFIX)]
        wanted = binds_for(binds, default, inherited)
        return adopt_binds(wanted, inherited, backlog=backlog, unix_mode=unix_mode, named=named)

    def take_side_socket(self, name: str) -> socket.socket | None:
        """After an upgrade, the old primary's listening socket ``name`` (see
        ``start(side=...)``), or None; taken once."""
        handover = self.handover
        if handover is None:
            return None
        for item in handover.inherited:
            if item.name == SIDE_PREFIX + name:
                handover.inherited = tuple(i for i in handover.inherited if i is not item)
                try:
                    return socket.socket(fileno=item.fd)
                except OSError:
                    return None
        return None

    def close_side_sockets(self) -> None:
        """Close inherited side sockets nobody took."""
        handover = self.handover
        if handover is None:
            return
        for item in handover.inherited:
            if item.name.startswith(SIDE_PREFIX):
                with contextlib.suppress(OSError):
                    os.close(item.fd)
        handover.inherited = tuple(
            i for i in handover.inherited if not i.name.startswith(SIDE_PREFIX)
        )

    def ready(self, status: str) -> None:
        """Every worker serves: tell systemd, and the old primary after an upgrade.

        Under systemd the old primary is then stopped: systemd has been told
        the new main pid first, so it does not take the old one's exit for
        the service's.
        """
        handover = self.handover
        if handover is None or self._announced:
            systemd.ready(status)
            return
        self._announced = True
        parent = os.getppid() == handover.from_pid
        if handover.notify:
            systemd.notify("READY=1", environ={"NOTIFY_SOCKET": handover.notify})
        if systemd.ready(status, mainpid=os.getpid()) and parent:
            LOG.info("upgrade: serving; stopping the old primary (pid %s)", handover.from_pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(handover.from_pid, signal.SIGTERM)
        elif parent:
            LOG.info(
                "upgrade: serving beside the old primary (pid %s); send it TERM to finish "
                "the upgrade, or TERM to this one (pid %s) to roll back",
                handover.from_pid,
                os.getpid(),
            )

    # -- the old primary ---------------------------------------------------------

    def start(
        self,
        loop: asyncio.AbstractEventLoop,
        binds: Sequence[BoundSocket],
        side: Sequence[tuple[str, socket.socket]] = (),
    ) -> None:
        """Start a new primary on ``binds`` (and the ``side`` sockets, by name,
        such as the metrics listener); errors are logged, this one serves on."""
        if self.child is not None:
            LOG.info(
                "SIGUSR2 ignored: an upgrade is in progress (new primary pid %s)",
                self.child.process.pid,
            )
            return
        self._loop = loop
        pid = os.getpid()
        try:
            set_pidfile_aside(self.pidfile, pid)
        except OSError as exc:
            LOG.error(
                "upgrade failed: cannot rename the pidfile %s: %s; still serving",
                self.pidfile,
                exc.strerror or exc,
            )
            return
        notify: socket.socket | None = None
        process: subprocess.Popen[bytes] | None = None
        try:
            notify, address = open_notify_socket()
            fds = [bound.fileno() for bound in binds] + [sock.fileno() for _, sock in side]
            env = child_environ(
                os.environ,
                from_pid=pid,
                inherited=[(bound.fileno(), bound.name) for bound in binds]
                + [(sock.fileno(), SIDE_PREFIX + name) for name, sock in side],
                notify=address,
            )
            process = subprocess.Popen(
                self.command.argv, cwd=self.command.cwd, env=env, pass_fds=fds, close_fds=True
            )
            pidfd = os.pidfd_open(process.pid)
        except OSError as exc:
            if notify is not None:
                notify.close()
            if process is not None:
                process.kill()
                process.wait()
            restore_pidfile(self.pidfile, pid)
            LOG.error(
                "upgrade failed: cannot start a new primary: %s; still serving",
                exc.strerror or exc,
            )
            return
        self.child = _Child(process, pidfd, notify)
        self.pids.add(process.pid)
        loop.add_reader(pidfd, self._on_child_exit)
        loop.add_reader(notify.fileno(), self._read_notify)
        LOG.info(
            "SIGUSR2: started a new primary (pid %s) on %s inherited sockets",
            process.pid,
            len(fds),
        )

    def _read_notify(self) -> None:
        child = self.child
        if child is None:
            return
        while True:
            try:
                data, ancdata, _flags, _addr = child.notify.recvmsg(
                    4096, socket.CMSG_SPACE(_UCRED.size)
                )
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            sender = sender_pid(ancdata)
            if sender != child.process.pid:
                LOG.debug("upgrade: ignored a message from pid %s", sender)
                continue
            if b"READY=1" in data.split(b"\n") and not child.ready:
                child.ready = True
                LOG.info("upgrade: the new primary (pid %s) is serving", child.process.pid)

    def _on_child_exit(self) -> None:
        child = self.child
        if child is None:
            return
        self._read_notify()  # a READY=1 sent just before the exit still counts
        self.child = None
        if self._loop is not None:
            self._loop.remove_reader(child.pidfd)
            self._loop.remove_reader(child.notify.fileno())
        os.close(child.pidfd)
        child.notify.close()
        code = child.process.wait()
        self.pids.discard(child.process.pid)
        restore_pidfile(self.pidfile, os.getpid())
        how = f"code {code}" if code >= 0 else f"signal {_signal_name(-code)}"
        if child.ready:
            LOG.warning(
                "the new primary (pid %s) exited with %s; still serving (upgrade rolled back)",
                child.process.pid,
                how,
            )
        else:
            LOG.error("upgrade failed: the new primary exited with %s; still serving", how)
        if self.on_child_exit is not None:
            self.on_child_exit()

    def handed_over(self) -> bool:
        """True once a new primary started here serves (so this one's stop is not the service's)."""
        self._read_notify()
        return self.child is not None and self.child.ready

    # -- both ------------------------------------------------------------------------

    def shares_sockets(self) -> bool:
        """True while another primary serves these sockets: keep unix socket files."""
        if self.child is not None and self.child.process.poll() is None:
            return True
        handover = self.handover
        return handover is not None and os.getppid() == handover.from_pid

    def close_in_child(self) -> None:
        """In a forked worker: close the descriptors that watch the new primary."""
        if self.child is not None:
            with contextlib.suppress(OSError):
                os.close(self.child.pidfd)
            self.child.notify.close()
            self.child = None

    def close(self) -> None:
        """At exit: remove ``PIDFILE.oldbin``; a running new primary is left running."""
        remove_oldbin(self.pidfile, os.getpid())
        child = self.child
        if child is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(child.pidfd)
                self._loop.remove_reader(child.notify.fileno())
            with contextlib.suppress(OSError):
                os.close(child.pidfd)
            child.notify.close()
