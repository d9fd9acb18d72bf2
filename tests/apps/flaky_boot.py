"""A WSGI app whose worker dies a moment after it starts: a crash loop."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

threading.Timer(0.2, os._exit, (1,)).start()


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Length", "2")])
    return [b"ok"]
