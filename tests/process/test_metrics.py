"""/metrics, statsd and the access log's Q atom against real servers."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Server
from tests.helpers import free_port, http_get, wait_for

APP = "wsgi_apps:app"


def scrape(port: int, path: str = "/metrics") -> tuple[int, dict[str, float], str]:
    raw = http_get("127.0.0.1", port, path)
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    values = {}
    text = body.decode()
    for line in text.splitlines() if status == 200 else ():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return status, values, text


def total(values: dict[str, float], name: str) -> float:
    return sum(value for key, value in values.items() if re.fullmatch(rf"{name}(\{{.*\}})?", key))


def test_metrics_add_up_across_recycling_and_kills(serve: Any, tmp_path: Path) -> None:
    port = free_port()
    server: Server = serve(
        APP, "-w", "2", "--max-requests", "4", "--metrics-bind", f"127.0.0.1:{port}", workers=2
    )
    wait_for(lambda: scrape(port)[1].get('forkserve_workers{state="serving"}') == 2, 10)
    status, before, text = scrape(port)
    assert status == 200
    assert "# TYPE forkserve_requests_total counter" in text
    assert "# TYPE forkserve_request_duration_seconds histogram" in text
    assert before["forkserve_up"] == 1
    start = total(before, "forkserve_requests_total")

    for _ in range(6):
        assert server.get("/").startswith(b"HTTP/1.1 200")
    for _ in range(2):
        echoed = server.request(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"
        )
        assert echoed.startswith(b"HTTP/1.1 200")
    assert server.get("/raise").startswith(b"HTTP/1.1 500")
    # At least one worker passed --max-requests 4 and was replaced meanwhile.
    wait_for(
        lambda: scrape(port)[1].get('forkserve_worker_restarts_total{cause="max-requests"}'), 10
    )

    def idle_worker() -> int | None:
        """A serving worker below --max-requests (so not about to be recycled)."""
        values = scrape(port)[1]
        if values['forkserve_workers{state="serving"}'] != 2:
            return None
        for key in values:
            found = re.fullmatch(r'forkserve_worker_rss_bytes\{worker="(\d+)",pid="(\d+)"\}', key)
            if found and values[f'forkserve_worker_requests_total{{worker="{found[1]}"}}'] < 4:
                return int(found[2])
        return None

    victim = wait_for(idle_worker, 10)
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: scrape(port)[1].get('forkserve_worker_restarts_total{cause="crash"}'), 10)
    _, after, _ = scrape(port)
    assert total(after, "forkserve_requests_total") == start + 9
    assert after['forkserve_requests_total{method="POST",status="2xx"}'] == 2
    assert after['forkserve_requests_total{method="GET",status="5xx"}'] == 1
    count = after["forkserve_request_duration_seconds_count"]
    assert count == total(after, "forkserve_requests_total")
    assert after['forkserve_request_duration_seconds_bucket{le="+Inf"}'] == count
    assert after['forkserve_worker_restarts_total{cause="crash"}'] == 1
    assert after["forkserve_requests_in_flight"] == 0


def test_metrics_endpoint_refuses_what_it_does_not_serve(serve: Any) -> None:
    port = free_port()
    serve(APP, "--metrics-bind", f"127.0.0.1:{port}")
    assert scrape(port, "/")[0] == 404
    assert scrape(port, "/metrics/x")[0] == 404
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"\x16\x03\x01garbage\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 400 ")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"DELETE /metrics HTTP/1.1\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 405 ")
    idle = socket.create_connection(("127.0.0.1", port), timeout=5)  # says nothing
    try:
        assert scrape(port)[0] == 200  # the primary serves on
    finally:
        idle.close()


def test_a_metrics_port_in_use_is_one_error_line(serve: Any) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        server: Server = serve(APP, "--metrics-bind", f"127.0.0.1:{port}", ready=False)
        assert server.wait(15) == 1
    finally:
        taken.close()
    assert "Traceback" not in server.output
    assert (
        f"forkserve: error: metrics bind 127.0.0.1:{port}: address already in use; "
        "is another server running?"
    ) in server.output.splitlines()


def test_statsd_gets_counts_gauges_and_timers(serve: Any) -> None:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(0.5)
    port = receiver.getsockname()[1]
    try:
        server: Server = serve(
            APP, "--statsd-host", f"127.0.0.1:{port}", "--statsd-prefix", "t", workers=1
        )
        for _ in range(4):
            assert server.get("/").startswith(b"HTTP/1.1 200")
        server.signal(signal.SIGTERM)  # the last flush goes out as the server stops
        assert server.wait(15) == 0
        lines: list[str] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(
            line.startswith("t.workers:") for line in lines
        ):
            try:
                packet = receiver.recv(65536)
            except TimeoutError:
                continue
            assert len(packet) <= 1400
            lines += packet.decode().split("\n")
    finally:
        receiver.close()
    requests = sum(
        int(line.split(":")[1].split("|")[0]) for line in lines if line.startswith("t.requests:")
    )
    assert requests >= 4  # and the readiness probes
    assert any(re.fullmatch(r"t\.request\.status\.2xx:\d+\|c", line) for line in lines)
    assert any(re.fullmatch(r"t\.request\.duration:[\d.]+\|ms", line) for line in lines)
    assert any(re.fullmatch(r"t\.requests\.in_flight:\d+\|g", line) for line in lines)


def test_a_statsd_host_that_does_not_resolve_is_one_error_line(serve: Any) -> None:
    server: Server = serve(APP, "--statsd-host", "nosuch.invalid:8125", ready=False)
    assert server.wait(15) == 1
    assert "Traceback" not in server.output
    assert any(
        line.startswith("forkserve: error: --statsd-host nosuch.invalid:8125: cannot resolve")
        for line in server.output.splitlines()
    )


# -- Q: milliseconds a connection waited in the primary (--sched rr) -----------------------

CLASSES = {
    "sync": ("wsgi_apps:app", "-k", "sync"),
    "threaded": ("wsgi_apps:app", "-k", "threaded"),
    "asgi": ("asgi_apps:app", "-k", "asgi"),
}


@pytest.mark.parametrize("sched", ["rr", "none"])
@pytest.mark.parametrize("kind", list(CLASSES))
def test_access_log_q_atom(serve: Any, kind: str, sched: str) -> None:
    app, *args = CLASSES[kind]
    server: Server = serve(
        app,
        *args,
        "-w",
        "1",
        "--sched",
        sched,
        "--access-logfile",
        "-",
        "--access-logformat",
        "%(W)s %(Q)s %(U)s",
        workers=1,
    )
    for _ in range(3):
        assert server.get("/pid").startswith(b"HTTP/1.1 200")

    def logged() -> list[str]:
        return [line for line in server.output.splitlines() if line.endswith(" /pid")]

    lines = wait_for(lambda: len(logged()) == 3 and logged(), 10)
    for line in lines:
        worker, queued, _ = line.split(" ")
        assert worker == "1"
        if sched == "rr":
            assert float(queued) >= 0.0
        else:
            assert queued == "-"
