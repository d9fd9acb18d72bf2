"""The asgi worker's strict front end (``asgi_guard``), in memory.

A fake transport and a recording inner protocol stand in for uvloop and
uvicorn. The fast path (``plain_head``) must never accept what the parser
refuses: a generated corpus of heads, valid and broken, is checked against
the parser. The whole front end runs the request corpus, and the head
deadlines run on a real event loop with short timeouts.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from forkserve.errors import HTTPError
from forkserve.http.events import NEED_DATA, EndOfMessage, ParserLimits, Request
from forkserve.http.parser import make_parser
from forkserve.workers import asgi_guard
from forkserve.workers.asgi_guard import (
    Flusher,
    GroupedTimers,
    GuardedConnection,
    GuardOptions,
    Relay,
    plain_head,
)
from tests.helpers import BODY_LEVEL, INCOMPLETE, INVALID, VALID


def options(
    limits: ParserLimits | None = None,
    *,
    websockets: bool = False,
    hold: Callable[[Any], None] = lambda inner: None,
) -> GuardOptions:
    return GuardOptions(
        backend="framing",
        limits=limits or ParserLimits(),
        websockets=websockets,
        busy=lambda inner: False,
        responding=lambda inner: False,
        hold=hold,
    )


class Inner(asyncio.Protocol):
    """uvicorn's place: records what the front end forwards."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.eof = False
        self.lost = False

    def data_received(self, data: bytes) -> None:
        self.received += data

    def eof_received(self) -> None:
        self.eof = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


class Transport:
    def __init__(self) -> None:
        self.written = bytearray()
        self.writes = 0  # system calls, as it were
        self.closing = False
        self.protocol: Any = None

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.written += data

    def writelines(self, lines: list[bytes]) -> None:
        self.writes += 1
        self.written += b"".join(lines)

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def get_protocol(self) -> Any:
        return self.protocol


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def connect(
    loop: asyncio.AbstractEventLoop,
    opts: GuardOptions | None = None,
    timeout: float = 0.0,
    inner: Any = None,
    transport: Any = None,
) -> tuple[GuardedConnection, Any, Any]:
    """``inner`` (an ``Inner`` by default) behind the guard over ``transport``."""
    inner = Inner() if inner is None else inner
    guard = GuardedConnection(inner, opts or options(), GroupedTimers(loop, timeout), Flusher(loop))
    transport = Transport() if transport is None else transport
    transport.protocol = guard
    guard.connection_made(transport)  # type: ignore[arg-type]
    return guard, inner, transport


def status_written(transport: Transport) -> int:
    assert transport.written.startswith(b"HTTP/1.1 "), bytes(transport.written[:80])
    return int(transport.written.split(b" ", 2)[1])


# -- plain_head never accepts what the parser refuses ----------------------------------


def parser_verdict(data: bytes, limits: ParserLimits) -> str:
    """'plain' for one whole bodyless head and nothing else, else what it is."""
    parser = make_parser("framing", limits)
    parser.feed(data)
    try:
        first = parser.next_event()
        second = parser.next_event()
    except HTTPError as exc:
        return f"error {exc.status}"
    if not isinstance(first, Request):
        return "incomplete"
    if not isinstance(second, EndOfMessage):
        return "body"
    parser.start_next_cycle()
    if parser.next_event() is not NEED_DATA or parser.unparsed:
        return "more"
    return "plain"


FIELDS = [
    b"Host: example.com",
    b"host:x",
    b"HOST: a",
    b"Host : x",
    b" Host: x",
    b"Host: a\tb",
    b"Content-Length: 0",
    b"content-length: 5",
    b"Transfer-Encoding: chunked",
    b"Upgrade: websocket",
    b"Connection: close",
    b"Connection: keep-alive, Upgrade",
    b"Expect: 100-continue",
    b"X-A: b\x01",
    b"X-A: b\x7f",
    b"X-A: caf\xc3\xa9",
    b"X A: b",
    b": b",
    b"X-A",
    b"X-A:",
    b"X-A: b\rc",
    b"X-A: b\nc",
    b"\tfolded",
    b"X-Forwarded-For: 203.0.113.7",
    b"Hostx: y",
    b"X-Long: " + b"v" * 90,
]
LINES = [
    b"GET / HTTP/1.1",
    b"GET / HTTP/1.0",
    b"POST /a?b=c HTTP/1.1",
    b"CONNECT / HTTP/1.1",
    b"CONNECT x:80 HTTP/1.1",
    b"OPTIONS * HTTP/1.1",
    b"GET http://x/ HTTP/1.1",
    b"get / HTTP/1.1",
    b"GET  / HTTP/1.1",
    b"GET / HTTP/2.0",
    b"GET / HTTP/1.2",
    b"GET / http/1.1",
    b"GET /a b HTTP/1.1",
    b"GET /\x7f HTTP/1.1",
    b"GET /\xff HTTP/1.1",
    b"G(T / HTTP/1.1",
    b"GET /" + b"a" * 90 + b" HTTP/1.1",
]
LIMITS = [
    ParserLimits(),
    ParserLimits(max_request_line=40, max_header_fields=2, max_header_field_size=60),
    ParserLimits(max_header_fields=0),
]
NOISE = [b"\r", b"\n", b"\x00", b" ", b"\t", b":", b"\r\n", b"\x80", b"a", b"/"]


def generated_heads(seed: int, count: int) -> Iterator[bytes]:
    rng = random.Random(seed)
    for _ in range(count):
        fields = rng.sample(FIELDS, rng.randint(0, 4))
        if rng.random() < 0.6:
            fields.insert(rng.randint(0, len(fields)), b"Host: a")
        head = b"\r\n".join([rng.choice(LINES), *fields]) + b"\r\n\r\n"
        if rng.random() < 0.3:  # a stray byte anywhere
            at = rng.randrange(len(head) + 1)
            head = head[:at] + rng.choice(NOISE) + head[at + rng.randint(0, 1) :]
        if rng.random() < 0.1:
            head = b"\r\n" + head
        if rng.random() < 0.1:
            head += rng.choice([b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"x", b"\r\n"])
        yield head


@pytest.mark.parametrize("limits", LIMITS, ids=["default", "small", "no-fields"])
def test_plain_head_accepts_only_what_the_parser_accepts_whole_and_bodyless(
    limits: ParserLimits,
) -> None:
    opts = options(limits)
    accepted = 0
    for head in itertools.chain(generated_heads(7, 4000), (p.read_bytes() for p in VALID)):
        if plain_head(head, opts):
            accepted += 1
            assert parser_verdict(head, limits) == "plain", head
    if limits.max_header_fields:
        assert accepted > 50  # the corpus exercises the fast path


def test_plain_head_takes_the_usual_requests() -> None:
    opts = options()
    for head in [
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n",
        b"GET /p?q=1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        b"HEAD /x HTTP/1.0\r\nhost: a\r\nUser-Agent: t/1 (x; y)\r\nAccept: */*\r\n\r\n",
        b"DELETE /r HTTP/1.1\r\nX-Forwarded-For: 10.0.0.1\r\nHost: a\r\nCookie: a=b; c=d\r\n\r\n",
    ]:
        assert plain_head(head, opts), head
    for head in [
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",  # framing: the parser's
        b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",  # two heads
        b"GET / HTTP/1.1\r\nHost: a\r\n",  # not whole yet
        b"GET / HTTP/1.0\r\n\r\n",  # no Host
    ]:
        assert not plain_head(head, opts), head


def test_plain_head_respects_every_limit() -> None:
    head = b"GET /abc HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 2\r\n\r\n"
    assert plain_head(head, options(ParserLimits(max_header_fields=3)))
    assert not plain_head(head, options(ParserLimits(max_header_fields=2)))
    assert not plain_head(head, options(ParserLimits(max_request_line=16)))
    assert not plain_head(head, options(ParserLimits(max_header_field_size=8)))
    many = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: y\r\n" * 150 + b"\r\n"
    assert not plain_head(many, options())
    assert parser_verdict(many, ParserLimits()) == "error 431"


# -- the front end ------------------------------------------------------------------


def test_a_whole_plain_head_is_forwarded_without_a_parser(
    loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_parser(*args: Any) -> Any:
        raise AssertionError("the parser was built for a plain head")

    monkeypatch.setattr(asgi_guard, "make_parser", no_parser)
    guard, inner, transport = connect(loop)
    heads = [b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % n for n in range(3)]
    for head in heads:
        guard.data_received(head)
    assert bytes(inner.received) == b"".join(heads)
    assert not transport.written


def test_the_parser_takes_over_and_hands_back(loop: asyncio.AbstractEventLoop) -> None:
    guard, inner, transport = connect(loop)
    chunked = (
        b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    )
    plain = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    for step in range(0, len(chunked), 5):  # split everywhere
        guard.data_received(chunked[step : step + 5])
    guard.data_received(plain)
    guard.data_received(b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n")
    assert bytes(inner.received) == chunked + plain
    assert status_written(transport) == 400 and transport.closing


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_vectors_are_answered_and_never_forwarded_whole(
    loop: asyncio.AbstractEventLoop, path: Path
) -> None:
    expected = json.loads(path.with_suffix(".json").read_text())
    data = path.read_bytes()
    for step in (len(data), 1):
        guard, inner, transport = connect(loop, options(ParserLimits(**expected.get("limits", {}))))
        for at in range(0, len(data), step):
            guard.data_received(data[at : at + step])
        if path.stem in INCOMPLETE:
            guard.eof_received()
        assert status_written(transport) == expected["status"], (step, path.stem)
        assert transport.closing
        if path.stem in BODY_LEVEL:  # the head was valid: uvicorn has it
            assert bytes(inner.received) != data or path.stem in INCOMPLETE
        else:
            assert not inner.received, bytes(inner.received)


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_valid_vectors_are_forwarded_intact(loop: asyncio.AbstractEventLoop, path: Path) -> None:
    data = path.read_bytes()
    for step in (len(data), 1, 7):
        guard, inner, transport = connect(loop)
        for at in range(0, len(data), step):
            guard.data_received(data[at : at + step])
        assert not transport.written, (step, bytes(transport.written))
        # Empty lines before a request are the front end's to skip.
        assert bytes(inner.received).replace(b"\r\n", b"") == data.replace(b"\r\n", b""), step


# -- the head deadline --------------------------------------------------------------------


def test_head_deadlines_close_silent_and_slow_connections_only(
    loop: asyncio.AbstractEventLoop,
) -> None:
    timeout = 0.1
    silent = connect(loop, timeout=timeout)
    slow = connect(loop, timeout=timeout)
    prompt = connect(loop, timeout=timeout)
    slow[0].data_received(b"GET / HTTP/1.1\r\n")
    prompt[0].data_received(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    began = loop.time()
    loop.run_until_complete(asyncio.sleep(timeout * 0.8))
    assert not silent[2].closing and not slow[2].closing
    deadline = began + 2.0
    while not (silent[2].closing and slow[2].closing) and loop.time() < deadline:
        loop.run_until_complete(asyncio.sleep(0.01))
    assert silent[2].closing and not silent[2].written  # nothing to answer
    assert slow[2].closing and status_written(slow[2]) == 408
    assert not prompt[2].closing and not prompt[2].written
    # Each waited at least the timeout, and at most one period more (plus slack).
    assert timeout * 0.8 <= loop.time() - began < timeout * 1.1 + 0.5


def test_a_kept_alive_connection_gets_the_deadline_again_for_a_partial_head(
    loop: asyncio.AbstractEventLoop,
) -> None:
    held: list[Any] = []
    guard, inner, transport = connect(loop, options(hold=held.append), timeout=0.05)
    guard.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    loop.run_until_complete(asyncio.sleep(0.2))
    assert not transport.closing  # idle after a request: uvicorn's keep-alive, not ours
    guard.data_received(b"GET /next HTTP/1.1\r\n")
    assert held == [inner]  # uvicorn's keep-alive timer stopped
    deadline = loop.time() + 2.0
    while not transport.closing and loop.time() < deadline:
        loop.run_until_complete(asyncio.sleep(0.01))
    assert status_written(transport) == 408


def test_a_connection_that_leaves_stops_its_deadline(loop: asyncio.AbstractEventLoop) -> None:
    guard, inner, transport = connect(loop, timeout=0.05)
    guard.connection_lost(None)
    loop.run_until_complete(asyncio.sleep(0.2))
    assert inner.lost and not transport.closing and not transport.written


def test_plain_head_remembers_a_bounded_number_of_heads() -> None:
    opts = options()
    for n in range(600):
        assert plain_head(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % n, opts)
    assert 0 < len(opts.plain_seen) <= 256
    large = b"GET / HTTP/1.1\r\nHost: a\r\nX-Large: " + b"v" * 3000 + b"\r\n\r\n"
    assert plain_head(large, opts) and large not in opts.plain_seen
    refused = b"GET / HTTP/1.1\r\nHost: a\r\nX-Bad: \x01\r\n\r\n"
    assert not plain_head(refused, opts) and refused not in opts.plain_seen


def test_grouped_timers_fire_late_never_early_and_survive_a_failing_callback(
    loop: asyncio.AbstractEventLoop,
) -> None:
    timers = GroupedTimers(loop, 0.1)
    fired: dict[str, float] = {}
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda loop, context: errors.append(context))

    def fail() -> None:
        fired["fail"] = loop.time()
        raise RuntimeError("boom")

    began = loop.time()
    timers.join("fail", fail)
    timers.join("kept", lambda: fired.setdefault("kept", loop.time()))
    stopped = timers.join("stopped", lambda: fired.setdefault("stopped", loop.time()))
    stopped.pop("stopped")
    loop.run_until_complete(asyncio.sleep(0.05))
    timers.join("later", lambda: fired.setdefault("later", loop.time()))
    loop.run_until_complete(asyncio.sleep(0.5))
    assert set(fired) == {"fail", "kept", "later"}
    for name in ("fail", "kept"):
        assert 0.1 <= fired[name] - began + 0.002 < 0.1 + 0.01 + 0.3
    assert [str(e["exception"]) for e in errors] == ["boom"]


# -- writes --------------------------------------------------------------------------------


class Writer(Inner):
    """uvicorn's place, writing a response the way uvicorn does: head, then body."""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def respond(self, body: bytes = b"ok") -> None:
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body))
        self.transport.write(body)


def relayed(inner: Inner, loop: asyncio.AbstractEventLoop) -> tuple[Relay, Transport]:
    """``inner`` behind a Relay over a fake transport, connected."""
    relay = Relay(inner, Flusher(loop))
    transport = Transport()
    relay.connection_made(transport)  # type: ignore[arg-type]
    return relay, transport


def test_a_responses_writes_leave_in_one_call_once_the_loop_turns(
    loop: asyncio.AbstractEventLoop,
) -> None:
    inner = Writer()
    _, transport = relayed(inner, loop)
    inner.respond(b"first")
    inner.respond(b"second")
    assert transport.writes == 0 and inner.transport.get_write_buffer_size() > 0
    loop.run_until_complete(asyncio.sleep(0))
    assert transport.writes == 1
    assert bytes(transport.written) == (
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirst"
        b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecond"
    )
    inner.respond(b"last")
    inner.transport.close()  # what was kept goes first
    assert transport.writes == 2 and transport.written.endswith(b"last") and transport.closing


def test_kept_writes_are_dropped_on_abort_and_after_the_peer_left(
    loop: asyncio.AbstractEventLoop,
) -> None:
    inner = Writer()
    _, transport = relayed(inner, loop)
    inner.respond()
    inner.transport.abort()
    loop.run_until_complete(asyncio.sleep(0))
    assert transport.writes == 0
    transport.closing = False
    inner.respond()
    transport.closing = True  # the peer reset the connection meanwhile
    loop.run_until_complete(asyncio.sleep(0))
    assert transport.writes == 0


def test_relay_forwards_everything_unchanged(loop: asyncio.AbstractEventLoop) -> None:
    inner = Inner()
    relay, _ = relayed(inner, loop)
    relay.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n")
    relay.data_received(b"X: \x01\r\n\r\n")  # not ours to judge with the guard off
    relay.eof_received()
    relay.connection_lost(None)
    assert bytes(inner.received) == b"GET / HTTP/1.1\r\nHost: a\r\nX: \x01\r\n\r\n"
    assert inner.eof and inner.lost


def test_an_error_answer_follows_the_responses_kept_before_it(
    loop: asyncio.AbstractEventLoop,
) -> None:
    guard, inner, transport = connect(loop, inner=Writer())
    guard.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    inner.respond(b"answered")
    guard.data_received(
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
    )
    assert transport.closing
    assert transport.written.index(b"answered") < transport.written.index(b"400 Bad Request")


def test_uvicorn_reads_the_addresses_the_loop_already_has(loop: asyncio.AbstractEventLoop) -> None:
    from uvicorn.protocols.utils import get_local_addr, get_remote_addr

    class Asked(Transport):
        def get_extra_info(self, name: str, default: Any = None) -> Any:
            if name == "socket":
                raise AssertionError("asked the socket itself")
            extra = {"sockname": ("::1", 8000, 0, 0), "peername": ("::1", 5555, 0, 0)}
            return extra.get(name, default)

    inner = Writer()
    Relay(inner, Flusher(loop)).connection_made(Asked())  # type: ignore[arg-type]
    assert get_local_addr(inner.transport) == ("::1", 8000)
    assert get_remote_addr(inner.transport) == ("::1", 5555)


def test_a_body_streamed_without_a_pause_is_not_kept_whole(
    loop: asyncio.AbstractEventLoop,
) -> None:
    inner = Writer()
    _, transport = relayed(inner, loop)
    chunk = b"x" * 16384
    for _ in range(64):  # 1 MiB in one turn of the loop
        inner.transport.write(chunk)
        assert inner.transport.get_write_buffer_size() <= asgi_guard.KEEP_MAX + len(chunk)
    assert len(transport.written) > 1_000_000 - asgi_guard.KEEP_MAX - len(chunk)
    loop.run_until_complete(asyncio.sleep(0))
    assert len(transport.written) == 64 * len(chunk)


def test_a_write_past_the_limit_with_nothing_kept_goes_at_once(
    loop: asyncio.AbstractEventLoop,
) -> None:
    inner = Writer()
    _, transport = relayed(inner, loop)
    inner.transport.write(b"x" * (asgi_guard.KEEP_MAX + 1))
    assert transport.writes == 1 and inner.transport.get_write_buffer_size() == 0


def test_a_response_that_never_ends_still_leaves_once_the_loop_turns(
    loop: asyncio.AbstractEventLoop,
) -> None:
    guard, inner, transport = connect(loop, inner=Writer())
    guard.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    inner.transport.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
    inner.transport.write(b"5\r\nfirst\r\n")  # and then the application waits forever
    loop.run_until_complete(asyncio.sleep(0))
    assert transport.writes == 1 and transport.written.endswith(b"first\r\n")
    assert not transport.closing


class FlowRecorder(Inner):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def pause_writing(self) -> None:
        self.calls.append("pause")

    def resume_writing(self) -> None:
        self.calls.append("resume")


def test_pause_and_resume_writing_reach_uvicorns_protocol(
    loop: asyncio.AbstractEventLoop,
) -> None:
    for front in (Relay, GuardedConnection):
        inner = FlowRecorder()
        if front is Relay:
            protocol: Relay = Relay(inner, Flusher(loop))
        else:
            protocol = GuardedConnection(inner, options(), GroupedTimers(loop, 0.0), Flusher(loop))
        protocol.connection_made(Transport())  # type: ignore[arg-type]
        protocol.pause_writing()
        protocol.resume_writing()
        assert inner.calls == ["pause", "resume"], front


def test_a_large_body_flows_over_a_socket_with_flow_control(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """4 MiB written in 16 KiB pieces as fast as uvicorn lets the application:
    it all arrives, writing pauses, and neither the kept writes nor the
    transport's buffer hold more than their limits."""
    chunk, count = b"y" * 16384, 256
    seen = {"kept": 0, "buffered": 0}

    class Streamer(Inner):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            self.resumed: asyncio.Future[None] | None = None
            self.pauses = 0

        def pause_writing(self) -> None:
            self.pauses += 1
            self.resumed = loop.create_future()

        def resume_writing(self) -> None:
            if self.resumed is not None and not self.resumed.done():
                self.resumed.set_result(None)

        async def stream(self) -> None:
            coalesced = self.transport
            for _ in range(count):
                coalesced.write(chunk)
                real = coalesced.transport.get_write_buffer_size()
                seen["kept"] = max(seen["kept"], coalesced.get_write_buffer_size() - real)
                seen["buffered"] = max(seen["buffered"], real)
                if self.resumed is not None:
                    await self.resumed  # uvicorn's FlowControl.drain
                    self.resumed = None
            coalesced.close()

    async def scenario() -> tuple[bytes, Streamer]:
        import socket

        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        inner = Streamer()
        relay = Relay(inner, Flusher(loop))
        await loop.connect_accepted_socket(lambda: relay, ours)
        writing = loop.create_task(inner.stream())
        received = bytearray()
        while True:
            data = await asyncio.wait_for(loop.sock_recv(theirs, 65536), 10)
            if not data:
                break
            received += data
            if len(received) % 5 == 0:
                await asyncio.sleep(0.001)  # a slow reader
        await asyncio.wait_for(writing, 10)
        theirs.close()
        return bytes(received), inner

    received, inner = loop.run_until_complete(scenario())
    assert received == chunk * count
    assert inner.pauses > 0
    assert seen["kept"] <= asgi_guard.KEEP_MAX
    assert seen["buffered"] <= 1024 * 1024


def test_an_upgrade_switches_the_transport_to_the_new_protocol(
    loop: asyncio.AbstractEventLoop,
) -> None:
    class Switched(Inner):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport

    websocket = Switched()

    class Upgrading(Inner):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            # uvicorn: the WebSocket protocol gets the same transport stand-in.
            websocket.connection_made(self.transport)
            self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
            self.transport.set_protocol(websocket)

    class Switchable(Transport):
        def set_protocol(self, protocol: Any) -> None:
            self.protocol = protocol

    guard, inner, transport = connect(
        loop, options(websockets=True), inner=Upgrading(), transport=Switchable()
    )
    head = (
        b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    guard.data_received(head + b"\x81\x80frame")
    assert transport.protocol is websocket
    assert bytes(inner.received) == head and bytes(websocket.received) == b"\x81\x80frame"
    websocket.transport.write(b"\x81\x02hi")
    loop.run_until_complete(asyncio.sleep(0))
    assert transport.writes == 1
    assert transport.written == b"HTTP/1.1 101 Switching Protocols\r\n\r\n\x81\x02hi"


def test_a_reused_buffer_is_sent_as_it_was_when_written(loop: asyncio.AbstractEventLoop) -> None:
    inner = Writer()
    _, transport = relayed(inner, loop)
    buffer = bytearray(b"first")
    inner.transport.write(buffer)
    buffer[:] = b"later"  # the caller reuses its buffer before the loop turns
    inner.transport.write(memoryview(b"-view"))
    loop.run_until_complete(asyncio.sleep(0))
    assert bytes(transport.written) == b"first-view"
