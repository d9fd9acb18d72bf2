"""ASGI applications used by the asgi worker's process tests.

``app`` routes on the path below ``root_path``. Lifespan events, and each
``/`` request, are appended to the file named by ``ASGI_EVENTS`` (when set);
``ASGI_STARTUP_DELAY`` makes startup take that many seconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

state = {"started": False}


def record(event: str) -> None:
    path = os.environ.get("ASGI_EVENTS")
    if path:
        with open(path, "a") as handle:
            handle.write(f"{event} {os.getpid()}\n")


async def respond(send: Send, body: bytes, status: int = 200) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await asyncio.sleep(float(os.environ.get("ASGI_STARTUP_DELAY", "0")))
            state["started"] = True
            record("startup")
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            record("shutdown")
            await send({"type": "lifespan.shutdown.complete"})
            return


async def websocket(receive: Receive, send: Send) -> None:
    """Echo; ``close:CODE`` closes with that code and reason ``bye``."""
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        text = message.get("text")
        if text is not None and text.startswith("close:"):
            await send({"type": "websocket.close", "code": int(text[6:]), "reason": "bye"})
            return
        if text is not None:
            await send({"type": "websocket.send", "text": text})
        else:
            await send({"type": "websocket.send", "bytes": message.get("bytes") or b""})


async def echo_stream(receive: Receive, send: Send) -> None:
    """Answer at once, then send back each request chunk as it arrives."""
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/octet-stream")],
        }
    )
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        more = message.get("more_body", False)
        await send(
            {"type": "http.response.body", "body": message.get("body", b""), "more_body": more}
        )
        if not more:
            return


async def drip(send: Send, chunks: int, pause: float) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    for index in range(chunks):
        await send({"type": "http.response.body", "body": b"chunk %d\n" % index, "more_body": True})
        await asyncio.sleep(pause)
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    root = scope.get("root_path", "")
    path = scope["path"]
    if root and path.startswith(root):
        path = path[len(root) :]
    if scope["type"] == "websocket":
        await websocket(receive, send)
        return
    query = scope.get("query_string", b"").decode()
    if path == "/":
        record("request" if state["started"] else "request-before-startup")
        await respond(send, b"ok")
    elif path == "/pid":
        await respond(send, str(os.getpid()).encode())
    elif path == "/sleep":
        record("begin")
        await asyncio.sleep(float(query or "0.5"))
        await respond(send, b"slept %d" % os.getpid())
    elif path == "/block":
        # Blocks the event loop itself (a bug the liveness watch must catch).
        time.sleep(float(query or "1"))
        await respond(send, b"blocked")
    elif path == "/echo-stream":
        await echo_stream(receive, send)
    elif path == "/drip":
        await drip(send, 5, 0.15)
    elif path == "/scope":
        client = scope.get("client")
        summary = {
            "path": scope["path"],
            "root_path": root,
            "scheme": scope.get("scheme"),
            "client": client[0] if client else None,
            "server": list(scope.get("server") or ()),
        }
        await respond(send, json.dumps(summary).encode())
    else:
        await respond(send, b"not found", 404)


async def failing_startup(scope: Scope, receive: Receive, send: Send) -> None:
    """Refuses to start: lifespan.startup.failed with a message."""
    if scope["type"] == "lifespan":
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "database unreachable (test)"})
        return
    await respond(send, b"should not be served")


async def no_lifespan(scope: Scope, receive: Receive, send: Send) -> None:
    """An app that does not support lifespan: it raises on that scope."""
    if scope["type"] != "http":
        raise RuntimeError(f"unsupported scope {scope['type']}")
    await respond(send, b"ok")
