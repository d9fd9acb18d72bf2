"""WSGI app that burns CPU per request and answers with the worker's pid.

``GET /`` spins for ``BENCH_CPU_MS`` milliseconds of thread CPU time (default 2)
and returns ``<pid>\\n``. ``GET /pid`` returns the pid without the CPU work, for
start-up and respawn timing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any

WORK_SECONDS = float(os.environ.get("BENCH_CPU_MS", "2")) / 1000.0


def burn(seconds: float) -> int:
    """Spin until this thread has used ``seconds`` of CPU time."""
    end = time.thread_time() + seconds
    acc = 0
    while time.thread_time() < end:
        for i in range(256):
            acc = (acc * 31 + i) & 0xFFFFFFFF
    return acc


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if environ.get("PATH_INFO", "/") != "/pid":
        burn(WORK_SECONDS)
    body = f"{os.getpid()}\n".encode()
    start_response(
        "200 OK",
        [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))],
    )
    return [body]
