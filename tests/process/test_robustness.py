"""--sched rr under hostile or unlucky conditions, through the real server.

Slow clients are held by the primary, not a worker; a full queue is answered
503 at once; and a worker killed mid-stream loses at most the connections it
was serving when it died.
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import Server
from tests.helpers import wait_for

HEADER_TIMEOUT = 2.0


def request(server: Server, path: str, timeout: float = 5.0) -> tuple[bytes, float]:
    """One GET with Connection: close; the whole reply and how long it took."""
    started = time.monotonic()
    reply = server.get(path, timeout=timeout)
    return reply, time.monotonic() - started


def read_until_closed(sock: socket.socket, deadline: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes; and when it closed (monotonic)."""
    chunks = []
    while time.monotonic() < deadline:
        if not select.select([sock], [], [], max(0.0, deadline - time.monotonic()))[0]:
            break
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            data = b""
        if not data:
            return b"".join(chunks), time.monotonic()
        chunks.append(data)
    return b"".join(chunks), float("inf")


def prompt_while(server: Server, busy: Callable[[], bool], limit: float) -> list[float]:
    """Request /pid over and over while ``busy()``; the latencies (every one answered 200)."""
    latencies = []
    deadline = time.monotonic() + limit
    while busy() and time.monotonic() < deadline:
        reply, took = request(server, "/pid")
        assert reply.startswith(b"HTTP/1.1 200 "), reply[:200]
        latencies.append(took)
        threading.Event().wait(0.05)  # pace: about 20 requests a second
    return latencies


# -- slow clients -------------------------------------------------------------------------


def test_silent_clients_never_reach_the_worker(serve: Callable[..., Server]) -> None:
    server = serve(
        "wsgi_apps:app",
        *("--sched", "rr", "-w", "1", "-k", "sync", "--header-timeout", str(HEADER_TIMEOUT)),
        workers=1,
    )
    started = time.monotonic()
    silent = [server.connect(timeout=10) for _ in range(20)]
    closed_at: dict[socket.socket, float] = {}

    def watch_silent() -> bool:
        """Note when the server closes each silent client; True while some are open."""
        waiting = [sock for sock in silent if sock not in closed_at]
        for sock in select.select(waiting, [], [], 0)[0] if waiting else []:
            got, at = read_until_closed(sock, time.monotonic() + 1)
            assert got == b"", got[:200]  # nothing was asked, nothing is answered
            closed_at[sock] = at - started
        return len(closed_at) < len(silent)

    try:
        # Until the primary dropped them all, while others are served meanwhile.
        latencies = prompt_while(server, watch_silent, HEADER_TIMEOUT + 5)
        closed_after = sorted(closed_at.values())
    finally:
        for sock in silent:
            sock.close()
    print(
        f"\nslowloris: 20 silent clients; {len(latencies)} requests served meanwhile, "
        f"slowest {max(latencies):.3f}s; silent ones closed after "
        f"{min(closed_after):.2f}..{max(closed_after):.2f}s"
    )
    assert max(latencies) < 1.0, latencies
    assert len(closed_after) == len(silent), "some silent clients were never closed"
    assert all(HEADER_TIMEOUT - 0.5 <= t <= HEADER_TIMEOUT + 1.0 for t in closed_after), (
        closed_after
    )


def test_buffered_head_keeps_trickling_clients_off_the_worker(
    serve: Callable[..., Server],
) -> None:
    server = serve(
        "wsgi_apps:app",
        *("--sched", "rr", "-w", "1", "-k", "sync", "--header-timeout", str(HEADER_TIMEOUT)),
        *("--buffer-request-head", "--access-logfile", "-"),
        workers=1,
    )
    results: dict[str, tuple[bytes, float]] = {}
    lock = threading.Lock()

    def trickle(name: str, pieces: list[bytes], pause: float) -> None:
        with server.connect(timeout=10) as sock:
            began = time.monotonic()
            for piece in pieces:
                with contextlib.suppress(OSError):
                    sock.sendall(piece)
                # Wait for the pause, or for the server closing on us.
                if select.select([sock], [], [], pause)[0]:
                    break
            got, at = read_until_closed(sock, began + HEADER_TIMEOUT + 5)
            with lock:
                results[name] = (got, at - began)

    def head(path: str) -> bytes:
        return f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()

    threads = []
    for n in range(5):  # one byte every 0.5 s: the head never arrives in time
        raw = head(f"/trickle-{n}")
        pieces = [raw[i : i + 1] for i in range(len(raw))]
        threads.append(threading.Thread(target=trickle, args=(f"never-{n}", pieces, 0.5)))
    for n in range(3):  # the head in three pieces over 1 s: in time
        raw = head(f"/late-{n}")
        third = len(raw) // 3
        pieces = [raw[:third], raw[third : 2 * third], raw[2 * third :]]
        threads.append(threading.Thread(target=trickle, args=(f"late-{n}", pieces, 0.5)))
    for thread in threads:
        thread.start()
    latencies = prompt_while(server, lambda: any(t.is_alive() for t in threads), 15)
    for thread in threads:
        thread.join(10)
    print(
        f"\nbuffered heads: {len(latencies)} requests served while 8 clients trickled, "
        f"slowest {max(latencies):.3f}s; "
        + ", ".join(f"{k}: {v[0][:12]!r} at {v[1]:.2f}s" for k, v in sorted(results.items()))
    )
    assert max(latencies) < 1.0, latencies
    log = server.output
    for n in range(5):
        got, at = results[f"never-{n}"]
        assert got.startswith(b"HTTP/1.1 408 "), got[:200]
        assert HEADER_TIMEOUT - 0.5 <= at <= HEADER_TIMEOUT + 2.0, at
        assert f"/trickle-{n}" not in log  # the application never saw it
    for n in range(3):
        got, at = results[f"late-{n}"]
        assert got.startswith(b"HTTP/1.1 200 "), got[:200]
        assert f"GET /late-{n} HTTP/1.1" in log


# -- overload -----------------------------------------------------------------------------


def test_full_queue_is_answered_503_and_the_queued_are_served_in_order(
    serve: Callable[..., Server],
) -> None:
    backlog = 4
    server = serve(
        "wsgi_apps:app",
        *("--sched", "rr", "-w", "1", "-k", "sync", "--backlog", str(backlog)),
        workers=1,
    )
    clients = 14
    sleep = 0.4
    raw = f"GET /sleep?{sleep} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    socks = []
    started = time.monotonic()
    try:
        for _ in range(clients):
            sock = server.connect(timeout=10)
            sock.sendall(raw)
            socks.append(sock)
            threading.Event().wait(0.01)  # keep the arrival order
        answers: dict[int, tuple[bytes, float]] = {}
        open_socks = dict(enumerate(socks))
        deadline = started + clients * sleep + 10
        while open_socks and time.monotonic() < deadline:
            ready, _, _ = select.select(list(open_socks.values()), [], [], 1.0)
            for sock in ready:
                index = next(i for i, s in open_socks.items() if s is sock)
                got, at = read_until_closed(sock, deadline)
                answers[index] = (got, at - started)
                del open_socks[index]
    finally:
        for sock in socks:
            sock.close()
    statuses = {i: got[:12] for i, (got, _) in answers.items()}
    served = sorted(i for i, s in statuses.items() if s == b"HTTP/1.1 200")
    refused = sorted(i for i, s in statuses.items() if s == b"HTTP/1.1 503")
    print(
        f"\noverload: {clients} clients, -w 1 --backlog {backlog}: {len(served)} served "
        f"{served}, {len(refused)} answered 503 {refused}; 503s after "
        f"{max((answers[i][1] for i in refused), default=0):.3f}s at most"
    )
    assert len(answers) == clients, statuses
    assert len(served) + len(refused) == clients, statuses
    # Capacity: the one being served, the one in the worker's hand, the queue.
    assert backlog + 1 <= len(served) <= backlog + 3, statuses
    assert refused, "nobody was refused"
    assert all(answers[i][1] < 1.0 for i in refused), {i: answers[i][1] for i in refused}
    assert served == list(range(len(served))), "the first to arrive are the ones served"
    finish = [answers[i][1] for i in served]
    assert finish == sorted(finish), f"served out of order: {finish}"
    body = answers[refused[0]][0]
    assert b"\r\nConnection: close\r\n" in body


# -- chaos --------------------------------------------------------------------------------


def test_killed_workers_lose_only_what_they_were_serving(serve: Callable[..., Server]) -> None:
    workers = 4
    server = serve("wsgi_apps:app", "--sched", "rr", "-w", str(workers), "-k", "sync")
    wait_for(lambda: len(server.workers()) == workers, 15)
    total = 10_000
    max_kills = 10
    budget = 60.0
    # 2 ms of work per request: the run outlasts the kills on a fast machine too.
    raw = b"GET /sleep?0.002 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    why: Counter[str] = Counter()
    lock = threading.Lock()
    started = time.monotonic()
    stop = threading.Event()
    kills: list[int] = []

    def one(_: int) -> None:
        if time.monotonic() - started > budget:
            outcome = "not sent (time budget)"
        else:
            try:
                with socket.create_connection((server.host, server.port), timeout=15) as sock:
                    sock.sendall(raw)
                    data = b""
                    while chunk := sock.recv(65536):
                        data += chunk
                if data.startswith(b"HTTP/1.1 200 "):
                    outcome = "ok"
                elif not data:
                    outcome = "closed without a reply"
                else:
                    outcome = f"status {data[9:12].decode(errors='replace')}"
            except ConnectionResetError:
                outcome = "reset"
            except TimeoutError:
                outcome = "timeout"
            except OSError as exc:
                outcome = f"error {exc.errno}"
        with lock:
            why[outcome] += 1

    def killer() -> None:
        rng = random.Random(7)
        while len(kills) < max_kills and not stop.wait(0.5):
            pids = server.workers()
            if pids:
                pid = rng.choice(pids)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    kills.append(pid)

    chaos = threading.Thread(target=killer)
    chaos.start()
    try:
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(one, range(total)))
    finally:
        stop.set()
        chaos.join(10)
    elapsed = time.monotonic() - started
    ok = why["ok"]
    failed = total - ok
    print(
        f"\nchaos: {total} connections in {elapsed:.1f}s, {len(kills)} workers SIGKILLed; "
        f"ok {ok}, failed {failed}: {dict(why)}"
    )
    assert why["not sent (time budget)"] == 0, "the run did not fit its time budget"
    assert len(kills) >= max_kills - 2, "the run ended before enough workers were killed"
    # A sync worker serves one connection at a time and holds at most one more,
    # which the primary still owns and hands out again.
    assert failed <= 2 * len(kills), dict(why)
    wait_for(lambda: len(server.workers()) == workers, 30)
    reply, _ = request(server, "/pid")
    assert reply.startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize("worker_class", ["sync", "threaded"])
def test_a_client_stalling_mid_body_does_not_hold_the_worker(
    serve: Callable[..., Server], worker_class: str
) -> None:
    server = serve("wsgi_apps:app", "-w", "1", "-k", worker_class, "--threads", "1", "-t", "1")
    stalled = server.connect(10)
    stalled.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly ten b")
    started = time.monotonic()
    # The worker reads the body and waits at most -t for the rest, then lets go.
    reply = b""
    with contextlib.suppress(OSError):
        while chunk := stalled.recv(4096):
            reply += chunk
    stalled.close()
    assert time.monotonic() - started < 5
    assert reply == b"" or reply.startswith(b"HTTP/1.1 408")
    assert server.get("/").startswith(b"HTTP/1.1 200"), "the worker serves others again"
