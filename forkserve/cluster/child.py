"""The worker role of the cluster: ``cluster`` inside a worker process.

Theory of operation
-------------------
The child owns its end of the IPC channel. It reads the channel on its
event loop (``loop.add_reader``) and, when the process is blocked outside the
loop (a sync worker in ``Listener.accept()``, or ``cluster.listen`` waiting
for the primary's answer), by pumping it directly with ``poll()`` /
``wait_readable()``. Either way every frame goes through ``_dispatch``:
internal acts by the table ``_ACTS``, replies to the requests it made, and
user messages to ``cluster.worker``'s ``'message'`` handlers.

When the channel closes without a deliberate disconnect (the primary died),
the worker emits ``'disconnect'`` and exits with code 0 (Node's child.js
does the same), so nothing is orphaned.

Imports nothing from forkserve outside this package.
"""

from __future__ import annotations

import asyncio
import errno
import os
import select
import socket
import traceback
from collections.abc import Callable
from typing import Any

from . import address as addr_mod
from .address import describe_target
from .events import EventEmitter
from .ipc import (
    NONBLOCKING,
    PARKED,
    REFUSED,
    SERIALIZATIONS,
    TAKEN,
    Channel,
    ChannelClosed,
    Kind,
    Record,
    pack_taken,
    send_user,
    socket_from_fd,
    unpack_handoff,
)
from .listener import Listener
from .worker_object import State, Worker, signal_number


class WorkerProcess:
    """``cluster.worker.process`` inside a worker: this process."""

    def __init__(self) -> None:
        self.pid = os.getpid()

    @property
    def ppid(self) -> int:
        return os.getppid()

    def kill(self, sig: str | int = "SIGTERM") -> None:
        os.kill(self.pid, signal_number(sig))

    def __repr__(self) -> str:
        return f"<WorkerProcess pid={self.pid}>"


class Child(EventEmitter):
    """The worker role. One per worker process."""

    is_primary = False

    def __init__(
        self,
        worker_id: int,
        sock: socket.socket,
        serialization: str = "json",
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__()
        self.loop = loop or asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self._loop = self.loop
        self.user_kind = SERIALIZATIONS.get(serialization, Kind.JSON)
        self.channel = Channel(sock)
        self.channel_fd = self.channel.fileno()
        self.channel.on_write_pending = self._want_write
        self.worker = Worker(worker_id, WorkerProcess(), self)
        self.worker._loop = self.loop
        self.worker._handlers_changed = self._wake  # type: ignore[method-assign]  # keep-alive check
        self.worker.state = State.ONLINE
        self._seq = 0
        self._replies: dict[int, Callable[[dict[str, Any], tuple[int, ...]], None]] = {}
        self._listeners: dict[str, Listener] = {}
        self._indexes: dict[str, set[int]] = {}
        self._disconnecting = False
        self._channel_closed = False
        self._writer_registered = False
        self._wake_event: asyncio.Event | None = None
        # Parked connections waiting to go with the next acknowledgement.
        self._parked: list[tuple[Record, _OwnedFd]] = []
        self.loop.add_reader(self.channel_fd, self.poll)
        self._send_internal({"act": "online"})

    def attach_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Move the cluster onto ``loop`` (e.g. uvloop) before it runs.

        The channel reader, event handlers and listeners follow; the old loop
        is closed.
        """
        old = self.loop
        if old is loop:
            return
        if old.is_running():
            raise RuntimeError("attach_loop() needs the current cluster loop to be stopped")
        if self.connected:
            old.remove_reader(self.channel_fd)
        if self._writer_registered:
            old.remove_writer(self.channel_fd)
            self._writer_registered = False
        self.loop = self._loop = self.worker._loop = loop
        for listener in self._listeners.values():
            listener._loop = loop
        asyncio.set_event_loop(loop)
        if self.connected:
            loop.add_reader(self.channel_fd, self.poll)
        old.close()

    # -- state ----------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.channel.connected and not self.channel.eof

    def worker_is_connected(self, worker: Worker) -> bool:
        return self.connected

    def worker_is_dead(self, worker: Worker) -> bool:
        return False

    # -- reading the channel ----------------------------------------------------

    def poll(self) -> None:
        """Process whatever the channel holds now, without blocking."""
        if not self.connected:
            return
        frames = self.channel.receive()
        try:
            for frame in frames:
                self._dispatch(frame.kind, frame.body, frame.fds)
            if self.channel.eof:
                self._on_channel_closed()
        except Exception:
            # An exception escaping a 'message'/'disconnect' handler ends the
            # worker with status 1, as an uncaught exception ends a Node worker.
            traceback.print_exc()
            raise SystemExit(1) from None

    def wait_readable(self, timeout: float | None) -> bool:
        """Block until the channel has data (then process it); False if closed."""
        if not self.connected:
            return False
        self.flush_parked()
        if self.channel.write_pending:
            self.channel.flush(timeout)
        ready, _, _ = select.select([self.channel_fd], [], [], timeout)
        if ready:
            self.poll()
        return self.connected

    def _dispatch(self, kind: Kind, body: Any, fds: tuple[int, ...]) -> None:
        if kind is Kind.CONN:
            self._take_conn(body, fds)
            return
        if kind is not Kind.INTERNAL:
            handle = socket_from_fd(fds[0]) if fds else None
            for extra in fds[1:]:
                os.close(extra)
            self.worker.emit("message", body, handle)
            return
        if "ack" in body and "act" not in body:
            callback = self._replies.pop(body["ack"], None)
            if callback is not None:
                callback(body, fds)
            else:
                for fd in fds:
                    os.close(fd)
            return
        act = self._ACTS.get(body.get("act"))
        if act is not None:
            act(self, body, fds)
        else:
            for fd in fds:
                os.close(fd)

    def _take_conn(self, payload: bytes, fds: tuple[int, ...]) -> None:
        """A round-robin connection handed over by the primary."""
        try:
            handoff = unpack_handoff(payload)
        except ValueError:
            handoff = None
        if len(fds) != 1 or handoff is None or not handoff.key:
            for fd in fds:
                os.close(fd)
            return
        conn = socket_from_fd(fds[0], handoff.family)
        listener = self._listeners.get(handoff.key)
        if listener is None or listener.closed:
            conn.close()
            self.ack(handoff.key, handoff.token, accepted=False)
            return
        listener._deliver(conn, handoff)

    def _act_disconnect(self, body: dict[str, Any], fds: tuple[int, ...]) -> None:
        self._disconnect(primary_initiated=True)

    _ACTS: dict[str, Callable[[Child, dict[str, Any], tuple[int, ...]], None]] = {
        "disconnect": _act_disconnect,
    }

    def _on_channel_closed(self) -> None:
        # Reached from poll() after a reply closed the channel, too: once only,
        # so 'disconnect' is emitted once.
        if self._channel_closed:
            return
        self._channel_closed = True
        parked, self._parked = self._parked, []
        for _, copy in parked:
            copy.close()
        for listener in list(self._listeners.values()):
            listener._channel_gone()
        try:
            self.loop.remove_reader(self.channel_fd)
            if self._writer_registered:
                self.loop.remove_writer(self.channel_fd)
                self._writer_registered = False
        except (ValueError, OSError, RuntimeError):
            pass
        self.channel.close()
        for callback in list(self._replies.values()):
            callback({"errno": errno.EPIPE, "strerror": "IPC channel closed"}, ())
        self._replies.clear()
        self._wake()
        self.worker.emit("disconnect")
        if not self.worker.exited_after_disconnect:
            # The primary went away: exit at once so no worker is orphaned.
            raise SystemExit(0)

    # -- writing the channel ----------------------------------------------------

    def _want_write(self) -> None:
        if self._writer_registered or self.loop.is_closed():
            return
        if self.loop.is_running():
            self._writer_registered = True
            self.loop.add_writer(self.channel_fd, self._on_writable)
        else:
            self.channel.flush(5.0)

    def _on_writable(self) -> None:
        self.channel.handle_writable()
        if not self.channel.write_pending and self._writer_registered:
            self._writer_registered = False
            self.loop.remove_writer(self.channel_fd)

    def _send_internal(
        self,
        body: dict[str, Any],
        reply: Callable[[dict[str, Any], tuple[int, ...]], None] | None = None,
    ) -> bool:
        if reply is not None:
            self._seq += 1
            body["seq"] = self._seq
            self._replies[self._seq] = reply
        return self.channel.send(Kind.INTERNAL, body)

    def request(self, body: dict[str, Any]) -> tuple[dict[str, Any], tuple[int, ...]]:
        """Send an internal request and wait (pumping the channel) for its reply."""
        result: list[tuple[dict[str, Any], tuple[int, ...]]] = []
        if not self._send_internal(body, lambda reply, fds: result.append((reply, fds))):
            raise ChannelClosed()
        self.channel.flush(10.0)
        while not result:
            if not self.wait_readable(None) and not result:
                raise ChannelClosed()
        return result[0]

    def ack(self, key: str, token: int, accepted: bool) -> None:
        """Tell the primary a round-robin connection was taken (or refused)."""
        if self.connected:
            self._send_records([Record(key, token, TAKEN if accepted else REFUSED)])

    def park(self, key: str, conn: socket.socket, peer: Any = None, defer: bool = False) -> bool:
        """Give an idle round-robin connection back to the primary.

        The primary watches it and hands it to the next free worker once the
        client sends again. The channel sends a copy of the descriptor: the
        caller closes ``conn`` as usual, without shutting it down. ``peer``
        (the client's address) travels with it. With ``defer`` the copy goes
        with the next acknowledgement (or ``flush_parked()``), in one message.
        """
        if not self.connected:
            return False
        flags = NONBLOCKING if conn.gettimeout() is not None else 0
        copy = _OwnedFd(os.dup(conn.fileno()))
        self._parked.append((Record(key, 0, PARKED, flags, int(conn.family), peer), copy))
        if not defer:
            self.flush_parked()
        return True

    def flush_parked(self) -> None:
        """Send the connections parked with ``defer`` now."""
        if self._parked:
            self._send_records([])

    def _send_records(self, records: list[Record]) -> None:
        parked, self._parked = self._parked, []
        copies = tuple(copy for _, copy in parked)
        if parked:
            records = [record for record, _ in parked] + records
        if not self.channel.send(
            Kind.CONN, pack_taken(records), tuple(c.fd for c in copies), close_after=copies
        ):
            for copy in copies:
                copy.close()

    def worker_send(
        self, worker: Worker, message: Any, handle: Any, callback: Any, keep_open: bool
    ) -> bool:
        def on_error(exc: BaseException) -> None:
            self.loop.call_soon(self.worker.emit, "error", exc)

        channel = self.channel if self.connected else None
        return send_user(channel, self.user_kind, message, handle, callback, keep_open, on_error)

    # -- listening ------------------------------------------------------------

    def listen(self, address: Any, **options: Any) -> Listener:
        """``cluster.listen`` in a worker; see the package docs."""
        kind = options.pop("type", "tcp")
        backlog = int(options.pop("backlog", 511))
        reuse_port = bool(options.pop("reuse_port", False))
        exclusive = bool(options.pop("exclusive", False))
        credits = int(options.pop("credits", 1))
        if options:
            raise TypeError(f"unknown listen option(s): {', '.join(sorted(options))}")
        if kind not in ("tcp", "udp"):
            raise ValueError(f"type must be 'tcp' or 'udp', not {kind!r}")
        udp = kind == "udp"
        if isinstance(address, socket.socket):
            return self._own(address, udp)
        parsed = addr_mod.parse(address, udp=udp)
        if exclusive:
            sock = addr_mod.open_socket(parsed, backlog=backlog, reuse_port=reuse_port)
            own = self._own(sock, udp)
            own.backlog = backlog
            return own
        if not self.connected:
            raise ChannelClosed()
        index_key = parsed.key()
        used = self._indexes.setdefault(index_key, set())
        index = 0
        while index in used:
            index += 1
        used.add(index)
        reply, fds = self.request(
            {
                "act": "queryServer",
                "address": parsed.as_message(),
                "index": index,
                "backlog": backlog,
                "reuse_port": reuse_port,
                "credits": credits,
            }
        )
        if reply.get("errno"):
            used.discard(index)
            for fd in fds:
                os.close(fd)
            code = int(reply["errno"])
            strerror = reply.get("strerror") or os.strerror(code)
            raise OSError(code, f"{strerror} ({describe_target(parsed)})")
        key = reply["key"]
        if fds:
            sock = socket_from_fd(fds[0])
            listener = Listener(
                "shared",
                addr_mod.describe(sock, udp=udp),
                sock=sock,
                child=self,
                key=key,
                loop=self.loop,
            )
        else:
            listener = Listener("rr", reply["sockname"], child=self, key=key, loop=self.loop)
        listener.backlog = backlog
        self._listeners[key] = listener

        def on_close() -> None:
            self._listeners.pop(key, None)
            used.discard(index)
            if self.connected:
                self._send_internal({"act": "close", "key": key})
            self._wake()

        listener._on_close.append(on_close)
        self.worker.state = State.LISTENING
        info = dict(listener.address)
        self._send_internal({"act": "listening", **info})
        return listener

    def _own(self, sock: socket.socket, udp: bool) -> Listener:
        listener = Listener(
            "own", addr_mod.describe(sock, udp=udp), sock=sock, child=self, loop=self.loop
        )
        key = f"own:{id(listener)}"
        listener.key = key
        self._listeners[key] = listener

        def on_close() -> None:
            self._listeners.pop(key, None)
            self._wake()

        listener._on_close.append(on_close)
        self.worker.state = State.LISTENING
        self._send_internal({"act": "listening", **listener.address})
        return listener

    @property
    def open_listeners(self) -> list[Listener]:
        return [item for item in self._listeners.values() if not item.closed]

    # -- disconnect and kill ----------------------------------------------------

    def worker_disconnect(self, worker: Worker) -> None:
        self._disconnect(primary_initiated=False)

    def _disconnect(self, primary_initiated: bool) -> None:
        if self._disconnecting:
            return
        self._disconnecting = True
        self.worker.exited_after_disconnect = True
        servers = [listener for listener in list(self._listeners.values()) if listener._conn_tasks]
        for listener in list(self._listeners.values()):
            listener.close()

        def finish() -> None:
            if not self.connected:
                return
            if primary_initiated:
                self._close_channel()
            else:
                self._send_internal(
                    {"act": "exitedAfterDisconnect"}, lambda reply, fds: self._close_channel()
                )
                if not self.loop.is_running():
                    while self.connected:
                        self.wait_readable(None)

        if servers and self.loop.is_running():

            async def wait_servers() -> None:
                tasks = [task for item in servers for task in item._conn_tasks]
                if tasks:
                    await asyncio.wait(tasks)
                finish()

            self.loop.create_task(wait_servers())
        else:
            finish()

    def _close_channel(self) -> None:
        if not self.channel.connected:
            return
        self.channel.flush(5.0)
        self.channel.eof = True
        try:
            self._on_channel_closed()
        except SystemExit:
            raise

    def worker_kill(self, worker: Worker, sig: str | int) -> None:
        """In a worker, as Node v20: tell the primary it is deliberate, disconnect, exit 0."""
        worker.exited_after_disconnect = True
        if self.connected:
            acked: list[bool] = []
            self._send_internal(
                {"act": "exitedAfterDisconnect"}, lambda reply, fds: acked.append(True)
            )
            # Wait for the primary's acknowledgement so it records the intent.
            while self.connected and not acked:
                self.wait_readable(None)
            self._close_channel()
        raise SystemExit(0)

    # -- the loop ---------------------------------------------------------------

    def _wake(self) -> None:
        if self._wake_event is not None:
            self.loop.call_soon(self._wake_event.set)

    def _idle(self) -> bool:
        if not self.connected:
            return True
        if self.open_listeners:
            return False
        worker = self.worker
        return not (worker.listener_count("message") or worker.listener_count("disconnect"))

    async def _serve_until_idle(self) -> None:
        self._wake_event = asyncio.Event()
        me = asyncio.current_task()
        # One waiter lives until the wake event fires: a waiter cancelled and
        # replaced on every turn would itself count as a task finishing next
        # turn, and the loop would spin.
        waiter: asyncio.Future[Any] | None = None
        try:
            while True:
                others = {
                    task for task in asyncio.all_tasks() if task is not me and task is not waiter
                }
                if self._idle() and not (others and self.connected):
                    return
                if not self.connected:
                    return
                if waiter is None:
                    waiter = asyncio.ensure_future(self._wake_event.wait())
                await asyncio.wait(others | {waiter}, return_when=asyncio.FIRST_COMPLETED)
                if waiter.done():
                    waiter = None
                    self._wake_event.clear()
        finally:
            if waiter is not None:
                waiter.cancel()

    def run(self) -> None:
        """Serve the worker's loop; returns once the worker is disconnected or idle."""
        if self.loop.is_running():
            raise RuntimeError("cluster.run() called while the cluster loop is running")
        self.loop.run_until_complete(self._serve_until_idle())

    def run_to_exit(self) -> int:
        """After the worker's script: serve until idle, then the exit status (0)."""
        self.run()
        return 0

    def fork(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            f"cluster.fork() can only be called in the primary (this is worker {self.worker.id})"
        )


def from_environment(environ: dict[str, str] | Any = None) -> Child:
    """Build the worker role from the variables the primary set; remove them."""
    from .starter import CHANNEL_FD_ENV, SERIALIZATION_ENV, WORKER_ID_ENV

    environ = os.environ if environ is None else environ
    raw_id = environ.pop(WORKER_ID_ENV, None)
    raw_fd = environ.pop(CHANNEL_FD_ENV, None)
    serialization = environ.pop(SERIALIZATION_ENV, "json")
    try:
        worker_id = int(raw_id or "")
        fd = int(raw_fd or "")
        sock = socket.socket(fileno=fd)
    except (ValueError, OSError):
        raise RuntimeError(
            f"{WORKER_ID_ENV}={raw_id!r} is set but no IPC channel was passed "
            f"({CHANNEL_FD_ENV}={raw_fd!r}); worker processes are started by cluster.fork()"
        ) from None
    sock.set_inheritable(False)
    return Child(worker_id, sock, serialization)


class _OwnedFd:
    """A descriptor the channel closes once it has been sent."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        os.close(self.fd)
