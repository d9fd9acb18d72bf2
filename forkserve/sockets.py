"""Opening the server's listeners from ``--bind`` values.

The arbiter binds every address before any worker starts, so an address in
use or a bad path is one clear error and a non-zero exit, not a fork storm.
Workers then ask the cluster for these sockets by their descriptor in the
primary (``cluster.listen({'fd': n})``).
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from dataclasses import dataclass

from forkserve.cluster import address as cluster_address
from forkserve.errors import BindError

HINTS = {
    errno.EADDRINUSE: "address already in use; is another server running?",
    errno.EACCES: "permission denied; ports below 1024 need privileges",
    errno.EADDRNOTAVAIL: "address not available on this machine",
}


@dataclass(slots=True)
class BoundSocket:
    name: str  # as the user wrote it
    sock: socket.socket
    unix_path: str | None = None
    inode: tuple[int, int] | None = None  # (st_dev, st_ino) of unix_path once bound

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self, unlink: bool = True) -> None:
        """Close; with ``unlink`` remove the unix socket's file if it is still ours.

        A path that now names another file (someone bound it anew) is left alone.
        """
        self.sock.close()
        if unlink and self.unix_path:
            try:
                info = os.stat(self.unix_path)
                ours = self.inode is None or (info.st_dev, info.st_ino) == self.inode
                if stat.S_ISSOCK(info.st_mode) and ours:
                    os.unlink(self.unix_path)
            except OSError:
                pass


def socket_inode(path: str | None) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of a unix socket's file, or None."""
    if not path:
        return None
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino)


def open_bind(bind: str, *, backlog: int, unix_mode: int = 0o660) -> BoundSocket:
    """Bind and listen on one ``--bind`` value; BindError says what and why."""
    try:
        addr = cluster_address.parse(bind)
    except ValueError as exc:
        raise BindError(f"bind {bind}: {exc}") from None
    try:
        sock = cluster_address.open_socket(addr, backlog=backlog)
    except OSError as exc:
        reason = HINTS.get(exc.errno or 0, exc.strerror or str(exc))
        raise BindError(f"bind {bind}: {reason}") from None
    if addr.kind == "fd" and sock.type != socket.SOCK_STREAM:
        sock.close()
        raise BindError(f"bind {bind}: descriptor is not a stream socket")
    if addr.kind == "unix" and addr.path:
        try:
            os.chmod(addr.path, unix_mode)
        except OSError as exc:
            sock.close()
            raise BindError(f"bind {bind}: cannot set mode: {exc.strerror}") from None
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        # Responses go out at once; accepted connections inherit it (Linux),
        # so no worker sets it per connection.
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
    sock.set_inheritable(False)
    path = addr.path if addr.kind == "unix" else None
    return BoundSocket(bind, sock, path, socket_inode(path))


def open_binds(
    binds: tuple[str, ...] | list[str],
    *,
    backlog: int,
    unix_mode: int,
    named: dict[str, int] | None = None,
) -> list[BoundSocket]:
    """Open every bind; ``fd://NAME`` refers to ``named`` (systemd's sockets)."""
    opened: list[BoundSocket] = []
    named = named or {}
    try:
        for bind in binds:
            label = bind[len("fd://") :] if bind.startswith("fd://") else ""
            if label and not label.isdigit():
                if label not in named:
                    known = ", ".join(sorted(named)) or "none"
                    raise BindError(
                        f"bind {bind}: no socket named {label!r} was passed by systemd "
                        f"(names: {known}); check FileDescriptorName= in the .socket unit"
                    )
                target = f"fd://{named[label]}"
                opened.append(open_bind(target, backlog=backlog, unix_mode=unix_mode))
                opened[-1].name = bind
                continue
            opened.append(open_bind(bind, backlog=backlog, unix_mode=unix_mode))
    except BindError:
        for item in opened:
            item.close()
        raise
    return opened


def describe(bound: BoundSocket) -> str:
    if bound.unix_path:
        return f"unix:{bound.unix_path}"
    host, port = bound.sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
