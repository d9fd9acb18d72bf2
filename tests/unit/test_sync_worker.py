"""The sync worker's serve loop, driven in a thread over a real listening socket."""

from __future__ import annotations

import os
import selectors
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from forkserve.config import load_config
from forkserve.scoreboard import Scoreboard
from forkserve.workers import sync


class Listening:
    """What the sync worker uses of a ``cluster.Listener`` on a real socket."""

    mode = "shared"
    closed = False

    def __init__(self, sock: socket.socket) -> None:
        self.raw_socket = sock

    def setblocking(self, flag: bool) -> None:
        self.raw_socket.setblocking(flag)

    def fileno(self) -> int:
        return self.raw_socket.fileno()

    def accept(self) -> tuple[socket.socket, Any]:
        return self.raw_socket.accept()

    def getsockname(self) -> Any:
        return self.raw_socket.getsockname()

    def take_initial_data(self, conn: socket.socket) -> bytes:
        return b""

    def take_accepted_at(self, conn: socket.socket) -> float | None:
        return None

    def close(self) -> None:
        self.closed = True


def hello(environ: Any, start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Length", "2")])
    return [b"hi"]


def test_waiting_connections_are_taken_in_a_row_without_selecting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    selects: list[int] = []

    class CountingSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
        def select(self, timeout: float | None = None) -> Any:
            ready = super().select(timeout)
            # Count the wake-ups for the listener (not heartbeats, not the stop).
            if any(key.data is not None for key, _ in ready):
                selects.append(1)
            return ready

    monkeypatch.setattr(sync.selectors, "DefaultSelector", CountingSelector)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    config = load_config({}, {}, app="m:app", cwd=str(tmp_path))
    board = Scoreboard(1)
    index = board.allocate()
    assert index is not None
    worker = sync.SyncWorker(config, hello, [Listening(sock)], board.attach(index))
    worker.init_signals = lambda: None  # type: ignore[method-assign]  # not the main thread
    clients = []
    for _ in range(5):
        client = socket.create_connection(sock.getsockname(), timeout=10)
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        clients.append(client)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        for client in clients:
            answer = b""
            while chunk := client.recv(4096):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"hi")
    finally:
        worker.alive = False
        os.write(worker._wake_w, b"x")
        thread.join(10)
        for client in clients:
            client.close()
        sock.close()
        os.close(worker._wake_r)
        os.close(worker._wake_w)
    assert not thread.is_alive()
    # One wake-up for the five waiting connections, not one each.
    assert len(selects) == 1, f"{len(selects)} wake-ups for 5 waiting connections"
