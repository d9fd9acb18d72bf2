"""Parser tables run against both backends; they must behave identically."""

from __future__ import annotations

import pytest
from http_helpers import BACKENDS, messages, parse_all

from forkserve.errors import HTTPError
from forkserve.http.parser import (
    NEED_DATA,
    Data,
    EndOfMessage,
    ParserLimits,
    Request,
    make_parser,
)

GET = b"GET /p?q=1 HTTP/1.1\r\nHost: example.com\r\nUser-Agent:  t \r\n\r\n"
POST = b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
CHUNKED = (
    b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Sum: abc\r\n\r\n"
)

backend = pytest.mark.parametrize("backend", BACKENDS)


@backend
def test_get_request_fields(backend: str) -> None:
    events = parse_all(backend, GET)
    assert events == [
        Request(
            method=b"GET",
            target=b"/p?q=1",
            http_version=b"1.1",
            headers=[(b"Host", b"example.com"), (b"User-Agent", b"t")],
            keep_alive=True,
            expect_continue=False,
            content_length=None,
            chunked=False,
        ),
        EndOfMessage(),
    ]


@backend
@pytest.mark.parametrize("step", [None, 1, 2, 3, 10])
def test_feeding_in_pieces_gives_same_events(backend: str, step: int | None) -> None:
    data = GET + POST + CHUNKED
    assert parse_all(backend, data, step=step) == parse_all(backend, data)
    got = messages(parse_all(backend, data, step=step))
    assert [(r.target, body) for r, body in got] == [
        (b"/p?q=1", b""),
        (b"/up", b"hello"),
        (b"/c", b"hello world"),
    ]


@backend
def test_chunked_with_trailers(backend: str) -> None:
    ((request, body),) = messages(parse_all(backend, CHUNKED))
    assert request.chunked and request.content_length is None
    assert body == b"hello world"


@backend
def test_body_is_streamed_not_buffered(backend: str) -> None:
    parser = make_parser(backend, ParserLimits())
    parser.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
    assert isinstance(parser.next_event(), Request)
    assert parser.next_event() == Data(b"abc")
    assert parser.next_event() is NEED_DATA
    parser.feed(b"defghij")
    assert parser.next_event() == Data(b"defghij")
    assert parser.next_event() == EndOfMessage()


@backend
def test_chunk_data_streams_before_chunk_ends(backend: str) -> None:
    parser = make_parser(backend, ParserLimits())
    parser.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\na\r\nabc")
    assert isinstance(parser.next_event(), Request)
    assert parser.next_event() == Data(b"abc")
    assert parser.next_event() is NEED_DATA


@backend
def test_pipelined_request_waits_for_next_cycle(backend: str) -> None:
    parser = make_parser(backend, ParserLimits())
    parser.feed(GET + POST)
    assert isinstance(parser.next_event(), Request)
    assert parser.next_event() == EndOfMessage()
    assert parser.next_event() is NEED_DATA
    assert parser.has_buffered_data
    parser.start_next_cycle()
    second = parser.next_event()
    assert isinstance(second, Request) and second.target == b"/up"
    assert parser.next_event() == Data(b"hello")
    assert parser.next_event() == EndOfMessage()
    assert not parser.has_buffered_data


@backend
def test_start_next_cycle_before_end_is_refused(backend: str) -> None:
    parser = make_parser(backend, ParserLimits())
    parser.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\n")
    parser.next_event()
    with pytest.raises(RuntimeError):
        parser.start_next_cycle()


@backend
def test_peer_close_between_requests_is_quiet(backend: str) -> None:
    parser = make_parser(backend, ParserLimits())
    parser.feed(GET)
    parser.next_event(), parser.next_event()
    parser.start_next_cycle()
    parser.feed(b"")
    assert parser.peer_closed
    assert parser.next_event() is NEED_DATA


@backend
def test_incomplete_body_raises_after_close(backend: str) -> None:
    parser = make_parser(backend, ParserLimits())
    parser.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 9\r\n\r\nabc")
    assert isinstance(parser.next_event(), Request)
    assert parser.next_event() == Data(b"abc")
    parser.feed(b"")
    with pytest.raises(HTTPError, match="incomplete body") as info:
        parser.next_event()
    assert info.value.status == 400


@backend
def test_error_is_sticky(backend: str) -> None:
    parser = make_parser(backend, ParserLimits())
    parser.feed(b"GET / HTTP/2.0\r\nHost: a\r\n\r\n")
    with pytest.raises(HTTPError) as info:
        parser.next_event()
    assert info.value.status == 505
    with pytest.raises(HTTPError):
        parser.feed(GET)
    with pytest.raises(HTTPError):
        parser.next_event()


@backend
@pytest.mark.parametrize(
    ("head", "keep_alive", "expect"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", True, False),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", False, False),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: foo, Close\r\n\r\n", False, False),
        (b"GET / HTTP/1.0\r\n\r\n", False, False),
        (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", True, False),
        (
            b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\nContent-Length: 1\r\n\r\n",
            True,
            True,
        ),
        (b"PUT / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n", False, False),
    ],
)
def test_connection_semantics(backend: str, head: bytes, keep_alive: bool, expect: bool) -> None:
    request = parse_all(backend, head, close=False)[0]
    assert isinstance(request, Request)
    assert (request.keep_alive, request.expect_continue) == (keep_alive, expect)


LIMITS = ParserLimits(
    max_request_line=20, max_header_fields=3, max_header_field_size=30, max_body=8
)


@backend
@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET /" + b"a" * 30 + b" HTTP/1.1\r\n", 414),
        (b"GET /" + b"a" * 30, 414),
        (b"GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"v" * 40 + b"\r\n\r\n", 431),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 9\r\n\r\n", 413),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n9\r\n", 413),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"4\r\nabcd\r\n5\r\nefghi\r\n",
            413,
        ),
    ],
)
def test_limits(backend: str, data: bytes, status: int) -> None:
    for step in (None, 1):
        events = parse_all(backend, data, step=step, limits=LIMITS, close=False)
        assert events[-1] == ("error", status)


@backend
def test_413_is_raised_before_body_is_read(backend: str) -> None:
    parser = make_parser(backend, ParserLimits(max_body=4))
    parser.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n")
    with pytest.raises(HTTPError) as info:
        parser.next_event()
    assert info.value.status == 413


@backend
def test_head_never_grows_unbounded(backend: str) -> None:
    limits = ParserLimits(max_request_line=50, max_header_fields=4, max_header_field_size=50)
    parser = make_parser(backend, limits)
    parser.feed(b"GET / HTTP/1.1\r\n")
    with pytest.raises(HTTPError) as info:
        for _ in range(100):
            parser.feed(b"X: " + b"y" * 20 + b"\r\n")
            assert parser.next_event() is NEED_DATA
    assert info.value.status == 431


@backend
def test_limit_on_body_still_accepts_exact_size(backend: str) -> None:
    data = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 8\r\n\r\n12345678"
    ((_, body),) = messages(parse_all(backend, data, limits=LIMITS))
    assert body == b"12345678"


def test_auto_prefers_httptools() -> None:
    parser = make_parser("auto", ParserLimits())
    parser.feed(GET)
    assert isinstance(parser.next_event(), Request)


def test_unknown_backend() -> None:
    with pytest.raises(ValueError, match="unknown parser backend"):
        make_parser("picohttp", ParserLimits())


@backend
def test_empty_lines_before_request_are_ignored(backend: str) -> None:
    events = parse_all(backend, b"\r\n\r\n" + GET)
    assert isinstance(events[0], Request)


@backend
def test_bare_lf_is_refused_early_without_waiting_for_more(backend: str) -> None:
    parser = make_parser(backend, ParserLimits())
    parser.feed(b"GET / HTTP/1.1\nHost")
    with pytest.raises(HTTPError) as info:
        parser.next_event()
    assert info.value.status == 400


@backend
def test_partial_head_limits_apply_before_the_head_ends(backend: str) -> None:
    parser = make_parser(backend, ParserLimits())
    parser.feed(b"GET / HTTP/1.1\r\n" + b"X: 1\r\n" * 101)
    with pytest.raises(HTTPError) as info:
        parser.next_event()
    assert info.value.status == 431

    parser = make_parser(backend, ParserLimits())
    parser.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"y" * 8200)
    with pytest.raises(HTTPError) as info:
        parser.next_event()
    assert info.value.status == 431


@backend
def test_trickled_head_is_linear_and_accepted(backend: str) -> None:
    head = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-Long: " + b"v" * 8000 + b"\r\n\r\n"
    ((request, _body),) = messages(parse_all(backend, head, step=1))
    assert request.headers[-1] == (b"X-Long", b"v" * 8000)


def test_framing_backend_frames_without_decoding() -> None:
    """The "framing" backend validates like the others; body Data is the raw framed bytes."""
    wire = (
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
        b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
        b"GET /c HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    for step in (None, 1, 7):
        events = parse_all("framing", wire, step=step)
        got = messages(events)
        assert [r.target for r, _ in got] == [b"/a", b"/b", b"/c"]
        assert got[0][1] == b"abc"
        assert got[1][1] == b"2\r\nhi\r\n0\r\n\r\n"
        assert got[2][1] == b""
    bad = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert parse_all("framing", bad)[-1] == ("error", 400)


def test_a_request_without_a_body_reaches_no_backend() -> None:
    from forkserve.http.parser import _Framer

    made: list[Request] = []

    def factory(request: Request, events: object) -> object:
        made.append(request)
        raise AssertionError("a bodiless message needs no backend")

    parser = _Framer(factory, ParserLimits())
    parser.feed(GET + b"DELETE /x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
    for method in (b"GET", b"DELETE"):
        request = parser.next_event()
        assert isinstance(request, Request) and request.method == method
        assert isinstance(parser.next_event(), EndOfMessage)
        assert parser.next_event() is NEED_DATA
        parser.start_next_cycle()
    assert made == []


@backend
def test_backends_are_made_once_per_process(backend: str) -> None:
    first = make_parser(backend, ParserLimits())
    second = make_parser(backend, ParserLimits())
    if backend != "h11":  # h11's factory carries the limits; it is made per parser
        assert first._factory is second._factory  # type: ignore[attr-defined]
    second.feed(POST)
    assert [type(e) for e in iter(second.next_event, NEED_DATA)] == [Request, Data, EndOfMessage]
