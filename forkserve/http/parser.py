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
message into ``Data`` and ``EndOfMessage`` events.

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
import re
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

from forkserve.errors import HTTPError


class NeedData(enum.Enum):
    """Returned by ``next_event`` when the parser needs more bytes."""

    NEED_DATA = enum.auto()


NEED_DATA = NeedData.NEED_DATA


@dataclass(frozen=True, slots=True)
class Request:
    method: bytes
    target: bytes
    http_version: bytes
    headers: list[tuple[bytes, bytes]]
    keep_alive: bool
    expect_continue: bool
    content_length: int | None
    chunked: bool


@dataclass(frozen=True, slots=True)
class Data:
    data: bytes


@dataclass(frozen=True, slots=True)
class EndOfMessage:
    pass


@dataclass(frozen=True, slots=True)
class ParserLimits:
    max_request_line: int = 4094
    max_header_fields: int = 100
    max_header_field_size: int = 8190
    max_body: int = 0  # 0 = unlimited


Event = Request | Data | EndOfMessage | NeedData


class RequestParser(Protocol):
    def feed(self, data: bytes) -> None: ...
    def next_event(self) -> Event: ...
    def start_next_cycle(self) -> None: ...
    @property
    def has_buffered_data(self) -> bool: ...
    @property
    def peer_closed(self) -> bool: ...


# RFC 9110 §5.6.2 token; RFC 9112 §3 request-line. The target is limited to
# visible ASCII: no CTL, no space, no obs-text (httptools refuses it too).
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])")
_ANY_VERSION = re.compile(rb"[^ ]+ [^ ]+(?: HTTP/[0-9]+\.[0-9]+)?")
# RFC 9112 §5: field-line = field-name ":" OWS field-value OWS; no space
# before the colon, values are VCHAR / obs-text / SP / HTAB.
_FIELD_LINE = re.compile(rb"(" + _TOKEN + rb"):[ \t]*([\t\x20-\x7e\x80-\xff]*?)[ \t]*")
# The whole field section at once, each line as "\r\n" field-line, ending in
# "\r\n": one C-level pass validates every line, so splitting is then safe.
_FIELD_BLOCK = re.compile(rb"(?:\r\n" + _TOKEN + rb":[^\x00-\x08\x0a-\x1f\x7f]*)*\r\n")
_ABSOLUTE_FORM = re.compile(rb"[A-Za-z][A-Za-z0-9+.\-]*://[\x21-\x7e]*")
_AUTHORITY_FORM = re.compile(rb"[A-Za-z0-9.\-_~!$&'()*+,;=%\[\]:]+:[0-9]+")
# RFC 9112 §7.1: chunk-size [ chunk-ext ] CRLF, strict: no whitespace at all.
_QUOTED = rb'"(?:[\t\x20\x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t\x20-\x7e\x80-\xff])*"'
_CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]+)((?:;" + _TOKEN + rb"(?:=(?:" + _TOKEN + rb"|" + _QUOTED + rb"))?)*)"
)
_MAX_CHUNK_LINE = 4096
_MAX_CONTENT_LENGTH = 2**63 - 1
_CRLF = b"\r\n"


class _State(enum.Enum):
    HEAD = enum.auto()
    BODY_LENGTH = enum.auto()
    CHUNK_SIZE = enum.auto()
    CHUNK_DATA = enum.auto()
    CHUNK_CRLF = enum.auto()
    TRAILERS = enum.auto()
    DONE = enum.auto()
    ERROR = enum.auto()


def _check_line_endings(buf: bytes | bytearray, end: int, partial: bool, start: int = 0) -> None:
    """Refuse a bare LF or bare CR in ``buf[start:end]`` (RFC 9112 §2.2 lets
    a server reject them; accepting them is how request smuggling starts). A
    partial buffer may end with the CR of a CRLF still to come."""
    if start and buf[start : start + 1] == b"\n":
        start -= 1  # keep a CRLF split by the previous scan whole
    n_crlf = buf.count(_CRLF, start, end)
    if buf.count(b"\n", start, end) != n_crlf:
        raise HTTPError("bare LF in request framing; lines must end with CRLF", status=400)
    n_cr = buf.count(b"\r", start, end)
    if n_cr != n_crlf and not (partial and n_cr == n_crlf + 1 and buf[end - 1 : end] == b"\r"):
        raise HTTPError("bare CR in request framing; lines must end with CRLF", status=400)


def parse_head(head: bytes, limits: ParserLimits) -> Request:
    """Validate a complete head (without its final empty line) and return the
    Request. Raises HTTPError with the status to answer with."""
    eol = head.find(_CRLF)
    line = head if eol < 0 else head[:eol]
    if len(line) > limits.max_request_line:
        raise HTTPError("request line too long", status=414)
    m = _REQUEST_LINE.fullmatch(line)
    if m is None:
        if _ANY_VERSION.fullmatch(line) and not line.endswith((b" HTTP/1.1", b" HTTP/1.0")):
            raise HTTPError("unsupported HTTP version; use HTTP/1.1 or HTTP/1.0", status=505)
        raise HTTPError("malformed request line", status=400)
    method, target, major, minor = m.groups()
    if major != b"1" or minor not in (b"0", b"1"):
        raise HTTPError("unsupported HTTP version; use HTTP/1.1 or HTTP/1.0", status=505)
    version = b"1.1" if minor == b"1" else b"1.0"
    _check_target(method, target)

    block = head[eol:] + _CRLF if eol >= 0 else b""
    if block:
        if block.count(_CRLF) - 1 > limits.max_header_fields:
            raise HTTPError("too many header fields", status=431)
        max_field = limits.max_header_field_size
        if len(block) > max_field and max(map(len, block.split(_CRLF))) > max_field:
            raise HTTPError("header field too long", status=431)
        if _FIELD_BLOCK.fullmatch(block) is None:
            raise HTTPError(_block_error(block), status=400)
        headers: list[tuple[bytes, bytes]] = []
        append = headers.append
        for raw in block[2:-2].split(_CRLF):
            name, _, value = raw.partition(b":")
            append((name, value.strip(b" \t")))
        lowered = block.lower()
        hosts = lowered.count(b"\r\nhost:")
    else:
        headers = []
        lowered = b""
        hosts = 0
    cl_values: list[bytes] = []
    te_values: list[bytes] = []
    connection = b""
    expect = b""
    # Only heads that carry a framing or connection header need a second look.
    if (
        b"\r\ncontent-length:" in lowered
        or b"\r\ntransfer-encoding:" in lowered
        or b"\r\nconnection:" in lowered
        or b"\r\nexpect:" in lowered
    ):
        for name, value in headers:
            lname = name.lower()
            if lname == b"content-length":
                cl_values.append(value)
            elif lname == b"transfer-encoding":
                te_values.append(value)
            elif lname == b"connection":
                connection = connection + b"," + value if connection else value
            elif lname == b"expect":
                expect = value

    if hosts > 1:
        raise HTTPError("more than one Host header", status=400)
    if hosts == 0 and version == b"1.1":
        raise HTTPError("missing Host header (required in HTTP/1.1)", status=400)

    content_length: int | None = None
    chunked = False
    if te_values:
        if cl_values:
            raise HTTPError("both Content-Length and Transfer-Encoding", status=400)
        if version == b"1.0":
            raise HTTPError("Transfer-Encoding in an HTTP/1.0 request", status=400)
        # Strict (RFC 9112 §6.1): the only coding accepted is exactly one
        # "chunked"; anything else cannot be framed safely.
        if len(te_values) != 1 or te_values[0].lower() != b"chunked":
            raise HTTPError("unsupported Transfer-Encoding; only 'chunked' is accepted", status=400)
        chunked = True
    elif cl_values:
        if len(cl_values) != 1:
            raise HTTPError("more than one Content-Length header", status=400)
        value = cl_values[0]
        if not value.isdigit() or not value.isascii() or len(value) > 19:
            raise HTTPError("malformed Content-Length", status=400)
        content_length = int(value)
        if content_length > _MAX_CONTENT_LENGTH:
            raise HTTPError("malformed Content-Length", status=400)
        if limits.max_body and content_length > limits.max_body:
            raise HTTPError("request body larger than the limit", status=413)

    tokens = {t.strip() for t in connection.lower().split(b",")} if connection else set()
    if version == b"1.1":
        keep_alive = b"close" not in tokens
    else:
        keep_alive = b"keep-alive" in tokens and b"close" not in tokens
    expect_continue = version == b"1.1" and expect.lower() == b"100-continue"
    return Request(
        method, target, version, headers, keep_alive, expect_continue, content_length, chunked
    )


def _check_target(method: bytes, target: bytes) -> None:
    """RFC 9112 §3.2: the four request-target forms, each for its methods."""
    if method == b"CONNECT":
        if _AUTHORITY_FORM.fullmatch(target) is None:
            raise HTTPError("CONNECT needs an authority-form target host:port", status=400)
    elif target[:1] == b"/":
        return
    elif target == b"*":
        if method != b"OPTIONS":
            raise HTTPError("asterisk-form target is only valid for OPTIONS", status=400)
    elif _ABSOLUTE_FORM.fullmatch(target) is None:
        raise HTTPError("malformed request target", status=400)


def _block_error(block: bytes) -> str:
    for raw in block.split(_CRLF)[1:-1]:
        if _FIELD_LINE.fullmatch(raw) is None:
            return _field_error(raw)
    return "invalid header block"


def _field_error(raw: bytes) -> str:
    if raw[:1] in (b" ", b"\t"):
        return "obsolete line folding in header (RFC 9112 §5.2)"
    colon = raw.find(b":")
    if colon < 0:
        return "header line without a colon"
    if colon > 0 and raw[colon - 1 : colon] in (b" ", b"\t"):
        return "whitespace between header name and colon (RFC 9112 §5.1)"
    if colon == 0:
        return "empty header name"
    return "invalid character in header"


class _Backend(Protocol):
    """Decodes the accepted bytes of ONE message into Data/EndOfMessage."""

    def start(self, head: bytes) -> None: ...
    def feed(self, data: bytes) -> None: ...


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
        while buf[:2] == _CRLF:
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
        backend = self._factory(request, self._events)
        self._backend = backend
        self._body_total = 0
        if request.chunked:
            self._state = _State.CHUNK_SIZE
            self._trailer_count = 0
            backend.start(head + b"\r\n\r\n")
            self._advance_chunked()
        elif request.content_length:
            self._state = _State.BODY_LENGTH
            self._remaining = request.content_length
            backend.start(head + b"\r\n\r\n")
            self._advance_length()
        else:
            self._state = _State.DONE
            backend.start(head + b"\r\n\r\n")

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
        self._events.append(EndOfMessage())

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
                events.append(EndOfMessage())
                return
            elif event is h11.NEED_DATA or event is h11.PAUSED:
                return


def _import(name: str) -> Any:
    if name == "httptools":
        import httptools

        return httptools
    import h11

    return h11


def make_parser(backend: str, limits: ParserLimits) -> RequestParser:
    """Return a parser over ``backend`` ("httptools", "h11" or "auto")."""
    if backend == "auto":
        try:
            module = _import("httptools")
            backend = "httptools"
        except ImportError:
            backend = "h11"
    if backend == "httptools":
        module = _import("httptools")

        def factory(request: Request, events: deque[Event]) -> _Backend:
            return _HttptoolsBackend(module, request, events)

    elif backend == "h11":
        module = _import("h11")
        size = (
            2
            * (
                limits.max_request_line
                + limits.max_header_fields * (limits.max_header_field_size + 2)
            )
            + _MAX_CHUNK_LINE
        )

        def factory(request: Request, events: deque[Event]) -> _Backend:
            return _H11Backend(module, request, events, size)

    else:
        raise ValueError(f"unknown parser backend {backend!r}; use 'httptools', 'h11' or 'auto'")
    return _Framer(factory, limits)
