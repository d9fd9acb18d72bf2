"""A small WSGI application for trying forkserve: ``forkserve examples.hello_wsgi:app``.

``/`` answers ``Hello, world!``, ``/echo`` returns a POST body, ``/env`` shows a
JSON summary of the WSGI environ. Standard library only.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

StartResponse = Callable[..., Any]

_ENV_KEYS = (
    "REQUEST_METHOD",
    "SCRIPT_NAME",
    "PATH_INFO",
    "QUERY_STRING",
    "SERVER_NAME",
    "SERVER_PORT",
    "SERVER_PROTOCOL",
    "REMOTE_ADDR",
    "CONTENT_TYPE",
    "CONTENT_LENGTH",
    "wsgi.url_scheme",
)


def _respond(
    start_response: StartResponse, status: str, body: bytes, content_type: str
) -> list[bytes]:
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
    return [body]


def _read_body(environ: dict[str, Any]) -> bytes:
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    return environ["wsgi.input"].read(length) if length > 0 else b""


def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """Route on PATH_INFO; 404 for anything else, 405 for a non-POST /echo."""
    path = environ.get("PATH_INFO", "/")
    method = environ.get("REQUEST_METHOD", "GET")
    if path == "/":
        return _respond(start_response, "200 OK", b"Hello, world!\n", "text/plain")
    if path == "/echo":
        if method != "POST":
            return _respond(start_response, "405 Method Not Allowed", b"POST only\n", "text/plain")
        body = _read_body(environ)
        content_type = environ.get("CONTENT_TYPE") or "application/octet-stream"
        return _respond(start_response, "200 OK", body, content_type)
    if path == "/env":
        summary = {key: environ[key] for key in _ENV_KEYS if key in environ}
        summary["headers"] = {
            key[5:].replace("_", "-").lower(): value
            for key, value in environ.items()
            if key.startswith("HTTP_")
        }
        body = json.dumps(summary, sort_keys=True).encode() + b"\n"
        return _respond(start_response, "200 OK", body, "application/json")
    return _respond(start_response, "404 Not Found", b"Not Found\n", "text/plain")
