"""A small ASGI application for trying forkserve: ``forkserve examples.hello_asgi:app``.

``/`` answers ``Hello, world!``, ``/echo`` returns a POST body, ``/env`` shows a
JSON summary of the scope, ``/ws`` echoes WebSocket messages. It handles
lifespan startup and shutdown. Standard library only.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

state: dict[str, Any] = {"started": False}


async def _respond(send: Send, status: int, body: bytes, content_type: bytes) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            state["started"] = True
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            state["started"] = False
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _websocket(receive: Receive, send: Send) -> None:
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("text") is not None:
            await send({"type": "websocket.send", "text": message["text"]})
        else:
            await send({"type": "websocket.send", "bytes": message.get("bytes") or b""})


async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    """Route on the scope type and path; 404 for anything else."""
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    path = scope.get("path", "/")
    if scope["type"] == "websocket":
        if path == "/ws":
            await _websocket(receive, send)
        else:
            await send({"type": "websocket.close", "code": 1008})
        return
    if path == "/":
        await _respond(send, 200, b"Hello, world!\n", b"text/plain")
    elif path == "/echo":
        if scope["method"] != "POST":
            await _respond(send, 405, b"POST only\n", b"text/plain")
            return
        body = await _read_body(receive)
        content_type = dict(scope["headers"]).get(b"content-type", b"application/octet-stream")
        await _respond(send, 200, body, content_type)
    elif path == "/env":
        client = scope.get("client")
        summary = {
            "type": scope["type"],
            "http_version": scope.get("http_version"),
            "method": scope.get("method"),
            "path": path,
            "root_path": scope.get("root_path", ""),
            "query_string": scope.get("query_string", b"").decode("latin-1"),
            "scheme": scope.get("scheme"),
            "client": list(client) if client else None,
            "headers": {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]},
            "lifespan_started": state["started"],
        }
        body = json.dumps(summary, sort_keys=True).encode() + b"\n"
        await _respond(send, 200, body, b"application/json")
    else:
        await _respond(send, 404, b"Not Found\n", b"text/plain")
