"""The threaded worker (-k threaded), under both scheduling policies.

Every test runs a real server through the ``serve`` fixture and talks to it
with real clients on loopback; waits are bounded.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from conftest import Server, wait_for

from tests.helpers import closed_by_server, make_certificate

APP = "threaded_apps:app"
SCHEDS = ["rr", "none"]


def start(serve: Callable[..., Server], sched: str, *args: str, **kwargs: object) -> Server:
    return serve(APP, "-k", "threaded", "--sched", sched, *args, **kwargs)


def read_response(sock: socket.socket, timeout: float = 5.0) -> tuple[bytes, bytes]:
    """One Content-Length response, consuming nothing after it: (head, body)."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    peeked = b""
    while b"\r\n\r\n" not in peeked:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no whole response head within {timeout}s: {peeked!r}")
        before = len(peeked)
        peeked = sock.recv(65536, socket.MSG_PEEK)
        if peeked and len(peeked) == before:
            time.sleep(0.005)  # part of a head is in: let the rest arrive
        elif not peeked:
            raise ConnectionError("closed before a response head")
    end = peeked.index(b"\r\n\r\n") + 4
    head = recv_exactly(sock, end)[:-4]
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head, recv_exactly(sock, length)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {size} bytes")
        data += chunk
    return data


def keepalive_get(sock: socket.socket, path: str = "/") -> tuple[bytes, bytes]:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    return read_response(sock)


@pytest.mark.parametrize("sched", SCHEDS)
def test_slow_requests_run_in_parallel_up_to_the_thread_count(serve, sched):
    """Four requests of 0.5 s run at once on 4 threads; a fifth waits for a free one."""
    server = start(serve, sched, "-w", "1", "--threads", "4")
    durations: list[float] = []
    lock = threading.Lock()
    began = time.monotonic()

    def one() -> None:
        with server.connect(timeout=5.0) as sock:
            sock.sendall(b"GET /slow?0.5 HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
            head, _ = read_response(sock)
            assert head.startswith(b"HTTP/1.1 200")
        with lock:
            durations.append(time.monotonic() - began)

    threads = [threading.Thread(target=one) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    durations.sort()
    assert len(durations) == 5, durations
    assert durations[3] < 1.5, f"4 requests of 0.5 s on 4 threads: {durations}"
    assert durations[4] >= 0.95, f"the 5th did not wait for a thread: {durations}"
    assert durations[4] < 2.0, durations


@pytest.mark.parametrize("sched", SCHEDS)
def test_idle_keepalive_connections_hold_no_thread(serve, sched):
    server = start(serve, sched, "-w", "1", "--threads", "2", "--keep-alive", "30")
    idle = [server.connect() for _ in range(8)]
    try:
        for sock in idle:
            head, body = keepalive_get(sock)
            assert head.startswith(b"HTTP/1.1 200") and body == b"Hello, world!"
        began = time.monotonic()
        with httpx.Client(timeout=5.0) as client:
            reply = client.get(server.url("/"), headers={"Connection": "close"})
        assert reply.status_code == 200
        assert time.monotonic() - began < 1.0
        # The idle connections were kept, not closed to make room.
        for sock in idle:
            head, _ = keepalive_get(sock)
            assert head.startswith(b"HTTP/1.1 200")
    finally:
        for sock in idle:
            sock.close()


@pytest.mark.parametrize("sched", SCHEDS)
def test_connection_cap_closes_the_oldest_idle_connection(serve, sched):
    server = start(
        serve, sched, "-w", "1", "--threads", "2", "--worker-connections", "3", "--keep-alive", "30"
    )
    first, second, third = (server.connect() for _ in range(3))
    with first, second, third:
        for sock in (first, second, third):
            assert keepalive_get(sock)[0].startswith(b"HTTP/1.1 200")
        with server.connect() as fourth:
            head, body = keepalive_get(fourth)
            assert head.startswith(b"HTTP/1.1 200") and body == b"Hello, world!"
            assert closed_by_server(first, timeout=3.0), "the oldest idle connection stayed open"
            for sock in (second, third, fourth):
                assert keepalive_get(sock)[0].startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("sched", SCHEDS)
def test_at_the_connection_cap_a_new_client_waits_for_a_free_slot(serve, sched, tmp_path):
    """At --worker-connections with none idle to close, a free thread does not take the
    next client; it is taken once a connection closes, not refused and not forgotten."""
    marks = tmp_path / "marks"
    marks.mkdir()
    server = start(
        serve, sched, "-w", "1", "--threads", "2", "--worker-connections", "1",
        env={"THREADED_TEST_MARKS": str(marks)},
    )  # fmt: skip
    slow: list[bytes] = []
    blocker = threading.Thread(target=lambda: slow.append(server.get("/slow?1.0", timeout=10)))
    blocker.start()
    wait_for(lambda: os.listdir(marks), timeout=5.0)
    began = time.monotonic()
    reply = server.get("/pid", timeout=10)
    waited = time.monotonic() - began
    blocker.join(10)
    assert reply.startswith(b"HTTP/1.1 200")
    assert slow and slow[0].startswith(b"HTTP/1.1 200")
    assert 0.3 < waited < 5.0, waited


def test_a_buffered_request_head_and_the_requests_after_it(serve):
    """With --buffer-request-head the first request comes with the connection (the
    primary read it); the next ones on that connection are read from the socket."""
    server = start(serve, "rr", "-w", "1", "--threads", "2", "--buffer-request-head")
    with server.connect() as sock:
        for path in ("/", "/pid", "/"):
            head, body = keepalive_get(sock, path)
            assert head.startswith(b"HTTP/1.1 200") and body, (path, head)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n" * 2)
        assert [read_response(sock)[1] for _ in range(2)] == [b"Hello, world!"] * 2


@pytest.mark.parametrize("sched", SCHEDS)
def test_keepalive_timeout_closes_an_idle_connection(serve, sched):
    server = start(serve, sched, "-w", "1", "--keep-alive", "1")
    with server.connect() as sock:
        head, _ = keepalive_get(sock)
        assert b"connection: close" not in head.lower()
        answered = time.monotonic()
        assert closed_by_server(sock, timeout=4.0), "idle connection not closed"
        waited = time.monotonic() - answered
        assert 0.7 <= waited < 3.0, waited


@pytest.mark.parametrize("http", ["auto", "h11"])
@pytest.mark.parametrize("sched", SCHEDS)
def test_environ_is_multithreaded(serve, sched, http):
    server = start(serve, sched, "-w", "2", "--http", http)
    environ = httpx.get(server.url("/env"), timeout=5.0).json()
    assert environ["wsgi.multithread"] is True
    assert environ["wsgi.multiprocess"] is True


@pytest.mark.parametrize("http", ["auto", "h11"])
@pytest.mark.parametrize("sched", SCHEDS)
def test_streaming_request_and_response_bodies(serve, sched, http):
    """Each line the client sends comes back before it sends the next one."""
    server = start(serve, sched, "-w", "1", "--http", http)
    with server.connect() as sock:
        sock.settimeout(5.0)
        sock.sendall(
            b"POST /echo-lines HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        received = b""
        for word in (b"one", b"two", b"three"):
            line = word + b"\n"
            sock.sendall(b"%x\r\n%s\r\n" % (len(line), line))
            while b"echo: " + line not in received:
                chunk = sock.recv(65536)
                assert chunk, f"closed early: {received!r}"
                received += chunk
        sock.sendall(b"0\r\n\r\n")
        while not received.endswith(b"0\r\n\r\n"):
            chunk = sock.recv(65536)
            assert chunk, f"closed early: {received!r}"
            received += chunk
    assert received.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding: chunked" in received.lower()


@pytest.mark.parametrize("sched", SCHEDS)
def test_graceful_stop_completes_requests_in_flight(serve, sched, tmp_path: Path):
    marks = tmp_path / "marks"
    marks.mkdir()
    # Every thread busy: the worker is not watching its listener when the stop comes.
    server = start(
        serve, sched, "-w", "1", "--threads", "3", env={"THREADED_TEST_MARKS": str(marks)}
    )
    conns = [http.client.HTTPConnection(server.host, server.port, timeout=10) for _ in range(3)]
    replies: list[tuple[int, str | None, bytes]] = []
    lock = threading.Lock()

    def one(conn: http.client.HTTPConnection) -> None:
        conn.request("GET", "/slow?1.0")
        response = conn.getresponse()
        body = response.read()
        with lock:
            replies.append((response.status, response.getheader("Connection"), body))

    threads = [threading.Thread(target=one, args=(conn,)) for conn in conns]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(os.listdir(marks)) == 3, timeout=5.0)
    server.signal(signal.SIGTERM)
    for thread in threads:
        thread.join(10)
    for conn in conns:
        conn.close()
    assert server.wait(15) == 0
    assert len(replies) == 3, replies
    for status, connection, body in replies:
        assert status == 200
        assert body.startswith(b"slept 1.0")
        assert connection == "close", "a response during shutdown must close its connection"


@pytest.mark.parametrize("sched", SCHEDS)
def test_graceful_stop_answers_a_request_waiting_for_a_thread(serve, sched, tmp_path: Path):
    """A keep-alive client whose next request came in while the only thread was busy
    gets its answer (with a close) when the server stops, not a closed connection."""
    marks = tmp_path / "marks"
    marks.mkdir()
    server = start(
        serve, sched, "-w", "1", "--threads", "1", env={"THREADED_TEST_MARKS": str(marks)}
    )
    slow: list[bytes] = []
    with server.connect() as waiting:
        assert keepalive_get(waiting)[0].startswith(b"HTTP/1.1 200")
        blocker = threading.Thread(target=lambda: slow.append(server.get("/slow?1.0", timeout=10)))
        blocker.start()
        wait_for(lambda: os.listdir(marks), timeout=5.0)
        waiting.sendall(b"GET /pid HTTP/1.1\r\nHost: test\r\n\r\n")
        server.signal(signal.SIGTERM)
        head, body = read_response(waiting, timeout=10.0)
        blocker.join(10)
    assert head.startswith(b"HTTP/1.1 200") and body.isdigit(), head
    assert b"connection: close" in head.lower()
    assert slow and slow[0].startswith(b"HTTP/1.1 200")
    assert server.wait(15) == 0


@pytest.mark.parametrize("sched", SCHEDS)
def test_max_requests_replaces_the_worker(serve, sched):
    server = start(serve, sched, "-w", "1", "--max-requests", "3", workers=1)
    first = int(server.get("/pid").partition(b"\r\n\r\n")[2])

    def new_pid() -> int | None:
        with contextlib.suppress(OSError, ValueError):
            pid = int(server.get("/pid", timeout=2.0).partition(b"\r\n\r\n")[2])
            if pid != first:
                return pid
        return None

    second = wait_for(new_pid, timeout=10.0)
    assert second != first
    wait_for(lambda: server.workers() == [second], timeout=10.0)
    assert json.loads(httpx.get(server.url("/env"), timeout=5.0).text)["forkserve.pid"] == second


@pytest.mark.parametrize("sched", SCHEDS)
def test_pipelined_requests_are_answered_in_order(serve, sched):
    server = start(serve, sched, "-w", "1", "--threads", "2")
    with server.connect() as sock:
        sock.sendall(
            b"GET /pid HTTP/1.1\r\nHost: test\r\n\r\n"
            b"GET /slow?0.1 HTTP/1.1\r\nHost: test\r\n\r\n"
            b"GET / HTTP/1.1\r\nHost: test\r\n\r\n"
        )
        bodies = [read_response(sock)[1] for _ in range(3)]
    assert bodies[0].isdigit()
    assert bodies[1].startswith(b"slept 0.1")
    assert bodies[2] == b"Hello, world!"


@pytest.mark.parametrize("sched", SCHEDS)
def test_sigterm_to_a_worker_finishes_its_request_and_it_is_replaced(serve, sched, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    server = start(serve, sched, "-w", "1", env={"THREADED_TEST_MARKS": str(marks)}, workers=1)
    [old] = server.workers()
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    conn.request("GET", "/slow?0.5")
    wait_for(lambda: os.listdir(marks), timeout=5.0)
    os.kill(old, signal.SIGTERM)
    response = conn.getresponse()
    assert response.status == 200
    assert response.read() == f"slept 0.5 in {old}".encode()
    assert response.getheader("Connection") == "close"
    conn.close()
    wait_for(lambda: server.workers() and old not in server.workers(), timeout=10.0)
    pid = int(server.get("/pid").partition(b"\r\n\r\n")[2])
    assert pid != old
    wait_for(lambda: f"(pid {old}) exited with code 0" in server.output, timeout=5.0)


@pytest.mark.parametrize("sched", SCHEDS)
def test_a_busy_worker_leaves_new_connections_to_a_free_one(serve, sched, tmp_path):
    """With one thread per worker, clients arriving while one worker is busy are served
    by the other at once. Under round robin one connection may already be in the busy
    worker's hands (the primary gave it before the worker became busy) and waits."""
    marks = tmp_path / "marks"
    marks.mkdir()
    server = start(
        serve, sched, "-w", "2", "--threads", "1", env={"THREADED_TEST_MARKS": str(marks)}
    )
    slow: list[bytes] = []
    blocker = threading.Thread(target=lambda: slow.append(server.get("/slow?2.0", timeout=10)))
    blocker.start()
    wait_for(lambda: os.listdir(marks), timeout=5.0)
    durations: list[float] = []
    lock = threading.Lock()

    def one() -> None:
        began = time.monotonic()
        reply = server.get("/pid", timeout=10)
        assert reply.startswith(b"HTTP/1.1 200")
        with lock:
            durations.append(time.monotonic() - began)

    clients = [threading.Thread(target=one) for _ in range(6)]
    for client in clients:
        client.start()
    for client in clients:
        client.join(10)
    blocker.join(10)
    assert len(durations) == 6 and slow
    delayed = [d for d in durations if d > 1.0]
    assert len(delayed) <= (1 if sched == "rr" else 0), durations


@pytest.mark.parametrize("sched", SCHEDS)
def test_busy_keepalive_clients_do_not_starve_a_new_connection(serve, sched):
    """Keep-alive clients sending requests back to back keep every thread busy; a new
    client is still answered within a few of their requests, not once they stop."""
    server = start(serve, sched, "-w", "1", "--threads", "2", "--keep-alive", "30")
    stop = threading.Event()
    served = [0]
    errors: list[BaseException] = []

    def hammer() -> None:
        try:
            with server.connect() as sock:
                while not stop.is_set():
                    head, _ = keepalive_get(sock, "/slow?0.02")
                    assert head.startswith(b"HTTP/1.1 200"), head
                    served[0] += 1
        except BaseException as exc:  # reported by the test, not lost in the thread
            errors.append(exc)

    clients = [threading.Thread(target=hammer) for _ in range(8)]
    for client in clients:
        client.start()
    try:
        # Every client is being served and more requests wait than there are threads.
        wait_for(lambda: served[0] >= 40, timeout=10.0)
        began = time.monotonic()
        with server.connect() as sock:
            try:
                head, body = keepalive_get(sock)
            except TimeoutError:
                head, body = b"no answer within 5 s", b""
        waited = time.monotonic() - began
    finally:
        stop.set()
        for client in clients:
            client.join(10)
    assert not errors, errors
    assert head.startswith(b"HTTP/1.1 200") and body == b"Hello, world!", head
    # 8 clients on 2 threads, 20 ms a request: a fair turn is about 80 ms.
    assert waited < 1.0, f"a new connection waited {waited:.2f}s behind busy keep-alive ones"


@pytest.mark.parametrize("sched", SCHEDS)
def test_tls_clients_between_handshake_and_request_hold_no_thread(serve, sched, tmp_path):
    """A TLS client that finished its handshake but has not sent its request yet waits
    without a thread: more such clients than threads do not delay the next one."""
    cert, key = make_certificate(tmp_path)
    server = start(
        serve, sched, "-w", "1", "--threads", "2", "--certfile", str(cert), "--keyfile", str(key),
        ready=False,
    )  # fmt: skip
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False

    def handshake(timeout: float = 3.0) -> ssl.SSLSocket:
        raw = socket.create_connection((server.host, server.port), timeout=timeout)
        try:
            return context.wrap_socket(raw, server_hostname="localhost")
        except BaseException:
            raw.close()
            raise

    def get(tls: ssl.SSLSocket) -> bytes:
        """One keep-alive GET / (13-byte body): the whole response."""
        tls.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        data = b""
        while not data.endswith(b"Hello, world!"):
            chunk = tls.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed after {data!r}")
            data += chunk
        return data

    def answers() -> bool:
        with contextlib.suppress(OSError, ssl.SSLError), handshake() as tls:
            return get(tls).startswith(b"HTTP/1.1 200")
        return False

    wait_for(answers, timeout=15.0)
    quiet = [handshake() for _ in range(4)]
    try:
        began = time.monotonic()
        with handshake() as tls:
            assert get(tls).startswith(b"HTTP/1.1 200")
        assert time.monotonic() - began < 2.0
        for tls in quiet:
            assert get(tls).startswith(b"HTTP/1.1 200")
    finally:
        for tls in quiet:
            tls.close()
