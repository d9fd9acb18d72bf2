"""forkserve.cluster: Node's ``cluster`` module, in Python.

The contract is ``cluster-api.md``: every name, event, setting and guarantee
of Node's document, in snake_case. This module only picks the role, from
``FORKSERVE_WORKER_ID`` as Node's ``cluster.js`` does from ``NODE_UNIQUE_ID``,
and delegates to the role object (``Primary`` or ``Child``); no state lives
at module level except the role.

Knows nothing about HTTP or configuration.
"""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from .child import Child, WorkerProcess, from_environment
from .events import EventEmitter
from .ipc import Channel, ChannelClosed
from .listener import Listener, ListenerServer
from .primary import SCHED_NONE, SCHED_RR, Primary
from .round_robin import RoundRobinHandle, RoundRobinQueue
from .shared_handle import SharedHandle
from .starter import WORKER_ID_ENV, ChildProcess, ExecStarter, ForkStarter
from .template import Template, TemplateError, TemplateStarter
from .worker_object import State, Worker

__all__ = [
    "SCHED_NONE",
    "SCHED_RR",
    "Channel",
    "ChannelClosed",
    "Child",
    "ChildProcess",
    "EventEmitter",
    "ExecStarter",
    "ForkStarter",
    "Listener",
    "ListenerServer",
    "Primary",
    "RoundRobinHandle",
    "RoundRobinQueue",
    "SharedHandle",
    "State",
    "Template",
    "TemplateError",
    "TemplateStarter",
    "Worker",
    "WorkerProcess",
    "available_parallelism",
    "disconnect",
    "emit",
    "fork",
    "listen",
    "listeners",
    "off",
    "on",
    "once",
    "run",
    "setup_master",
    "setup_primary",
]

_role: Primary | Child | None = None

if TYPE_CHECKING:
    # Role-dependent attributes, served by ``_ClusterModule`` properties at run time.
    is_primary: bool
    is_master: bool
    is_worker: bool
    workers: dict[int, Worker] | None
    worker: Worker | None
    settings: Mapping[str, Any]
    scheduling_policy: int
    primary: Primary
    child: Child | None
    loop: Any


def _get_role() -> Primary | Child:
    global _role
    if _role is None:
        _role = from_environment() if os.environ.get(WORKER_ID_ENV) else Primary()
    return _role


def _primary(name: str) -> Primary:
    role = _get_role()
    if not isinstance(role, Primary):
        raise RuntimeError(
            f"cluster.{name}() can only be called in the primary; this is worker {role.worker.id}"
        )
    return role


def _child(name: str) -> Child:
    role = _get_role()
    if not isinstance(role, Child):
        raise RuntimeError(f"cluster.{name}() can only be called in a worker; this is the primary")
    return role


def _become_worker() -> Child:
    """Switch this (forked) process to the worker role, from its environment."""
    global _role
    _role = from_environment()
    return _role


def use_primary(primary: Primary) -> Primary:
    """Make ``primary`` the role behind the module functions (for servers and tests)."""
    global _role
    _role = primary
    return primary


def available_parallelism() -> int:
    """The number of CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def setup_primary(**settings: Any) -> None:
    """Change how future workers start; emits ``'setup'``. Primary only."""
    _primary("setup_primary").setup_primary(**settings)


setup_master = setup_primary


def fork(env: Mapping[str, Any] | None = None) -> Worker:
    """Start a worker process. Primary only."""
    return _primary("fork").fork(env)


def disconnect(callback: Callable[[], Any] | None = None) -> None:
    """Disconnect every worker; ``callback()`` when all are gone. Primary only."""
    _primary("disconnect").disconnect(callback)


def listen(address: Any, **options: Any) -> Listener:
    """A server socket shared across the cluster; see ``cluster-api.md``."""
    return _get_role().listen(address, **options)


def run() -> None:
    """Run the cluster's event loop (both roles)."""
    _get_role().run()


def on(event: str, handler: Callable[..., Any]) -> EventEmitter:
    return _get_role().on(event, handler)


def once(event: str, handler: Callable[..., Any]) -> EventEmitter:
    return _get_role().once(event, handler)


def off(event: str, handler: Callable[..., Any]) -> EventEmitter:
    return _get_role().off(event, handler)


def emit(event: str, *args: Any) -> bool:
    return _get_role().emit(event, *args)


def listeners(event: str) -> list[Callable[..., Any]]:
    return _get_role().listeners(event)


class _ClusterModule(types.ModuleType):
    """Module attributes that depend on the role (Node's cluster properties)."""

    @property
    def is_primary(self) -> bool:
        return isinstance(_get_role(), Primary)

    @property
    def is_master(self) -> bool:
        return self.is_primary

    @property
    def is_worker(self) -> bool:
        return not self.is_primary

    @property
    def workers(self) -> dict[int, Worker] | None:
        role = _get_role()
        return role.workers if isinstance(role, Primary) else None

    @property
    def worker(self) -> Worker | None:
        role = _get_role()
        return role.worker if isinstance(role, Child) else None

    @property
    def settings(self) -> Mapping[str, Any]:
        role = _get_role()
        return role.settings if isinstance(role, Primary) else types.MappingProxyType({})

    @property
    def scheduling_policy(self) -> int:
        role = _get_role()
        return role.scheduling_policy if isinstance(role, Primary) else SCHED_RR

    @scheduling_policy.setter
    def scheduling_policy(self, value: int) -> None:
        role = _get_role()
        if isinstance(role, Primary):
            role.scheduling_policy = value
        # In a worker, as in Node, the setting has no effect: the primary decides.

    @property
    def primary(self) -> Primary:
        """The primary role object (its loop, starter and handles)."""
        return _primary("primary")

    @property
    def child(self) -> Child | None:
        """The worker role object (its channel and loop) in a worker; None in the primary."""
        role = _get_role()
        return role if isinstance(role, Child) else None

    @property
    def loop(self) -> Any:
        return _get_role().loop


sys.modules[__name__].__class__ = _ClusterModule
