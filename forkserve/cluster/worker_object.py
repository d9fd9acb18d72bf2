"""The Worker object both roles expose.

Theory of operation
-------------------
A Worker is an event emitter plus the few facts Node's Worker carries. What
its methods *do* depends on the role (primary or worker process); the role
object is injected as a ``WorkerBackend`` rather than patched onto the class.

States and the transitions the roles make (any other is a bug)::

    none ---------> online ------> listening
      |               |               |
      +---------------+---------------+--> disconnected --> dead
      +---------------+---------------+-----------------------^

``exited_after_disconnect`` is None until the worker exits or is disconnected
on purpose; ``disconnect()``/``kill()`` set it True, an exit without them
makes it False.

Imports nothing from forkserve outside this package.
"""

from __future__ import annotations

import enum
import signal as _signal
from typing import Any, Protocol

from .events import EventEmitter


class State(str, enum.Enum):
    NONE = "none"
    ONLINE = "online"
    LISTENING = "listening"
    DISCONNECTED = "disconnected"
    DEAD = "dead"

    def __str__(self) -> str:
        return self.value


TRANSITIONS: dict[State, frozenset[State]] = {
    State.NONE: frozenset({State.ONLINE, State.LISTENING, State.DISCONNECTED, State.DEAD}),
    State.ONLINE: frozenset({State.LISTENING, State.DISCONNECTED, State.DEAD}),
    State.LISTENING: frozenset({State.LISTENING, State.DISCONNECTED, State.DEAD}),
    State.DISCONNECTED: frozenset({State.DEAD}),
    State.DEAD: frozenset({State.DISCONNECTED}),
}


def signal_number(sig: str | int) -> int:
    """``'SIGTERM'``, ``'TERM'`` or 15 -> 15; ValueError for an unknown name."""
    if isinstance(sig, int):
        return int(sig)
    name = sig.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(getattr(_signal, name))
    except AttributeError:
        raise ValueError(f"unknown signal {sig!r}") from None


def signal_name(signum: int) -> str:
    try:
        return _signal.Signals(signum).name
    except ValueError:
        return f"SIG{signum}"


class WorkerBackend(Protocol):
    """What a role provides so a Worker can act."""

    def worker_send(
        self, worker: Worker, message: Any, handle: Any, callback: Any, keep_open: bool
    ) -> bool: ...

    def worker_disconnect(self, worker: Worker) -> None: ...

    def worker_kill(self, worker: Worker, sig: str | int) -> None: ...

    def worker_is_connected(self, worker: Worker) -> bool: ...

    def worker_is_dead(self, worker: Worker) -> bool: ...


class Worker(EventEmitter):
    """A cluster worker: ``cluster.workers[id]`` in the primary, ``cluster.worker`` in it."""

    def __init__(self, id: int, process: Any, backend: WorkerBackend) -> None:
        super().__init__()
        self.id = id
        self.process = process
        self._backend = backend
        self._state = State.NONE
        self.exited_after_disconnect: bool | None = None

    @property
    def state(self) -> State:
        return self._state

    @state.setter
    def state(self, new: State | str) -> None:
        new = State(new)
        if new is not self._state and new not in TRANSITIONS[self._state]:
            raise RuntimeError(f"worker {self.id}: illegal state change {self._state} -> {new}")
        self._state = new

    def send(
        self,
        message: Any,
        handle: Any = None,
        callback: Any = None,
        *,
        keep_open: bool = False,
    ) -> bool:
        """Send ``message`` (and a socket ``handle``) to the other side.

        Returns False when the channel is disconnected; the error then goes
        to ``callback(exc)`` or is emitted as ``'error'``. An unserializable
        message raises TypeError and nothing is sent.
        """
        return self._backend.worker_send(self, message, handle, callback, keep_open)

    def disconnect(self) -> Worker:
        """Close this worker's servers, then its channel; the exit is deliberate."""
        self._backend.worker_disconnect(self)
        return self

    def kill(self, signal: str | int = "SIGTERM") -> None:
        """End the worker on purpose (``exited_after_disconnect`` becomes True)."""
        self._backend.worker_kill(self, signal)

    destroy = kill

    def is_connected(self) -> bool:
        return self._backend.worker_is_connected(self)

    def is_dead(self) -> bool:
        return self._backend.worker_is_dead(self)

    def __repr__(self) -> str:
        pid = getattr(self.process, "pid", None)
        return f"<Worker id={self.id} pid={pid} state={self._state.value}>"
