"""An app only importable through --chdir or --pythonpath."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    body = b"hidden"
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]
