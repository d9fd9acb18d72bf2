"""The asgi worker's per-request layer (``request_hooks``), in memory.

The application runs on a real event loop against a recording ``send``;
the scoreboard is a real one. Covered: the counts, the send given to the
application (no coroutine of its own per message), refused response heads,
draining, and the --request-timeout deadline.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from forkserve.errors import ResponseError
from forkserve.scoreboard import Scoreboard, Slot
from forkserve.workers.asgi import ResponseGuard, proxy_rewriter, request_hooks

Message = dict[str, Any]
HEADERS = [(b"content-type", b"text/plain"), (b"content-length", b"2")]


def scope(path: str = "/") -> dict[str, Any]:
    return {
        "type": "http",
        "http_version": "1.1",
        "method": "GET",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"host", b"a")],
        "client": ("127.0.0.1", 5555),
        "scheme": "http",
        "state": {},
    }


async def receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


class Recorder:
    """uvicorn's send: records the messages, returns a fresh awaitable each time."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.returned: list[Awaitable[None]] = []

    def __call__(self, message: Message) -> Awaitable[None]:
        self.messages.append(message)
        awaitable = self._sent()
        self.returned.append(awaitable)
        return awaitable

    async def _sent(self) -> None:
        await asyncio.sleep(0)


@pytest.fixture
def slot() -> tuple[Scoreboard, Slot]:
    board = Scoreboard(1)
    return board, board.attach(0)


def run(app: Any, send: Recorder, **options: Any) -> None:
    hooked = request_hooks(app, options.pop("responses", ResponseGuard()), **options)
    asyncio.run(asyncio.wait_for(hooked(scope(), receive, send), 10))


def counts(board: Scoreboard) -> dict[str, int]:
    return board.read(0).counts.by_status_class()


def test_the_send_the_app_gets_returns_uvicorns_awaitable(slot: tuple[Scoreboard, Slot]) -> None:
    board, observer = slot
    given: list[Awaitable[None]] = []

    async def app(scope: Any, receive: Any, send: Callable[[Message], Awaitable[None]]) -> None:
        for message in (
            {"type": "http.response.start", "status": 201, "headers": HEADERS},
            {"type": "http.response.body", "body": b"ok"},
        ):
            awaitable = send(message)
            given.append(awaitable)
            await awaitable

    send = Recorder()
    run(app, send, observer=observer)
    assert given == send.returned  # no coroutine in between
    assert [m["type"] for m in send.messages] == ["http.response.start", "http.response.body"]
    assert counts(board)["2xx"] == 1


def test_a_refused_head_is_a_500_and_later_sends_are_dropped(
    slot: tuple[Scoreboard, Slot],
) -> None:
    board, observer = slot
    raised: list[BaseException] = []

    async def app(scope: Any, receive: Any, send: Callable[[Message], Awaitable[None]]) -> None:
        headers = [(b"x-bad", b"a\r\nInjected: 1")]
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
        except ResponseError as exc:
            raised.append(exc)
        await send({"type": "http.response.body", "body": b"after"})
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        raise raised[0]  # the refusal itself, re-raised: not an application error

    send = Recorder()
    run(app, send, observer=observer)
    assert len(raised) == 1
    statuses = [m.get("status") for m in send.messages if m["type"] == "http.response.start"]
    assert statuses == [500]
    assert all(b"Injected" not in repr(m).encode() for m in send.messages)
    assert b"after" not in b"".join(m.get("body", b"") for m in send.messages)
    assert counts(board)["5xx"] == 1


def test_headers_given_as_lists_or_an_iterator_are_checked_too() -> None:
    async def app(scope: Any, receive: Any, send: Callable[[Message], Awaitable[None]]) -> None:
        pairs = iter([[b"x-a", b"1"], [b"x-b", b"2\x00"]])
        await send({"type": "http.response.start", "status": 200, "headers": pairs})

    send = Recorder()
    run(app, send)
    assert [m["status"] for m in send.messages if m["type"] == "http.response.start"] == [500]


def test_while_draining_every_response_closes_its_connection() -> None:
    async def app(scope: Any, receive: Any, send: Callable[[Message], Awaitable[None]]) -> None:
        headers = [*HEADERS, (b"connection", b"keep-alive")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    responses = ResponseGuard()
    responses.closing = True
    send = Recorder()
    run(app, send, responses=responses)
    headers = send.messages[0]["headers"]
    assert (b"connection", b"close") in headers and (b"connection", b"keep-alive") not in headers


def test_a_request_past_its_deadline_is_cancelled_and_answered_503(
    slot: tuple[Scoreboard, Slot], caplog: pytest.LogCaptureFixture
) -> None:
    board, observer = slot
    after: list[int] = []

    async def app(scope: Any, receive: Any, send: Callable[[Message], Awaitable[None]]) -> None:
        await asyncio.sleep(30)

    async def request() -> None:
        hooked = request_hooks(app, ResponseGuard(), observer=observer, request_timeout=0.1)
        await hooked(scope("/slow"), receive, send)
        task = asyncio.current_task()
        if sys.version_info >= (3, 11):
            assert task is not None
            after.append(task.cancelling())

    send = Recorder()
    began = time.monotonic()
    asyncio.run(asyncio.wait_for(request(), 10))
    assert time.monotonic() - began < 5
    assert [m.get("status") for m in send.messages][:1] == [503]
    assert board.read(0).counts.timeouts == 1 and counts(board)["5xx"] == 1
    assert "request exceeded --request-timeout (0.1s); cancelling it: GET /slow" in caplog.text
    assert "in app" in caplog.text  # where the request waited
    if sys.version_info >= (3, 11):
        assert after == [0]  # the deadline's cancellation is not left on the task


def test_a_request_within_its_deadline_and_outside_cancellation() -> None:
    async def quick(scope: Any, receive: Any, send: Callable[[Message], Awaitable[None]]) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        await send({"type": "http.response.body", "body": b"ok"})

    send = Recorder()
    run(quick, send, request_timeout=5.0)
    assert [m["type"] for m in send.messages] == ["http.response.start", "http.response.body"]

    async def slow(scope: Any, receive: Any, send: Callable[[Message], Awaitable[None]]) -> None:
        await asyncio.sleep(30)

    async def cancelled_from_outside() -> None:
        hooked = request_hooks(slow, ResponseGuard(), request_timeout=5.0)
        task = asyncio.ensure_future(hooked(scope(), receive, send))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(asyncio.wait_for(cancelled_from_outside(), 10))


def test_proxy_headers_rewrite_the_scope_first_and_only_when_present() -> None:
    seen: list[tuple[str, str]] = []
    records: list[Any] = []

    async def app(scope: Any, receive: Any, send: Callable[[Message], Awaitable[None]]) -> None:
        seen.append((scope["client"][0], scope["scheme"]))
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        await send({"type": "http.response.body", "body": b"ok"})

    def request(trusted: list[str], headers: list[tuple[bytes, bytes]]) -> None:
        hooked = request_hooks(
            app, ResponseGuard(), access_log=records.append, forwarded=proxy_rewriter(trusted)
        )
        asked = {**scope(), "headers": [(b"host", b"a"), *headers]}
        asyncio.run(asyncio.wait_for(hooked(asked, receive, Recorder()), 10))

    forwarded = [(b"x-forwarded-for", b"203.0.113.7"), (b"x-forwarded-proto", b"https")]
    request(["127.0.0.1"], forwarded)
    request(["10.9.8.7"], forwarded)
    request(["127.0.0.1"], [])
    assert seen == [("203.0.113.7", "https"), ("127.0.0.1", "http"), ("127.0.0.1", "http")]
    assert [r.client for r in records] == ["203.0.113.7", "127.0.0.1", "127.0.0.1"]

    calls: list[Any] = []

    async def rewriter(scope: Any, receive: Any, send: Any) -> None:
        calls.append(scope)

    hooked = request_hooks(app, ResponseGuard(), forwarded=rewriter)
    asyncio.run(asyncio.wait_for(hooked(scope(), receive, Recorder()), 10))
    assert calls == []  # no proxy header: nothing to rewrite, nothing run
