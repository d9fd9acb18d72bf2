"""Response heads: validation of what the application returns, the framing
decision, and the bytes of the status line and headers.

Pure functions and small value objects; the connection (``wsgi.py``) sends
the bytes. This module must not import sockets, threads, signals, selectors,
asyncio or anything from forkserve except ``forkserve.errors``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus

from forkserve.errors import ResponseError

# RFC 9110 §5.6.2 token for field names; values may not carry CR, LF or NUL
# (RFC 9110 §5.5), which is what response splitting needs.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(r"[\r\n\x00]")
_TOKEN_BYTES = re.compile(_TOKEN.pattern.encode("ascii"))
_BAD_VALUE_BYTES = re.compile(_BAD_VALUE.pattern.encode("ascii"))
_STATUS = re.compile(r"([0-9]{3})(?: ([^\r\n\x00]*))?")

_STATUS_LINES: dict[tuple[int, str], bytes] = {
    (s.value, s.phrase): b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode("latin-1"))
    for s in HTTPStatus
}
_REASONS = {s.value: s.phrase for s in HTTPStatus}

# Hop-by-hop headers the server owns (RFC 9110 §7.6.1); the application's
# values are read for intent and not forwarded.
_HOP_BY_HOP = frozenset({"connection", "transfer-encoding", "keep-alive"})

# Headers whose value changes the framing or the defaults; never cached.
_SPECIAL = frozenset({"content-length", "date", "server"})
# Small bounded caches: apps send the same few statuses and headers.
_STATUS_CACHE: dict[str, tuple[int, bytes]] = {}
_LINE_CACHE: dict[tuple[str, str], bytes] = {}
# Whole heads by everything that shapes them (see ``build_head``); cleared
# when full, so an app whose headers change on every response only misses.
_SHAPE_CACHE: dict[tuple[object, ...], _Shape] = {}
_SHAPE_CACHE_SIZE = 256

# RFC 9110 §5.6.7 IMF-fixdate pieces.
_DAYS = (b"Mon", b"Tue", b"Wed", b"Thu", b"Fri", b"Sat", b"Sun")
_MONTHS = (
    b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun",
    b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec",
)  # fmt: skip

LAST_CHUNK = b"0\r\n\r\n"
CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"


class DateCache:
    """The ``Date`` header line, formatted at most once per second.

    One instance can serve every connection and thread of a process
    (``DATE``): the second and its line are replaced together, as one tuple.
    """

    __slots__ = ("_clock", "_current")

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._current = (-1, b"")

    def header(self) -> bytes:
        """``b"Date: <IMF-fixdate>\\r\\n"`` for the current second; the same
        bytes object for every call within one second."""
        second = int(self._clock())
        current = self._current
        if current[0] == second:
            return current[1]
        line = date_line(second)
        self._current = (second, line)
        return line


def date_line(second: int) -> bytes:
    """The ``Date`` header line for ``second`` (epoch), IMF-fixdate (RFC 9110 §5.6.7)."""
    t = time.gmtime(second)
    return b"Date: %s, %02d %s %04d %02d:%02d:%02d GMT\r\n" % (
        _DAYS[t.tm_wday],
        t.tm_mday,
        _MONTHS[t.tm_mon - 1],
        t.tm_year,
        t.tm_hour,
        t.tm_min,
        t.tm_sec,
    )


# The process-wide Date line: connections share it instead of each
# formatting the date again.
DATE = DateCache()


def check_header(name: str | bytes, value: str | bytes) -> None:
    """Raise ResponseError unless ``name`` is a token (RFC 9110 §5.6.2) and
    ``value`` holds no CR, LF or NUL (RFC 9110 §5.5); both str or both bytes."""
    if isinstance(name, bytes) and isinstance(value, bytes):
        name_ok = _TOKEN_BYTES.fullmatch(name) is not None
        value_ok = _BAD_VALUE_BYTES.search(value) is None
    elif isinstance(name, str) and isinstance(value, str):
        name_ok = _TOKEN.fullmatch(name) is not None
        value_ok = _BAD_VALUE.search(value) is None
    else:
        raise ResponseError(
            f"invalid header ({name!r}, {value!r}): name and value must both be str or bytes"
        )
    if not name_ok:
        raise ResponseError(f"invalid header name {name!r}")
    if not value_ok:
        raise ResponseError(f"invalid header value for {name!r}: CR, LF or NUL")


def parse_status(status: object) -> tuple[int, bytes]:
    """Validate a WSGI status string; return the code and its status line."""
    if type(status) is str:
        found = _STATUS_CACHE.get(status)
        if found is not None:
            return found
    result = _parse_status(status)
    if len(_STATUS_CACHE) < 256:
        _STATUS_CACHE[status] = result  # type: ignore[index]  # str, checked above
    return result


def _parse_status(status: object) -> tuple[int, bytes]:
    if not isinstance(status, str):
        raise ResponseError(f"status must be a str like '200 OK', got {type(status).__name__}")
    m = _STATUS.fullmatch(status)
    if m is None:
        raise ResponseError(f"invalid status {status!r}: expected '<3-digit code> <reason>'")
    code = int(m.group(1))
    if code < 100:
        raise ResponseError(f"invalid status code {code}: must be 100-999")
    reason = m.group(2)
    if reason is None:
        reason = _REASONS.get(code, "")
    line = _STATUS_LINES.get((code, reason))
    if line is None:
        try:
            line = b"HTTP/1.1 %d %s\r\n" % (code, reason.encode("latin-1"))
        except UnicodeEncodeError:
            raise ResponseError(f"invalid status {status!r}: reason must be latin-1")
    return code, line


class ResponseHead:
    """The head to send and the framing the body must follow."""

    __slots__ = ("chunked", "content_length", "head", "keep_alive", "send_body", "status")

    def __init__(
        self,
        status: int,
        head: bytes,
        chunked: bool,
        content_length: int | None,
        send_body: bool,
        keep_alive: bool,
    ) -> None:
        self.status = status
        self.head = head
        self.chunked = chunked
        self.content_length = content_length
        self.send_body = send_body
        self.keep_alive = keep_alive


class _Shape:
    """A head built once: the bytes before and after its ``Date`` line, and
    the latest ResponseHead with that line filled in (replaced each second)."""

    __slots__ = ("_after", "_before", "_current", "_fields")

    def __init__(self, head: ResponseHead, date_at: int, date_len: int, date: bytes) -> None:
        data = head.head
        self._fields = (
            head.status,
            head.chunked,
            head.content_length,
            head.send_body,
            head.keep_alive,
        )
        if date_at < 0:
            self._before, self._after = data, b""
        else:
            self._before, self._after = data[:date_at], data[date_at + date_len :]
        self._current = (date if date_at >= 0 else None, head)

    def head(self, date: DateCache) -> ResponseHead:
        line, head = self._current
        if line is None:
            return head  # the application's own Date: nothing changes
        now = date.header()
        if now is not line and now != line:
            status, chunked, content_length, send_body, keep_alive = self._fields
            head = ResponseHead(
                status,
                self._before + now + self._after,
                chunked,
                content_length,
                send_body,
                keep_alive,
            )
            self._current = (now, head)
        return head


def build_head(
    status: object,
    headers: Iterable[tuple[str, str]],
    *,
    method: bytes,
    http_version: bytes,
    keep_alive: bool,
    date: DateCache,
    server: bytes = b"forkserve",
    body_length: int | None = None,
) -> ResponseHead:
    """Validate the application's status and headers and build the head.

    Framing: HEAD, 1xx, 204 and 304 carry no body; otherwise the app's
    Content-Length, else ``body_length`` when the server knows the whole body
    in advance, else chunked (HTTP/1.1 kept alive), else the end of the body
    is the close of the connection. Raises ResponseError on anything that
    must not be sent.

    The same arguments give the same head but for its Date line, so heads
    are kept by their arguments: an application answering with the same
    status and header list costs a tuple and a dictionary lookup, and the
    returned ResponseHead may be shared (it is never modified).
    """
    items = headers if type(headers) is tuple else tuple(headers)
    key = (status, items, method == b"HEAD", http_version, keep_alive, body_length, server)
    try:
        shape = _SHAPE_CACHE.get(key)
    except TypeError:  # an unhashable header item: no caching, the checks say why
        return _build_head(
            status, items, method, http_version, keep_alive, date, server, body_length
        )[0]
    if shape is None:
        head, date_at, line = _build_head(
            status, items, method, http_version, keep_alive, date, server, body_length
        )
        if len(_SHAPE_CACHE) >= _SHAPE_CACHE_SIZE:
            _SHAPE_CACHE.clear()
        _SHAPE_CACHE[key] = _Shape(head, date_at, len(line), line)
        return head
    return shape.head(date)


def _build_head(
    status: object,
    headers: Iterable[tuple[str, str]],
    method: bytes,
    http_version: bytes,
    keep_alive: bool,
    date: DateCache,
    server: bytes,
    body_length: int | None,
) -> tuple[ResponseHead, int, bytes]:
    """The head, where its server-made Date line starts (-1: none) and that line."""
    code, status_line = parse_status(status)
    parts = [status_line]
    content_length: int | None = None
    has_date = has_server = False
    no_body_status = code < 200 or code == 204 or code == 304
    line_cache = _LINE_CACHE
    for item in headers:
        cached = line_cache.get(item) if type(item) is tuple else None
        if cached is not None:
            # An ordinary header already validated and encoded once.
            parts.append(cached)
            continue
        try:
            name, value = item
        except (TypeError, ValueError):
            raise ResponseError(f"invalid header {item!r}: expected a (name, value) pair")
        if not isinstance(name, str) or not isinstance(value, str):
            raise ResponseError(f"invalid header {item!r}: name and value must be str")
        check_header(name, value)
        lname = name.lower()
        if lname in _HOP_BY_HOP:
            if lname == "connection" and "close" in value.lower():
                keep_alive = False
            continue
        if lname == "content-length":
            stripped = value.strip()
            if content_length is not None or not (stripped.isdigit() and stripped.isascii()):
                raise ResponseError(f"invalid Content-Length {value!r}")
            content_length = int(stripped)
            if no_body_status and code != 304:
                continue
            value = stripped
        elif lname == "date":
            has_date = True
        elif lname == "server":
            has_server = True
        try:
            line = b"%s: %s\r\n" % (name.encode("ascii"), value.encode("latin-1"))
        except UnicodeEncodeError:
            raise ResponseError(f"invalid header value for {name!r}: not latin-1")
        parts.append(line)
        if lname not in _SPECIAL and len(line_cache) < 512 and type(item) is tuple:
            line_cache[item] = line

    send_body = not (no_body_status or method == b"HEAD")
    chunked = False
    if content_length is None and body_length is not None and not no_body_status:
        # HEAD too: the length a GET would have (RFC 9110 §8.6).
        content_length = body_length
        parts.append(b"Content-Length: %d\r\n" % body_length)
    elif send_body and content_length is None:
        if http_version == b"1.1":
            # Chunked even when closing: a client can then tell a complete
            # body from one cut short by an error (RFC 9112 §6.3).
            chunked = True
            parts.append(b"Transfer-Encoding: chunked\r\n")
        else:
            keep_alive = False
    date_at = -1
    line = b""
    if not has_date:
        date_at = sum(map(len, parts))
        line = date.header()
        parts.append(line)
    if not has_server:
        parts.append(b"Server: %s\r\n" % server)
    if not keep_alive:
        parts.append(b"Connection: close\r\n")
    elif http_version == b"1.0":
        parts.append(b"Connection: keep-alive\r\n")
    parts.append(b"\r\n")
    head = ResponseHead(code, b"".join(parts), chunked, content_length, send_body, keep_alive)
    return head, date_at, line


def encode_chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (RFC 9112 §7.1); empty data gives b""."""
    if not data:
        return b""
    return b"%x\r\n%s\r\n" % (len(data), data)


class BodyFramer:
    """Frames body bytes as the head declared.

    A body longer than its Content-Length is truncated; shorter or longer,
    the connection must then be closed (``must_close``), since the peer
    cannot find the next response otherwise.
    """

    __slots__ = ("_chunked", "_remaining", "_send", "overflow", "sent")

    def __init__(self, head: ResponseHead) -> None:
        self._chunked = head.chunked
        self._send = head.send_body
        self._remaining = head.content_length if head.send_body else None
        self.overflow = False
        self.sent = 0

    def frame(self, data: bytes) -> bytes:
        """The bytes to send for ``data`` (possibly b"")."""
        if not self._send or not data:
            return b""
        if self._chunked:
            self.sent += len(data)
            return b"%x\r\n%s\r\n" % (len(data), data)
        remaining = self._remaining
        if remaining is not None:
            if len(data) > remaining:
                data = data[:remaining]
                self.overflow = True
            self._remaining = remaining - len(data)
        self.sent += len(data)
        return data

    def allow(self, count: int) -> int:
        """How many of ``count`` raw bytes (e.g. a sendfile) may be sent."""
        if not self._send:
            return 0
        remaining = self._remaining
        if remaining is not None and count > remaining:
            self.overflow = True
            count = remaining
        if remaining is not None:
            self._remaining = remaining - count
        self.sent += count
        return count

    def finish(self) -> bytes:
        """Bytes that end the body: the last chunk when chunked."""
        return LAST_CHUNK if self._chunked and self._send else b""

    @property
    def must_close(self) -> bool:
        return self.overflow or bool(self._remaining)


def error_response(
    status: int, message: str, date: DateCache, server: bytes = b"forkserve"
) -> bytes:
    """A complete short plain-text response that closes the connection."""
    reason = _REASONS.get(status, "Error")
    body = f"{message}\n".encode("latin-1", "replace")
    return b"".join(
        (
            b"HTTP/1.1 %d %s\r\n" % (status, reason.encode("latin-1")),
            b"Content-Type: text/plain; charset=utf-8\r\n",
            b"Content-Length: %d\r\n" % len(body),
            date.header(),
            b"Server: %s\r\n" % server,
            b"Connection: close\r\n\r\n",
            body,
        )
    )
