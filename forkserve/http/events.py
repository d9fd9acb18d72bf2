"""The parser's events and limits: what a request parser hands a connection.

Imports nothing from forkserve.
"""

from __future__ import annotations

import enum
from typing import NamedTuple, Protocol


class NeedData(enum.Enum):
    """Returned by ``next_event`` when the parser needs more bytes."""

    NEED_DATA = enum.auto()


NEED_DATA = NeedData.NEED_DATA


class Request(NamedTuple):
    method: bytes
    target: bytes
    http_version: bytes
    headers: list[tuple[bytes, bytes]]
    keep_alive: bool
    expect_continue: bool
    content_length: int | None
    chunked: bool


class Data(NamedTuple):
    data: bytes


class EndOfMessage:
    """The end of one message (one instance serves: it carries nothing)."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return type(other) is EndOfMessage

    def __hash__(self) -> int:
        return hash(EndOfMessage)

    def __repr__(self) -> str:
        return "EndOfMessage()"


class ParserLimits(NamedTuple):
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
    def unparsed(self) -> bytes | bytearray: ...
    def discard_unparsed(self) -> None: ...
    @property
    def peer_closed(self) -> bool: ...


# RFC 9110 §5.6.2 token; RFC 9112 §3 request-line. The target is limited to
# visible ASCII: no CTL, no space, no obs-text (httptools refuses it too).
