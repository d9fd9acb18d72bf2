"""Response head building, validation and body framing."""

from __future__ import annotations

from typing import Any

import pytest

from forkserve.errors import ResponseError
from forkserve.http.response import (
    DATE,
    BodyFramer,
    DateCache,
    build_head,
    date_line,
    encode_chunk,
    error_response,
    parse_status,
)


def head(status: Any = "200 OK", headers: Any = (), **kw: Any) -> Any:
    args: dict[str, Any] = {
        "method": b"GET",
        "http_version": b"1.1",
        "keep_alive": True,
        "date": DateCache(lambda: 0.0),
    }
    args.update(kw)
    return build_head(status, list(headers), **args)


def test_date_cache_formats_once_per_second() -> None:
    now = [1_000_000_000.2]
    cache = DateCache(lambda: now[0])
    first = cache.header()
    assert first == b"Date: Sun, 09 Sep 2001 01:46:40 GMT\r\n"
    now[0] = 1_000_000_000.9
    assert cache.header() is first
    now[0] = 1_000_000_001.0
    assert cache.header() == b"Date: Sun, 09 Sep 2001 01:46:41 GMT\r\n"


def test_common_head() -> None:
    h = head(headers=[("Content-Type", "text/plain"), ("Content-Length", "3")])
    assert h.head == (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n"
        b"Date: Thu, 01 Jan 1970 00:00:00 GMT\r\nServer: forkserve\r\n\r\n"
    )
    assert (h.content_length, h.chunked, h.send_body, h.keep_alive) == (3, False, True, True)


@pytest.mark.parametrize(
    ("status", "code", "line"),
    [
        ("200 OK", 200, b"HTTP/1.1 200 OK\r\n"),
        ("404 Gone Fishing", 404, b"HTTP/1.1 404 Gone Fishing\r\n"),
        ("599 Custom", 599, b"HTTP/1.1 599 Custom\r\n"),
        ("204", 204, b"HTTP/1.1 204 No Content\r\n"),
        ("999 Max", 999, b"HTTP/1.1 999 Max\r\n"),
    ],
)
def test_parse_status(status: str, code: int, line: bytes) -> None:
    assert parse_status(status) == (code, line)


@pytest.mark.parametrize(
    "status", ["099 Low", "1000 X", "abc", "200 O\rK", "200 O\nK", b"200 OK", 200]
)
def test_bad_status(status: Any) -> None:
    with pytest.raises(ResponseError):
        parse_status(status)


@pytest.mark.parametrize(
    "headers",
    [
        [("X", "a\rb")],
        [("X", "a\nb")],
        [("X", "a\x00b")],
        [("X Y", "v")],
        [("", "v")],
        [("X\r\nY", "v")],
        [("X", 1)],
        [("X",)],
        [("Content-Length", "1"), ("Content-Length", "1")],
        [("Content-Length", "+1")],
        [("X", "\u20ac")],
    ],
)
def test_bad_headers_raise(headers: Any) -> None:
    with pytest.raises(ResponseError):
        head(headers=headers)


def test_framing_decisions() -> None:
    assert head().chunked
    assert b"Transfer-Encoding: chunked\r\n" in head().head
    h10 = head(http_version=b"1.0", keep_alive=False)
    assert not h10.chunked and not h10.keep_alive and b"Connection: close" in h10.head
    h10ka = head(http_version=b"1.0", keep_alive=True, headers=[("Content-Length", "0")])
    assert h10ka.keep_alive and b"Connection: keep-alive" in h10ka.head
    h10_no_length = head(http_version=b"1.0", keep_alive=True)
    assert not h10_no_length.keep_alive
    assert head(body_length=5).content_length == 5
    for status in ("204 No Content", "304 Not Modified", "101 Switching Protocols"):
        h = head(status)
        assert not h.send_body and not h.chunked and b"Transfer-Encoding" not in h.head
    h_head = head(method=b"HEAD", body_length=7)
    assert not h_head.send_body and b"Content-Length: 7" in h_head.head
    assert b"Content-Length" not in head("204 No Content", [("Content-Length", "5")]).head


def test_hop_by_hop_from_app() -> None:
    h = head(
        headers=[("Connection", "close"), ("Transfer-Encoding", "chunked"), ("Keep-Alive", "x")]
    )
    assert not h.keep_alive
    assert b"Keep-Alive" not in h.head and b"x\r\n" not in h.head
    # The app's framing headers are dropped; the server frames the body itself.
    assert h.chunked and h.head.count(b"Transfer-Encoding: chunked") == 1
    assert h.head.count(b"Connection:") == 1


def test_app_date_and_server_win() -> None:
    h = head(headers=[("Date", "yesterday"), ("Server", "mine")])
    assert b"Date: yesterday" in h.head and b"forkserve" not in h.head


def test_encode_chunk() -> None:
    assert encode_chunk(b"") == b""
    assert encode_chunk(b"x" * 26) == b"1a\r\n" + b"x" * 26 + b"\r\n"


def test_body_framer_short_and_long() -> None:
    framer = BodyFramer(head(headers=[("Content-Length", "5")]))
    assert framer.frame(b"abc") == b"abc"
    assert framer.must_close  # 2 bytes still owed
    assert framer.frame(b"defg") == b"de"
    assert framer.must_close and framer.overflow
    exact = BodyFramer(head(headers=[("Content-Length", "2")]))
    exact.frame(b"ab")
    assert not exact.must_close and exact.finish() == b""


def test_body_framer_chunked_and_no_body() -> None:
    framer = BodyFramer(head())
    assert framer.frame(b"hi") == b"2\r\nhi\r\n"
    assert framer.frame(b"") == b""
    assert framer.finish() == b"0\r\n\r\n"
    none = BodyFramer(head(method=b"HEAD"))
    assert none.frame(b"data") == b"" and none.finish() == b"" and not none.must_close


def test_error_response() -> None:
    raw = error_response(400, "bad\r\nthing", DateCache(lambda: 0.0))
    assert raw.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"Connection: close\r\n" in raw
    head_part, _, body = raw.partition(b"\r\n\r\n")
    assert b"Content-Length: %d" % len(body) in head_part


@pytest.mark.parametrize("second", [0, 951_782_400, 1_000_000_000, 1_709_251_199, 4_102_444_799])
def test_date_line_is_imf_fixdate(second: int) -> None:
    from email.utils import formatdate

    expected = f"Date: {formatdate(second, usegmt=True)}\r\n".encode("ascii")
    assert date_line(second) == expected


def test_a_head_is_built_once_and_gets_each_new_date() -> None:
    now = [1_000_000_000.0]
    date = DateCache(lambda: now[0])
    headers = [("Content-Type", "text/plain"), ("X-Unique-To-This-Test", "1")]
    first = head(headers=headers, date=date)
    # The same status and headers (a new list, as apps build them): the same head.
    assert head(headers=list(headers), date=date) is first
    now[0] += 1
    later = head(headers=list(headers), date=date)
    assert later is not first
    assert later.head == first.head.replace(b"01:46:40", b"01:46:41")
    assert (later.status, later.keep_alive, later.chunked) == (200, True, True)
    # Anything else that shapes the head is part of what is looked up.
    closing = head(headers=headers, date=date, keep_alive=False)
    assert b"Connection: close\r\n" in closing.head and b"Connection" not in later.head
    assert b"Content-Length: 3\r\n" in head(headers=headers, date=date, body_length=3).head
    assert not head(headers=headers, date=date, method=b"HEAD").send_body


def test_a_head_with_the_apps_own_date_never_changes() -> None:
    now = [0.0]
    date = DateCache(lambda: now[0])
    headers = [("Date", "Tue, 15 Nov 1994 08:12:31 GMT"), ("X-Own-Date", "1")]
    first = head(headers=headers, date=date)
    now[0] = 5000.0
    assert head(headers=headers, date=date) is first
    assert first.head.count(b"\r\nDate:") == 1


def test_headers_that_cannot_be_looked_up_are_still_built() -> None:
    as_lists = head(headers=[["X-List", "1"]])
    assert b"X-List: 1\r\n" in as_lists.head
    generated = build_head(
        "200 OK",
        (pair for pair in [("X-Gen", "1")]),
        method=b"GET",
        http_version=b"1.1",
        keep_alive=True,
        date=DateCache(lambda: 0.0),
    )
    assert b"X-Gen: 1\r\n" in generated.head


def test_an_invalid_head_is_refused_every_time() -> None:
    for _ in range(2):
        with pytest.raises(ResponseError):
            head(headers=[("X-Bad", "a\r\nInjected: 1")])


def test_the_head_cache_stays_bounded() -> None:
    from forkserve.http import response

    for n in range(response._SHAPE_CACHE_SIZE + 10):
        head(headers=[("X-Bounded", str(n))])
    assert len(response._SHAPE_CACHE) <= response._SHAPE_CACHE_SIZE
    assert b"X-Bounded: 3\r\n" in head(headers=[("X-Bounded", "3")]).head


def test_the_shared_date_cache() -> None:
    line = DATE.header()
    assert line.startswith(b"Date: ") and line.endswith(b" GMT\r\n")
    assert DATE.header() in (line, DATE.header())
