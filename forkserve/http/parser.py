"""Request parsing: bytes in, events out, over httptools or h11.

Theory of operation
-------------------
A connection feeds received bytes to a parser and pulls events from it:
one ``Request``, zero or more ``Data``, one ``EndOfMessage``, and
``NEED_DATA`` whenever more bytes are needed. After the response has been
written the caller calls ``start_next_cycle`` to parse the next request of a
kept-alive connection; until then bytes of a pipelined request stay buffered.

Both backends sit behind one shared front end (``_Framer``) that sees every
raw byte first. It finds the end of the head, enforces the size limits,
validates the head strictly (RFC 9112) and decides the body framing; then it
walks the chunked framing line by line. Only bytes it has accepted reach the
backend, one message at a time, so the two backends cannot disagree about
what is a valid request or where a message ends, and a pipelined request is
never parsed early. The backend turns the accepted bytes of the current
message into ``Data`` and ``EndOfMessage`` events. A message without a body
(most requests) never reaches a backend: the front end has validated its
head and knows it ends there, so it emits ``EndOfMessage`` itself.

States of the front end:

    HEAD --head ok--> BODY_LENGTH --all bytes--> DONE
         \\--head ok--> CHUNK_SIZE --size 0--> TRAILERS --empty line--> DONE
                        CHUNK_SIZE --size n--> CHUNK_DATA --n bytes--> CHUNK_CRLF
                        CHUNK_CRLF --CRLF--> CHUNK_SIZE
    DONE --start_next_cycle--> HEAD
    any --violation--> ERROR (every later call raises the same HTTPError)

This module must not import sockets, threads, signals, selectors, asyncio or
anything from forkserve except ``forkserve.errors``.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from forkserve.errors import HTTPError

from .events import (
    NEED_DATA,
    Data,
    EndOfMessage,
    Event,
    NeedData,
    ParserLimits,
    Request,
    RequestParser,
)
from .head import (
    _CHUNK_LINE,
    _CRLF,
    _FIELD_LINE,
    _MAX_CHUNK_LINE,
    _MAX_CONTENT_LENGTH,
    _check_line_endings,
    _field_error,
    parse_head,
)

# Events carry no state of their own: one instance serves every message.
_END = EndOfMessage()


class _State(enum.Enum):
    HEAD = enum.auto()
    BODY_LENGTH = enum.auto()
    CHUNK_SIZE = enum.auto()
    CHUNK_DATA = enum.auto()
    CHUNK_CRLF = enum.auto()
    TRAILERS = enum.auto()
    DONE = enum.auto()
    ERROR = enum.auto()


class _Backend(Protocol):
    """Decodes the accepted bytes of ONE message into Data/EndOfMessage."""

    def start(self, head: bytes) -> None: ...
    def feed(self, data: bytes) -> None: ...
    def end(self) -> None: ...


class _Framer:
    """Shared front end; the backend is created per message by ``factory``."""

    __slots__ = (
        "_backend",
        "_body_total",
        "_buf",
        "_error",
        "_events",
        "_factory",
        "_head_lines",
        "_limits",
        "_max_head",
        "_peer_closed",
        "_remaining",
        "_request",
        "_scan_from",
        "_state",
        "_trailer_count",
    )

    def __init__(self, factory: Any, limits: ParserLimits) -> None:
        self._factory = factory
        self._limits = limits
        self._max_head = (
            limits.max_request_line
            + 2
            + limits.max_header_fields * (limits.max_header_field_size + 2)
            + 2
        )
        self._buf = bytearray()
        self._events: deque[Event] = deque()
        self._state = _State.HEAD
        self._error: HTTPError | None = None
        self._peer_closed = False
        self._backend: _Backend | None = None
        self._request: Request | None = None
        self._remaining = 0
        self._scan_from = 0
        self._head_lines = 0
        self._body_total = 0
        self._trailer_count = 0

    # -- public API -----------------------------------------------------
    def feed(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        if not data:
            self._peer_closed = True
        else:
            self._buf += data

    def next_event(self) -> Event:
        """Next event; a framing error is raised after the events that came
        before it, so feeding bytes at once or one by one looks the same."""
        events = self._events
        if events:
            return events.popleft()
        if self._error is not None:
            raise self._error
        try:
            self._advance()
        except HTTPError as exc:
            self._fail(exc)
        if events:
            return events.popleft()
        if self._error is not None:
            raise self._error
        if self._peer_closed and self._state is not _State.DONE:
            if self._state is _State.HEAD:
                if self._buf.strip(b"\r\n"):
                    self._fail(HTTPError("connection closed inside the request head", status=400))
                    raise self._fail_error()
            else:
                self._fail(HTTPError("incomplete body: connection closed early", status=400))
                raise self._fail_error()
        return NEED_DATA

    def start_next_cycle(self) -> None:
        if self._state is not _State.DONE or self._events:
            raise RuntimeError("start_next_cycle called before the request was fully read")
        self._state = _State.HEAD
        self._scan_from = 0
        self._head_lines = 0
        self._backend = None
        self._request = None

    @property
    def has_buffered_data(self) -> bool:
        return bool(self._buf) and self._state in (_State.HEAD, _State.DONE)

    @property
    def unparsed(self) -> bytes | bytearray:
        """Bytes received and not consumed yet (a live view: do not modify)."""
        return self._buf

    def discard_unparsed(self) -> None:
        """Drop the bytes not consumed yet (the connection is being closed)."""
        self._buf.clear()

    @property
    def peer_closed(self) -> bool:
        return self._peer_closed

    # -- internals --------------------------------------------------------
    def _fail(self, exc: HTTPError) -> None:
        self._state = _State.ERROR
        self._error = exc
        self._buf.clear()

    def _fail_error(self) -> HTTPError:
        assert self._error is not None
        return self._error

    def _advance(self) -> None:
        state = self._state
        if state is _State.HEAD:
            self._advance_head()
        elif state is _State.BODY_LENGTH:
            self._advance_length()
        elif state is not _State.DONE and state is not _State.ERROR:
            self._advance_chunked()

    def _advance_head(self) -> None:
        buf = self._buf
        # RFC 9112 §2.2: ignore empty lines received before the request-line.
        while buf.startswith(_CRLF):
            del buf[:2]
        if not buf:
            return
        start = max(self._scan_from - 3, 0)
        end = buf.find(b"\r\n\r\n", start)
        if end < 0:
            # Only the new bytes are scanned: a head trickled in byte by byte
            # must not cost quadratic time.
            scan = max(self._scan_from - 1, 0)
            _check_line_endings(buf, len(buf), True, scan)
            self._scan_from = len(buf)
            self._head_lines += buf.count(_CRLF, scan)
            limits = self._limits
            if self._head_lines > limits.max_header_fields + 1:
                raise HTTPError("too many header fields", status=431)
            if self._head_lines and len(buf) - buf.rfind(_CRLF) - 2 > limits.max_header_field_size:
                raise HTTPError("header field too long", status=431)
            first = buf.find(_CRLF)
            if first < 0 and len(buf) > self._limits.max_request_line:
                raise HTTPError("request line too long", status=414)
            if first > self._limits.max_request_line:
                raise HTTPError("request line too long", status=414)
            if len(buf) > self._max_head:
                raise HTTPError("request head too large", status=431)
            return
        _check_line_endings(buf, end, partial=False)
        head = bytes(buf[:end])
        del buf[: end + 4]
        request = parse_head(head, self._limits)
        self._request = request
        self._events.append(request)
        if not request.chunked and not request.content_length:
            # No body: the head is validated and nothing follows; no backend.
            self._state = _State.DONE
            self._events.append(_END)
            return
        backend = self._factory(request, self._events)
        self._backend = backend
        self._body_total = 0
        if request.chunked:
            self._state = _State.CHUNK_SIZE
            self._trailer_count = 0
            backend.start(head + b"\r\n\r\n")
            self._advance_chunked()
        else:
            self._state = _State.BODY_LENGTH
            self._remaining = request.content_length or 0
            backend.start(head + b"\r\n\r\n")
            self._advance_length()

    def _advance_length(self) -> None:
        buf = self._buf
        if not buf:
            return
        n = min(self._remaining, len(buf))
        chunk = bytes(buf[:n])
        del buf[:n]
        self._remaining -= n
        if self._remaining == 0:
            self._state = _State.DONE
        assert self._backend is not None
        self._backend.feed(chunk)

    def _advance_chunked(self) -> None:
        buf = self._buf
        out = bytearray()
        limits = self._limits
        try:
            while buf:
                state = self._state
                if state is _State.CHUNK_DATA:
                    n = min(self._remaining, len(buf))
                    out += buf[:n]
                    del buf[:n]
                    self._remaining -= n
                    if self._remaining == 0:
                        self._state = _State.CHUNK_CRLF
                elif state is _State.CHUNK_CRLF:
                    if len(buf) < 2:
                        if buf[:1] != b"\r":
                            raise HTTPError("missing CRLF after chunk data", status=400)
                        break
                    if buf[:2] != _CRLF:
                        raise HTTPError("missing CRLF after chunk data", status=400)
                    out += _CRLF
                    del buf[:2]
                    self._state = _State.CHUNK_SIZE
                else:
                    eol = buf.find(_CRLF)
                    if eol < 0:
                        _check_line_endings(buf, len(buf), partial=True)
                        if len(buf) > (
                            _MAX_CHUNK_LINE
                            if state is _State.CHUNK_SIZE
                            else limits.max_header_field_size
                        ):
                            raise HTTPError("chunk framing line too long", status=400)
                        break
                    line = bytes(buf[:eol])
                    if b"\r" in line or b"\n" in line:
                        raise HTTPError("bare CR or LF in chunked framing", status=400)
                    del buf[: eol + 2]
                    if state is _State.CHUNK_SIZE:
                        self._chunk_size_line(line)
                    elif line:
                        self._trailer_line(line)
                    else:
                        self._state = _State.DONE
                    out += line + _CRLF
                    if self._state is _State.DONE:
                        break
        finally:
            # Bytes accepted before a violation still reach the backend.
            if out:
                assert self._backend is not None
                self._backend.feed(bytes(out))
        if self._state is _State.DONE:
            assert self._backend is not None
            self._backend.end()

    def _chunk_size_line(self, line: bytes) -> None:
        m = _CHUNK_LINE.fullmatch(line)
        if m is None:
            raise HTTPError("malformed chunk size line", status=400)
        digits = m.group(1).lstrip(b"0")
        if len(digits) > 16:
            raise HTTPError("chunk size overflow", status=400)
        size = int(digits, 16) if digits else 0
        if size > _MAX_CONTENT_LENGTH:
            raise HTTPError("chunk size overflow", status=400)
        self._body_total += size
        max_body = self._limits.max_body
        if max_body and self._body_total > max_body:
            raise HTTPError("request body larger than the limit", status=413)
        if size:
            self._state = _State.CHUNK_DATA
            self._remaining = size
        else:
            self._state = _State.TRAILERS

    def _trailer_line(self, line: bytes) -> None:
        self._trailer_count += 1
        if self._trailer_count > self._limits.max_header_fields:
            raise HTTPError("too many trailer fields", status=431)
        if _FIELD_LINE.fullmatch(line) is None:
            raise HTTPError(_field_error(line), status=400)


# -- backends ---------------------------------------------------------------


class _HttptoolsBackend:
    """llhttp through httptools; callbacks append to the shared event deque."""

    __slots__ = ("_events", "_module", "_parser", "_request")

    def __init__(self, module: Any, request: Request, events: deque[Event]) -> None:
        self._module = module
        self._events = events
        self._request = request
        self._parser = module.HttpRequestParser(self)

    def on_body(self, body: bytes) -> None:
        self._events.append(Data(body))

    def on_message_complete(self) -> None:
        self._events.append(_END)

    def start(self, head: bytes) -> None:
        request = self._request
        # llhttp treats CONNECT and Upgrade as a protocol switch and skips the
        # body, and knows only registered methods; WSGI never switches, so
        # those heads are decoded through a synthetic head that carries only
        # the framing the front end has validated.
        if request.method == b"CONNECT" or b"\r\nupgrade:" in head.lower():
            self.feed(self._synthetic_head())
            return
        try:
            self._parser.feed_data(head)
        except self._module.HttpParserInvalidMethodError:
            self._parser = self._module.HttpRequestParser(self)
            self.feed(self._synthetic_head())
        except self._module.HttpParserError as exc:
            raise HTTPError(f"invalid request: {exc}", status=400) from exc

    def feed(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except self._module.HttpParserError as exc:
            raise HTTPError(f"invalid request: {exc}", status=400) from exc

    def end(self) -> None:
        """llhttp reports the end of a chunked message itself."""

    def _synthetic_head(self) -> bytes:
        request = self._request
        if request.chunked:
            return b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        length = request.content_length or 0
        return b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % length


class _H11Backend:
    """h11 in server mode; a fresh connection per message keeps h11's own
    keep-alive rules (it has none for HTTP/1.0) out of the way."""

    __slots__ = ("_conn", "_events", "_h11")

    def __init__(self, module: Any, request: Request, events: deque[Event], size: int) -> None:
        self._h11 = module
        self._events = events
        self._conn = module.Connection(module.SERVER, max_incomplete_event_size=size)

    def start(self, head: bytes) -> None:
        self.feed(head)

    def end(self) -> None:
        """h11 reports the end of a chunked message itself."""

    def feed(self, data: bytes) -> None:
        h11 = self._h11
        conn = self._conn
        conn.receive_data(data)
        events = self._events
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise HTTPError(f"invalid request: {exc}", status=400) from exc
            kind = type(event)
            if kind is h11.Data:
                events.append(Data(bytes(event.data)))
            elif kind is h11.EndOfMessage:
                events.append(_END)
                return
            elif event is h11.NEED_DATA or event is h11.PAUSED:
                return


class _FramingBackend:
    """No second parse: for a caller that forwards the accepted bytes itself.

    ``Data`` events carry the body bytes as framed on the wire (chunk-size
    lines included); ``EndOfMessage`` comes where the front end's framing
    ends the message.
    """

    __slots__ = ("_chunked", "_events", "_left")

    def __init__(self, request: Request, events: deque[Event]) -> None:
        self._events = events
        self._chunked = request.chunked
        self._left = 0 if request.chunked else (request.content_length or 0)

    def start(self, head: bytes) -> None:
        if not self._chunked and not self._left:
            self._events.append(_END)

    def feed(self, data: bytes) -> None:
        if data:
            self._events.append(Data(data))
        if not self._chunked:
            self._left -= len(data)
            if self._left <= 0:
                self._events.append(_END)

    def end(self) -> None:
        self._events.append(_END)


def _import(name: str) -> Any:
    if name == "httptools":
        import httptools

        return httptools
    import h11

    return h11


# Backend factories by name, built once per process (the import and the
# closure are not redone for every connection).
_Factory = Callable[[Request, deque[Event]], _Backend]
_FACTORIES: dict[str, _Factory] = {}


def make_parser(backend: str, limits: ParserLimits) -> RequestParser:
    """Return a parser over ``backend`` ("httptools", "h11", "auto" or "framing").

    ``framing`` validates and frames like the others but decodes nothing:
    body ``Data`` is the raw framed bytes (see ``_FramingBackend``).
    """
    factory = _FACTORIES.get(backend)
    if factory is None:
        name = backend
        if name == "auto":
            try:
                _import("httptools")
                name = "httptools"
            except ImportError:
                name = "h11"
        if name == "h11":
            factory = _h11_factory(limits)  # its size limit comes from ``limits``
        else:
            factory = _FACTORIES[backend] = _make_factory(name)
    return _Framer(factory, limits)


def _make_factory(backend: str) -> _Factory:
    if backend == "framing":

        def framing(request: Request, events: deque[Event]) -> _Backend:
            return _FramingBackend(request, events)

        return framing
    if backend == "httptools":
        module = _import("httptools")

        def factory(request: Request, events: deque[Event]) -> _Backend:
            return _HttptoolsBackend(module, request, events)

        return factory
    raise ValueError(f"unknown parser backend {backend!r}; use 'httptools', 'h11' or 'auto'")


def _h11_factory(limits: ParserLimits) -> _Factory:
    module = _import("h11")
    size = (
        2
        * (limits.max_request_line + limits.max_header_fields * (limits.max_header_field_size + 2))
        + _MAX_CHUNK_LINE
    )

    def factory(request: Request, events: deque[Event]) -> _Backend:
        return _H11Backend(module, request, events, size)

    return factory


__all__ = [
    "NEED_DATA",
    "Data",
    "EndOfMessage",
    "NeedData",
    "ParserLimits",
    "Request",
    "RequestParser",
    "make_parser",
    "parse_head",
]
