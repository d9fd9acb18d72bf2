"""The primary supervises its workers: liveness, request deadlines, recycling.

Each test runs the real server and looks at what an operator sees: the log
(the stack and the request in flight), the worker pids, and the replies of a
bounded load run on loopback, which must see no failed request while workers
are recycled one at a time.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable

import pytest

from tests.conftest import Server
from tests.helpers import wait_for
from tests.load import Load

WSGI = "wsgi_apps:app"
ASGI = "asgi_apps:app"


def body(reply: bytes) -> bytes:
    return reply.partition(b"\r\n\r\n")[2]


def pid_of(server: Server) -> int:
    return int(body(server.get("/pid")))


def in_log(server: Server, pattern: str, timeout: float = 10.0) -> re.Match[str]:
    return wait_for(lambda: re.search(pattern, server.output, re.S), timeout)


# -- liveness ---------------------------------------------------------------------


@pytest.mark.parametrize(("app", "path"), [(WSGI, "/spin?30"), (ASGI, "/block?30")])
def test_a_stuck_worker_is_killed_with_its_stack_and_request(
    serve: Callable[..., Server], app: str, path: str
) -> None:
    server = serve(app, "-w", "1", "--timeout", "2", "--graceful-timeout", "2")
    stuck = pid_of(server)
    sock = server.connect()
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    in_log(server, rf"no heartbeat for [\d.]+s \(--timeout 2\); in flight: GET {re.escape(path)}")
    # faulthandler's dump, taken before the kill, shows the frame the app is stuck in.
    in_log(server, r"stack of worker 1 .*before it was killed:.*_apps\.py\", line \d+ in app")
    in_log(server, rf"worker 1 \(pid {stuck}\) exited with signal SIGKILL")
    sock.close()
    wait_for(lambda: pid_of(server) != stuck, 10)


def test_a_slow_request_in_a_threaded_worker_does_not_trip_liveness(
    serve: Callable[..., Server],
) -> None:
    server = serve(WSGI, "-w", "1", "-k", "threaded", "--timeout", "1")
    first = pid_of(server)
    assert body(server.get("/sleep?2.5", timeout=10)) == b"slept"
    assert pid_of(server) == first
    assert "no heartbeat" not in server.output


# -- request deadline ---------------------------------------------------------------


@pytest.mark.parametrize("worker_class", ["sync", "threaded"])
def test_a_request_past_its_deadline_is_logged_and_the_worker_recycled(
    serve: Callable[..., Server], worker_class: str
) -> None:
    server = serve(WSGI, "-w", "1", "-k", worker_class, "--request-timeout", "1")
    first = pid_of(server)
    # The request itself finishes: the worker leaves once it has answered.
    assert body(server.get("/sleep?2.5", timeout=15)) == b"slept"
    in_log(
        server,
        r"request running [\d.]+s \(--request-timeout 1\): GET /sleep\?2\.5 from 127\.0\.0\.1",
    )
    in_log(server, r"stack of worker 1 .*at the request timeout:.*wsgi_apps\.py\", line \d+ in app")
    in_log(server, rf"recycling worker 1 \(pid {first}\): request-timeout")
    wait_for(lambda: pid_of(server) != first, 10)


def test_an_asgi_request_past_its_deadline_is_cancelled_with_503(
    serve: Callable[..., Server],
) -> None:
    server = serve(ASGI, "-w", "1", "--request-timeout", "0.5")
    first = pid_of(server)
    started = time.monotonic()
    reply = server.get("/sleep?5", timeout=10)
    assert reply.startswith(b"HTTP/1.1 503 ")
    assert body(reply) == b"request timed out\n"
    assert time.monotonic() - started < 3
    in_log(server, r"request exceeded --request-timeout \(0\.5s\); cancelling it: GET /sleep\?5")
    in_log(server, r"asgi_apps\.py\", line \d+, in app")
    # The task was cancelled; the worker stays.
    assert pid_of(server) == first


# -- recycling --------------------------------------------------------------------


def recycled_in_turn(output: str) -> list[str]:
    """The recycled workers' ids, checking each left before the next recycling began."""
    order: list[str] = []
    leaving: str | None = None
    for line in output.splitlines():
        started = re.search(r"recycling worker (\d+) ", line)
        if started:
            assert leaving is None, f"worker {started.group(1)} recycled while {leaving} was"
            leaving = started.group(1)
            order.append(leaving)
        left = re.search(r"worker (\d+) \(pid \d+\) exited", line)
        if left and left.group(1) == leaving:
            leaving = None
    return order


def test_max_requests_recycles_one_worker_at_a_time_under_load(
    serve: Callable[..., Server],
) -> None:
    server = serve(WSGI, "-w", "2", "--max-requests", "300", "--max-requests-jitter", "50")
    with Load(server.host, server.port, clients=20, duration=5.0) as load:
        pass
    assert load.failures == [], load.summary()
    assert load.ok > 600
    assert len(recycled_in_turn(server.output)) >= 2, server.output[-2000:]


def test_memory_recycling_replaces_the_worker_without_failures(
    serve: Callable[..., Server],
) -> None:
    server = serve(WSGI, "-w", "2", "--max-worker-memory", "60M")
    with Load(server.host, server.port, clients=20, duration=5.0) as load:
        grown = int(body(server.get("/grow?80")))
        in_log(server, rf"\(pid {grown}\): RSS \d+ MiB above --max-worker-memory 60 MiB", 8)
        in_log(server, rf"recycling worker \d+ \(pid {grown}\): memory", 8)
    assert load.failures == [], load.summary()
    in_log(server, rf"\(pid {grown}\) exited with code 0")


def test_lifetime_recycles_in_turn_without_failures(serve: Callable[..., Server]) -> None:
    server = serve(WSGI, "-w", "2", "--max-worker-lifetime", "1.5")
    with Load(server.host, server.port, clients=20, duration=5.0) as load:
        pass
    assert load.failures == [], load.summary()
    assert len(recycled_in_turn(server.output)) >= 2, server.output[-2000:]


def test_scaling_down_under_load_fails_nothing(serve: Callable[..., Server]) -> None:
    server = serve(WSGI, "-w", "3", workers=3)
    with Load(server.host, server.port, clients=20, duration=5.0) as load:
        time.sleep(1.0)
        server.signal(signal.SIGTTOU)
        time.sleep(1.5)
        server.signal(signal.SIGTTOU)
    assert load.failures == [], load.summary()
    wait_for(lambda: len(server.workers()) == 1, 10)


# -- crash loops --------------------------------------------------------------------


def test_a_crash_loop_backs_off(serve: Callable[..., Server]) -> None:
    server = serve("flaky_boot:app", "-w", "1", ready=False)
    time.sleep(4.0)
    delays = [float(d) for d in re.findall(r"crashed, restarting in ([\d.]+)s", server.output)]
    # Doubling from 0.1s: without the back-off a worker living 0.2s crashes ~15 times in 4s.
    assert 3 <= len(delays) <= 8, server.output
    assert delays[1:4] == [0.1, 0.2, 0.4], delays
    assert server.proc.poll() is None  # a worker that did boot is restarted, not fatal
