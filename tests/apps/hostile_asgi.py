"""The ASGI twin of ``http_apps:recorder`` for the hostile corpus (-k asgi).

Appends one JSON line per request to ``$HTTP_APPS_STATE/requests.log``:
``enter`` when called, ``done`` once it holds the whole body (never when the
client disconnects first). ``/split?v=...`` puts the decoded ``v`` into a
response header, which the server must refuse.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def raw_uri(scope: Scope) -> str:
    """The request target as far as the scope keeps it: raw path and query."""
    path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
    query: bytes = scope.get("query_string") or b""
    return (path + b"?" + query if query else path).decode("latin-1")


def record(event: str, scope: Scope, **extra: Any) -> None:
    """Append one JSON line to requests.log; O_APPEND keeps lines whole."""
    line = {
        "event": event,
        "method": scope["method"],
        "raw_uri": raw_uri(scope),
        "path": scope["path"],
        "pid": os.getpid(),
        **extra,
    }
    data = (json.dumps(line) + "\n").encode()
    state = Path(os.environ["HTTP_APPS_STATE"])
    fd = os.open(state / "requests.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


async def read_body(receive: Receive) -> bytes | None:
    """The whole body, or None when the client went away before its end."""
    parts = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


async def recorder(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return  # no lifespan support: served without it
    record("enter", scope)
    body = await read_body(receive)
    if body is None:
        return
    record("done", scope, body=body.decode("latin-1"))
    if scope["path"] == "/split":
        query = scope["query_string"].decode("latin-1")
        value = unquote(query.partition("v=")[2])
        # Not latin-1 (U+2028): the app fails, as a WSGI app's header would.
        headers = [(b"content-length", b"2"), (b"x-echo", value.encode("latin-1"))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})
        return
    reply = json.dumps({"path": scope["path"], "length": len(body)}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(reply))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": reply})
