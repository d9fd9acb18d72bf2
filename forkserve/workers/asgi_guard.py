"""forkserve's strict HTTP/1.1 front end in front of uvicorn's protocol.

Theory of operation
-------------------
uvicorn's HTTP protocols are more lenient than forkserve's parser (both
Content-Length and Transfer-Encoding, obs-fold, loose chunk extensions, bare
LF...). ``GuardedConnection`` is the asyncio protocol the transport talks to;
uvicorn's protocol sits behind it and writes to the same transport through
``CoalescedTransport``, so responses, flow control and closing stay
uvicorn's. Every received byte goes first through forkserve's request
parser (``make_parser``); the guard forwards a byte to uvicorn only once the
parser has accepted it:

* a request head only when it is complete and valid (a partial head is held);
* body bytes once their framing is valid (a partial chunk line is held);
* the next pipelined request only after the current message's
  ``EndOfMessage`` (the guard calls ``start_next_cycle`` there: uvicorn
  answers the requests, the guard only validates them).

Most requests need less: when a connection is at a message boundary and
one receive holds exactly one whole request head without a body, a single
regular expression and a few byte scans (``plain_head``) show that the full
parser would accept it, and the bytes go to uvicorn at once. The check
accepts only a subset of what the parser accepts (origin-form target, one
Host, no Content-Length, Transfer-Encoding or Upgrade, within the size
limits); anything else, a head split over several receives included, takes
the parser's path, which is created only then.

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
with ``408`` if part of a head had arrived. The deadlines of a worker's
connections share a few loop timers (``GroupedTimers``): a connection
joins the group of the moment and leaves it with its head, so most
connections never arm or cancel a timer of their own.

Writes: uvicorn's HTTP protocols write a response's head and its body
separately, one system call each (a loopback ``send`` costs about as much
as all the Python a small request runs). ``CoalescedTransport`` keeps what
is written during one turn of the event loop and sends it in one call
(``writelines``) once the turn is over: ``Flusher`` schedules one callback
(``call_soon``) for all the connections written to in the turn, which the
loop runs before it can sleep, so a response the application leaves
unfinished still goes out. Closing and ``write_eof`` send what is kept
first; aborting drops it. A write that would make the kept bytes pass
``KEEP_MAX`` sends at once, so a body streamed without a pause reaches the
transport's own buffer and its flow control (``pause_writing``, which
reaches uvicorn's protocol unchanged). ``Relay`` is the same front without
the checks, for ``--asgi-guard off``.

This module does not import uvicorn; the worker (``asgi.py``) passes what
the guard needs to know about uvicorn's protocol as plain callables.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from forkserve.errors import HTTPError
from forkserve.http.events import NEED_DATA, EndOfMessage, ParserLimits, Request
from forkserve.http.parser import RequestParser, make_parser
from forkserve.http.response import DateCache, error_response

LOG = logging.getLogger("forkserve.asgi")

# The most a CoalescedTransport keeps before it sends (the loop's transports
# start pushing back at 64 KiB).
KEEP_MAX = 65536
# While an earlier response is still going out, an error answer waits this
# long between checks (only on the rare error-after-pipelining path).
ERROR_RETRY = 0.02

_DATE = DateCache()

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_VALUE = rb":[^\x00-\x08\x0a-\x1f\x7f]*"
# A field line other than Host and the ones that frame a body or switch
# protocols (names are case-insensitive: RFC 9110 §5.1).
_OTHER_FIELD = rb"\r\n(?!(?i:content-length|transfer-encoding|upgrade|host):)" + _TOKEN + _VALUE
# One whole request head with exactly one Host and no body, in the strict
# grammar of RFC 9112 §3 and §5 that the parser's head validation applies,
# restricted further: HTTP/1.0 or 1.1, an origin-form target (which CONNECT
# may not use), field values without a control character but HTAB. It cannot
# match a bare CR or LF, and it ends at the first empty line.
_PLAIN_HEAD = re.compile(
    rb"(?!CONNECT )" + _TOKEN + rb" /[\x21-\x7e]* HTTP/1\.[01]"
    rb"(?:" + _OTHER_FIELD + rb")*\r\n(?i:host)" + _VALUE + rb"(?:" + _OTHER_FIELD + rb")*"
    rb"\r\n\r\n"
)
# How many heads ``plain_head`` remembers (it forgets all at once), and up to
# which size: a repeated head costs a hash instead of the regular expression.
_SEEN_HEADS = 256
_SEEN_HEAD_MAX = 2048
# The shortest head: "A / HTTP/1.1" CRLF, field lines of at least "a:" CRLF,
# CRLF. A head of at most this plus 4 bytes per allowed field cannot hold more.
_MIN_HEAD = 16


@dataclass(frozen=True, slots=True)
class GuardOptions:
    backend: str
    limits: ParserLimits
    websockets: bool  # uvicorn has a WebSocket protocol to switch to
    # True while uvicorn's protocol has a response in progress or queued.
    busy: Callable[[Any], bool]
    # True once uvicorn has started the response of its current request.
    responding: Callable[[Any], bool]
    # Stops uvicorn's keep-alive timer: the next head has begun arriving.
    hold: Callable[[Any], None]
    server: bytes = b"forkserve"
    # The longest head ``plain_head`` takes: no line of it can then pass
    # --limit-request-line or --limit-request-field-size.
    plain_max: int = field(init=False)
    # Heads up to this long cannot pass --limit-request-fields: not counted.
    plain_uncounted: int = field(init=False)
    # Heads ``plain_head`` took lately, byte for byte: clients repeat theirs.
    plain_seen: set[bytes] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        limits = self.limits
        plain_max = min(limits.max_request_line, limits.max_header_field_size)
        object.__setattr__(self, "plain_max", plain_max)
        object.__setattr__(self, "plain_uncounted", _MIN_HEAD + 4 * limits.max_header_fields)
        object.__setattr__(self, "plain_seen", set())


def plain_head(data: bytes, options: GuardOptions) -> bool:
    """True when ``data`` is exactly one whole request head, with one Host and
    no body, that forkserve's parser accepts as it is.

    False says nothing about validity: the parser decides those.
    """
    seen = options.plain_seen
    if data in seen:
        return True
    size = len(data)
    if size > options.plain_max or _PLAIN_HEAD.fullmatch(data) is None:
        return False
    # Field lines: the CRLFs but the request line's and the empty line's.
    fields = options.limits.max_header_fields
    if size > options.plain_uncounted and data.count(b"\r\n") - 2 > fields:
        return False
    if size <= _SEEN_HEAD_MAX:
        if len(seen) >= _SEEN_HEADS:
            seen.clear()
        seen.add(data)
    return True


Group = dict[Any, Callable[[], object]]


class GroupedTimers:
    """Deadlines of one length (``delay``) for many connections, on few loop timers.

    ``join(key, callback)`` starts one: the key joins the group of the
    current ``period`` (a dict, so ``group.pop(key)`` stops it); at the end
    of the period a loop timer seals the group and, if any key is still in
    it, arms one more that calls their callbacks ``delay`` later. A deadline
    so passes between ``delay`` and ``delay + period`` after it started,
    for the cost of a dict insertion instead of a loop timer.
    """

    __slots__ = ("_group", "_period", "delay", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        self.loop = loop
        self.delay = delay
        self._period = min(max(delay / 10, 0.01), 0.5)
        self._group: Group | None = None

    def join(self, key: Any, callback: Callable[[], object]) -> Group:
        """Start ``key``'s deadline; the result is the group to leave."""
        group = self._group
        if group is None:
            group = self._group = {}
            self.loop.call_later(self._period, self._seal, group)
        group[key] = callback
        return group

    def _seal(self, group: Group) -> None:
        self._group = None
        if group:
            self.loop.call_later(self.delay, self._expire, group)

    def _expire(self, group: Group) -> None:
        for key in list(group):
            callback = group.pop(key, None)
            if callback is None:
                continue  # an earlier callback of the group stopped it
            try:
                callback()
            except Exception as exc:
                self.loop.call_exception_handler(
                    {"message": "exception in a grouped timer", "exception": exc}
                )


class Flusher:
    """A worker's transports with writes kept in this turn of the event loop:
    one callback at the end of the turn sends them all."""

    __slots__ = ("kept", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.kept: list[CoalescedTransport] = []

    def flush(self) -> None:
        kept, self.kept = self.kept, []
        for coalesced in kept:
            coalesced.flush()


class CoalescedTransport:
    """The transport as ``inner`` protocols see it: the writes of one turn of
    the event loop leave together, in order, in one system call.

    Everything but writing and closing is the transport's own. Closing sends
    what is kept first; aborting drops it. Asked for its socket, it gives
    ``SocketAddresses``.
    """

    __slots__ = ("_flusher", "_size", "is_closing", "pending", "transport")

    def __init__(self, transport: Any, flusher: Flusher) -> None:
        self.transport = transport
        self._flusher = flusher
        self.pending: list[bytes] | None = None
        self._size = 0  # bytes kept
        # Asked after every response: the transport's own, without a frame here.
        self.is_closing: Callable[[], bool] = transport.is_closing

    def write(self, data: bytes) -> None:
        if type(data) is not bytes:
            # A transport copies what it cannot send at once; kept here, a
            # bytearray or memoryview the caller reuses would change first.
            data = bytes(data)
        pending = self.pending
        if pending is None:
            size = len(data)
            if size > KEEP_MAX:
                # Nothing to gather it with: it goes now, and the transport's
                # flow control (pause_writing) sees it at once.
                self.transport.write(data)
                return
            self.pending = [data]
            self._size = size
            flusher = self._flusher
            kept = flusher.kept
            if not kept:
                flusher.loop.call_soon(flusher.flush)
            kept.append(self)
            return
        pending.append(data)
        self._size += len(data)
        if self._size > KEEP_MAX:
            # A body streamed without a pause: the transport's own buffer
            # and its flow control (pause_writing) take over at once.
            self.flush()

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def flush(self) -> None:
        """Send what was written since the last flush."""
        pending = self.pending
        if pending is None:
            return
        self.pending = None
        transport = self.transport
        if transport.is_closing():
            return  # the peer went away: nowhere to send it
        if len(pending) == 1:
            transport.write(pending[0])
        else:
            transport.writelines(pending)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def abort(self) -> None:
        self.pending = None
        self.transport.abort()

    def write_eof(self) -> None:
        self.flush()
        self.transport.write_eof()

    def get_write_buffer_size(self) -> int:
        kept = self._size if self.pending else 0
        return int(self.transport.get_write_buffer_size()) + kept

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return SocketAddresses(self.transport)
        return self.transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        self.transport.resume_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        protocol: asyncio.BaseProtocol = self.transport.get_protocol()
        return protocol

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class SocketAddresses:
    """A connection's socket as uvicorn uses it: for its two addresses.

    uvicorn asks the socket (``get_extra_info("socket")``) for its local and
    peer address on every connection, and each answer costs system calls;
    the loop has both already (``sockname``, ``peername``: the same values,
    read once when the connection was accepted). Anything else is the
    socket's own.
    """

    __slots__ = ("_transport",)

    def __init__(self, transport: Any) -> None:
        self._transport = transport

    def getsockname(self) -> Any:
        return self._transport.get_extra_info("sockname")

    def getpeername(self) -> Any:
        return self._transport.get_extra_info("peername")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport.get_extra_info("socket"), name)


class Relay(asyncio.Protocol):
    """``inner`` (uvicorn's protocol) behind a ``CoalescedTransport``; what
    arrives reaches it unchanged (``--asgi-guard off``)."""

    __slots__ = ("_flusher", "_loop", "inner", "transport")

    def __init__(self, inner: asyncio.Protocol, flusher: Flusher) -> None:
        self.inner = inner
        self._flusher = flusher
        self._loop = flusher.loop
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        coalesced = CoalescedTransport(transport, self._flusher)
        self.transport = coalesced
        self.inner.connection_made(coalesced)  # type: ignore[arg-type]  # a transport's stand-in

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class GuardedConnection(Relay):
    """Validates every byte before ``inner`` (uvicorn's protocol) sees it."""

    __slots__ = (
        "_at_start",
        "_deadlines",
        "_failed",
        "_held",
        "_idle",
        "_in_body",
        "_left",
        "_open",
        "_options",
        "_parser",
        "_unparsed",
        "_upgrade",
        "_watch",
    )

    def __init__(
        self,
        inner: asyncio.Protocol,
        options: GuardOptions,
        deadlines: GroupedTimers,
        flusher: Flusher,
    ) -> None:
        super().__init__(inner, flusher)
        self._options = options
        self._deadlines = deadlines
        # Made by ``_make_parser`` for the first receive ``plain_head`` cannot take.
        self._parser: RequestParser | None = None
        # The parser's bytes not consumed yet: what was received and is not
        # accepted is exactly their length.
        self._unparsed: bytes | bytearray = b""
        # At a message boundary with nothing held: the next receive may
        # take the ``plain_head`` path.
        self._idle = True
        self._held: bytes | bytearray = b""  # received, not yet forwarded
        self._at_start = True  # the next byte forwarded begins a message
        self._open = False  # a head was accepted, its message is not complete
        self._in_body = False  # ... and that head reached uvicorn
        self._upgrade = False  # the current message asks for a WebSocket
        self._left = -1  # bytes the parser held after the last message it completed
        self._failed = False
        # The deadline group this connection waits for a head in (``deadlines``).
        self._watch: Group | None = None

    # -- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self._idle and plain_head(data, self._options):
            watch = self._watch
            if watch is not None:
                del watch[self]
                self._watch = None
            self.inner.data_received(data)
            return
        if self._failed:
            return
        self._idle = False
        parser = self._parser or self._make_parser()
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
            return
        # Back at a boundary once everything received has been forwarded.
        self._idle = not self._held and not self._open and not self._failed

    def eof_received(self) -> bool | None:
        if self._failed:
            return None
        self._idle = False
        parser = self._parser
        if parser is None:
            return self.inner.eof_received()  # nothing held: nothing to refuse
        self._left = -1
        try:
            parser.feed(b"")
            self._advance()
        except HTTPError as exc:
            self._fail(exc)
            return None
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._held = b""
        self.inner.connection_lost(exc)

    # -- validation ------------------------------------------------------------

    def _make_parser(self) -> RequestParser:
        parser = make_parser(self._options.backend, self._options.limits)
        self._parser = parser
        self._unparsed = parser.unparsed
        return parser

    def _advance(self) -> None:
        """Pull events until the parser needs more bytes; forward what it accepted."""
        parser = self._parser
        assert parser is not None
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
                if self._watch is None and parser.has_buffered_data:
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
        self._idle = False
        transport = self.transport
        parser = self._parser
        assert transport is not None and parser is not None
        self._forward(len(self._held) - len(self._unparsed))
        protocol = transport.get_protocol()
        if protocol is self:
            return False  # uvicorn answered it as plain HTTP: keep validating
        self._cancel_timer()
        rest, self._held = self._held, b""
        parser.discard_unparsed()
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
        self._idle = False
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
        deadlines = self._deadlines
        if deadlines.delay > 0 and self._watch is None:
            self._watch = deadlines.join(self, self._header_timeout)

    def _cancel_timer(self) -> None:
        watch = self._watch
        if watch is not None:
            watch.pop(self, None)
            self._watch = None

    def _header_timeout(self) -> None:
        self._watch = None
        transport = self.transport
        if self._failed or transport is None or transport.is_closing():
            return
        if self._options.busy(self.inner):
            # The next head started while a response is going out: its
            # deadline counts once the connection is idle again.
            self._arm_header_timer()
            return
        self._failed = True
        self._idle = False
        parser = self._parser
        if parser is not None and parser.has_buffered_data:
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
