"""Keep-alive for sync workers under --sched rr: idle connections are parked.

A sync worker serves one connection at a time, so an idle keep-alive client
must not hold it. Under round robin the worker gives such a connection back
to the primary (it *parks* it); the primary watches it and hands it to the
next free worker when the client sends again, or closes it after
--keep-alive seconds idle. These tests talk HTTP/1.1 over raw sockets and
check what a client sees: the connection stays open across requests, any
worker may serve the next request, requests from parked connections are
served in the order they arrive, an idle one is closed on time, and a parked
connection outlives the worker that served it.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable

from tests.conftest import Server
from tests.helpers import closed_by_server, wait_for


def ask(sock: socket.socket, path: str, timeout: float = 10.0) -> tuple[bytes, bytes]:
    """Send one keep-alive GET and read its response: (head, body)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    return read_response(sock, timeout)


_LEFTOVER: dict[int, bytes] = {}


def read_response(sock: socket.socket, timeout: float = 10.0) -> tuple[bytes, bytes]:
    """One response (head, body); bytes past it are kept for the next call."""
    sock.settimeout(timeout)
    data = _LEFTOVER.pop(sock.fileno(), b"")
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed in the body")
        body += chunk
    if len(body) > length:
        _LEFTOVER[sock.fileno()] = body[length:]
    return head, body[:length]


def start(serve: Callable[..., Server], workers: int, *args: str) -> Server:
    return serve(
        "wsgi_apps:app", "-k", "sync", "--sched", "rr", "-w", str(workers), *args,
        workers=workers,
    )  # fmt: skip


def test_a_keep_alive_connection_stays_open_and_any_worker_serves_it(serve) -> None:
    server = start(serve, 2)
    with server.connect() as sock:
        pids: set[int] = set()
        # A worker just forked may not take connections yet: ask until both
        # have answered, within bounds.
        deadline = time.monotonic() + 10
        for _ in range(500):
            head, body = ask(sock, "/pid")
            assert head.startswith(b"HTTP/1.1 200 ")
            assert b"connection: close" not in head.lower()
            pids.add(int(body))
            if len(pids) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert pids == set(server.workers()), "requests of one connection reach both workers"


def test_parked_connections_are_served_in_the_order_their_requests_arrive(serve) -> None:
    server = start(serve, 1)
    clients = [server.connect() for _ in range(4)]
    try:
        for sock in clients:
            assert ask(sock, "/pid")[0].startswith(b"HTTP/1.1 200 ")  # now parked
        busy = server.connect()
        busy.sendall(b"GET /sleep?0.6 HTTP/1.1\r\nHost: test\r\n\r\n")
        time.sleep(0.15)  # the only worker is sleeping
        for sock in reversed(clients):  # arrival order: the last client first
            sock.sendall(b"GET /seq HTTP/1.1\r\nHost: test\r\n\r\n")
            time.sleep(0.05)
        assert read_response(busy)[0].startswith(b"HTTP/1.1 200 ")
        order = [int(read_response(sock)[1].split()[1]) for sock in reversed(clients)]
        assert order == sorted(order), f"served out of arrival order: {order}"
        busy.close()
    finally:
        for sock in clients:
            sock.close()


def test_an_idle_parked_connection_is_closed_after_the_keep_alive_timeout(serve) -> None:
    server = start(serve, 1, "--keep-alive", "1")
    with server.connect() as sock:
        assert ask(sock, "/")[0].startswith(b"HTTP/1.1 200 ")
        began = time.monotonic()
        assert closed_by_server(sock, timeout=5), "the idle connection is closed"
        idle = time.monotonic() - began
        assert 0.7 <= idle <= 3.0, f"closed after {idle:.2f}s idle, --keep-alive is 1s"
    # The worker was never held: it answers at once.
    assert server.get("/").startswith(b"HTTP/1.1 200 ")


def test_a_parked_connection_outlives_the_worker_that_served_it(serve) -> None:
    server = start(serve, 1, "--keep-alive", "30")
    with server.connect() as sock:
        head, body = ask(sock, "/pid")
        first = int(body)
        time.sleep(0.3)  # the worker gives the connection back after the response
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: server.workers() and server.workers() != [first], 15)
        head, body = ask(sock, "/pid")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert int(body) != first


def test_a_stop_closes_parked_connections_at_once(serve) -> None:
    server = start(serve, 1, "--keep-alive", "30")
    sock = server.connect()
    assert ask(sock, "/")[0].startswith(b"HTTP/1.1 200 ")
    server.signal(signal.SIGTERM)
    began = time.monotonic()
    assert closed_by_server(sock, timeout=5)
    assert time.monotonic() - began < 1.5, "an idle connection does not delay the stop"
    sock.close()
    assert server.wait(15) == 0


def test_pipelined_requests_are_served_before_the_connection_is_parked(serve) -> None:
    server = start(serve, 2)
    with server.connect() as sock:
        sock.sendall(b"GET /seq HTTP/1.1\r\nHost: test\r\n\r\n" * 3)
        replies = [read_response(sock)[1].split() for _ in range(3)]
        pids = {pid for pid, _ in replies}
        counts = [int(n) for _, n in replies]
        assert len(pids) == 1 and counts == sorted(counts), replies
        assert ask(sock, "/")[0].startswith(b"HTTP/1.1 200 "), "then parked, still open"
