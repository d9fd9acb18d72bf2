"""Worker classes, registered by short name.

A worker class is where the cluster (processes, listeners) meets the HTTP
layer. The table maps each name to the module and class that implement it,
so a class is imported only when used.
"""

from __future__ import annotations

import importlib
from typing import Any

WORKER_CLASSES: dict[str, tuple[str, str]] = {
    "sync": ("forkserve.workers.sync", "SyncWorker"),
    "threaded": ("forkserve.workers.threaded", "ThreadedWorker"),
    "asgi": ("forkserve.workers.asgi", "ASGIWorker"),
}


def load_worker_class(name: str) -> Any:
    """The class registered as ``name``; ValueError names the choices."""
    try:
        module_name, class_name = WORKER_CLASSES[name]
    except KeyError:
        choices = ", ".join(sorted(WORKER_CLASSES))
        raise ValueError(f"unknown worker class {name!r}; expected one of: {choices}") from None
    return getattr(importlib.import_module(module_name), class_name)
