"""The asgi worker's write path: what uvicorn writes reaches the client whole.

uvicorn writes through ``CoalescedTransport`` (``asgi_guard``), which keeps
the writes of one turn of the event loop and sends them together. These
tests run a real server on loopback, with the front end on and off, under
both policies and over TLS: a large body streamed without pauses arrives
whole (flow control still applies), a response the application never
finishes still leaves, and the scope carries the connection's addresses.
Waits are bounded.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Server

from tests.helpers import make_certificate, wait_for

APP_SOURCE = """
import asyncio

PIECE = bytes(range(256)) * 256  # 64 KiB
PIECES = 128  # 8 MiB


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path == "/bulk":
        headers = [(b"content-length", b"%d" % (len(PIECE) * PIECES))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for _ in range(PIECES):
            await send({"type": "http.response.body", "body": PIECE, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    elif path == "/hang":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        await asyncio.sleep(30)  # never finishes within the test
    elif path == "/where":
        body = repr((scope.get("client"), scope.get("server"), scope.get("scheme"))).encode()
        headers = [(b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
"""
PIECE = bytes(range(256)) * 256
PIECES = 128


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "writes_app.py").write_text(APP_SOURCE)
    return tmp_path


def start(serve: Callable[..., Server], app_dir: Path, *args: str, **kwargs: object) -> Server:
    return serve(
        "writes_app:app", "-k", "asgi", "-w", "1", "--pythonpath", str(app_dir), *args, **kwargs
    )


def read_response(sock: socket.socket, deadline: float) -> tuple[bytes, bytes]:
    """Head and body of a Content-Length response, read to the end."""
    data = b""
    while b"\r\n\r\n" not in data:
        assert time.monotonic() < deadline, data[:200]
        chunk = sock.recv(65536)
        assert chunk, data[:200]
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    received = bytearray(body)
    while len(received) < length:
        assert time.monotonic() < deadline, len(received)
        chunk = sock.recv(1 << 20)
        assert chunk, len(received)
        received += chunk
    return head, bytes(received)


@pytest.mark.parametrize(
    ("sched", "guard", "http"),
    [("rr", "on", "httptools"), ("none", "on", "httptools"), ("none", "off", "h11")],
)
def test_a_large_body_streamed_without_pauses_arrives_whole(
    serve, app_dir: Path, sched: str, guard: str, http: str
) -> None:
    server = start(serve, app_dir, "--sched", sched, "--asgi-guard", guard, "--http", http)
    with server.connect(10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(b"GET /bulk HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.5)  # the client does not read: the server must pause writing
        # The worker is not stuck in the paused response: a second client is served.
        assert server.get("/where", timeout=5).startswith(b"HTTP/1.1 200")
        head, body = read_response(sock, time.monotonic() + 20)
        assert head.startswith(b"HTTP/1.1 200")
        assert body == PIECE * PIECES
        # The connection stays usable for the next request.
        sock.sendall(b"GET /where HTTP/1.1\r\nHost: x\r\n\r\n")
        head, body = read_response(sock, time.monotonic() + 5)
        assert head.startswith(b"HTTP/1.1 200") and b"127.0.0.1" in body


@pytest.mark.parametrize("guard", ["on", "off"])
def test_a_response_the_application_never_finishes_still_leaves(
    serve, app_dir: Path, guard: str
) -> None:
    server = start(serve, app_dir, "--asgi-guard", guard)
    with server.connect(5) as sock:
        sock.sendall(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        deadline = time.monotonic() + 5
        while b"first" not in data:
            assert time.monotonic() < deadline, data
            chunk = sock.recv(4096)
            assert chunk, data
            data += chunk
    assert data.startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("sched", ["rr", "none"])
def test_the_scope_carries_the_connections_addresses(serve, app_dir: Path, sched: str) -> None:
    server = start(serve, app_dir, "--sched", sched)
    with server.connect(5) as sock:
        sock.sendall(b"GET /where HTTP/1.1\r\nHost: x\r\n\r\n")
        _, body = read_response(sock, time.monotonic() + 5)
        local = sock.getsockname()
    client, where, scheme = eval(body.decode("ascii"), {})  # a repr of plain tuples
    assert client == ("127.0.0.1", local[1])
    assert where == ("127.0.0.1", server.port) and scheme == "http"


def test_tls_responses_and_large_bodies(serve, app_dir: Path) -> None:
    cert, key = make_certificate(app_dir)
    server = start(serve, app_dir, "--certfile", str(cert), "--keyfile", str(key), ready=False)
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False

    def fetch(path: str) -> tuple[bytes, bytes]:
        try:
            with (
                socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw,
                context.wrap_socket(raw, server_hostname="localhost") as tls,
            ):
                tls.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
                return read_response(tls, time.monotonic() + 20)  # type: ignore[arg-type]
        except (OSError, ssl.SSLError):
            return b"", b""

    head, body = wait_for(lambda: fetch("/where")[0] and fetch("/where"), 15)
    assert head.startswith(b"HTTP/1.1 200") and body.endswith(b"'https')")
    head, body = fetch("/bulk")
    assert head.startswith(b"HTTP/1.1 200") and body == PIECE * PIECES
