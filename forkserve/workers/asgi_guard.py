"""forkserve's strict HTTP/1.1 front end in front of uvicorn's protocol.

Theory of operation
-------------------
uvicorn's HTTP protocols are more lenient than forkserve's parser (both
Content-Length and Transfer-Encoding, obs-fold, loose chunk extensions, bare
LF...). ``GuardedConnection`` is the asyncio protocol the transport talks to;
uvicorn's protocol sits behind it and gets the same transport, so responses,
flow control and closing stay uvicorn's. Every received byte goes first
through forkserve's request parser (``make_parser``); the guard forwards a
byte to uvicorn only once the parser has accepted it:

* a request head only when it is complete and valid (a partial head is held);
* body bytes once their framing is valid (a partial chunk line is held);
* the next pipelined request only after the current message's
  ``EndOfMessage`` (the guard calls ``start_next_cycle`` there: uvicorn
  answers the requests, the guard only validates them).

A violation (``HTTPError``) forwards nothing of the offending bytes: the
guard answers forkserve's error response with the error's status and closes
the connection. When an earlier response of the connection is still being
written, the error waits for it; when the bad message's head already
reached the application, the application sees a disconnect.

Per connection states:

    HTTP --violation--> FAILED (error response written, connection closed)
    HTTP --valid websocket upgrade, uvicorn switched protocols--> PASSTHROUGH

In PASSTHROUGH the transport talks to uvicorn's WebSocket protocol directly.

``--header-timeout``: a connection that has not completed a request head
within it after connecting, or after it started the next one, is closed;
with ``408`` if part of a head had arrived.

This module does not import uvicorn; the worker (``asgi.py``) passes what
the guard needs to know about uvicorn's protocol as plain callables.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from forkserve.errors import HTTPError
from forkserve.http.events import NEED_DATA, EndOfMessage, ParserLimits, Request
from forkserve.http.parser import make_parser
from forkserve.http.response import DateCache, error_response

LOG = logging.getLogger("forkserve.asgi")

# While an earlier response is still going out, an error answer waits this
# long between checks (only on the rare error-after-pipelining path).
ERROR_RETRY = 0.02

_DATE = DateCache()


@dataclass(frozen=True, slots=True)
class GuardOptions:
    backend: str
    limits: ParserLimits
    header_timeout: float
    websockets: bool  # uvicorn has a WebSocket protocol to switch to
    # True while uvicorn's protocol has a response in progress or queued.
    busy: Callable[[Any], bool]
    # True once uvicorn has started the response of its current request.
    responding: Callable[[Any], bool]
    # Stops uvicorn's keep-alive timer: the next head has begun arriving.
    hold: Callable[[Any], None]
    server: bytes = b"forkserve"


class GuardedConnection(asyncio.Protocol):
    """Validates every byte before ``inner`` (uvicorn's protocol) sees it."""

    __slots__ = (
        "_at_start",
        "_failed",
        "_held",
        "_in_body",
        "_left",
        "_loop",
        "_open",
        "_options",
        "_parser",
        "_timer",
        "_unparsed",
        "_upgrade",
        "inner",
        "transport",
    )

    def __init__(
        self, inner: asyncio.Protocol, options: GuardOptions, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.inner = inner
        self._options = options
        self._loop = loop
        parser = make_parser(options.backend, options.limits)
        self._parser = parser
        # The parser's bytes not consumed yet: what was received and is not
        # accepted is exactly their length.
        self._unparsed = parser.unparsed
        self._held: bytes | bytearray = b""  # received, not yet forwarded
        self._at_start = True  # the next byte forwarded begins a message
        self._open = False  # a head was accepted, its message is not complete
        self._in_body = False  # ... and that head reached uvicorn
        self._upgrade = False  # the current message asks for a WebSocket
        self._left = -1  # bytes the parser held after the last message it completed
        self._failed = False
        self._timer: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None

    # -- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses.
        self.transport = transport  # type: ignore[assignment]
        self.inner.connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self._failed:
            return
        parser = self._parser
        held = self._held
        if held:
            if type(held) is bytes:
                held = bytearray(held)  # grows in place from here: no quadratic copying
            held += data
        else:
            held = data  # the usual case: one recv, one or more whole messages
        self._held = held
        self._left = -1
        try:
            parser.feed(data)
            self._advance()
        except HTTPError as exc:
            self._fail(exc)

    def eof_received(self) -> bool | None:
        if self._failed:
            return None
        self._left = -1
        try:
            self._parser.feed(b"")
            self._advance()
        except HTTPError as exc:
            self._fail(exc)
            return None
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._held = b""
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    # -- validation ------------------------------------------------------------

    def _advance(self) -> None:
        """Pull events until the parser needs more bytes; forward what it accepted."""
        parser = self._parser
        while True:
            event = parser.next_event()
            kind = type(event)
            if kind is Request:
                self._cancel_timer()
                self._open = True
                assert isinstance(event, Request)
                self._upgrade = (
                    event.method == b"GET" and self._options.websockets and _asks_websocket(event)
                )
            elif kind is EndOfMessage:
                parser.start_next_cycle()
                self._open = self._in_body = False
                self._left = len(self._unparsed)
                if self._upgrade and self._switch_protocols():
                    return
                if self._unparsed[:1] == b"\r":
                    # Empty lines before the next request (RFC 9112 §2.2), which
                    # the parser skips and h11 refuses: start the next batch here.
                    self._forward(len(self._held) - len(self._unparsed))
            elif event is NEED_DATA:
                self._forward(len(self._held) - len(self._unparsed))
                if self._timer is None and parser.has_buffered_data:
                    # The next head began: --header-timeout, not --keep-alive, from here.
                    self._options.hold(self.inner)
                    self._arm_header_timer()
                return

    def _forward(self, count: int) -> None:
        if count <= 0:
            return
        held = self._held
        if count == len(held):
            self._held = b""
        else:
            self._held = held[count:]
            held = held[:count]
        if type(held) is not bytes:
            held = bytes(held)
        if self._at_start and held[:2] == b"\r\n":
            while held[:2] == b"\r\n":
                held = held[2:]
        self._at_start = not self._open
        self._in_body = self._open
        if held:
            self.inner.data_received(held)

    def _switch_protocols(self) -> bool:
        """After a valid upgrade request: hand it over; True once uvicorn switched."""
        self._upgrade = False
        transport = self.transport
        assert transport is not None
        self._forward(len(self._held) - len(self._unparsed))
        protocol = transport.get_protocol()
        if protocol is self:
            return False  # uvicorn answered it as plain HTTP: keep validating
        self._cancel_timer()
        rest, self._held = self._held, b""
        self._parser.discard_unparsed()
        if rest and isinstance(protocol, asyncio.Protocol):
            protocol.data_received(bytes(rest))
        return True

    # -- errors and the head deadline ----------------------------------------------

    def _fail(self, exc: HTTPError) -> None:
        if self._left >= 0:
            # The messages completed before the bad one are valid: uvicorn
            # answers them; the error is answered after them.
            self._open = False
            self._forward(len(self._held) - self._left)
        self._failed = True
        self._held = b""
        self._cancel_timer()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.pause_reading()
        LOG.debug("refused a request: %s (%s)", exc, exc.status)
        options = self._options
        if self._in_body:
            # The bad message's head reached the application: it gets a
            # disconnect; the error is answered unless a response began.
            inner = self.inner
            if options.responding(inner) or _queued(inner):
                transport.abort()
                return
            self._answer(exc.status, str(exc))
            return
        self._answer_when_idle(exc.status, str(exc))

    def _answer_when_idle(self, status: int, message: str) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._options.busy(self.inner):
            self._loop.call_later(ERROR_RETRY, self._answer_when_idle, status, message)
            return
        self._answer(status, message)

    def _answer(self, status: int, message: str) -> None:
        transport = self.transport
        assert transport is not None
        transport.write(error_response(status, message, _DATE, self._options.server))
        transport.close()

    def _arm_header_timer(self) -> None:
        timeout = self._options.header_timeout
        if timeout > 0:
            self._timer = self._loop.call_later(timeout, self._header_timeout)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _header_timeout(self) -> None:
        self._timer = None
        transport = self.transport
        if self._failed or transport is None or transport.is_closing():
            return
        if self._options.busy(self.inner):
            # The next head started while a response is going out: its
            # deadline counts once the connection is idle again.
            self._arm_header_timer()
            return
        self._failed = True
        if self._parser.has_buffered_data:
            self._answer(408, "request head not received in time")
        else:
            transport.close()


def _asks_websocket(request: Request) -> bool:
    for name, value in request.headers:
        if len(name) == 7 and name.lower() == b"upgrade" and b"websocket" in value.lower():
            return True
    return False


def _queued(inner: Any) -> bool:
    return bool(getattr(inner, "pipeline", None))
