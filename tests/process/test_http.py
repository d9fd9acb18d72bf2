"""HTTP/1.1 and PEP 3333 through the real server, as a client sees them.

Every test runs against ``-k sync`` under both scheduling policies and both
parsers; the behaviour on the wire must be the same for all four. One server
per combination serves the whole module (``live``): tests only make requests,
so they cannot disturb each other. It runs ONE worker, so a client holding
the worker shows up as a delay for the next one.

The client helpers at the top (raw sockets, a strict response splitter) are
shared with test_hostile.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import select
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import h11
import httpx
import pytest

from tests.conftest import FORKSERVE, Server
from tests.helpers import APPS, ROOT, free_port, wait_for

SCHEDS = ["rr", "none"]
PARSERS = ["httptools", "h11"]
COMBOS = [(sched, http) for sched in SCHEDS for http in PARSERS]
KEEP_ALIVE = 0.5  # seconds

LIMIT_BODY = 10 * 1024 * 1024
LIMIT_LINE = 1024
LIMIT_FIELDS = 50
LIMIT_FIELD_SIZE = 2048


# -- client side: bytes on the wire ------------------------------------------


@dataclass
class Response:
    version: bytes
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    chunked: bool = False
    complete: bool = True  # the framing ended properly

    def get(self, name: str) -> bytes | None:
        wanted = name.lower().encode()
        values = [v for n, v in self.headers if n.lower() == wanted]
        return b", ".join(values) if values else None

    def count(self, name: str) -> int:
        wanted = name.lower().encode()
        return sum(1 for n, _ in self.headers if n.lower() == wanted)


_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-9][0-9]{2}) ?([^\r\n]*)")
_HEADER_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([^\r\n\x00]*?)[ \t]*")


def _dechunk(data: bytes, pos: int) -> tuple[bytes, int, bool]:
    """Decode a chunked body at ``pos`` strictly: (body, end, complete)."""
    body = bytearray()
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            return bytes(body), len(data), False
        line = data[pos:eol]
        assert re.fullmatch(rb"[0-9a-fA-F]+", line), f"bad chunk size line {line!r}"
        size = int(line, 16)
        pos = eol + 2
        if size == 0:
            while True:  # trailers, then the empty line
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    return bytes(body), len(data), False
                trailer = data[pos:eol]
                pos = eol + 2
                if not trailer:
                    return bytes(body), pos, True
        piece = data[pos : pos + size]
        body += piece
        if len(piece) < size or data[pos + size : pos + size + 2] != b"\r\n":
            assert len(data) <= pos + size + 1, "chunk data not followed by CRLF"
            return bytes(body), len(data), False
        pos += size + 2


def split_responses(data: bytes, methods: Sequence[bytes] = (), eof: bool = True) -> list[Response]:
    """Every response in ``data`` (as read until the server closed), parsed
    strictly; ``methods`` gives the request method of each (HEAD has no body)."""
    out: list[Response] = []
    pos = 0
    index = 0
    while pos < len(data):
        end = data.find(b"\r\n\r\n", pos)
        assert end >= 0, f"truncated response head: {data[pos : pos + 300]!r}"
        lines = data[pos:end].split(b"\r\n")
        m = _STATUS_LINE.fullmatch(lines[0])
        assert m is not None, f"bad status line {lines[0]!r}"
        headers = []
        for line in lines[1:]:
            hm = _HEADER_LINE.fullmatch(line)
            assert hm is not None, f"bad header line {line!r}"
            headers.append((hm.group(1), hm.group(2)))
        response = Response(lines[0][:8], int(m.group(1)), m.group(2), headers)
        out.append(response)
        pos = end + 4
        if response.status < 200:
            continue  # interim response; the final one follows
        method = methods[index] if index < len(methods) else b"GET"
        index += 1
        if method == b"HEAD" or response.status in (204, 304):
            continue
        te = response.get("transfer-encoding")
        length = response.get("content-length")
        assert te is None or length is None, "both Transfer-Encoding and Content-Length"
        if te is not None:
            assert te.lower() == b"chunked", te
            response.chunked = True
            response.body, pos, response.complete = _dechunk(data, pos)
        elif length is not None:
            assert length.isdigit(), length
            n = int(length)
            response.body = data[pos : pos + n]
            response.complete = len(response.body) == n
            pos += len(response.body)
        else:
            response.body = data[pos:]
            response.complete = eof
            pos = len(data)
    return out


def read_until_closed(sock: socket.socket, timeout: float = 5.0) -> tuple[bytes, bool]:
    """Everything the server sends until it closes: (bytes, closed). A
    reset counts as closed; running out of time does not."""
    deadline = time.monotonic() + timeout
    chunks = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return b"".join(chunks), False
        sock.settimeout(remaining)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return b"".join(chunks), False
        except ConnectionResetError:
            return b"".join(chunks), True
        if not data:
            return b"".join(chunks), True
        chunks.append(data)


def read_until(sock: socket.socket, done: Callable[[bytes], bool], timeout: float = 5.0) -> bytes:
    """Read until ``done(received)`` holds; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    buf = b""
    while not done(buf):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no complete answer within {timeout}s; got {buf[:300]!r}")
        sock.settimeout(remaining)
        data = sock.recv(65536)
        if not data:
            raise AssertionError(f"server closed early; got {buf[:300]!r}")
        buf += data
    return buf


def exchange(
    server: Server, data: bytes, timeout: float = 5.0, half_close: bool = False
) -> tuple[bytes, bool]:
    """Send ``data`` on a new connection and read until the server closes."""
    with server.connect(timeout) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed early; read what it said
        if half_close:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
        return read_until_closed(sock, timeout)


def build(
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    version: str = "1.1",
    host: str | None = "test",
) -> bytes:
    lines = [f"{method} {target} HTTP/{version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += [f"{n}: {v}" for n, v in headers]
    if body and not any(n.lower() in ("content-length", "transfer-encoding") for n, _ in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunked(pieces: Sequence[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p) + b"0\r\n\r\n"


def one(server: Server, data: bytes, method: bytes = b"GET", timeout: float = 5.0) -> Response:
    """Send one request; expect exactly one final response and a close."""
    raw, closed = exchange(server, data, timeout)
    responses = [r for r in split_responses(raw, [method]) if r.status >= 200]
    assert len(responses) == 1, raw[:500]
    assert closed, "the server kept the connection open"
    return responses[0]


# -- servers -----------------------------------------------------------------


def launch(
    app: str, *args: str, state: Path, log_path: Path, extra_env: dict[str, str] | None = None
) -> Server:
    """Start forkserve in its own process group on a free port (not waited for)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(APPS), str(ROOT), env.get("PYTHONPATH", "")])
    env.pop("WEB_CONCURRENCY", None)
    env["HTTP_APPS_STATE"] = str(state)
    env.update(extra_env or {})
    port = free_port()
    argv = [*FORKSERVE, app, "-b", f"127.0.0.1:{port}", *args]
    server = Server(argv, env, ROOT, log_path)
    server.port = port
    return server


@contextlib.contextmanager
def stopped_at_end(request: pytest.FixtureRequest, servers: Sequence[Server]) -> Iterator[None]:
    """Stop ``servers`` by process group; show their output if a test failed."""
    failed_before = request.session.testsfailed
    try:
        yield
    finally:
        for server in servers:
            server.stop()
        if request.session.testsfailed > failed_before:
            for server in servers:
                print(f"--- forkserve output ({' '.join(server.args)}) ---\n{server.output}")


@dataclass
class Live:
    server: Server
    state: Path
    sched: str
    http: str
    tokens: Iterator[int] = field(default_factory=lambda: iter(range(1, 10**9)))

    def token(self) -> str:
        return f"{next(self.tokens)}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module", params=COMBOS, ids=[f"{s}-{h}" for s, h in COMBOS])
def live(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Live]:
    sched, http = request.param
    state = tmp_path_factory.mktemp(f"http-{sched}-{http}")
    server = launch(
        "http_apps:app",
        "-k", "sync", "-w", "1", "--sched", sched, "--http", http,
        "--root-path", "/api",
        "--header-timeout", "1",
        # Under rr an idle connection is parked, then closed after this.
        "--keep-alive", str(KEEP_ALIVE),
        "--limit-request-body", str(LIMIT_BODY),
        "--limit-request-line", str(LIMIT_LINE),
        "--limit-request-fields", str(LIMIT_FIELDS),
        "--limit-request-field-size", str(LIMIT_FIELD_SIZE),
        state=state,
        log_path=state / "server.log",
    )  # fmt: skip
    with stopped_at_end(request, [server]):
        server.ready()
        yield Live(server, state, sched, http)


def env_of(live: Live, data: bytes) -> dict[str, Any]:
    response = one(live.server, data)
    assert response.status == 200, response
    return json.loads(response.body)


def worker_output_contains(live: Live, text: str, timeout: float = 5.0) -> str:
    return wait_for(lambda: live.server.output if text in live.server.output else "", timeout)


# -- keep-alive and pipelining ----------------------------------------------


def test_pipelined_requests_are_answered_in_order_then_closed(live: Live) -> None:
    data = b"".join(
        [
            build("GET", "/who?1"),
            build("POST", "/who?2", body=b"two"),
            build("POST", "/who?3", [("Transfer-Encoding", "chunked")], chunked([b"th", b"ree"])),
            build("HEAD", "/who?4"),
            build(
                "GET", "/who?5", version="1.0", host=None, headers=[("Connection", "keep-alive")]
            ),
            build("GET", "/who?6"),
        ]
    )
    raw, closed = exchange(live.server, data)
    methods = [b"GET", b"POST", b"POST", b"HEAD", b"GET", b"GET"]
    responses = split_responses(raw, methods)
    assert [r.status for r in responses] == [200] * 6, raw[:1000]
    assert [r.body for r in responses] == [
        b"GET /who?1 ",
        b"POST /who?2 two",
        b"POST /who?3 three",
        b"",
        b"GET /who?5 ",
        b"GET /who?6 ",
    ]
    assert all(r.complete for r in responses)
    for r in responses[:-1]:
        assert r.get("connection") in (None, b"keep-alive"), r
    assert responses[4].get("connection") == b"keep-alive", "HTTP/1.0 keep-alive is confirmed"
    if live.sched == "rr":
        # Parked in the primary once idle, closed after --keep-alive.
        assert responses[-1].get("connection") is None
    else:
        assert responses[-1].get("connection") == b"close"
    assert closed


@pytest.mark.parametrize(
    "first",
    [
        build("GET", "/who?1", [("Connection", "close")]),
        build("GET", "/who?1", version="1.0", host=None),
        build("GET", "/who?1", [("Connection", "keep-alive, close")], version="1.0", host=None),
    ],
    ids=["http11-close", "http10", "http10-keep-alive-close"],
)
def test_nothing_is_served_after_a_request_that_closes(live: Live, first: bytes) -> None:
    raw, closed = exchange(live.server, first + build("GET", "/who?2"))
    (response,) = split_responses(raw)
    assert response.body == b"GET /who?1 " and response.get("connection") == b"close"
    assert b"/who?2" not in raw and closed


def test_an_unread_body_is_skipped_not_parsed_as_a_request(live: Live) -> None:
    inner = build("GET", "/who?hidden")
    data = (
        build("POST", "/hello", body=inner)
        + build("POST", "/hello", [("Transfer-Encoding", "chunked")], chunked([inner]))
        + build("GET", "/who?next")
    )
    raw, closed = exchange(live.server, data)
    responses = split_responses(raw)
    assert [r.body for r in responses] == [b"hello", b"hello", b"GET /who?next "]
    assert b"hidden" not in raw and closed


def test_an_idle_connection_never_holds_the_worker(live: Live) -> None:
    """``none``: the lone request is answered with ``Connection: close``;
    ``rr``: the connection stays open, parked in the primary, and is closed
    after --keep-alive while the only worker serves others."""
    with live.server.connect() as sock:
        sock.sendall(build("GET", "/who?alone"))
        started = time.monotonic()
        if live.sched == "rr":
            time.sleep(0.1)
            other = one(live.server, build("GET", "/who?other", [("Connection", "close")]))
            assert other.status == 200, "the only worker is free while the client idles"
        raw, closed = read_until_closed(sock, 5.0)
        elapsed = time.monotonic() - started
    (response,) = split_responses(raw)
    assert closed
    if live.sched == "rr":
        assert response.get("connection") is None
        assert KEEP_ALIVE * 0.8 < elapsed < KEEP_ALIVE + 2.5, f"closed after {elapsed:.2f}s"
    else:
        assert response.get("connection") == b"close"
        assert elapsed < KEEP_ALIVE * 0.8, "no wait for the keep-alive timeout"


# -- request bodies ------------------------------------------------------------


def test_chunked_request_body_is_streamed_into_wsgi_input(live: Live) -> None:
    size = 8 * 1024 * 1024
    payload = os.urandom(size)
    pieces = []
    pos = 0
    sizes = [1, 7, 100, 4096, 65536, 65537, 300_000, 1_000_000]
    i = 0
    while pos < size:
        n = sizes[i % len(sizes)]
        pieces.append(payload[pos : pos + n])
        pos += n
        i += 1
    token = live.token()
    encoded = chunked(pieces)
    first_chunk = b"%x\r\n%s\r\n" % (len(pieces[0]), pieces[0])
    head = build("POST", f"/digest?token={token}", [("Transfer-Encoding", "chunked")])
    with live.server.connect(10) as sock:
        sock.sendall(head + first_chunk)
        # The app runs before the body is complete: it streams, not buffers.
        wait_for(lambda: (live.state / f"entered-{token}").exists(), 5)
        sock.sendall(encoded[len(first_chunk) :])
        raw, closed = read_until_closed(sock, 20)
    (response,) = split_responses(raw)
    result = json.loads(response.body)
    assert result["length"] == size
    assert result["sha256"] == hashlib.sha256(payload).hexdigest()
    assert result["biggest"] <= 65536 and result["reads"] > size // 65536
    assert closed


def test_bodies_round_trip_byte_for_byte(live: Live) -> None:
    # Framing look-alikes inside the data must stay data.
    payload = (b"0\r\n\r\nGET /x HTTP/1.1\r\n\r\n\x00\xff" * 3000) + os.urandom(70_000)
    by_length = one(live.server, build("PUT", "/echo", body=payload))
    assert by_length.status == 200 and by_length.body == payload
    pieces = [payload[i : i + 999] for i in range(0, len(payload), 999)]
    by_chunks = one(
        live.server, build("PUT", "/echo", [("Transfer-Encoding", "chunked")], chunked(pieces))
    )
    assert by_chunks.status == 200 and by_chunks.body == payload


def test_wsgi_input_read_readline_and_iteration(live: Live) -> None:
    body = b"line1\nabcdef\nrest1\nrest2"
    response = one(live.server, build("POST", "/lines", body=body))
    assert json.loads(response.body) == ["line1\n", "abc", "def\n", "rest1\n", "rest2", ""]


def test_expect_100_continue_comes_before_the_body_is_sent(live: Live) -> None:
    interim = b"HTTP/1.1 100 Continue\r\n\r\n"
    for framing, body in (
        ([("Content-Length", "11")], b"hello world"),
        ([("Transfer-Encoding", "chunked")], chunked([b"hello", b" world"])),
    ):
        head = build("POST", "/echo", [("Expect", "100-continue"), *framing])
        with live.server.connect() as sock:
            sock.sendall(head)
            got = read_until(sock, lambda b: b"\r\n\r\n" in b)
            assert got == interim, "100 Continue first, and nothing else before the body"
            sock.sendall(body)
            raw, closed = read_until_closed(sock)
        (response,) = split_responses(raw)
        assert (response.status, response.body) == (200, b"hello world")
        assert closed


def test_expect_100_continue_not_sent_when_the_app_ignores_the_body(live: Live) -> None:
    head = build("POST", "/hello", [("Expect", "100-continue"), ("Content-Length", "5")])
    with live.server.connect() as sock:
        sock.sendall(head)  # the body is never sent
        raw, closed = read_until_closed(sock)
    assert b"100 Continue" not in raw
    (response,) = split_responses(raw)
    assert (response.status, response.body) == (200, b"hello")
    assert response.get("connection") == b"close" and closed


# -- responses -----------------------------------------------------------------


def _without(headers: list[tuple[bytes, bytes]], *names: bytes) -> list[tuple[bytes, bytes]]:
    return [(n.lower(), v) for n, v in headers if n.lower() not in names]


def test_head_has_the_headers_of_get_and_no_body(live: Live) -> None:
    (live.state / "head.bin").write_bytes(b"x" * 12345)
    for target, may_differ in (
        ("/hello", ()),
        ("/file?name=head.bin", ()),
        # RFC 9112 §6.1: a HEAD response may omit the Transfer-Encoding of a GET.
        ("/stream?n=2", (b"transfer-encoding",)),
    ):
        get = one(live.server, build("GET", target))
        raw, closed = exchange(live.server, build("HEAD", target))
        head_end = raw.find(b"\r\n\r\n") + 4
        assert raw[head_end:] == b"", "a HEAD response has no body"
        (head,) = split_responses(raw, [b"HEAD"])
        assert head.status == get.status == 200
        skip = (b"date", *may_differ)
        assert _without(head.headers, *skip) == _without(get.headers, *skip), target
        assert closed


def test_date_and_server_headers_on_every_response(live: Live) -> None:
    for data in (build("GET", "/hello"), build("GET", "/stream"), b"GET / HTTP/1.1\r\n\r\n"):
        raw, _ = exchange(live.server, data)
        (response,) = split_responses(raw)
        assert response.count("date") == 1 and response.count("server") == 1
        assert response.get("server") == b"forkserve"
        date = response.get("date")
        assert date is not None and date.endswith(b" GMT")
        sent = parsedate_to_datetime(date.decode()).timestamp()
        assert abs(sent - time.time()) < 5


def test_response_without_length_is_chunked_on_http11(live: Live) -> None:
    # Alone, and first of two pipelined: chunked either way, so a client can
    # tell a complete body from one cut short.
    for data, index in (
        (build("GET", "/stream?n=3"), 0),
        (build("GET", "/stream?n=3") + build("GET", "/hello"), 0),
    ):
        raw, closed = exchange(live.server, data)
        response = split_responses(raw)[index]
        assert response.get("transfer-encoding") == b"chunked", response
        assert response.get("content-length") is None
        assert response.body == b"part0;part1;part2;" and response.complete
        assert closed


def test_response_without_length_is_close_delimited_on_http10(live: Live) -> None:
    for extra in ((), (("Connection", "keep-alive"),)):
        raw, closed = exchange(
            live.server, build("GET", "/stream?n=3", extra, version="1.0", host=None)
        )
        (response,) = split_responses(raw)
        assert response.version == b"HTTP/1.1"
        assert response.get("transfer-encoding") is None
        assert response.get("content-length") is None
        assert response.get("connection") == b"close"
        assert response.body == b"part0;part1;part2;"
        assert closed


def test_wrong_content_length_from_the_app_never_spills_into_the_next_response(
    live: Live,
) -> None:
    for declared, actual in ((10, 5), (3, 8)):
        target = f"/length?declared={declared}&actual={actual}"
        raw, closed = exchange(live.server, build("GET", target) + build("GET", "/who?next"))
        head, _, rest = raw.partition(b"\r\n\r\n")
        assert b"Content-Length: %d\r\n" % declared in head + b"\r\n"
        assert rest == b"0123456789abcdef"[: min(declared, actual)], rest
        assert raw.count(b"HTTP/1.1 ") == 1, "the connection ends after the broken response"
        assert closed


@pytest.mark.parametrize("code", ["204 No Content", "304 Not Modified"])
def test_no_body_is_sent_for_204_and_304(live: Live, code: str) -> None:
    target = f"/status?code={quote(code)}&body=oops"
    raw, closed = exchange(live.server, build("GET", target) + build("GET", "/who?next"))
    assert b"oops" not in raw
    first, second = split_responses(raw)
    assert first.status == int(code[:3]) and first.get("transfer-encoding") is None
    assert (second.status, second.body) == (200, b"GET /who?next ")
    assert closed
    if code.startswith("204"):
        assert first.get("content-length") is None  # RFC 9110 §8.6


def test_repeated_response_headers_are_kept_apart(live: Live) -> None:
    response = one(live.server, build("GET", "/cookies"))
    assert [v for n, v in response.headers if n.lower() == b"set-cookie"] == [b"a=1", b"b=2"]
    assert (b"X-MiXeD-Case", b"kept") in response.headers


def test_h11_client_reads_every_kind_of_response(live: Live) -> None:
    """A strict independent client accepts the server's framing."""
    for method, target, expected in (
        ("GET", "/hello", b"hello"),
        ("GET", "/stream?n=2", b"part0;part1;"),
        ("HEAD", "/stream?n=2", b""),
        ("GET", "/write", b"one;two;three;"),
        ("GET", "/file-like?data=abcdefghij", b"abcdefghij"),
    ):
        client = h11.Connection(h11.CLIENT)
        out = client.send(h11.Request(method=method, target=target, headers=[("Host", "t")]))
        out += client.send(h11.EndOfMessage())
        body = b""
        with live.server.connect() as sock:
            sock.sendall(out)
            while True:
                event = client.next_event()
                if event is h11.NEED_DATA:
                    client.receive_data(sock.recv(65536))
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.Response):
                    assert event.status_code == 200
        assert body == expected, (method, target)


def test_file_wrapper_sends_the_file_with_its_length(live: Live) -> None:
    content = os.urandom(1024 * 1024 + 17)
    (live.state / "big.bin").write_bytes(content)
    with httpx.Client(timeout=10) as client:
        response = client.get(live.server.url("/file?name=big.bin"))
    assert response.status_code == 200
    assert response.headers["content-length"] == str(len(content))
    assert response.content == content
    worker = live.server.workers()[0]

    def file_closed() -> bool:
        links = []
        for fd in os.listdir(f"/proc/{worker}/fd"):
            with contextlib.suppress(OSError):
                links.append(os.readlink(f"/proc/{worker}/fd/{fd}"))
        return str(live.state / "big.bin") not in links

    wait_for(file_closed, 5)
    # A file-like object without a descriptor is iterated instead.
    like = one(live.server, build("GET", "/file-like?data=0123456789"))
    assert like.body == b"0123456789"


# -- PEP 3333 environ -----------------------------------------------------------


def test_environ_has_everything_pep_3333_asks_for(live: Live) -> None:
    target = "/api/a%20b/c%2Fd/caf%C3%A9?x=1&y=%20z&report=env"
    body = b"data"
    data = build(
        "POST",
        target,
        [
            ("Content-Type", "text/plain; charset=latin-1"),
            ("Content-Length", "4"),
            ("X-Custom", "one"),
            ("X-Custom", "two"),
            ("Cookie", "a=1"),
            ("Cookie", "b=2"),
            ("X_Underscored", "dropped"),
        ],
        body,
        host="example.test:8080",
    )
    with live.server.connect() as sock:
        client_port = sock.getsockname()[1]
        sock.sendall(data)
        raw, _ = read_until_closed(sock)
    (response,) = split_responses(raw)
    env = json.loads(response.body)
    assert env["REQUEST_METHOD"] == "POST"
    assert env["SCRIPT_NAME"] == "/api"
    # Percent-decoded, as latin-1 text of the bytes (PEP 3333 "bytes as str").
    assert env["PATH_INFO"] == "/a b/c/d/caf\u00c3\u00a9"
    assert env["PATH_INFO"].encode("latin-1").decode("utf-8") == "/a b/c/d/café"
    assert env["QUERY_STRING"] == "x=1&y=%20z&report=env"
    assert env["RAW_URI"] == target
    assert env["CONTENT_TYPE"] == "text/plain; charset=latin-1"
    assert env["CONTENT_LENGTH"] == "4"
    assert "HTTP_CONTENT_TYPE" not in env and "HTTP_CONTENT_LENGTH" not in env
    assert env["SERVER_NAME"] == "127.0.0.1"
    assert env["SERVER_PORT"] == str(live.server.port)
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert env["REMOTE_ADDR"] == "127.0.0.1"
    assert env["REMOTE_PORT"] == str(client_port)
    assert env["HTTP_HOST"] == "example.test:8080"
    assert env["HTTP_X_CUSTOM"] == "one, two"
    assert env["HTTP_COOKIE"] == "a=1; b=2"
    assert not any("UNDERSCORED" in key for key in env)
    assert env["wsgi.version"] == [1, 0]
    assert env["wsgi.url_scheme"] == "http"
    assert env["_input_methods"] == ["read", "readline", "readlines", "__iter__"]
    assert env["_errors_methods"] == ["write", "writelines", "flush"]
    assert env["wsgi.multithread"] is False
    assert env["wsgi.multiprocess"] is True
    assert env["wsgi.run_once"] is False
    assert "wsgi.file_wrapper" in env
    assert env["_body"] == "data"
    for key, kinds in env["_types"].items():
        key_type, value_type = kinds.split("/")
        assert key_type == "str", key
        if key.isupper():  # CGI variables are native strings
            assert value_type == "str", (key, value_type)


def test_environ_root_path_and_http10(live: Live) -> None:
    env = env_of(live, build("GET", "/api?report=env"))
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("/api", "")
    env = env_of(live, build("GET", "/api/env", version="1.0", host=None))
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("/api", "/env")
    assert env["SERVER_PROTOCOL"] == "HTTP/1.0"
    assert env["QUERY_STRING"] == ""
    assert "HTTP_HOST" not in env


def test_wsgi_errors_goes_to_the_error_log(live: Live) -> None:
    marker = live.token()
    response = one(live.server, build("GET", f"/errors?marker={marker}"))
    assert response.status == 200
    worker_output_contains(live, f"wsgi.errors says {marker}")


# -- start_response, write() and close() ---------------------------------------


def test_start_response_twice_without_exc_info_is_an_error(live: Live) -> None:
    response = one(live.server, build("GET", "/double-start"))
    assert response.status == 500
    assert b"should not be sent" not in response.body


def test_exc_info_before_the_head_is_sent_replaces_the_response(live: Live) -> None:
    response = one(live.server, build("GET", "/exc-before"))
    assert (response.status, response.body) == (503, b"replaced")
    assert response.get("x-first") is None


def test_exc_info_after_the_head_is_sent_reraises_and_aborts(live: Live) -> None:
    marker = live.token()
    raw, closed = exchange(live.server, build("GET", f"/exc-after?marker={marker}"))
    (response,) = split_responses(raw)
    assert response.status == 200, "the head already went out"
    assert response.body.startswith(b"partial;")
    assert b"must-not-appear" not in raw and b"500" not in raw.split(b"\r\n", 1)[1]
    assert closed
    assert response.chunked and not response.complete, "the client can tell it was cut short"
    out = worker_output_contains(live, f"too late {marker}")
    assert out.count(f"ValueError: too late {marker}") == 1


def test_write_callable_comes_before_the_iterable(live: Live) -> None:
    assert one(live.server, build("GET", "/write")).body == b"one;two;three;"
    sized = one(live.server, build("GET", "/write?length=14"))
    assert (sized.get("content-length"), sized.body) == (b"14", b"one;two;three;")


@pytest.mark.parametrize("method,mode", [("GET", "ok"), ("HEAD", "ok"), ("GET", "raise")])
def test_close_is_called_on_the_iterable(live: Live, method: str, mode: str) -> None:
    token = live.token()
    raw, closed = exchange(live.server, build(method, f"/close?token={token}&mode={mode}"))
    (response,) = split_responses(raw, [method.encode()])
    assert response.status == 200 and closed
    if method == "GET" and mode == "ok":
        assert response.body == b"a;b;c;"
    if mode == "raise":
        assert response.body.startswith(b"a;") and b"b;" not in response.body
    path = live.state / f"closed-{token}"
    wait_for(path.exists, 5)
    assert path.read_text() == "closed\n", "close() is called exactly once"


def test_iterable_is_streamed_as_it_is_produced(live: Live) -> None:
    token = live.token()
    with live.server.connect() as sock:
        sock.sendall(build("GET", f"/gated?token={token}"))
        first = read_until(sock, lambda b: b"first;" in b)
        assert b"released" not in first
        (live.state / f"go-{token}").write_text("go")
        rest, closed = read_until_closed(sock, 10)
    (response,) = split_responses(first + rest)
    assert response.body == b"first;released;"
    assert closed


# -- errors from the application ------------------------------------------------


@pytest.mark.parametrize(
    "where,value",
    [
        ("value", "a\r\nInjected: 1"),
        ("value", "a\nInjected: 1"),
        ("value", "a\rInjected: 1"),
        ("value", "a\x00Injected: 1"),
        ("name", "X-A\r\nInjected"),
        ("status", "\r\nInjected: 1"),
    ],
)
def test_app_headers_with_cr_lf_nul_are_500_and_never_sent(
    live: Live, where: str, value: str
) -> None:
    target = f"/bad-header?where={where}&value={quote(value, safe='')}"
    raw, closed = exchange(live.server, build("GET", target))
    (response,) = split_responses(raw)
    assert response.status == 500
    assert b"Injected" not in raw and b"X-Bad" not in raw
    assert closed
    assert one(live.server, build("GET", "/hello")).status == 200


def test_app_exception_is_500_logged_once_and_the_worker_serves_on(live: Live) -> None:
    workers = live.server.workers()
    marker = live.token()
    response = one(live.server, build("GET", f"/raise?marker={marker}"))
    assert response.status == 500
    assert b"boom" not in response.body and b"Traceback" not in response.body
    assert one(live.server, build("GET", "/hello")).body == b"hello"
    assert live.server.workers() == workers, "the same worker process served on"
    out = worker_output_contains(live, f"RuntimeError: boom-{marker}")
    assert out.count(f"RuntimeError: boom-{marker}") == 1
    request_line = f"GET /raise?marker={marker} HTTP/1.1"
    assert out.count(request_line) == 1
    logged = out[out.index(request_line) :]
    assert logged.index("Traceback") < logged.index(f"RuntimeError: boom-{marker}")


# -- proxy headers ---------------------------------------------------------------


def test_proxy_headers_are_honoured_from_a_trusted_peer(live: Live) -> None:
    env = env_of(
        live,
        build("GET", "/env", [("X-Forwarded-For", "203.0.113.7"), ("X-Forwarded-Proto", "https")]),
    )
    assert (env["REMOTE_ADDR"], env["wsgi.url_scheme"]) == ("203.0.113.7", "https")
    env = env_of(
        live, build("GET", "/env", [("Forwarded", 'for="[2001:db8::1]:4711";proto=https')])
    )
    assert (env["REMOTE_ADDR"], env["wsgi.url_scheme"]) == ("2001:db8::1", "https")
    # The client is the rightmost address that is not a trusted proxy.
    env = env_of(live, build("GET", "/env", [("X-Forwarded-For", "198.51.100.2, 127.0.0.1")]))
    assert env["REMOTE_ADDR"] == "198.51.100.2"


@pytest.mark.parametrize("sched,http", COMBOS, ids=[f"{s}-{h}" for s, h in COMBOS])
def test_proxy_headers_are_ignored_from_an_untrusted_peer(
    serve: Any, tmp_path: Path, sched: str, http: str
) -> None:
    server = serve(
        "http_apps:app",
        "-k", "sync", "--sched", sched, "--http", http,
        "--forwarded-allow-ips", "10.0.0.1",
        env={"HTTP_APPS_STATE": str(tmp_path)},
    )  # fmt: skip
    for headers in (
        [("X-Forwarded-For", "203.0.113.7"), ("X-Forwarded-Proto", "https")],
        [("Forwarded", "for=203.0.113.7;proto=https")],
    ):
        response = one(server, build("GET", "/env", headers))
        env = json.loads(response.body)
        assert (env["REMOTE_ADDR"], env["wsgi.url_scheme"]) == ("127.0.0.1", "http")


# -- deadlines and limits ---------------------------------------------------------


def _race(live: Live, slow_bytes: bytes, trickle: bytes) -> tuple[bytes, float, bytes, float]:
    """A slow client (connected first) against a prompt one, on ONE worker:
    returns what each received and when it was closed/answered."""
    slow = live.server.connect()
    good = live.server.connect()
    try:
        started = time.monotonic()
        slow.sendall(slow_bytes)
        good.sendall(build("GET", "/who?prompt"))
        got = {slow: b"", good: b""}
        done_at: dict[socket.socket, float] = {}
        remaining_trickle = trickle
        deadline = started + 8
        while len(done_at) < 2 and time.monotonic() < deadline:
            open_socks = [s for s in (slow, good) if s not in done_at]
            for sock in open_socks:
                sock.settimeout(0)
            ready = [s for s in open_socks if _readable(s, 0.1)]
            for sock in ready:
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    data = b""
                got[sock] += data
                if not data:
                    done_at[sock] = time.monotonic() - started
            if slow not in done_at and remaining_trickle and not ready:
                with contextlib.suppress(OSError):
                    slow.sendall(remaining_trickle[:1])  # paced: one byte per 0.1 s
                remaining_trickle = remaining_trickle[1:]
        return got[slow], done_at.get(slow, 99.0), got[good], done_at.get(good, 99.0)
    finally:
        slow.close()
        good.close()


def _readable(sock: socket.socket, timeout: float) -> bool:
    return bool(select.select([sock], [], [], timeout)[0])


@pytest.mark.parametrize(
    "kind", ["half-head", "trickle", "silent"], ids=["half-head", "trickle", "silent"]
)
def test_header_deadline_cuts_off_a_slow_client_and_the_next_is_served(
    live: Live, kind: str
) -> None:
    if kind == "half-head":
        slow_bytes, trickle = b"GET /who?slow HTTP/1.1\r\nHost: x\r\n", b""
    elif kind == "trickle":
        slow_bytes, trickle = b"G", b"ET /who?slow HTTP/1.1\r\nX-Pad: " + b"a" * 200
    else:
        slow_bytes, trickle = b"", b""
    slow_got, slow_at, good_got, good_at = _race(live, slow_bytes, trickle)
    assert slow_got == b"" or slow_got.startswith(b"HTTP/1.1 408 "), slow_got[:200]
    if slow_bytes:
        assert slow_got.startswith(b"HTTP/1.1 408 "), "a started head is answered with 408"
    assert 0.5 <= slow_at <= 3.0, f"cut off after {slow_at:.2f}s (header timeout 1s)"
    (good,) = split_responses(good_got)
    assert (good.status, good.body) == (200, b"GET /who?prompt ")
    assert good_at <= 3.5, f"the prompt client waited {good_at:.2f}s"


def test_body_over_the_limit_is_413_without_reading_it(live: Live) -> None:
    for head, first_bytes in (
        (build("POST", "/echo", [("Content-Length", str(100 * LIMIT_BODY))]), b"x" * 1024),
        # A single chunk declared larger than the limit.
        (build("POST", "/echo", [("Transfer-Encoding", "chunked")]), b"10000000\r\n" + b"x" * 1024),
    ):
        with live.server.connect() as sock:
            started = time.monotonic()
            sock.sendall(head + first_bytes)
            raw, closed = read_until_closed(sock, 5)
            elapsed = time.monotonic() - started
        (response,) = split_responses(raw)
        assert response.status == 413
        assert response.get("connection") == b"close" and closed
        assert elapsed < 2.0, f"413 took {elapsed:.2f}s"


def test_request_line_limit_is_414(live: Live) -> None:
    fixed = len("GET ") + len(" HTTP/1.1") + len("/who?")
    at_limit = "/who?" + "a" * (LIMIT_LINE - fixed)
    assert one(live.server, build("GET", at_limit)).status == 200
    response = one(live.server, build("GET", at_limit + "a"))
    assert response.status == 414 and response.get("connection") == b"close"


def test_too_many_header_fields_is_431(live: Live) -> None:
    fields = [(f"X-F{i}", "v") for i in range(LIMIT_FIELDS - 1)]  # plus Host
    assert one(live.server, build("GET", "/hello", fields)).status == 200
    response = one(live.server, build("GET", "/hello", [*fields, ("X-One-More", "v")]))
    assert response.status == 431 and response.get("connection") == b"close"


def test_too_large_header_field_is_431(live: Live) -> None:
    name = "X-Big"
    fits = "v" * (LIMIT_FIELD_SIZE - len(name) - 2)  # "X-Big: vvv..." is the limit
    assert one(live.server, build("GET", "/hello", [(name, fits)])).status == 200
    response = one(live.server, build("GET", "/hello", [(name, fits + "v")]))
    assert response.status == 431 and response.get("connection") == b"close"
