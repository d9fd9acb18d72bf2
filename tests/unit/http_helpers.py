"""In-memory doubles for the HTTP layer: a fake transport and parser drivers."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from forkserve.errors import HTTPError
from forkserve.http.parser import (
    NEED_DATA,
    Data,
    EndOfMessage,
    ParserLimits,
    Request,
    make_parser,
)

BACKENDS = ["httptools", "h11"]


def parse_all(
    backend: str,
    data: bytes,
    step: int | None = None,
    limits: ParserLimits | None = None,
    close: bool = True,
) -> list[Any]:
    """Feed ``data`` (whole, or ``step`` bytes at a time), pull every event,
    start the next cycle after each message, and return the events with
    consecutive Data merged; an HTTPError ends the list as ("error", status)."""
    parser = make_parser(backend, limits or ParserLimits())
    pieces = [data] if step is None else [data[i : i + step] for i in range(0, len(data), step)]
    if close:
        pieces.append(b"")
    events: list[Any] = []
    try:
        for piece in pieces:
            parser.feed(piece)
            while True:
                event = parser.next_event()
                if event is NEED_DATA:
                    break
                if isinstance(event, Data) and events and isinstance(events[-1], Data):
                    events[-1] = Data(events[-1].data + event.data)
                else:
                    events.append(event)
                if isinstance(event, EndOfMessage):
                    parser.start_next_cycle()
    except HTTPError as exc:
        events.append(("error", exc.status))
    return events


def messages(events: Iterable[Any]) -> list[tuple[Request, bytes]]:
    """Group events into (request, body) pairs."""
    out: list[tuple[Request, bytes]] = []
    current: Request | None = None
    body = b""
    for event in events:
        if isinstance(event, Request):
            current, body = event, b""
        elif isinstance(event, Data):
            body += event.data
        elif isinstance(event, EndOfMessage):
            assert current is not None
            out.append((current, body))
            current = None
    return out


class FakeTransport:
    """A socket stand-in: scripted input chunks, recorded output.

    ``incoming`` items are bytes (returned by one recv, split to ``n``), or an
    exception instance to raise from recv. An exhausted script returns b""."""

    def __init__(self, *incoming: bytes | BaseException, sendfile_ok: bool = True) -> None:
        self.incoming: list[bytes | BaseException] = list(incoming)
        self.sent: list[bytes] = []
        self.timeouts: list[float | None] = []
        self.sendfile_calls: list[tuple[int, int | None]] = []
        self.sendfile_ok = sendfile_ok
        self.recv_calls = 0

    def recv(self, n: int) -> bytes:
        self.recv_calls += 1
        if not self.incoming:
            return b""
        item = self.incoming[0]
        if isinstance(item, BaseException):
            self.incoming.pop(0)
            raise item
        chunk, rest = item[:n], item[n:]
        if rest:
            self.incoming[0] = rest
        else:
            self.incoming.pop(0)
        return chunk

    def sendall(self, data: bytes | memoryview) -> None:
        self.sent.append(bytes(data))

    def sendfile(self, file: Any, offset: int = 0, count: int | None = None) -> int:
        if not self.sendfile_ok:
            raise OSError("sendfile not supported here")
        self.sendfile_calls.append((offset, count))
        file.seek(offset)
        data = file.read() if count is None else file.read(count)
        self.sent.append(data)
        return len(data)

    def settimeout(self, value: float | None) -> None:
        self.timeouts.append(value)

    @property
    def output(self) -> bytes:
        return b"".join(self.sent)


def split_responses(raw: bytes) -> list[tuple[bytes, dict[bytes, bytes], bytes]]:
    """Split sent bytes into (status line, lowercased headers, body) using the
    framing the server declared (Content-Length, chunked, or close)."""
    out = []
    while raw:
        head, _, raw = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        status = int(lines[0].split(b" ")[1])
        if b"content-length" in headers:
            n = int(headers[b"content-length"])
            body, raw = raw[:n], raw[n:]
        elif headers.get(b"transfer-encoding") == b"chunked":
            body = b""
            while True:
                size_line, _, raw = raw.partition(b"\r\n")
                size = int(size_line, 16)
                if size == 0:
                    _, _, raw = raw.partition(b"\r\n")
                    break
                body += raw[:size]
                raw = raw[size + 2 :]
        elif 100 <= status < 200 or status in (204, 304):
            body = b""
        else:
            body, raw = raw, b""
        out.append((lines[0], headers, body))
    return out
