"""The asgi worker (-k asgi): uvicorn's protocols on forkserve's processes and sockets.

Every test runs a real server through the ``serve`` fixture, under both
scheduling policies where the policy matters, and talks to it with real
clients on loopback (raw sockets, httpx, the websockets client). Waits are
bounded.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from conftest import Server
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from tests.helpers import APPS, ROOT, wait_for

APP = "asgi_apps:app"
POLICIES = ["rr", "none"]


def start(serve: Callable[..., Server], sched: str, *args: str, **kwargs: object) -> Server:
    return serve(APP, "-k", "asgi", "--sched", sched, *args, **kwargs)


def body_of(reply: bytes) -> bytes:
    return reply.partition(b"\r\n\r\n")[2]


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.") else 0


def read_until(sock: socket.socket, marker: bytes, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def answers(server: Server, path: str) -> bool:
    """True once ``path`` answers 200; False while the port refuses connections."""
    try:
        return server.get(path, timeout=3).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def events(path: Path) -> list[str]:
    return path.read_text().split("\n")[:-1] if path.exists() else []


# -- concurrency ------------------------------------------------------------------


VARIANTS = [("rr", "httptools"), ("none", "httptools"), ("rr", "h11")]


@pytest.mark.parametrize(("sched", "http"), VARIANTS)
def test_one_worker_serves_slow_requests_concurrently(serve, sched: str, http: str) -> None:
    server = start(serve, sched, "-w", "1", "--http", http, workers=1)
    began = time.monotonic()
    with ThreadPoolExecutor(20) as pool:
        replies = list(pool.map(lambda _: server.get("/sleep?0.5", timeout=10), range(20)))
    elapsed = time.monotonic() - began
    assert all(reply.startswith(b"HTTP/1.1 200") for reply in replies)
    assert len({body_of(reply) for reply in replies}) == 1, "one worker answered all"
    assert elapsed < 2.0, f"20 requests of 0.5 s took {elapsed:.2f}s"


def test_auto_class_serves_an_asgi_app_under_both_policies(serve) -> None:
    for sched in ("auto", "rr", "none"):
        server = serve("examples.hello_asgi:app", "-w", "2", "--sched", sched)
        reply = server.get("/")
        assert reply.startswith(b"HTTP/1.1 200") and body_of(reply) == b"Hello, world!\n"
        assert b"\r\nserver: forkserve\r\n" in reply.lower()
        assert b"\r\ndate: " in reply.lower()
        server.stop()


# -- WebSockets --------------------------------------------------------------------


def ws_url(server: Server) -> str:
    return f"ws://127.0.0.1:{server.port}/ws"


@pytest.mark.parametrize("ws", ["websockets", "wsproto"])
@pytest.mark.parametrize("sched", POLICIES)
def test_websocket_echo_close_codes_and_max_size(serve, sched: str, ws: str) -> None:
    server = start(serve, sched, "--ws", ws, "--ws-max-size", "1024")
    with ws_connect(ws_url(server), open_timeout=5, close_timeout=5) as conn:
        conn.send("hello")
        assert conn.recv(timeout=5) == "hello"
        conn.send(b"\x00\x01binary")
        assert conn.recv(timeout=5) == b"\x00\x01binary"
        conn.send("close:4001")
        with pytest.raises(ConnectionClosed) as closed:
            conn.recv(timeout=5)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4001, "bye")

    with ws_connect(ws_url(server), open_timeout=5, close_timeout=5) as conn:
        conn.send("x" * 1024)
        assert conn.recv(timeout=5) == "x" * 1024
        conn.send("x" * 1025)
        with pytest.raises(ConnectionClosed) as closed:
            conn.recv(timeout=5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


def test_ws_none_refuses_websocket_upgrades(serve) -> None:
    server = start(serve, "none", "--ws", "none")
    with pytest.raises(Exception):  # noqa: B017 - the handshake fails, whatever the reason
        ws_connect(ws_url(server), open_timeout=5).close()
    assert server.get("/").startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("sched", POLICIES)
def test_sigterm_closes_open_websockets_with_1001(serve, sched: str) -> None:
    server = start(serve, sched, "-w", "1", workers=1)
    with ws_connect(ws_url(server), open_timeout=5, close_timeout=5) as conn:
        conn.send("ping")
        assert conn.recv(timeout=5) == "ping"
        server.signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed) as closed:
            conn.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    assert server.wait(15) == 0


# -- lifespan ---------------------------------------------------------------------


@pytest.mark.parametrize("sched", POLICIES)
def test_lifespan_startup_precedes_requests_and_shutdown_follows_sigterm(
    serve, tmp_path: Path, sched: str
) -> None:
    log = tmp_path / "events"
    env = {"ASGI_EVENTS": str(log), "ASGI_STARTUP_DELAY": "0.5"}
    server = start(serve, sched, "-w", "1", env=env, ready=False)
    # Ask at once: a request must not be served before startup completed.
    wait_for(lambda: answers(server, "/"), 15, interval=0.01)
    server.signal(signal.SIGTERM)
    assert server.wait(15) == 0
    names = [line.split()[0] for line in events(log)]
    assert names[0] == "startup"
    assert "request" in names and "request-before-startup" not in names
    assert names[-1] == "shutdown" and names.count("shutdown") == 1


def test_failing_startup_stops_the_server_with_the_message_once(serve) -> None:
    server = serve("asgi_apps:failing_startup", "-k", "asgi", "-w", "2", ready=False)
    assert server.wait(15) == 1
    output = server.output
    assert output.count("database unreachable (test)") == 1, output
    assert "a worker failed to boot" in output


def test_lifespan_auto_serves_apps_without_lifespan_and_on_refuses_them(serve) -> None:
    server = serve("asgi_apps:no_lifespan", "-k", "asgi")
    assert body_of(server.get("/")) == b"ok"
    server.stop()
    refused = serve("asgi_apps:no_lifespan", "-k", "asgi", "--lifespan", "on", ready=False)
    assert refused.wait(15) == 1
    assert refused.output.count("RuntimeError: unsupported scope lifespan") == 1


# -- limits and bodies ------------------------------------------------------------


@pytest.mark.parametrize("sched", POLICIES)
def test_worker_connections_answers_503_past_the_cap(serve, tmp_path: Path, sched: str) -> None:
    log = tmp_path / "events"
    server = start(
        serve,
        sched,
        "-w",
        "1",
        "--worker-connections",
        "2",
        env={"ASGI_EVENTS": str(log)},
        workers=1,
    )
    held = [server.connect(10) for _ in range(2)]
    try:
        for sock in held:
            sock.sendall(b"GET /sleep?1.5 HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_for(lambda: sum(1 for e in events(log) if e.startswith("begin")) == 2, 5)
        began = time.monotonic()
        refused = server.get("/pid", timeout=5)
        assert status_of(refused) == 503
        assert time.monotonic() - began < 1.0, "refused at once, not queued"
        for sock in held:
            assert read_until(sock, b"slept").startswith(b"HTTP/1.1 200")
    finally:
        for sock in held:
            sock.close()
    wait_for(lambda: status_of(server.get("/pid")) == 200, 5)


@pytest.mark.parametrize(("sched", "http"), [("rr", "httptools"), ("none", "h11")])
def test_request_and_response_bodies_stream(serve, sched: str, http: str) -> None:
    server = start(serve, sched, "--http", http)
    with server.connect(5) as sock:
        sock.sendall(b"POST /echo-stream HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        # Each chunk comes back before the next is sent: both bodies stream.
        received = b""
        for piece in (b"first-piece", b"second-piece", b"third-piece"):
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            received += read_until(sock, piece)
            assert piece in received
        sock.sendall(b"0\r\n\r\n")
        received += read_until(sock, b"0\r\n\r\n")
    assert received.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding: chunked" in received.lower()

    arrivals: list[float] = []
    chunks: list[bytes] = []
    began = time.monotonic()
    with httpx.Client(timeout=5) as client, client.stream("GET", server.url("/drip")) as reply:
        for chunk in reply.iter_bytes():
            if chunk:
                arrivals.append(time.monotonic() - began)
                chunks.append(chunk)
    assert reply.status_code == 200
    assert b"".join(chunks) == b"".join(b"chunk %d\n" % i for i in range(5))
    assert len(arrivals) >= 3, arrivals
    assert arrivals[0] < arrivals[-1] - 0.3, f"the response arrived in one piece: {arrivals}"


# -- stopping ---------------------------------------------------------------------


@pytest.mark.parametrize("sched", POLICIES)
def test_sigterm_completes_requests_in_flight(serve, tmp_path: Path, sched: str) -> None:
    log = tmp_path / "events"
    server = start(
        serve, sched, "-w", "1", "--keep-alive", "30", env={"ASGI_EVENTS": str(log)}, workers=1
    )
    socks = [server.connect(10) for _ in range(3)]
    for sock in socks:
        sock.sendall(b"GET /sleep?1.0 HTTP/1.1\r\nHost: x\r\n\r\n")
    idle = server.connect(5)  # a keep-alive connection with nothing in flight
    idle.sendall(b"GET /scope HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_until(idle, b"}").startswith(b"HTTP/1.1 200")
    wait_for(lambda: sum(1 for e in events(log) if e.startswith("begin")) == 3, 5)
    server.signal(signal.SIGTERM)
    began = time.monotonic()
    idle.settimeout(5)
    assert idle.recv(100) == b"", "an idle keep-alive connection is closed"
    assert time.monotonic() - began < 0.8, "closed at the signal, not after in-flight work"
    idle.close()
    for sock in socks:
        reply = read_until(sock, b"slept", timeout=10)
        assert reply.startswith(b"HTTP/1.1 200") and b"connection: close" in reply.lower()
        sock.close()
    assert server.wait(15) == 0
    assert [e.split()[0] for e in events(log)][-1] == "shutdown"


def test_graceful_timeout_bounds_the_wait(serve) -> None:
    server = start(serve, "none", "-w", "1", "--graceful-timeout", "1", workers=1)
    sock = server.connect(10)
    sock.sendall(b"GET /sleep?30 HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_for(lambda: server.get("/pid").startswith(b"HTTP/1.1 200"), 5)
    began = time.monotonic()
    server.signal(signal.SIGTERM)
    assert server.wait(15) == 0
    assert time.monotonic() - began < 6
    sock.close()


@pytest.mark.parametrize("sched", POLICIES)
def test_max_requests_recycles_the_worker(serve, sched: str) -> None:
    server = start(serve, sched, "-w", "1", "--max-requests", "3", workers=1)
    first = body_of(server.get("/pid"))
    wait_for(lambda: body_of(server.get("/pid")) not in (first, b""), 10)
    assert "recycling" in server.output


# -- scope: root_path and proxy headers ---------------------------------------------


@pytest.mark.parametrize("sched", POLICIES)
def test_root_path_is_in_the_scope(serve, sched: str) -> None:
    server = start(serve, sched, "--root-path", "/api")
    scope = json.loads(body_of(server.get("/scope")))
    assert scope["root_path"] == "/api"
    assert scope["path"] == "/api/scope"


FORWARDED = "X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: https\r\n"


@pytest.mark.parametrize("sched", POLICIES)
def test_proxy_headers_only_from_trusted_peers(serve, sched: str) -> None:
    trusted = start(serve, sched)  # the default trusts 127.0.0.1
    scope = json.loads(body_of(trusted.get("/scope", headers=FORWARDED)))
    assert (scope["client"], scope["scheme"]) == ("203.0.113.7", "https")
    trusted.stop()
    untrusted = start(serve, sched, "--forwarded-allow-ips", "10.9.8.7")
    scope = json.loads(body_of(untrusted.get("/scope", headers=FORWARDED)))
    assert (scope["client"], scope["scheme"]) == ("127.0.0.1", "http")


# -- access log -------------------------------------------------------------------

LINE = re.compile(
    r"^127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\] "
    r'"GET /pid\?x=1 HTTP/1\.1" 200 (\d+) "http://ref\.example/" "asgi-test/1\.0"$',
    re.M,
)


@pytest.mark.parametrize(("sched", "http"), [("rr", "h11"), ("none", "httptools")])
def test_access_log_in_forkserve_format(serve, sched: str, http: str) -> None:
    server = start(serve, sched, "--http", http, "--access-logfile", "-")
    reply = server.get(
        "/pid?x=1", headers="Referer: http://ref.example/\r\nUser-Agent: asgi-test/1.0\r\n"
    )
    match = wait_for(lambda: LINE.search(server.output), 5)
    assert int(match.group(1)) == len(body_of(reply))


def test_access_log_custom_atoms(serve) -> None:
    server = start(
        serve,
        "none",
        "--access-logfile",
        "-",
        "--access-logformat",
        "atoms %(m)s %(U)s %(q)s %(s)s %(B)s %(M)s %({x-test}i)s %({content-type}o)s",
    )
    server.get("/sleep?0.2", headers="X-Test: yes\r\n")
    server.get("/missing")
    line = wait_for(lambda: re.search(r"^atoms GET /sleep 0\.2 200 .*$", server.output, re.M), 5)
    fields = line.group(0).split()
    assert int(fields[6]) >= 200, "duration in ms covers the app's sleep"
    assert fields[7:] == ["yes", "text/plain"]
    assert wait_for(lambda: "atoms GET /missing  404 9 " in server.output, 5)


def test_uvloop_requested_but_missing_is_a_clear_boot_error(serve, tmp_path: Path) -> None:
    fake = tmp_path / "uvloop"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('No module named uvloop')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(APPS), str(ROOT)])}
    server = serve(APP, "-k", "asgi", "-w", "2", "--loop", "uvloop", env=env, ready=False)
    assert server.wait(15) == 1
    output = server.output
    assert output.count("--loop uvloop needs the uvloop package") == 1, output
    assert "Traceback" not in output


# -- forkserve's front end: limits, head deadline, pipelining ------------------------


def until_closed(sock: socket.socket, timeout: float = 5.0) -> tuple[bytes, bool]:
    """Everything the server sends until it closes: (bytes, closed); a reset counts."""
    deadline = time.monotonic() + timeout
    data = b""
    while (remaining := deadline - time.monotonic()) > 0:
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


def statuses(raw: bytes) -> list[int]:
    return [int(m) for m in re.findall(rb"HTTP/1\.1 (\d{3}) ", raw)]


LIMITS = (
    "--limit-request-line", "64",
    "--limit-request-fields", "5",
    "--limit-request-field-size", "40",
    "--limit-request-body", "10",
)  # fmt: skip


@pytest.mark.parametrize(("sched", "http"), [("rr", "httptools"), ("none", "h11")])
def test_request_limits_answer_413_414_431_and_close(serve, sched: str, http: str) -> None:
    server = start(serve, sched, "--http", http, *LIMITS)
    head = "POST / HTTP/1.1\r\nHost: x\r\n"
    cases = {
        "414 long line": (b"GET /" + b"a" * 100 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        "431 fields": ((head + "A: 1\r\n" * 6 + "\r\n").encode(), 431),
        "431 field size": ((head + "A: " + "b" * 60 + "\r\n\r\n").encode(), 431),
        "413 length": ((head + "Content-Length: 11\r\n\r\n" + "c" * 11).encode(), 413),
        "413 chunked": (
            (
                head + "Transfer-Encoding: chunked\r\n\r\n6\r\nabcdef\r\n6\r\nghijkl\r\n0\r\n\r\n"
            ).encode(),
            413,
        ),
    }
    for name, (data, status) in cases.items():
        with server.connect(5) as sock:
            sock.sendall(data + b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n")
            raw, closed = until_closed(sock)
        assert statuses(raw) == [status], (name, raw[:200])
        assert b"connection: close" in raw.lower() and closed, name
    within = (head + "A: 1\r\nContent-Length: 10\r\n\r\n" + "d" * 10).encode()
    with server.connect(5) as sock:
        sock.sendall(within)
        assert status_of(read_until(sock, b"ok")) == 200


@pytest.mark.parametrize(("sched", "http"), [("rr", "h11"), ("none", "httptools")])
def test_header_timeout_closes_slow_heads_with_408(serve, sched: str, http: str) -> None:
    server = start(serve, sched, "--http", http, "--header-timeout", "1", "--keep-alive", "0.3")
    with server.connect(5) as started, server.connect(5) as silent:
        began = time.monotonic()
        started.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        raw, closed = until_closed(started)
        assert closed and statuses(raw) == [408], raw
        assert time.monotonic() - began >= 0.8
        raw, closed = until_closed(silent)
        assert closed and raw == b""
    # Kept alive after a response: closed idle after --keep-alive, but once the
    # next head has begun, --header-timeout holds (longer here) and ends in 408.
    with server.connect(5) as idle, server.connect(5) as slow:
        for sock in (idle, slow):
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status_of(read_until(sock, b"ok")) == 200
        began = time.monotonic()
        slow.sendall(b"GET / HTTP/1.1\r\n")
        raw, closed = until_closed(idle)
        assert closed and raw == b""
        raw, closed = until_closed(slow)
        assert closed and statuses(raw) == [408], raw
        assert time.monotonic() - began >= 0.8


@pytest.mark.parametrize(("sched", "http"), [("rr", "httptools"), ("none", "h11")])
def test_pipelined_and_split_requests_pass_the_front_end(serve, sched: str, http: str) -> None:
    server = start(serve, sched, "--http", http)
    with server.connect(5) as sock:
        # Three requests in one write, one with a chunked body, blank lines between.
        sock.sendall(
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\r\n"
            b"POST /echo-stream HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\n\r\n"
            b"GET /pid HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        raw = read_until(sock, str(server.workers()[0]).encode())
        assert statuses(raw) == [200, 200, 200] and b"abc" in raw, raw
        # One request cut at every awkward place: the head and the chunk framing.
        request = (
            b"POST /echo-stream HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;n=v\r\nhello\r\n0\r\nT: 1\r\n\r\n"
        )
        for index in range(0, len(request), 7):
            sock.sendall(request[index : index + 7])
        raw = read_until(sock, b"0\r\n\r\n")
        assert statuses(raw) == [200] and b"hello" in raw, raw
        # A slow response, then a bad request: the error waits for the response.
        sock.sendall(
            b"GET /sleep?0.3 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        raw, closed = until_closed(sock)
    assert statuses(raw) == [200, 400] and b"slept" in raw and closed, raw
    assert raw.index(b"slept") < raw.index(b"400 Bad Request")


def test_asgi_guard_off_leaves_framing_to_uvicorn(serve) -> None:
    long_target = "/" + "a" * 300
    raw = f"GET {long_target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    guarded = serve("asgi_apps:app", "-k", "asgi", "--limit-request-line", "100")
    assert guarded.request(raw).startswith(b"HTTP/1.1 414")
    lenient = serve(
        "asgi_apps:app", "-k", "asgi", "--limit-request-line", "100", "--asgi-guard", "off"
    )
    assert not lenient.request(raw).startswith(b"HTTP/1.1 414")


# -- invalid response headers ----------------------------------------------------------

BAD_HEADERS = [
    ("value", "a\rInjected: 1"),
    ("value", "a\nInjected: 1"),
    ("value", "a\x00Injected: 1"),
    ("name", "X-A Injected"),
]


@pytest.mark.parametrize(("sched", "http"), [("rr", "httptools"), ("none", "h11")])
def test_invalid_response_headers_are_500_logged_once_and_never_sent(
    serve, sched: str, http: str
) -> None:
    server = serve(
        "asgi_headers:app", "-k", "asgi", "-w", "1", "--sched", sched, "--http", http, workers=1
    )
    pid = body_of(server.get("/pid"))
    for where, value in BAD_HEADERS:
        target = f"/bad-header?where={where}&value={quote(value, safe='')}"
        with server.connect() as sock:
            sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            raw, closed = until_closed(sock)
        assert statuses(raw) == [500], (where, value, raw)
        assert b"Injected" not in raw and b"x-bad" not in raw.lower(), raw
        assert b"should not be sent" not in raw and closed, raw
        line = f"GET {target} HTTP/1.1"
        wait_for(lambda line=line: line in server.output, 5)
        assert server.output.count(line) == 1, server.output
        assert body_of(server.get("/pid")) == pid, "the same worker serves on"
    assert "Exception in ASGI application" not in server.output
    assert server.output.count("invalid response to") == len(BAD_HEADERS)


def test_sends_after_a_refused_response_are_dropped(serve) -> None:
    server = serve("asgi_headers:app", "-k", "asgi", "-w", "1", workers=1)
    value = quote("a\r\nInjected: 1", safe="")
    raw = server.get(f"/after-refusal?value={value}")
    assert statuses(raw) == [500] and b"sent after" not in raw and b"Injected" not in raw, raw
    assert server.get("/").startswith(b"HTTP/1.1 200")
