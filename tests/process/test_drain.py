"""The stages of a graceful stop (SIGTERM), with and without --drain-delay.

For every worker class: during the drain delay the server still accepts new
connections and answers every request 200 with ``Connection: close``; after
it the server stops with exit 0; a load run across the signal sees no
failure while it drains. Without a drain delay: an idle keep-alive
connection is closed at the signal, a request in flight completes with 200,
and new connections are refused once the listeners are closed.

SIGTERM goes to the primary only (``server.signal``), as a container runtime
or systemd with ``KillMode=mixed`` sends it.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from tests.conftest import Server
from tests.helpers import closed_by_server, wait_for
from tests.load import Load

CLASSES = {
    "sync": ("drain_apps:wsgi", "-k", "sync"),
    "threaded": ("drain_apps:wsgi", "-k", "threaded", "--threads", "4"),
    "asgi": ("drain_apps:asgi", "-k", "asgi"),
}
DRAIN = 3.0


def start(serve: Callable[..., Server], kind: str, *args: str, **kwargs: object) -> Server:
    app, *flags = CLASSES[kind]
    return serve(app, *flags, "--keep-alive", "30", *args, **kwargs)


def read_response(sock: socket.socket, timeout: float = 5.0) -> tuple[int, dict[bytes, bytes]]:
    """One response head and its Content-Length body: (status, lower-cased headers)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response head: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get(b"content-length", b"0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed in the middle of a body")
        body += chunk
    return int(lines[0].split(b" ", 2)[1]), headers


def ask(sock: socket.socket, path: str = "/") -> tuple[int, dict[bytes, bytes]]:
    """A keep-alive request (no ``Connection`` header) on ``sock``."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    return read_response(sock)


def closes_now(server: Server) -> bool:
    """A request on a new connection is answered 200 with Connection: close."""
    with server.connect() as sock:
        status, headers = ask(sock)
    return status == 200 and headers.get(b"connection") == b"close"


def refused(server: Server) -> bool:
    try:
        server.connect(timeout=1.0).close()
    except ConnectionRefusedError:
        return True
    return False


def events(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


# -- with a drain delay ---------------------------------------------------------------


@pytest.mark.parametrize("kind", CLASSES)
def test_drain_delay_closes_every_response_and_keeps_accepting(serve, kind: str) -> None:
    server = start(serve, kind, "-w", "2", "--drain-delay", str(DRAIN), workers=2)
    kept = server.connect()
    status, headers = ask(kept)
    assert status == 200
    if kind != "sync":  # a sync worker closes any connection with nothing pipelined
        assert headers.get(b"connection") != b"close"
    server.signal(signal.SIGTERM)
    began = time.monotonic()
    wait_for(lambda: closes_now(server), 2.0)  # the drain message has reached the workers
    for _ in range(10):
        with server.connect() as sock:
            status, headers = ask(sock)
            assert (status, headers.get(b"connection")) == (200, b"close")
            assert closed_by_server(sock), "the server closes after the response"
    if kind != "sync":
        status, headers = ask(kept)
        assert (status, headers.get(b"connection")) == (200, b"close")
        assert closed_by_server(kept)
    kept.close()
    assert time.monotonic() - began < DRAIN, "all of this happened during the drain"
    assert server.wait(DRAIN + 10) == 0
    assert time.monotonic() - began >= DRAIN - 0.2, "stopped before the drain delay ended"
    assert "draining for 3.0s" in server.output


@pytest.mark.parametrize("sched", ["none", "rr"])
@pytest.mark.parametrize("kind", CLASSES)
def test_load_across_term_with_a_drain_delay_has_no_failures(serve, kind: str, sched: str) -> None:
    server = start(serve, kind, "-w", "2", "--sched", sched, "--drain-delay", str(DRAIN), workers=2)
    load = Load(server.host, server.port, clients=8, duration=DRAIN + 10).start()
    try:
        wait_for(lambda: load.ok >= 50, 10)
        server.signal(signal.SIGTERM)
        began = time.monotonic()
        at_signal = load.ok
        # Stop the load a second before the listeners close.
        wait_for(lambda: time.monotonic() - began >= DRAIN - 1.0, DRAIN)
    finally:
        load.stop()
    assert load.failures == [], load.summary()
    assert load.ok - at_signal >= 50, f"served during the drain: {load.summary()}"
    assert server.wait(DRAIN + 10) == 0


def test_drain_keeps_websockets_open_until_the_stop_closes_them_with_1001(serve) -> None:
    server = start(serve, "asgi", "-w", "1", "--drain-delay", "1", workers=1)
    with ws_connect(f"ws://127.0.0.1:{server.port}/ws", open_timeout=5, close_timeout=5) as conn:
        server.signal(signal.SIGTERM)
        wait_for(lambda: closes_now(server), 2.0)
        conn.send("still here")
        assert conn.recv(timeout=5) == "still here"
        with pytest.raises(ConnectionClosed) as closed:
            conn.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    assert server.wait(15) == 0


def test_without_a_drain_delay_responses_keep_their_connections(serve) -> None:
    server = start(serve, "threaded", "-w", "1", workers=1)
    with server.connect() as sock:
        for _ in range(3):
            status, headers = ask(sock)
            assert status == 200 and headers.get(b"connection") != b"close"


# -- the stages of a graceful stop ------------------------------------------------------


@pytest.mark.parametrize("kind", CLASSES)
def test_term_closes_idle_connections_finishes_in_flight_and_refuses_new(
    serve, tmp_path: Path, kind: str
) -> None:
    log = tmp_path / "events"
    # Two sync workers: one is busy with the slow request, the other serves the rest.
    workers = 2 if kind == "sync" else 1
    server = start(serve, kind, "-w", str(workers), env={"DRAIN_EVENTS": str(log)})
    idle = server.connect()
    assert ask(idle)[0] == 200
    slow = server.connect()
    slow.sendall(b"GET /slow?2 HTTP/1.1\r\nHost: test\r\n\r\n")
    wait_for(lambda: any(e.startswith("begin") for e in events(log)), 5)
    server.signal(signal.SIGTERM)
    began = time.monotonic()
    assert closed_by_server(idle, timeout=5), "the idle keep-alive connection is closed"
    assert time.monotonic() - began < 1.0, "closed at the signal, not after --keep-alive"
    idle.close()
    if kind != "sync":
        # A busy sync worker holds the shared socket until its request ends.
        wait_for(lambda: refused(server), 1.5)
        assert time.monotonic() - began < 1.8, "refused while the slow request still runs"
    status, headers = read_response(slow, timeout=10)
    assert status == 200 and headers.get(b"connection") == b"close"
    slow.close()
    wait_for(lambda: refused(server), 5)
    assert server.wait(15) == 0


def test_term_to_the_whole_group_under_rr_does_not_wait_for_held_connections(
    serve, tmp_path: Path
) -> None:
    """A terminal's Ctrl-C or systemd's stop signals every process of the server.

    The workers leave by themselves; connections the primary accepted and
    still holds have no worker left to take them: the primary closes them at
    once instead of waiting out --graceful-timeout.
    """
    log = tmp_path / "events"
    server = start(
        serve, "sync", "-w", "1", "--sched", "rr", "--graceful-timeout", "20",
        env={"DRAIN_EVENTS": str(log)},
    )  # fmt: skip
    slow = server.connect()
    slow.sendall(b"GET /slow?1 HTTP/1.1\r\nHost: test\r\n\r\n")
    wait_for(lambda: any(e.startswith("begin") for e in events(log)), 5)
    # The only worker is busy: these wait in the primary.
    held = [server.connect() for _ in range(3)]
    for sock in held:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
    time.sleep(0.2)
    began = time.monotonic()
    os.killpg(server.pid, signal.SIGTERM)
    assert server.wait(15) == 0
    assert time.monotonic() - began < 5.0, "stopped without waiting out --graceful-timeout"
    for sock in held:
        assert closed_by_server(sock, timeout=2), "a held connection is closed, not left open"
        sock.close()
    slow.close()
