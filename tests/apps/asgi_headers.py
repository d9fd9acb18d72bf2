"""An ASGI app that sends the response header a test asks for (-k asgi).

``/bad-header?where=value&value=<quoted>`` sends ``X-Bad: <value>``;
``where=name`` sends a header named ``<value>``. ``/pid`` answers the
worker's pid. ``/after-refusal`` catches the error ``send`` raises and tries
to go on sending: nothing of it may reach the client.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def respond(send: Send, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    headers = [*headers, (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return  # no lifespan support: served without it
    query = parse_qs(scope["query_string"].decode("latin-1"))
    value = query.get("value", [""])[0].encode("latin-1")
    bad = (value, b"1") if query.get("where") == ["name"] else (b"x-bad", value)
    if scope["path"] == "/bad-header":
        await respond(send, b"should not be sent", [bad])
    elif scope["path"] == "/after-refusal":
        try:
            await respond(send, b"should not be sent", [bad])
        except Exception:
            await respond(send, b"sent after the refusal", [])
    elif scope["path"] == "/pid":
        await respond(send, str(os.getpid()).encode(), [(b"content-type", b"text/plain")])
    else:
        await respond(send, b"hello", [(b"content-type", b"text/plain")])
