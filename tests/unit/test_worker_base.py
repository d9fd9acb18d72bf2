"""What every worker class shares, in-process: socket options and the options
handed to the HTTP layer."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from forkserve.config import load_config
from forkserve.scoreboard import Scoreboard
from forkserve.sockets import open_bind
from forkserve.workers.base import WorkerBase


class FakeListener:
    """The part of ``cluster.Listener`` a worker base looks at."""

    def __init__(self, sock: socket.socket | None) -> None:
        self.raw_socket = sock


@pytest.fixture
def tcp_listener() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    try:
        yield sock
    finally:
        sock.close()


@pytest.fixture
def make_worker(tmp_path: Path) -> Iterator[Any]:
    made: list[WorkerBase] = []

    def make(listeners: list[Any], multithread: bool = False) -> WorkerBase:
        config = load_config({}, {}, app="m:app", cwd=str(tmp_path))
        board = Scoreboard(1)
        index = board.allocate()
        assert index is not None
        cls = type("Worker", (WorkerBase,), {"multithread": multithread})
        made.append(cls(config, None, listeners, board.attach(index)))
        return made[-1]

    yield make
    for worker in made:
        os.close(worker._wake_r)
        os.close(worker._wake_w)


def accepted(listener: socket.socket) -> tuple[socket.socket, socket.socket]:
    client = socket.create_connection(listener.getsockname())
    conn, _ = listener.accept()
    return client, conn


def nodelay(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


@pytest.mark.skipif(sys.platform != "linux", reason="accepted sockets inherit it on Linux")
def test_nodelay_is_set_once_on_the_listening_socket(
    make_worker: Any, tcp_listener: socket.socket
) -> None:
    worker = make_worker([FakeListener(tcp_listener)])
    client, conn = accepted(tcp_listener)
    with client, conn:
        assert nodelay(conn) == 0
        worker.prepare_connection(conn)
        # The listening socket has it now; later connections inherit it.
        assert nodelay(tcp_listener) != 0
        assert worker._nodelay_inherited is True
    client, conn = accepted(tcp_listener)
    with client, conn:
        assert nodelay(conn) != 0
        assert worker.prepare_connection(conn) is conn


@pytest.mark.skipif(sys.platform != "linux", reason="accepted sockets inherit it on Linux")
def test_round_robin_connections_inherit_nodelay_from_the_arbiters_bind(
    make_worker: Any,
) -> None:
    # Round robin: the primary accepts on the socket the arbiter bound, which
    # has TCP_NODELAY from the bind; the worker sets nothing per connection.
    bound = open_bind("127.0.0.1:0", backlog=8)
    try:
        assert nodelay(bound.sock) != 0
        worker = make_worker([FakeListener(None)])
        client, conn = accepted(bound.sock)
        with client, conn:
            assert nodelay(conn) != 0
            assert worker.prepare_connection(conn) is conn
            assert worker._nodelay_inherited is True
    finally:
        bound.close()


def test_http_options(make_worker: Any) -> None:
    options = make_worker([]).http_options()
    assert options.dontwait == socket.MSG_DONTWAIT  # plain sockets take flags
    assert options.observer is not None


@pytest.mark.parametrize("multithread", [False, True])
def test_the_slot_locks_only_for_threaded_classes(make_worker: Any, multithread: bool) -> None:
    worker = make_worker([], multithread=multithread)
    assert worker.slot is not None
    assert (worker.slot._lock is not None) is multithread
