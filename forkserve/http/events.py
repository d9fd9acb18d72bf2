"""The parser's events and limits: what a request parser hands a connection.

Imports nothing from forkserve.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol


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
    def unparsed(self) -> bytes | bytearray: ...
    def discard_unparsed(self) -> None: ...
    @property
    def peer_closed(self) -> bool: ...


# RFC 9110 §5.6.2 token; RFC 9112 §3 request-line. The target is limited to
# visible ASCII: no CTL, no space, no obs-text (httptools refuses it too).
