"""The primary role of the cluster: forks workers and owns the listening sockets.

Theory of operation
-------------------
For every worker the primary holds the parent end of its channel and a
pidfd. Both are watched on the primary's asyncio loop: channel frames go to
``_dispatch`` (internal acts through ``_ACTS``, user messages to
``'message'``), channel EOF to ``_on_disconnect`` and process exit to
``_on_exit``. Those two keep Node's order and guarantees: the per-worker
event fires before the cluster-wide one, and the worker leaves ``workers``
before the later of its ``'disconnect'``/``'exit'`` events (or as soon as
``worker.disconnect()`` is called). When an exit is seen first, the channel
is drained before ``'exit'`` so messages sent before dying are delivered.

Listening sockets live here, keyed by (address, port, type, fd, index):
``SharedHandle`` under SCHED_NONE and for UDP, ``RoundRobinHandle`` under
SCHED_RR.

Imports nothing from forkserve outside this package.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import subprocess
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any

from . import address as addr_mod
from .events import EventEmitter
from .ipc import (
    PARKED,
    SERIALIZATIONS,
    TAKEN,
    Channel,
    Handoff,
    Kind,
    pack_handoff,
    send_user,
    socket_from_fd,
    socketpair,
    unpack_taken,
)
from .listener import Listener
from .round_robin import HeadComplete, OnExpired, OnOverflow, RoundRobinHandle, WaitStats
from .shared_handle import SharedHandle
from .starter import (
    INSPECT_PORT_ENV,
    SERIALIZATION_ENV,
    WORKER_ID_ENV,
    ChildProcess,
    ExecStarter,
    Starter,
)
from .worker_object import State, Worker, signal_number

SCHED_NONE = 1
SCHED_RR = 2

SETTING_NAMES = (
    "exec",
    "args",
    "exec_argv",
    "cwd",
    "serialization",
    "silent",
    "stdio",
    "uid",
    "gid",
    "inspect_port",
    "windows_hide",
)

Handle = SharedHandle | RoundRobinHandle


def policy_from_env(value: str | None) -> int:
    """``FORKSERVE_SCHED_POLICY``: 'rr' or 'none'; unset means SCHED_RR."""
    if value is None or value == "":
        return SCHED_RR
    if value == "rr":
        return SCHED_RR
    if value == "none":
        return SCHED_NONE
    raise ValueError(f"FORKSERVE_SCHED_POLICY={value!r}: expected 'rr' or 'none'")


class _Record:
    """The primary's private facts about one worker."""

    __slots__ = ("channel", "disconnect_emitted", "exit_emitted", "kind", "pidfd", "writer")

    def __init__(self, channel: Channel, kind: Kind) -> None:
        self.channel = channel
        self.pidfd = -1
        self.kind = kind
        self.disconnect_emitted = False
        self.exit_emitted = False
        self.writer = False


class Primary(EventEmitter):
    """The primary role. ``cluster`` in the primary delegates here."""

    is_primary = True

    def __init__(
        self,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        starter: Starter | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.loop = loop or asyncio.new_event_loop()
        self._loop = self.loop
        self.starter: Starter = starter or ExecStarter()
        self.workers: dict[int, Worker] = {}
        self._settings: dict[str, Any] = {}
        self._environ = os.environ if environ is None else environ
        self._policy: int | None = None
        self._frozen = False
        self._ids = 0
        self._records: dict[int, _Record] = {}
        self._handles: dict[str, Handle] = {}
        self._live: dict[int, Worker] = {}
        self._disconnect_callbacks: list[Callable[[], Any]] = []
        self._idle: asyncio.Event | None = None
        # Options of the SCHED_RR handles opened from now on (round_robin.py):
        # the defaults are Node's behaviour; the server built on the cluster
        # sets them, injecting whatever depends on the protocol it speaks.
        self.max_pending = 0
        self.wait_for_data = 0.0
        self.head_complete: HeadComplete | None = None
        # Round robin: how long a connection a worker gave back (parked) may
        # stay idle in the primary before it is closed.
        self.park_timeout = 0.0
        self.on_overflow: OnOverflow | None = None
        self.on_expired: OnExpired | None = None
        # A round-robin handle whose last worker leaves keeps its socket and
        # the connections waiting in it for the next worker (a server that
        # replaces workers loses nothing while its pool is empty), until
        # disconnect(). Off: Node's behaviour, the handle closes.
        self.keep_handles = False
        self._disconnecting = False
        # How long connections waited in every round-robin handle, from
        # accept to being taken by a worker (handles come and go; this stays).
        self.rr_wait = WaitStats()

    # -- settings and policy ----------------------------------------------------

    @property
    def settings(self) -> Mapping[str, Any]:
        return types.MappingProxyType(self._settings)

    @property
    def scheduling_policy(self) -> int:
        if self._policy is None:
            try:
                return policy_from_env(self._environ.get("FORKSERVE_SCHED_POLICY"))
            except ValueError:
                return SCHED_RR
        return self._policy

    @scheduling_policy.setter
    def scheduling_policy(self, value: int) -> None:
        if value not in (SCHED_NONE, SCHED_RR):
            raise ValueError(
                f"scheduling_policy must be SCHED_NONE (1) or SCHED_RR (2), not {value!r}"
            )
        if self._frozen:
            if value != self._policy:
                raise RuntimeError(
                    "scheduling_policy is frozen once setup_primary() or fork() has been called"
                )
            return
        self._policy = value

    def setup_primary(self, **settings: Any) -> None:
        """Merge ``settings`` (later values win) for future forks; emits ``'setup'``."""
        unknown = sorted(set(settings) - set(SETTING_NAMES))
        if unknown:
            raise TypeError(
                f"setup_primary() got unknown setting(s): {', '.join(unknown)}; "
                f"expected some of: {', '.join(SETTING_NAMES)}"
            )
        if "serialization" in settings and settings["serialization"] not in SERIALIZATIONS:
            raise ValueError(
                f"serialization must be 'json' or 'advanced', not {settings['serialization']!r}"
            )
        if "inspect_port" in settings:
            port = settings["inspect_port"]
            if port is not None and not callable(port) and not isinstance(port, int):
                raise TypeError("inspect_port must be a number or a callable returning one")
        merged: dict[str, Any] = {
            "args": list(sys.argv[1:]),
            "exec": os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else "",
            "exec_argv": subprocess._args_from_interpreter_flags(),  # type: ignore[attr-defined]  # the stdlib's own helper
            "silent": False,
            "serialization": "json",
        }
        merged.update(self._settings)
        merged.update(settings)
        self._settings = merged
        if not self._frozen:
            if self._policy is None:
                self._policy = policy_from_env(self._environ.get("FORKSERVE_SCHED_POLICY"))
            self._frozen = True
        snapshot = dict(merged)
        self.loop.call_soon(self.emit, "setup", snapshot)

    # -- fork -------------------------------------------------------------------

    def fork(self, env: Mapping[str, Any] | None = None) -> Worker:
        """Start a worker; ``env`` adds variables to its environment."""
        self.setup_primary()
        self._disconnecting = False
        settings = self._settings
        self._ids += 1
        worker_id = self._ids
        child_env = {key: str(value) for key, value in self._environ.items()}
        child_env.update({key: str(value) for key, value in (env or {}).items()})
        child_env[WORKER_ID_ENV] = str(worker_id)
        child_env[SERIALIZATION_ENV] = settings.get("serialization", "json")
        child_env[INSPECT_PORT_ENV] = str(self._inspect_port(worker_id))
        parent_sock, child_sock = socketpair()
        try:

            def close_in_child() -> None:
                parent_sock.close()
                self.close_inherited()

            process = self.starter.start(
                worker_id, settings, child_env, child_sock.fileno(), close_in_child
            )
        except BaseException:
            parent_sock.close()
            child_sock.close()
            raise
        child_sock.close()
        channel = Channel(parent_sock)
        record = _Record(channel, SERIALIZATIONS[settings.get("serialization", "json")])
        worker = Worker(worker_id, process, self)
        worker._loop = self.loop
        self._records[worker_id] = record
        self.workers[worker_id] = worker
        self._live[worker_id] = worker
        channel.on_write_pending = lambda: self._want_write(worker_id)
        self.loop.add_reader(channel.fileno(), self._on_readable, worker)
        record.pidfd = os.pidfd_open(process.pid)
        self.loop.add_reader(record.pidfd, self._on_exit, worker)
        self.loop.call_soon(self.emit, "fork", worker)
        return worker

    def _inspect_port(self, worker_id: int) -> int:
        port = self._settings.get("inspect_port")
        if callable(port):
            return int(port())
        if port is not None:
            return int(port)
        base = int(self._environ.get(INSPECT_PORT_ENV, "9229") or 9229)
        return base + worker_id

    def close_inherited(self) -> None:
        """In a process forked from the primary (a worker, a template): close
        everything the primary owns, its loop included."""
        for record in self._records.values():
            try:
                record.channel.sock.close()
            except OSError:
                pass
            if record.pidfd >= 0:
                _close_quietly(record.pidfd)
        for handle in self._handles.values():
            for fd in handle.fds():
                _close_quietly(fd)
        _abandon_loop(self.loop)

    # -- channel ----------------------------------------------------------------

    def _want_write(self, worker_id: int) -> None:
        record = self._records.get(worker_id)
        if record is None or record.writer:
            return
        record.writer = True
        self.loop.add_writer(record.channel.fileno(), self._on_writable, worker_id)

    def _on_writable(self, worker_id: int) -> None:
        record = self._records.get(worker_id)
        if record is None:
            return
        record.channel.handle_writable()
        if not record.channel.write_pending or not record.channel.connected:
            record.writer = False
            self.loop.remove_writer(record.channel.fileno())

    def _on_readable(self, worker: Worker) -> None:
        record = self._records.get(worker.id)
        if record is None or not record.channel.connected:
            return
        for frame in record.channel.receive():
            self._dispatch(worker, frame.kind, frame.body, frame.fds)
        if record.channel.eof:
            self._on_disconnect(worker)

    def _dispatch(self, worker: Worker, kind: Kind, body: Any, fds: tuple[int, ...]) -> None:
        if kind is Kind.CONN:
            self._on_taken(worker, body, fds)
            return
        if kind is Kind.INTERNAL:
            act = self._ACTS.get(body.get("act"))
            if act is not None:
                act(self, worker, body)
            for fd in fds:
                _close_quietly(fd)
            return
        handle = socket_from_fd(fds[0]) if fds else None
        for fd in fds[1:]:
            _close_quietly(fd)
        worker.emit("message", body, handle)
        self.emit("message", worker, body, handle)

    def _on_taken(self, worker: Worker, payload: bytes, fds: tuple[int, ...]) -> None:
        """Round-robin connections a worker took, refused or gave back (parked)."""
        try:
            records = unpack_taken(payload)
        except ValueError:
            records = []
        spare = list(fds)
        for record in records:
            rr = self._handles.get(record.key)
            if record.state == PARKED:
                if not spare:
                    break
                conn = socket_from_fd(spare.pop(0), record.family)
                if isinstance(rr, RoundRobinHandle):
                    rr.park(conn, record.peer, record.flags)
                else:
                    conn.close()
            elif isinstance(rr, RoundRobinHandle):
                rr.ack(worker.id, record.token, record.state == TAKEN)
        for fd in spare:
            _close_quietly(fd)

    def _send_internal(
        self, worker: Worker, body: dict[str, Any], handles: tuple[Any, ...] = ()
    ) -> bool:
        record = self._records.get(worker.id)
        if record is None or not record.channel.connected:
            return False
        return record.channel.send(Kind.INTERNAL, body, handles)

    # -- internal acts ----------------------------------------------------------

    def _act_online(self, worker: Worker, body: dict[str, Any]) -> None:
        worker.state = State.ONLINE
        worker.emit("online")
        self.emit("online", worker)

    def _act_query_server(self, worker: Worker, body: dict[str, Any]) -> None:
        if worker.exited_after_disconnect:
            return
        address = addr_mod.Address.from_message(body["address"])
        key = f"{address.key()}:{body.get('index', 0)}"
        handle = self._handles.get(key)
        reply: dict[str, Any] = {"ack": body["seq"], "key": key}
        if handle is None:
            try:
                handle = self._open_handle(key, address, body)
            except OSError as exc:
                reply.update(errno=exc.errno or errno.EINVAL, strerror=exc.strerror or str(exc))
                self._send_internal(worker, reply)
                return
            self._handles[key] = handle
        handle.add(worker.id, int(body.get("credits", 1)))
        if isinstance(handle, RoundRobinHandle):
            reply["sockname"] = addr_mod.describe(handle.sock)
            self._send_internal(worker, reply)
        else:
            self._send_internal(worker, reply, (handle.sock,))

    def _open_handle(self, key: str, address: addr_mod.Address, body: dict[str, Any]) -> Handle:
        sock = addr_mod.open_socket(
            address, backlog=int(body.get("backlog", 511)), reuse_port=bool(body.get("reuse_port"))
        )
        if self.scheduling_policy == SCHED_RR and sock.type == socket.SOCK_STREAM:
            return RoundRobinHandle(
                key,
                sock,
                self.loop,
                self._send_conn,
                self.max_pending,
                wait_for_data=self.wait_for_data,
                head_complete=self.head_complete,
                park_timeout=self.park_timeout,
                on_overflow=self.on_overflow,
                on_expired=self.on_expired,
                wait=self.rr_wait,
            )
        return SharedHandle(key, sock)

    def _send_conn(self, worker_id: int, conn: socket.socket, handoff: Handoff) -> bool:
        record = self._records.get(worker_id)
        if record is None or not record.channel.connected:
            return False
        return record.channel.send(Kind.CONN, pack_handoff(handoff), (conn,))

    def _act_listening(self, worker: Worker, body: dict[str, Any]) -> None:
        info = {
            "address": body.get("address"),
            "port": body.get("port"),
            "address_type": body.get("address_type"),
        }
        if worker.state in (State.NONE, State.ONLINE, State.LISTENING):
            worker.state = State.LISTENING
        worker.emit("listening", info)
        self.emit("listening", worker, info)

    def _act_close(self, worker: Worker, body: dict[str, Any]) -> None:
        handle = self._handles.get(body.get("key", ""))
        if handle is not None and self._remove_from(handle, worker):
            del self._handles[handle.key]

    def _remove_from(self, handle: Handle, worker: Worker) -> bool:
        """Take ``worker`` off ``handle``; True when the handle closed."""
        if isinstance(handle, RoundRobinHandle):
            return handle.remove(worker.id, keep=self.keep_handles and not self._disconnecting)
        return handle.remove(worker.id)

    def _act_exited_after_disconnect(self, worker: Worker, body: dict[str, Any]) -> None:
        worker.exited_after_disconnect = True
        self._send_internal(worker, {"ack": body.get("seq")})

    _ACTS: dict[str, Callable[[Primary, Worker, dict[str, Any]], None]] = {
        "online": _act_online,
        "queryServer": _act_query_server,
        "listening": _act_listening,
        "close": _act_close,
        "exitedAfterDisconnect": _act_exited_after_disconnect,
    }

    # -- disconnect / exit --------------------------------------------------------

    def _remove_handles_for(self, worker: Worker) -> None:
        for key, handle in list(self._handles.items()):
            if self._remove_from(handle, worker):
                del self._handles[key]

    def _remove_worker(self, worker: Worker) -> None:
        if self.workers.pop(worker.id, None) is None:
            return
        if not self.workers:
            callbacks, self._disconnect_callbacks = self._disconnect_callbacks, []
            for callback in callbacks:
                self.loop.call_soon(callback)

    def _on_disconnect(self, worker: Worker) -> None:
        record = self._records.get(worker.id)
        if record is None or record.disconnect_emitted:
            return
        record.disconnect_emitted = True
        self._close_channel(record)
        self._remove_handles_for(worker)
        if worker.is_dead():
            self._remove_worker(worker)
        worker.exited_after_disconnect = bool(worker.exited_after_disconnect)
        worker.state = State.DISCONNECTED
        worker.emit("disconnect")
        self.emit("disconnect", worker)
        self._event_done(worker)

    def _close_channel(self, record: _Record) -> None:
        fd = record.channel.fileno()
        try:
            self.loop.remove_reader(fd)
            if record.writer:
                self.loop.remove_writer(fd)
                record.writer = False
        except (ValueError, OSError):
            pass
        record.channel.close()

    def _on_exit(self, worker: Worker) -> None:
        record = self._records.get(worker.id)
        if record is None:
            return
        process: ChildProcess = worker.process
        if process.poll() is None:
            return
        self.loop.remove_reader(record.pidfd)
        _close_quietly(record.pidfd)
        record.pidfd = -1
        if record.channel.connected and not record.channel.eof:
            # Deliver what it sent before dying, and its disconnect, first.
            self._on_readable(worker)
        if not record.disconnect_emitted and (record.channel.eof or not record.channel.connected):
            self._on_disconnect(worker)
        if not worker.is_connected():
            self._remove_handles_for(worker)
            self._remove_worker(worker)
        worker.exited_after_disconnect = bool(worker.exited_after_disconnect)
        worker.state = State.DEAD
        record.exit_emitted = True
        worker.emit("exit", process.exit_code, process.signal_code)
        self.emit("exit", worker, process.exit_code, process.signal_code)
        self._event_done(worker)

    def _event_done(self, worker: Worker) -> None:
        record = self._records.get(worker.id)
        if record is None or not (record.disconnect_emitted and record.exit_emitted):
            return
        del self._records[worker.id]
        self._live.pop(worker.id, None)
        self.loop.call_soon(self._check_idle)

    def _check_idle(self) -> None:
        if not self._live and self._idle is not None:
            self._idle.set()

    # -- Worker backend -----------------------------------------------------------

    def worker_is_connected(self, worker: Worker) -> bool:
        record = self._records.get(worker.id)
        return record is not None and record.channel.connected and not record.channel.eof

    def worker_is_dead(self, worker: Worker) -> bool:
        return worker.process.returncode is not None

    def worker_send(
        self, worker: Worker, message: Any, handle: Any, callback: Any, keep_open: bool
    ) -> bool:
        record = self._records.get(worker.id)

        def on_error(exc: BaseException) -> None:
            self.loop.call_soon(worker.emit, "error", exc)

        channel = record.channel if record is not None else None
        kind = record.kind if record is not None else Kind.JSON
        return send_user(channel, kind, message, handle, callback, keep_open, on_error)

    def worker_disconnect(self, worker: Worker) -> None:
        worker.exited_after_disconnect = True
        self._send_internal(worker, {"act": "disconnect"})
        self._remove_handles_for(worker)
        self._remove_worker(worker)

    def worker_kill(self, worker: Worker, sig: str | int) -> None:
        signum = signal_number(sig)
        worker.exited_after_disconnect = True
        record = self._records.get(worker.id)
        if record is not None and record.channel.connected and not record.channel.eof:
            record.channel.flush(1.0)
            self._close_channel(record)
            self.loop.call_soon(self._on_disconnect, worker)
        worker.process.kill(signum)

    # -- cluster-wide -------------------------------------------------------------

    def disconnect(self, callback: Callable[[], Any] | None = None) -> None:
        """Disconnect every worker; ``callback()`` once all are gone and handles closed."""
        if callback is not None:
            self._disconnect_callbacks.append(callback)
        self._disconnecting = True
        for key, handle in list(self._handles.items()):
            if isinstance(handle, RoundRobinHandle) and not handle.queue.workers:
                handle.close()  # kept for workers that will not come now
                del self._handles[key]
        if not self.workers:
            callbacks, self._disconnect_callbacks = self._disconnect_callbacks, []
            for item in callbacks:
                self.loop.call_soon(item)
            return
        for worker in list(self.workers.values()):
            if worker.is_connected():
                worker.disconnect()

    def listen(self, address: Any, **options: Any) -> Listener:
        """In the primary the caller gets its own socket; nothing is shared."""
        kind = options.pop("type", "tcp")
        backlog = int(options.pop("backlog", 511))
        reuse_port = bool(options.pop("reuse_port", False))
        options.pop("exclusive", None)
        options.pop("credits", None)
        if options:
            raise TypeError(f"unknown listen option(s): {', '.join(sorted(options))}")
        udp = kind == "udp"
        if isinstance(address, socket.socket):
            sock = address
        else:
            sock = addr_mod.open_socket(
                addr_mod.parse(address, udp=udp), backlog=backlog, reuse_port=reuse_port
            )
        listener = Listener("own", addr_mod.describe(sock, udp=udp), sock=sock, loop=self.loop)
        if not isinstance(address, socket.socket):
            listener.backlog = backlog
        return listener

    async def wait_idle(self) -> None:
        """Return when no worker is left alive (both its events emitted)."""
        self._idle = asyncio.Event()
        await asyncio.sleep(0)
        while self._live:
            self._idle.clear()
            await self._idle.wait()
            # Let handlers of the last exit fork replacements before deciding.
            await asyncio.sleep(0)

    async def pause_accepting(self, timeout: float) -> int:
        """Round robin: stop accepting, then wait up to ``timeout`` seconds
        until every connection already accepted has been taken by a worker.

        Called before the workers are disconnected for a graceful stop, so a
        connection the primary accepted is served, not reset. A handle whose
        workers are all gone (they were signalled with the primary, as a
        terminal's Ctrl-C or systemd's stop does) cannot drain: what it holds
        is closed at once instead of waiting out the timeout. Returns how many
        connections were left unserved (closed, or still held at the
        deadline). Shared handles (SCHED_NONE) have nothing to pause: workers
        accept for themselves.
        """
        handles = [h for h in self._handles.values() if isinstance(h, RoundRobinHandle)]
        for handle in handles:
            handle.pause()
        deadline = self.loop.time() + timeout
        dropped = 0

        def settled(handle: RoundRobinHandle) -> bool:
            nonlocal dropped
            if handle.drained or handle.closed:
                return True
            if not handle.queue.workers:
                dropped += handle.drop_held()
                return True
            return False

        while not all([settled(handle) for handle in handles]):
            if self.loop.time() >= deadline:
                return dropped + sum(h.held_count for h in handles if not h.closed)
            await asyncio.sleep(0.01)
        return dropped

    def run(self) -> None:
        """Run the loop until no worker is left alive."""
        if self.loop.is_running():
            raise RuntimeError("cluster.run() called while the cluster loop is running")
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.wait_idle())

    def live_workers(self) -> list[Worker]:
        """Workers whose ``'disconnect'`` and ``'exit'`` have not both been emitted."""
        return list(self._live.values())

    @property
    def handles(self) -> Mapping[str, Handle]:
        return types.MappingProxyType(self._handles)

    def pending_connections(self) -> int:
        """Connections waiting in the primary across round-robin handles."""
        return sum(
            len(h.queue.pending) for h in self._handles.values() if isinstance(h, RoundRobinHandle)
        )


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _abandon_loop(loop: asyncio.AbstractEventLoop) -> None:
    """In a forked child: drop the parent's loop without touching shared state.

    Closing the epoll descriptor (rather than unregistering) leaves the
    parent's registrations intact; the self-pipe is closed so a signal in the
    child cannot wake the parent.
    """
    asyncio.events._set_running_loop(None)
    selector = getattr(loop, "_selector", None)
    inner = getattr(selector, "_selector", None)
    if inner is not None and hasattr(inner, "close"):
        inner.close()
    for name in ("_ssock", "_csock"):
        sock = getattr(loop, name, None)
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
