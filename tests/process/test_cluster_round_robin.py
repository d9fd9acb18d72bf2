"""SCHED_RR over real processes: fair, and a busy worker is skipped."""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter

import pytest
from cluster_helpers import STARTERS, Running


def fetch(port: int, payload: bytes = b"", timeout: float = 5.0) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        if payload:
            sock.sendall(payload)
        data = b""
        while chunk := sock.recv(16):
            data += chunk
        return data.decode()


@pytest.mark.parametrize("starter", STARTERS)
def test_fair_over_400_connections(starter):
    with Running(
        "rr_fair.py", starter=starter, env={"FORKSERVE_SCHED_POLICY": "rr", "WORKERS": "4"}
    ) as run:
        port = run.wait_tag("ready", timeout=15)[0][0]
        counts: Counter[str] = Counter()
        lock = threading.Lock()
        errors = []

        def client(n):
            try:
                for _ in range(n):
                    who = fetch(port)
                    with lock:
                        counts[who] += 1
            except Exception as exc:  # reported below
                errors.append(exc)

        # Two connectors: each worker is usually free when its turn comes, so the
        # split shows the rotation rather than how the machine schedules workers.
        threads = [threading.Thread(target=client, args=(200,)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert sum(counts.values()) == 400
        assert set(counts) == {"1", "2", "3", "4"}
        for who, n in counts.items():
            assert 80 <= n <= 120, f"worker {who} got {n} of 400: {dict(counts)}"


class BusyWorker:
    """rr_busy.py with one worker held on a slow connection, and the fast
    connections sent while it sleeps: answered at once (``prompt``: by whom)
    or left waiting for the busy worker (``stalled``)."""

    def __init__(self, run: Running, slow: float) -> None:
        self.slow = slow
        self.port = run.wait_tag("ready", timeout=15)[0][0]
        self.slow_conn = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        self.slow_conn.sendall(b"slow")
        self.busy = str(run.wait_tag("w-slow")[0][0])
        self.prompt: list[str] = []
        self.stalled: list[socket.socket] = []

    def send_fast(self, count: int) -> None:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            sock.sendall(b"fast")
            sock.settimeout(0.5)
            try:
                self.prompt.append(sock.recv(16).decode())
                sock.close()
            except TimeoutError:
                self.stalled.append(sock)

    def finish(self) -> None:
        """The slow connection, then every stalled one, is served by the busy worker."""
        for sock in (self.slow_conn, *self.stalled):
            sock.settimeout(self.slow + 5)
            assert sock.recv(16).decode() == self.busy
            sock.close()


@pytest.mark.parametrize("starter", STARTERS)
def test_busy_worker_is_skipped(starter):
    """A sync worker sleeping on a connection gets at most the one connection it was
    handed when it took the slow one (Node's one-in-hand rule); every other
    connection goes to the free worker and is answered at once."""
    slow = 2.0
    env = {"FORKSERVE_SCHED_POLICY": "rr", "SLOW": str(slow)}
    with Running("rr_busy.py", starter=starter, env=env) as run:
        held = BusyWorker(run, slow)
        started = time.monotonic()
        held.send_fast(20)
        assert time.monotonic() - started < slow, "fast connections waited for the busy worker"
        assert set(held.prompt) == {"1", "2"} - {held.busy}, (held.busy, held.prompt)
        assert len(held.stalled) <= 1, f"{len(held.stalled)} went to the busy worker"
        held.finish()


def test_credits_let_a_busy_worker_hold_that_many():
    """With credits=3 a worker holds up to three connections it has not taken:
    the busy one ends up with three of the fast connections, each served once
    it is back."""
    slow = 3.0  # above the three 0.5 s waits on the stalled connections
    env = {"FORKSERVE_SCHED_POLICY": "rr", "SLOW": str(slow), "CREDITS": "3"}
    with Running("rr_busy.py", starter=STARTERS[0], env=env) as run:
        held = BusyWorker(run, slow)
        held.send_fast(12)
        assert set(held.prompt) == {"1", "2"} - {held.busy}
        assert len(held.stalled) == 3, f"the busy worker holds {len(held.stalled)}, not 3"
        held.finish()
