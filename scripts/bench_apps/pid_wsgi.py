"""WSGI app answering with the worker's pid, for the operations benchmark.

``GET /`` returns ``<pid>``; ``GET /hold?S`` sleeps S seconds first (a sync
worker holding a connection takes no other, so N concurrent holds reach N
different workers).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if environ.get("PATH_INFO") == "/hold":
        time.sleep(float(environ.get("QUERY_STRING") or "0.02"))
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
