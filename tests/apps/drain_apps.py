"""WSGI and ASGI twins for the stop and drain tests.

``/`` answers ``ok`` with a Content-Length. ``/slow?S`` appends ``begin
<pid>`` to ``$DRAIN_EVENTS`` (when set), then answers after S seconds, so a
test knows the request is in flight before it signals the server. The ASGI
app also echoes WebSocket text messages.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

StartResponse = Callable[..., Any]
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def record(event: str) -> None:
    path = os.environ.get("DRAIN_EVENTS")
    if path:
        with open(path, "a") as handle:
            handle.write(f"{event} {os.getpid()}\n")


def wsgi(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    body = b"ok"
    if environ["PATH_INFO"] == "/slow":
        record("begin")
        time.sleep(float(environ.get("QUERY_STRING") or "1"))
        body = b"slow ok"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "websocket":
        await websocket(receive, send)
        return
    if scope["type"] != "http":
        return  # no lifespan support: served without it
    body = b"ok"
    if scope["path"] == "/slow":
        record("begin")
        await asyncio.sleep(float(scope["query_string"] or b"1"))
        body = b"slow ok"
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def websocket(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "websocket.connect":
            await send({"type": "websocket.accept"})
        elif message["type"] == "websocket.receive":
            await send({"type": "websocket.send", "text": message.get("text") or ""})
        else:
            return
