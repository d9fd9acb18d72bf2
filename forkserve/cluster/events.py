"""A small event emitter with Node's semantics, for the cluster objects.

``on``/``once``/``off``/``emit``/``listeners`` behave as Node's EventEmitter:
handlers run synchronously in registration order; ``emit('error', exc)`` with
no handler raises ``exc``. A handler that is a coroutine function is scheduled
as a task on the emitter's event loop.

Imports nothing from forkserve.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any

Handler = Callable[..., Any]


class EventEmitter:
    """Node-style event emitter. ``_loop`` is where coroutine handlers run."""

    _loop: asyncio.AbstractEventLoop | None = None

    def __init__(self) -> None:
        self._handlers: dict[str, list[tuple[Handler, bool]]] = {}

    def on(self, event: str, handler: Handler) -> EventEmitter:
        """Call ``handler`` every time ``event`` is emitted."""
        self._handlers.setdefault(event, []).append((handler, False))
        return self

    add_listener = on

    def once(self, event: str, handler: Handler) -> EventEmitter:
        """Call ``handler`` the next time ``event`` is emitted, then forget it."""
        self._handlers.setdefault(event, []).append((handler, True))
        return self

    def off(self, event: str, handler: Handler) -> EventEmitter:
        """Remove the most recently added registration of ``handler``."""
        entries = self._handlers.get(event, [])
        for index in range(len(entries) - 1, -1, -1):
            if entries[index][0] is handler or entries[index][0] == handler:
                del entries[index]
                break
        if not entries:
            self._handlers.pop(event, None)
        self._handlers_changed()
        return self

    remove_listener = off

    def remove_all_listeners(self, event: str | None = None) -> EventEmitter:
        if event is None:
            self._handlers.clear()
        else:
            self._handlers.pop(event, None)
        self._handlers_changed()
        return self

    def listeners(self, event: str) -> list[Handler]:
        return [handler for handler, _ in self._handlers.get(event, [])]

    def listener_count(self, event: str) -> int:
        return len(self._handlers.get(event, []))

    def emit(self, event: str, *args: Any) -> bool:
        """Run the handlers of ``event``; True if there were any.

        As in Node, an ``'error'`` event nobody listens to is raised.
        """
        entries = self._handlers.get(event)
        if not entries:
            if event == "error":
                exc = args[0] if args else RuntimeError("unhandled 'error' event")
                if isinstance(exc, BaseException):
                    raise exc
                raise RuntimeError(f"unhandled 'error' event: {exc!r}")
            return False
        snapshot = list(entries)
        for entry in snapshot:
            if entry[1]:
                try:
                    entries.remove(entry)
                except ValueError:
                    continue
        if not entries:
            self._handlers.pop(event, None)
        for handler, _ in snapshot:
            result = handler(*args)
            if inspect.iscoroutine(result):
                self._spawn(result)
        return True

    def _spawn(self, coro: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                coro.close()
                raise RuntimeError("a coroutine handler needs a running cluster loop") from None
        task = loop.create_task(coro)
        task.add_done_callback(_report_task_error)

    def _handlers_changed(self) -> None:
        """Hook for roles that keep the process alive while handlers exist."""


def _report_task_error(task: asyncio.Task[Any]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        task.get_loop().call_exception_handler(
            {"message": "exception in a cluster event handler", "exception": exc, "task": task}
        )
