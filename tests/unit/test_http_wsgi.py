"""WSGIConnection driven through an in-memory transport."""

from __future__ import annotations

import io
import logging
import sys
from typing import Any

import pytest
from http_helpers import BACKENDS, FakeTransport, split_responses

from forkserve.http.parser import ParserLimits
from forkserve.http.wsgi import HTTPOptions, WSGIConnection

Environ = dict[str, Any]


def hello(environ: Environ, start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]


def serve(
    app: Any,
    *incoming: bytes | BaseException,
    backend: str = "httptools",
    client: Any = ("10.1.2.3", 5555),
    server: Any = ("127.0.0.1", 8000),
    max_requests: int = 10,
    **options: Any,
) -> tuple[FakeTransport, WSGIConnection, list[bool]]:
    transport = FakeTransport(*incoming)
    conn = WSGIConnection(transport, app, HTTPOptions(backend=backend, **options), client, server)
    results = []
    for _ in range(max_requests):
        keep = conn.handle_request()
        results.append(keep)
        if not keep:
            break
    return transport, conn, results


backend = pytest.mark.parametrize("backend", BACKENDS)
GET = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"


@backend
def test_environ_has_every_pep3333_key(backend: str) -> None:
    seen: list[Environ] = []

    def app(environ: Environ, start_response: Any) -> list[bytes]:
        seen.append(environ)
        return hello(environ, start_response)

    req = (
        b"POST /app/a%20b/c?x=1&y=%20 HTTP/1.1\r\nHost: example.com:8080\r\n"
        b"Content-Type: text/plain\r\nContent-Length: 3\r\nX-Thing: 1\r\nx-thing: 2\r\n"
        b"X_Thing: spoof\r\nCookie: a=1\r\nCookie: b=2\r\n\r\nabc"
    )
    serve(app, req, backend=backend, root_path="/app")
    env = seen[0]
    assert env["REQUEST_METHOD"] == "POST"
    assert env["SCRIPT_NAME"] == "/app"
    assert env["PATH_INFO"] == "/a b/c"
    assert env["QUERY_STRING"] == "x=1&y=%20"
    assert env["RAW_URI"] == "/app/a%20b/c?x=1&y=%20"
    assert env["CONTENT_TYPE"] == "text/plain"
    assert env["CONTENT_LENGTH"] == "3"
    assert "HTTP_CONTENT_LENGTH" not in env
    assert env["SERVER_NAME"] == "127.0.0.1"
    assert env["SERVER_PORT"] == "8000"
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert env["HTTP_HOST"] == "example.com:8080"
    assert env["HTTP_X_THING"] == "1, 2"  # the underscore spelling was dropped
    assert env["HTTP_COOKIE"] == "a=1; b=2"
    assert env["REMOTE_ADDR"] == "10.1.2.3"
    assert env["REMOTE_PORT"] == "5555"
    assert env["wsgi.version"] == (1, 0)
    assert env["wsgi.url_scheme"] == "http"
    assert env["wsgi.errors"] is sys.stderr
    assert env["wsgi.multithread"] is False
    assert env["wsgi.multiprocess"] is True
    assert env["wsgi.run_once"] is False
    assert env["wsgi.input_terminated"] is True
    assert callable(env["wsgi.file_wrapper"])
    assert all(type(k) is str for k in env)


def test_path_info_is_latin1_and_root_path_only_strips_a_prefix() -> None:
    seen: list[Environ] = []

    def app(environ: Environ, start_response: Any) -> list[bytes]:
        seen.append(environ)
        return hello(environ, start_response)

    serve(app, b"GET /application/%C3%A9 HTTP/1.1\r\nHost: a\r\n\r\n", root_path="/app")
    assert seen[0]["PATH_INFO"] == "/application/\u00c3\u00a9"
    assert seen[0]["SCRIPT_NAME"] == "/app"


def test_unix_socket_peer_and_server() -> None:
    seen: list[Environ] = []

    def app(environ: Environ, start_response: Any) -> list[bytes]:
        seen.append(environ)
        return hello(environ, start_response)

    serve(app, b"GET / HTTP/1.1\r\nHost: site.test:81\r\n\r\n", client="", server="/run/s.sock")
    assert seen[0]["REMOTE_ADDR"] == ""
    assert (seen[0]["SERVER_NAME"], seen[0]["SERVER_PORT"]) == ("site.test", "81")


@backend
def test_streaming_input_read_readline_iter(backend: str) -> None:
    got: dict[str, Any] = {}

    def app(environ: Environ, start_response: Any) -> list[bytes]:
        if got:
            return hello(environ, start_response)
        stream = environ["wsgi.input"]
        got["first"] = stream.read(3)
        got["line"] = stream.readline()
        got["limited"] = stream.readline(2)
        got["rest"] = list(stream)
        got["after"] = stream.read()
        return hello(environ, start_response)

    body = b"abcdef\nghijk\nlm\nno"
    head = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body)
    # body arrives in pieces, then the next request is already queued
    transport, _, _ = serve(app, head + body[:4], body[4:9], body[9:] + GET, backend=backend)
    assert got == {
        "first": b"abc",
        "line": b"def\n",
        "limited": b"gh",
        "rest": [b"ijk\n", b"lm\n", b"no"],
        "after": b"",
    }
    assert len(split_responses(transport.output)) == 2


@backend
def test_chunked_request_body_and_readlines(backend: str) -> None:
    got: list[Any] = []

    def app(environ: Environ, start_response: Any) -> list[bytes]:
        got.append(environ["wsgi.input"].readlines())
        got.append("CONTENT_LENGTH" in environ)
        return hello(environ, start_response)

    req = (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4\r\nab\nc\r\n3\r\nd\nz\r\n0\r\n\r\n"
    )
    serve(app, req, backend=backend)
    assert got == [[b"ab\n", b"cd\n", b"z"], False]


def test_100_continue_sent_on_first_read_only() -> None:
    def app(environ: Environ, start_response: Any) -> list[bytes]:
        data = environ["wsgi.input"].read()
        start_response("200 OK", [])
        return [data]

    req = b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"
    transport, _, _ = serve(app, req, b"data")
    assert transport.sent[0] == b"HTTP/1.1 100 Continue\r\n\r\n"
    responses = split_responses(transport.output)
    assert responses[1][2] == b"data"

    # body already received with the head: no 100 Continue
    transport, _, _ = serve(app, req + b"data")
    assert b"100 Continue" not in transport.output


def test_100_continue_not_sent_when_app_ignores_body_and_connection_closes() -> None:
    req = b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"
    transport, _, results = serve(hello, req)
    assert b"100 Continue" not in transport.output
    assert results == [False]
    assert split_responses(transport.output)[0][1][b"connection"] == b"close"


@backend
def test_chunked_response_for_http11_keep_alive(backend: str) -> None:
    def app(environ: Environ, start_response: Any) -> Any:
        start_response("200 OK", [])
        yield b"ab"
        yield b""
        yield b"cd"

    transport, _, results = serve(app, GET, backend=backend)
    ((_status, headers, body),) = split_responses(transport.output)
    assert headers[b"transfer-encoding"] == b"chunked"
    assert body == b"abcd"
    assert transport.output.endswith(b"0\r\n\r\n")
    assert results == [True, False]  # the second call sees EOF


def test_http10_gets_close_delimited_body() -> None:
    def app(environ: Environ, start_response: Any) -> Any:
        start_response("200 OK", [])
        yield b"ab"
        yield b"cd"

    transport, _, results = serve(app, b"GET / HTTP/1.0\r\n\r\n")
    assert results == [False]
    head, _, body = transport.output.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head and b"Connection: close" in head
    assert body == b"abcd"


def test_http10_keep_alive_with_length() -> None:
    req = b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
    transport, _, results = serve(hello, req, req)
    assert results == [True, True, False]
    assert transport.output.count(b"Connection: keep-alive") == 2


def test_single_item_list_gets_content_length_and_one_sendall() -> None:
    transport, _, _ = serve(hello, GET)
    assert len(transport.sent) == 1
    status, headers, body = split_responses(transport.sent[0])[0]
    assert status == b"HTTP/1.1 200 OK"
    assert headers[b"content-length"] == b"5"
    assert headers[b"server"] == b"forkserve"
    assert b"date" in headers
    assert body == b"hello"


def test_app_content_length_and_app_server_header_kept() -> None:
    def app(environ: Environ, start_response: Any) -> Any:
        start_response("200 OK", [("Content-Length", "4"), ("Server", "mine")])
        return iter([b"ab", b"cd"])

    transport, _, results = serve(app, GET, GET)
    assert results == [True, True, False]
    responses = split_responses(transport.output)
    assert [r[2] for r in responses] == [b"abcd", b"abcd"]
    assert responses[0][1][b"server"] == b"mine"


@pytest.mark.parametrize("status", ["204 No Content", "304 Not Modified"])
def test_no_body_statuses(status: str) -> None:
    def app(environ: Environ, start_response: Any) -> list[bytes]:
        start_response(status, [])
        return [b"ignored"]

    transport, _, results = serve(app, GET, GET)
    assert b"ignored" not in transport.output
    assert b"Transfer-Encoding" not in transport.output
    assert results == [True, True, False]


def test_head_request_has_no_body() -> None:
    transport, _, results = serve(hello, b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n", GET)
    head_response, _, rest = transport.output.partition(b"\r\n\r\n")
    assert b"Content-Length: 5" in head_response
    assert rest.startswith(b"HTTP/1.1 200 OK\r\n")  # no body between the two
    assert split_responses(rest)[0][2] == b"hello"
    assert results == [True, True, False]


def test_short_body_closes_connection() -> None:
    def app(environ: Environ, start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Length", "10")])
        return [b"abc", b"de"]

    transport, _, results = serve(app, GET, GET)
    assert results == [False]
    assert transport.output.endswith(b"abcde")


def test_long_body_is_truncated_and_closes() -> None:
    def app(environ: Environ, start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Length", "3")])
        return [b"ab", b"cdef"]

    transport, _, results = serve(app, GET, GET)
    assert results == [False]
    assert transport.output.endswith(b"\r\n\r\nabc")


class Closing:
    def __init__(self, items: list[Any], fail: bool = False) -> None:
        self.items = items
        self.fail = fail
        self.closed = 0

    def __iter__(self) -> Any:
        for item in self.items:
            if self.fail:
                raise RuntimeError("boom in iterable")
            yield item

    def close(self) -> None:
        self.closed += 1


@pytest.mark.parametrize(
    "headers",
    [
        [("X-Bad", "a\r\nSet-Cookie: x=1")],
        [("X-Bad", "a\nb")],
        [("X-Bad", "a\x00b")],
        [("Bad Name", "v")],
        [("Bad:Name", "v")],
        [("Content-Length", "-1")],
        [("Content-Length", "abc")],
    ],
)
def test_bad_response_header_gives_500_and_is_never_sent(
    headers: list[tuple[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    body = Closing([b"secret"])

    def app(environ: Environ, start_response: Any) -> Closing:
        start_response("200 OK", headers)
        return body

    with caplog.at_level(logging.ERROR, logger="forkserve.worker"):
        transport, _, results = serve(app, GET, GET)
    assert results == [False]
    assert transport.output.startswith(b"HTTP/1.1 500 ")
    assert b"Set-Cookie" not in transport.output and b"secret" not in transport.output
    assert b"X-Bad" not in transport.output and b"Name" not in transport.output
    assert body.closed == 1
    assert "GET / HTTP/1.1" in caplog.text


@pytest.mark.parametrize("status", ["20 OK", "2000 OK", "OK", "200 O\r\nK", 200])
def test_bad_status_gives_500(status: Any) -> None:
    def app(environ: Environ, start_response: Any) -> list[bytes]:
        start_response(status, [])
        return [b"x"]

    transport, _, _ = serve(app, GET)
    assert transport.output.startswith(b"HTTP/1.1 500 ")


def test_app_exception_gives_500_logged_once_and_close_called(
    caplog: pytest.LogCaptureFixture,
) -> None:
    body = Closing([b"x"], fail=True)

    def app(environ: Environ, start_response: Any) -> Closing:
        start_response("200 OK", [])
        return body

    with caplog.at_level(logging.ERROR, logger="forkserve.worker"):
        transport, _, results = serve(app, GET, GET)
    assert results == [False]
    ((status, headers, _),) = split_responses(transport.output)
    assert status.startswith(b"HTTP/1.1 500")
    assert headers[b"connection"] == b"close"
    assert body.closed == 1
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "GET / HTTP/1.1" in errors[0].getMessage()
    assert errors[0].exc_info is not None


def test_exception_from_app_call_itself() -> None:
    def app(environ: Environ, start_response: Any) -> list[bytes]:
        raise ValueError("nope")

    transport, _, results = serve(app, GET)
    assert transport.output.startswith(b"HTTP/1.1 500 ")
    assert results == [False]


def test_exception_after_headers_sent_closes_without_second_response() -> None:
    def app(environ: Environ, start_response: Any) -> Any:
        start_response("200 OK", [])
        yield b"partial"
        raise RuntimeError("late")

    transport, _, results = serve(app, GET, GET)
    assert results == [False]
    assert transport.output.count(b"HTTP/1.1") == 1
    assert b"500" not in transport.output


def test_write_callable_and_iterable_both_sent() -> None:
    def app(environ: Environ, start_response: Any) -> list[bytes]:
        write = start_response("200 OK", [])
        write(b"from-write;")
        return [b"from-iter"]

    transport, _, _ = serve(app, GET)
    assert split_responses(transport.output)[0][2] == b"from-write;from-iter"


def test_start_response_twice_without_exc_info_is_an_error() -> None:
    def app(environ: Environ, start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        start_response("201 Created", [])
        return [b"x"]

    transport, _, _ = serve(app, GET)
    assert transport.output.startswith(b"HTTP/1.1 500 ")


def test_exc_info_before_headers_replaces_status() -> None:
    def app(environ: Environ, start_response: Any) -> list[bytes]:
        start_response("200 OK", [("X-A", "1")])
        try:
            raise KeyError("x")
        except KeyError:
            start_response("503 Service Unavailable", [("X-B", "2")], sys.exc_info())
        return [b"sorry"]

    transport, _, _ = serve(app, GET)
    status, headers, body = split_responses(transport.output)[0]
    assert status == b"HTTP/1.1 503 Service Unavailable"
    assert b"x-a" not in headers and headers[b"x-b"] == b"2"
    assert body == b"sorry"


def test_exc_info_after_headers_sent_reraises() -> None:
    raised: list[BaseException] = []

    def app(environ: Environ, start_response: Any) -> Any:
        write = start_response("200 OK", [])
        write(b"sent")
        try:
            raise KeyError("original")
        except KeyError:
            try:
                start_response("500 Oops", [], sys.exc_info())
            except KeyError as exc:
                raised.append(exc)
                raise
        return [b""]

    transport, _, results = serve(app, GET)
    assert raised and isinstance(raised[0], KeyError)
    assert results == [False]
    assert transport.output.count(b"HTTP/1.1") == 1


@backend
def test_pipelined_requests_answered_in_order(backend: str) -> None:
    def app(environ: Environ, start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        return [environ["PATH_INFO"].encode() + environ["wsgi.input"].read()]

    data = (
        b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nxy"
        b"GET /3 HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    transport, conn, results = serve(app, data, backend=backend)
    assert [r[2] for r in split_responses(transport.output)] == [b"/1", b"/2xy", b"/3"]
    assert results == [True, True, True, False]
    assert conn.requests_served == 3


def test_has_pending_data_and_close_after_response() -> None:
    transport = FakeTransport(GET + GET)
    conn = WSGIConnection(transport, hello, HTTPOptions(), ("1.2.3.4", 1), ("0.0.0.0", 80))
    assert conn.handle_request() is True
    assert conn.has_pending_data
    conn.close_after_response = True
    assert conn.handle_request() is False
    assert split_responses(transport.output)[1][1][b"connection"] == b"close"


def test_unread_body_is_drained_for_keep_alive() -> None:
    req = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\n\r\n"
    transport, _, results = serve(hello, req, b"abc", b"def" + GET)
    assert results == [True, True, False]
    assert len(split_responses(transport.output)) == 2


def test_huge_unread_body_closes_instead_of_draining() -> None:
    req = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5000000\r\n\r\n"
    chunks = [b"x" * 65536] * 40
    _transport, _, results = serve(hello, req, *chunks)
    assert results == [False]


class SeekableFile(io.BytesIO):
    def fileno(self) -> int:
        return 99


@pytest.mark.parametrize("length_header", [True, False])
def test_file_wrapper_uses_sendfile(length_header: bool) -> None:
    def app(environ: Environ, start_response: Any) -> Any:
        f = SeekableFile(b"0123456789" * 100)
        f.seek(10)
        headers = [("Content-Length", "990")] if length_header else []
        start_response("200 OK", headers)
        return environ["wsgi.file_wrapper"](f, 256)

    transport, _, results = serve(app, GET, GET)
    assert transport.sendfile_calls[0] == (10, 990)
    responses = split_responses(transport.output)
    assert responses[0][2] == (b"0123456789" * 100)[10:]
    assert results == [True, True, False]


def test_file_wrapper_falls_back_when_sendfile_fails() -> None:
    f = SeekableFile(b"abcdef")

    def app(environ: Environ, start_response: Any) -> Any:
        start_response("200 OK", [])
        return environ["wsgi.file_wrapper"](f, 2)

    transport = FakeTransport(GET, sendfile_ok=False)
    conn = WSGIConnection(transport, app, HTTPOptions(), ("1.1.1.1", 1), ("0.0.0.0", 80))
    conn.handle_request()
    assert split_responses(transport.output)[0][2] == b"abcdef"
    assert f.closed


def test_file_wrapper_without_fileno_iterates() -> None:
    def app(environ: Environ, start_response: Any) -> Any:
        start_response("200 OK", [])
        return environ["wsgi.file_wrapper"](io.BytesIO(b"abcdef"), 4)

    transport, _, _ = serve(app, GET)
    assert transport.sendfile_calls == []
    assert split_responses(transport.output)[0][2] == b"abcdef"


@pytest.mark.parametrize(
    ("data", "status", "limits"),
    [
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\n",
            413,
            ParserLimits(max_body=10),
        ),
        (b"GET /" + b"a" * 100 + b" HTTP/1.1\r\n\r\n", 414, ParserLimits(max_request_line=50)),
        (
            b"GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 1\r\n\r\n",
            431,
            ParserLimits(max_header_fields=2),
        ),
        (
            b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
            ParserLimits(),
        ),
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505, ParserLimits()),
    ],
)
def test_bad_requests_never_reach_the_app(data: bytes, status: int, limits: ParserLimits) -> None:
    calls: list[Environ] = []

    def app(environ: Environ, start_response: Any) -> list[bytes]:
        calls.append(environ)
        return hello(environ, start_response)

    transport, _, results = serve(app, data + GET, limits=limits)
    assert calls == []
    assert results == [False]
    ((status_line, headers, _),) = split_responses(transport.output)
    assert status_line.startswith(b"HTTP/1.1 %d " % status)
    assert headers[b"connection"] == b"close"


def test_chunked_413_while_app_reads_body() -> None:
    def app(environ: Environ, start_response: Any) -> list[bytes]:
        environ["wsgi.input"].read()
        return hello(environ, start_response)

    req = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n9\r\n"
    transport, _, results = serve(app, req, limits=ParserLimits(max_body=8))
    assert transport.output.startswith(b"HTTP/1.1 413 ")
    assert results == [False]


def test_timeouts_per_phase() -> None:
    def app(environ: Environ, start_response: Any) -> list[bytes]:
        environ["wsgi.input"].read()
        return hello(environ, start_response)

    req = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n"
    transport, _, _ = serve(
        app, req, b"ab", GET, header_timeout=5.0, keepalive_timeout=1.5, body_timeout=7.0
    )
    assert transport.timeouts[0] == 5.0
    assert 7.0 in transport.timeouts
    assert transport.timeouts[-1] == 1.5


def test_idle_timeout_without_bytes_closes_silently() -> None:
    transport, _, results = serve(hello, TimeoutError())
    assert results == [False]
    assert transport.output == b""


def test_timeout_with_partial_head_sends_408() -> None:
    transport, _, results = serve(hello, b"GET / HTTP/1.1\r\nHo", TimeoutError())
    assert results == [False]
    assert transport.output.startswith(b"HTTP/1.1 408 ")


def test_peer_closing_mid_body_gives_400_to_the_reader() -> None:
    def app(environ: Environ, start_response: Any) -> list[bytes]:
        environ["wsgi.input"].read()
        return hello(environ, start_response)

    req = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 9\r\n\r\nabc"
    transport, _, results = serve(app, req)
    assert transport.output.startswith(b"HTTP/1.1 400 ")
    assert results == [False]


PROXIED = (
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 6.6.6.6, 203.0.113.9\r\n"
    b"X-Forwarded-Proto: https\r\n\r\n"
)


@pytest.mark.parametrize(
    ("client", "allow", "addr", "scheme"),
    [
        (("127.0.0.1", 1), ("127.0.0.1",), "203.0.113.9", "https"),
        (("10.9.9.9", 1), ("10.0.0.0/8",), "203.0.113.9", "https"),
        (("10.9.9.9", 1), ("*",), "6.6.6.6", "https"),
        (("198.51.100.7", 1), ("127.0.0.1",), "198.51.100.7", "http"),
    ],
)
def test_proxy_headers(client: Any, allow: tuple[str, ...], addr: str, scheme: str) -> None:
    seen: list[Environ] = []

    def app(environ: Environ, start_response: Any) -> list[bytes]:
        seen.append(environ)
        return hello(environ, start_response)

    serve(app, PROXIED, client=client, forwarded_allow_ips=allow)
    assert (seen[0]["REMOTE_ADDR"], seen[0]["wsgi.url_scheme"]) == (addr, scheme)


def test_access_log_record() -> None:
    records: list[Any] = []
    _transport, _, _ = serve(
        hello, b"GET /x?y HTTP/1.1\r\nHost: a\r\nUser-Agent: ua\r\n\r\n", access_log=records.append
    )
    (record,) = records
    assert (record.method, record.target, record.status, record.bytes_sent) == (
        "GET",
        "/x?y",
        200,
        5,
    )
    assert ("User-Agent", "ua") in record.request_headers
    assert record.client == "10.1.2.3"
    assert record.duration >= 0


@backend
def test_large_body_read_whole_and_in_sizes(backend: str) -> None:
    body = bytes(range(256)) * 1000
    got: list[bytes] = []

    def app(environ: Environ, start_response: Any) -> list[bytes]:
        stream = environ["wsgi.input"]
        if environ["PATH_INFO"] == "/whole":
            got.append(stream.read())
        else:
            parts = []
            while part := stream.read(100_000):
                assert len(part) <= 100_000
                parts.append(part)
            got.append(b"".join(parts))
        return hello(environ, start_response)

    for path in (b"/whole", b"/sized"):
        head = b"POST %s HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % (path, len(body))
        pieces = [body[i : i + 7000] for i in range(0, len(body), 7000)]
        serve(app, head, *pieces, backend=backend)
    assert got == [body, body]


def test_initial_data_is_parsed_first() -> None:
    transport = FakeTransport()
    conn = WSGIConnection(
        transport, hello, HTTPOptions(), ("1.2.3.4", 1), ("0.0.0.0", 80), initial_data=GET
    )
    assert conn.has_pending_data
    assert conn.handle_request() is True
    assert transport.output.startswith(b"HTTP/1.1 200 OK")


# -- dontwait: one try before any timeout (a plain socket's MSG_DONTWAIT) -------------

DONTWAIT = 0x40


class FlagTransport(FakeTransport):
    """Takes recv/send flags like a socket. ``None`` in the script is "nothing
    yet": a recv with the flag raises BlockingIOError, one without goes on.
    ``send_limit`` bytes at most leave per send call with the flag."""

    def __init__(self, *incoming: Any, send_limit: int = 1 << 20) -> None:
        super().__init__(*incoming)
        self.calls: list[tuple[str, int]] = []
        self.send_limit = send_limit

    def recv(self, n: int, flags: int = 0) -> bytes:
        self.calls.append(("recv", flags))
        if self.incoming and self.incoming[0] is None:
            if flags:
                raise BlockingIOError
            self.incoming.pop(0)
        return super().recv(n)

    def send(self, data: bytes | memoryview, flags: int = 0) -> int:
        self.calls.append(("send", flags))
        part = bytes(data[: self.send_limit])
        self.sent.append(part)
        return len(part)

    def sendall(self, data: bytes | memoryview) -> None:
        self.calls.append(("sendall", 0))
        super().sendall(data)

    def settimeout(self, value: float | None) -> None:
        self.calls.append(("settimeout", 0))
        super().settimeout(value)


def serve_dontwait(transport: FlagTransport, app: Any, **options: Any) -> list[bool]:
    conn = WSGIConnection(transport, app, HTTPOptions(dontwait=DONTWAIT, **options), None, None)
    results = []
    while True:
        results.append(conn.handle_request())
        if not results[-1]:
            return results


def test_dontwait_bytes_already_there_need_no_timeout() -> None:
    transport = FlagTransport(GET, GET)
    assert serve_dontwait(transport, hello, header_timeout=5.0) == [True, True, False]
    assert transport.timeouts == []  # nothing ever waited
    assert transport.calls[:2] == [("recv", DONTWAIT), ("send", DONTWAIT)]
    # Head and body in one send per response.
    assert [len(split_responses(item)) for item in transport.sent] == [1, 1]
    assert split_responses(transport.output)[1][2] == b"hello"


def test_dontwait_sets_the_phase_timeout_before_waiting() -> None:
    transport = FlagTransport(None, GET, None)
    results = serve_dontwait(transport, hello, header_timeout=5.0, keepalive_timeout=1.5)
    assert results == [True, False]
    assert transport.timeouts == [5.0, 1.5]
    # The first wait: a try, the header timeout, then a recv that waits.
    assert transport.calls[:3] == [("recv", DONTWAIT), ("settimeout", 0), ("recv", 0)]
    # Once a timeout is set, calls wait with it (no second try).
    assert ("send", DONTWAIT) not in transport.calls


def test_dontwait_partial_send_finishes_under_the_timeout() -> None:
    def big(environ: Environ, start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        return [b"x" * 5000]

    transport = FlagTransport(GET, send_limit=1000)
    serve_dontwait(transport, big, header_timeout=5.0)
    assert transport.calls[1:4] == [("send", DONTWAIT), ("settimeout", 0), ("sendall", 0)]
    assert transport.timeouts[0] == 5.0
    assert split_responses(transport.output)[0][2] == b"x" * 5000


def test_dontwait_body_read_waits_with_the_body_timeout() -> None:
    def echo(environ: Environ, start_response: Any) -> list[bytes]:
        body = environ["wsgi.input"].read()
        start_response("200 OK", [])
        return [body]

    req = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n"
    transport = FlagTransport(req, None, b"ab")
    serve_dontwait(transport, echo, header_timeout=5.0, body_timeout=7.0, keepalive_timeout=1.5)
    # The head was there; the body had to be waited for; the next head too.
    assert transport.timeouts == [7.0, 1.5]
    assert split_responses(transport.output)[0][2] == b"ab"


def test_a_whole_body_goes_out_with_its_head() -> None:
    transport, _, _ = serve(hello, GET)
    assert len(transport.sent) == 1
    ((status_line, headers, body),) = split_responses(transport.sent[0])
    assert (status_line, headers[b"content-length"], body) == (b"HTTP/1.1 200 OK", b"5", b"hello")


def test_environ_template_is_per_options_and_extra() -> None:
    seen: list[Environ] = []

    def app(environ: Environ, start_response: Any) -> list[bytes]:
        seen.append(environ)
        return hello(environ, start_response)

    options = HTTPOptions(root_path="/r")
    for extra in ({"x.one": 1}, {"x.two": 2}):
        conn = WSGIConnection(FakeTransport(GET), app, options, ("1.2.3.4", 5), None, extra)
        conn.handle_request()
    first, second = seen
    assert first["x.one"] == 1 and "x.two" not in first
    assert second["x.two"] == 2 and "x.one" not in second
    assert first["SCRIPT_NAME"] == second["SCRIPT_NAME"] == "/r"
    assert (first["REMOTE_ADDR"], first["REMOTE_PORT"]) == ("1.2.3.4", "5")
    assert first["SERVER_NAME"] == "example.com"  # no server address: from Host
    first["HTTP_X_CHANGED"] = "by the app"
    conn = WSGIConnection(FakeTransport(GET), app, options, None, None, {"x.one": 1})
    conn.handle_request()
    assert "HTTP_X_CHANGED" not in seen[-1]
