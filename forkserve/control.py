"""The control socket: where ``forkserve ctl`` talks to a running primary.

Where it is (``--control-socket``): ``auto`` puts it beside the pidfile when
``--pid`` is given (``app.pid`` -> ``app.ctl``), else in the runtime
directory (``runtime_dir()``) as ``<primary pid>.ctl``; ``off`` disables it;
anything else is the path. The socket is created with mode 0600 under a
restrictive umask (there is no moment when it is wider), a stale socket
left by a server that died is replaced, and a path a live server answers
on is refused. The runtime directory is created 0700 and must be ours.

The protocol is one JSON object per line each way, over a Unix stream
socket; a client may send several requests on one connection::

    -> {"command": "scale", "args": [3]}
    <- {"ok": true, "result": {...}}
    <- {"ok": false, "error": "scale: expected a number of workers >= 1"}

``ControlServer`` serves it on the primary's asyncio loop and dispatches to
the handlers it is given (command name -> function of the argument list,
returning JSON-ready data, or an awaitable of it; ``CommandError`` is the
client's mistake). It knows nothing of the arbiter, the cluster or HTTP:
it imports nothing from forkserve but ``errors`` and ``sideband``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from forkserve.errors import BindError
from forkserve.process import alive
from forkserve.sideband import SidebandServer, receive, send_all

LOG = logging.getLogger("forkserve.arbiter")

SUFFIX = ".ctl"
MAX_LINE = 65536  # bytes of one request line
IDLE_TIMEOUT = 60.0  # seconds a client may stay silent between requests
SEND_TIMEOUT = 10.0
MAX_CLIENTS = 16

Handler = Callable[[list[Any]], Any | Awaitable[Any]]


class CommandError(Exception):
    """A request the server refuses; the message goes back to the client."""


# -- where -----------------------------------------------------------------------


def runtime_dir() -> str:
    """Where ``auto`` control sockets live (the directory is not created here).

    ``$XDG_RUNTIME_DIR/forkserve``, else ``/run/forkserve`` for root when
    ``/run`` is writable, else ``/tmp/forkserve-<uid>``.
    """
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if xdg and os.path.isabs(xdg) and os.path.isdir(xdg):
        return os.path.join(xdg, "forkserve")
    if os.geteuid() == 0 and os.path.isdir("/run") and os.access("/run", os.W_OK):
        return "/run/forkserve"
    return f"/tmp/forkserve-{os.getuid()}"


def beside_pidfile(pidfile: str) -> str:
    """``app.pid`` -> ``app.ctl`` (another name gets ``.ctl`` appended)."""
    root, ext = os.path.splitext(pidfile)
    return root + SUFFIX if ext == ".pid" else pidfile + SUFFIX


def control_path(setting: str | None, pidfile: str | None, pid: int) -> str | None:
    """The control socket's path for ``--control-socket`` (None: disabled).

    For ``auto`` without ``--pid`` the runtime directory is created (0700)
    and checked to be ours.
    """
    value = (setting or "auto").strip()
    if value == "off":
        return None
    if value != "auto":
        return os.path.abspath(value)
    if pidfile:
        return os.path.abspath(beside_pidfile(pidfile))
    directory = runtime_dir()
    ensure_private_dir(directory)
    sweep_stale(directory)
    return os.path.join(directory, f"{pid}{SUFFIX}")


def sweep_stale(directory: str) -> None:
    """Remove ``<pid>.ctl`` sockets left by servers that died (killed, say)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        stem = name[: -len(SUFFIX)]
        if not name.endswith(SUFFIX) or not stem.isdigit() or alive(int(stem)):
            continue
        path = os.path.join(directory, name)
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.lstat(path).st_mode) and not answers(path):
                os.unlink(path)


def ensure_private_dir(path: str) -> None:
    """Create ``path`` with mode 0700 unless it exists; it must be a directory
    owned by us, and is made 0700 if it is wider (others could plant sockets)."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise BindError(
            f"control socket directory {path}: cannot create it ({exc.strerror}); "
            "use --control-socket PATH or off"
        ) from None
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise BindError(
            f"control socket directory {path}: not a directory; remove it or use "
            "--control-socket PATH"
        )
    if info.st_uid != os.geteuid():
        raise BindError(
            f"control socket directory {path}: owned by uid {info.st_uid}, not {os.geteuid()}; "
            "remove it or use --control-socket PATH"
        )
    if info.st_mode & 0o077:
        os.chmod(path, 0o700)


_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid


def listening_pid(path: str, timeout: float = 1.0) -> int | None:
    """The pid of the process listening on the Unix socket ``path`` (0 when
    someone is there but unknown), None when nobody is."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(timeout)
    try:
        probe.connect(path)
        pid = _UCRED.unpack(probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))[0]
        return int(pid)
    except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
        return None
    except OSError as exc:
        # EACCES, a timeout: someone is there.
        return None if exc.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK) else 0
    finally:
        probe.close()


def answers(path: str, timeout: float = 1.0) -> bool:
    """True when something accepts connections on the Unix socket ``path``."""
    return listening_pid(path, timeout) is not None


def bind_control_socket(path: str, successor_of: int | None = None) -> socket.socket:
    """A listening Unix socket at ``path``, mode 0600 from the start.

    A socket nobody answers on (its server died) is replaced; one a server
    answers on, or any other kind of file, is an error, unless that server
    is ``successor_of`` (the primary this one upgrades: the path moves here).
    """
    if os.path.lexists(path):
        mode = os.lstat(path).st_mode
        if not stat.S_ISSOCK(mode):
            raise BindError(
                f"control socket {path}: a file that is not a socket is there; "
                "remove it or choose another --control-socket"
            )
        holder = listening_pid(path)
        if holder is not None and (holder != successor_of or not holder):
            raise BindError(
                f"control socket {path}: a running server answers there; stop it, "
                "or choose another --control-socket (or --pid)"
            )
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
        sock.listen(MAX_CLIENTS)
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        if exc.errno == errno.EACCES:
            reason = "permission denied"
        raise BindError(
            f"control socket {path}: {reason}; choose another --control-socket or off"
        ) from None
    finally:
        os.umask(old)
    sock.set_inheritable(False)
    sock.setblocking(False)
    return sock


# -- serving -----------------------------------------------------------------------


def _encode(response: Mapping[str, Any]) -> bytes:
    return json.dumps(response, separators=(",", ":"), default=str).encode("utf-8") + b"\n"


class ControlServer:
    """Serves the control protocol at ``path`` on the running loop."""

    def __init__(self, path: str, commands: Mapping[str, Handler]) -> None:
        self.path = path
        self.commands = dict(commands)
        self._server: SidebandServer | None = None
        self._identity: tuple[int, int] | None = None

    def bind(self, successor_of: int | None = None) -> None:
        """Create the socket (``BindError`` says why it cannot be)."""
        sock = bind_control_socket(self.path, successor_of)
        info = os.stat(self.path)
        self._identity = (info.st_dev, info.st_ino)
        self._server = SidebandServer(
            sock, self._serve_client, name="control socket", max_clients=MAX_CLIENTS
        )

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._server is None:
            self.bind()
        assert self._server is not None
        self._server.start(loop)

    async def answer(self, line: bytes) -> dict[str, Any]:
        """The response to one request line."""
        usage = 'expected a JSON object such as {"command": "status"}'
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            return {"ok": False, "error": usage}
        if not isinstance(request, dict) or not isinstance(request.get("command"), str):
            return {"ok": False, "error": usage}
        name = request["command"]
        args = request.get("args", [])
        if not isinstance(args, list):
            return {"ok": False, "error": f"{name}: args must be a JSON array"}
        handler = self.commands.get(name)
        if handler is None:
            known = ", ".join(sorted(self.commands))
            return {"ok": False, "error": f"unknown command {name!r}; commands: {known}"}
        try:
            result = handler(args)
            if inspect.isawaitable(result):
                result = await result
        except CommandError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:
            LOG.exception("control command %s failed", name)
            return {"ok": False, "error": f"{name} failed: {exc}"}
        return {"ok": True, "result": result}

    async def _serve_client(self, conn: socket.socket) -> None:
        buffer = b""
        while True:
            newline = buffer.find(b"\n")
            if newline < 0:
                if len(buffer) > MAX_LINE:
                    await send_all(conn, _encode({"ok": False, "error": "request too long"}), 1.0)
                    return
                chunk = await receive(conn, 65536, IDLE_TIMEOUT)
                if not chunk:
                    return  # the client is done
                buffer += chunk
                continue
            line, buffer = buffer[:newline], buffer[newline + 1 :]
            if line.strip():
                await send_all(conn, _encode(await self.answer(line)), SEND_TIMEOUT)

    def reclaim(self, loop: asyncio.AbstractEventLoop) -> None:
        """Bind the path again if another primary took it over and has left
        (a failed or rolled-back upgrade); nothing if the path is still ours."""
        with contextlib.suppress(OSError):
            info = os.stat(self.path)
            if (info.st_dev, info.st_ino) == self._identity:
                return
        if self._server is not None:
            self._server.close()
            self._server = None
        self._identity = None
        try:
            self.bind()
        except (BindError, OSError) as exc:
            LOG.warning("control socket not restored: %s", exc)
            return
        self.start(loop)
        LOG.info("control socket at %s again", self.path)

    def close_in_child(self) -> None:
        """In a process forked from the primary: close the inherited sockets."""
        if self._server is not None:
            self._server.close_in_child()

    def close(self) -> None:
        """Stop serving and remove the socket (if it is still ours)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._identity is not None:
            with contextlib.suppress(OSError):
                info = os.stat(self.path)
                if (info.st_dev, info.st_ino) == self._identity:
                    os.unlink(self.path)
            self._identity = None


def parse_scale(args: list[Any]) -> int:
    """``scale N``'s argument: a whole number >= 1."""
    if len(args) != 1:
        raise CommandError("scale: expected one argument, the number of workers")
    value = args[0]
    try:
        count = int(value) if not isinstance(value, bool) else -1
    except (TypeError, ValueError):
        count = -1
    if isinstance(value, float) and not value.is_integer():
        count = -1
    if count < 1:
        raise CommandError(f"scale: expected a number of workers >= 1, got {value!r}")
    return count
