"""Address forms accepted by ``cluster.listen`` and the ``'listening'`` address dict.

Pure functions plus ``open_socket``, which binds what an ``Address`` names.
Imports nothing from forkserve outside this package.
"""

from __future__ import annotations

import os
import socket
import stat
from dataclasses import dataclass
from typing import Any

ADDRESS_TYPE_UNIX = -1


@dataclass(frozen=True, slots=True)
class Address:
    """A parsed listen address. ``kind`` is 'tcp', 'unix' or 'fd'."""

    kind: str
    host: str | None = None
    port: int | None = None
    path: str | None = None
    fd: int | None = None
    udp: bool = False

    @property
    def address_type(self) -> int | str:
        if self.kind == "unix":
            return ADDRESS_TYPE_UNIX
        six = self.host is not None and ":" in self.host
        if self.udp:
            return "udp6" if six else "udp4"
        return 6 if six else 4

    def key(self) -> str:
        """The primary's key for a shared socket: address, port, type and fd."""
        where = self.path if self.kind == "unix" else self.host
        return f"{where}:{self.port}:{self.address_type}:{self.fd}"

    def as_message(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "host": self.host,
            "port": self.port,
            "path": self.path,
            "fd": self.fd,
            "udp": self.udp,
        }

    @classmethod
    def from_message(cls, msg: dict[str, Any]) -> Address:
        return cls(msg["kind"], msg["host"], msg["port"], msg["path"], msg["fd"], msg["udp"])


def describe_target(addr: Address) -> str:
    """``host:port``, the unix path, or ``fd N``: for error messages."""
    if addr.kind == "unix":
        return str(addr.path)
    if addr.kind == "fd":
        return f"fd {addr.fd}"
    host = f"[{addr.host}]" if addr.host and ":" in addr.host else addr.host
    return f"{host}:{addr.port}"


def _port(value: Any, where: str) -> int:
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"bad port in {where!r}: expected 0-65535") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"bad port in {where!r}: expected 0-65535")
    return port


def default_host() -> str:
    """Like Node: all interfaces, IPv6 dual-stack when the machine has IPv6."""
    return "::" if socket.has_ipv6 and _ipv6_works() else "0.0.0.0"


def _ipv6_works() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM):
            return True
    except OSError:
        return False


def parse(address: Any, *, udp: bool = False) -> Address:
    """Parse every form ``cluster.listen`` takes (not socket objects).

    ``8000``, ``("host", 8000)``, ``"host:8000"``, ``"[::1]:8000"``,
    ``"unix:/path"`` (or an absolute path), ``{"fd": n}``,
    ``{"port": 8000, "host": "..."}``, ``{"path": "/p"}``.
    """
    if isinstance(address, bool):
        raise ValueError(f"bad listen address {address!r}")
    if isinstance(address, int):
        return Address("tcp", default_host(), _port(address, str(address)), udp=udp)
    if isinstance(address, dict):
        if "fd" in address:
            fd = int(address["fd"])
            if fd < 0:
                raise ValueError(f"bad fd {fd}")
            return Address("fd", fd=fd, udp=udp)
        if "path" in address:
            return parse("unix:" + str(address["path"]), udp=udp)
        host = address.get("host") or default_host()
        return Address("tcp", str(host), _port(address.get("port", 0), str(address)), udp=udp)
    if isinstance(address, tuple) and len(address) >= 2:
        host = address[0] or default_host()
        return Address("tcp", str(host), _port(address[1], str(address)), udp=udp)
    if isinstance(address, str):
        text = address.strip()
        if text.startswith("unix:"):
            path = text[5:]
            if not path:
                raise ValueError(f"bad listen address {address!r}: empty unix path")
            if udp:
                raise ValueError("unix paths are stream sockets; type='udp' needs host:port")
            return Address("unix", path=os.path.abspath(path))
        if text.startswith("/") or text.startswith("./"):
            return Address("unix", path=os.path.abspath(text))
        if text.startswith("fd://"):
            return Address("fd", fd=int(text[5:]), udp=udp)
        if text.startswith("["):
            host, sep, port = text[1:].partition("]:")
            if not sep:
                raise ValueError(f"bad listen address {address!r}: expected [v6]:port")
            return Address("tcp", host, _port(port, address), udp=udp)
        if text.isdigit():
            return Address("tcp", default_host(), _port(text, address), udp=udp)
        host, sep, port = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"bad listen address {address!r}: expected host:port")
        return Address("tcp", host or default_host(), _port(port, address), udp=udp)
    raise ValueError(f"bad listen address {address!r}")


def describe(sock: socket.socket, *, udp: bool | None = None) -> dict[str, Any]:
    """The ``'listening'`` dict: ``{'address', 'port', 'address_type'}``."""
    if udp is None:
        udp = sock.type == socket.SOCK_DGRAM
    if sock.family == socket.AF_UNIX:
        name = sock.getsockname()
        if isinstance(name, bytes):
            name = name.decode(errors="replace")
        return {"address": name, "port": None, "address_type": ADDRESS_TYPE_UNIX}
    host, port = sock.getsockname()[:2]
    six = sock.family == socket.AF_INET6
    kind: int | str = ("udp6" if six else "udp4") if udp else (6 if six else 4)
    return {"address": host, "port": port, "address_type": kind}


class Acceptor:
    """``sock.accept()`` for one listening socket, without its per-call cost.

    ``socket.accept()`` reads the listening socket's family and type through
    properties that build enum members on every call (about 3 µs of a 12 µs
    accept on CPython 3.11); these are read once here. The result is the
    same: the connection and the peer's address, the connection blocking
    unless a default timeout is set.
    """

    __slots__ = ("_accept", "_kind", "_sock")

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        # The C method socket.accept() wraps (not in the type stubs).
        self._accept = sock._accept  # type: ignore[attr-defined]
        self._kind = (int(sock.family), int(sock.type), sock.proto)

    def __call__(self) -> tuple[socket.socket, Any]:
        fd, addr = self._accept()
        family, kind, proto = self._kind
        conn = socket.socket(family, kind, proto, fd)
        if socket.getdefaulttimeout() is None and self._sock.gettimeout():
            conn.setblocking(True)  # as socket.accept() does
        return conn, addr


def open_socket(
    addr: Address, *, backlog: int = 511, reuse_port: bool = False, port: int | None = None
) -> socket.socket:
    """Bind (and for TCP listen on) what ``addr`` names. Raises OSError."""
    if addr.kind == "fd":
        assert addr.fd is not None
        sock = socket.socket(fileno=os.dup(addr.fd))
        sock.set_inheritable(False)
        if sock.type == socket.SOCK_STREAM:
            try:
                sock.listen(backlog)
            except OSError:
                pass
        return sock
    if addr.kind == "unix":
        assert addr.path is not None
        _remove_stale_unix_socket(addr.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(addr.path)
            sock.listen(backlog)
        except OSError:
            sock.close()
            raise
        return sock
    host = addr.host or default_host()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    kind = socket.SOCK_DGRAM if addr.udp else socket.SOCK_STREAM
    sock = socket.socket(family, kind)
    try:
        if not addr.udp:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port and hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6 and host == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, addr.port if port is None else port))
        if not addr.udp:
            sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def _remove_stale_unix_socket(path: str) -> None:
    """Remove a socket file nobody listens on; leave a live one (bind then fails)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
    except OSError:
        pass
    finally:
        probe.close()
