"""Every example in docs/cluster/ runs and prints what its docstring promises.

Examples that serve forever are checked with a real client, then their
process group is killed.
"""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import pytest
from cluster_helpers import ROOT, Running, free_port, run_script

DOCS = ROOT / "docs" / "cluster"
EXAMPLES = sorted(p.name for p in DOCS.glob("*.py") if not p.name.startswith("_"))


def http_get(port: int, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    return data


def wait_lines(run: Running, pattern: str, count: int = 1, timeout: float = 15.0) -> list[str]:
    regex = re.compile(pattern)
    return run.wait_for(
        lambda _records: (
            hits if len(hits := [ln for ln in run.lines if regex.search(ln)]) >= count else None
        ),
        timeout,
        what=f"{count} line(s) matching {pattern!r}",
    )


def finite(name: str, **env: str) -> list[str]:
    result = run_script(DOCS / name, env={"EXAMPLE_PORT": "0", **env}, timeout=20)
    assert result.returncode == 0, result
    return result.stdout.splitlines()


def test_every_example_has_a_test():
    tested = {name for name in globals() if name.startswith("test_example_")}
    for example in EXAMPLES:
        stem = re.sub(r"^\d+_", "", Path(example).stem)
        assert f"test_example_{stem}" in tested, f"{example} is not run by any test"


def test_example_http_server():
    port = free_port()
    env = {"EXAMPLE_PORT": str(port), "EXAMPLE_WORKERS": "2"}
    with Running(DOCS / "01_http_server.py", env=env) as run:
        wait_lines(run, r"^Primary \d+ is running$")
        wait_lines(run, r"^Worker \d+ started$", 2)
        deadline = time.monotonic() + 10
        while True:
            try:
                response = http_get(port)
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "port never opened"
                time.sleep(0.05)
        assert response.startswith(b"HTTP/1.1 200 OK")
        assert response.endswith(b"hello world\n")


def test_example_message_count():
    port = free_port()
    env = {"EXAMPLE_PORT": str(port), "EXAMPLE_WORKERS": "2"}
    with Running(DOCS / "02_message_count.py", env=env) as run:
        wait_lines(run, r"^numReqs = 0$")
        for _ in range(3):
            assert http_get(port).endswith(b"hello world\n")
        wait_lines(run, r"^numReqs = 3$")


def test_example_is_dead():
    port = free_port()
    env = {"EXAMPLE_PORT": str(port), "EXAMPLE_WORKERS": "2"}
    with Running(DOCS / "03_is_dead.py", env=env) as run:
        wait_lines(run, r"^worker is dead: False$", 2)
        deadline = time.monotonic() + 10
        bodies = []
        while len(bodies) < 2:
            try:
                bodies.append(http_get(port))
            except (ConnectionRefusedError, ConnectionResetError):
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert all(b"Current process" in body for body in bodies)
        wait_lines(run, r"^worker is dead: True$", 2)
        assert run.wait_exit(10) == 0


def test_example_exit_event():
    assert finite("04_exit_event.py") == ["worker success!"]


def test_example_disconnect_timeout():
    assert finite("05_disconnect_timeout.py") == [
        "worker: shutting down",
        "worker 1 disconnected in time",
        "worker 1 exited: 0 None",
    ]


def test_example_echo():
    assert finite("06_echo.py") == ["primary got back: hi there"]


def test_example_setup_primary():
    assert sorted(finite("07_setup_primary.py")) == [
        "silent worker 1 said: worker 1 started with --use https",
        "silent worker 2 said: worker 2 started with --use http",
    ]


def test_example_fork_timeouts():
    lines = finite("08_fork_timeouts.py")
    assert re.fullmatch(r"worker 1 is listening on port \d+", lines[0])
    assert lines[1:] == ["Something must be wrong with the connection ..."]


def test_example_worker_id():
    lines = finite("09_worker_id.py")
    assert lines[0] == "I am primary"
    # Two workers print at the same moment: their lines may interleave.
    said = re.findall(r"I am worker #\d+", "".join(lines[1:]))
    assert sorted(said) == ["I am worker #1", "I am worker #2"]


def test_example_exited_after_disconnect():
    assert finite("10_exited_after_disconnect.py") == [
        "Oh, it was just voluntary \u2013 no need to worry"
    ]


def test_example_workers_broadcast():
    assert sorted(finite("11_workers_broadcast.py")) == [
        "worker 1 got: big announcement to all workers",
        "worker 2 got: big announcement to all workers",
    ]


def test_example_events():
    lines = finite("12_events.py")
    assert lines[:6] == [
        "Worker is online",
        "Yay, the worker responded after it was forked",
        "Worker is listening",
        lines[3],
        "Worker has disconnected",
        "The worker #1 has disconnected",
    ]
    assert re.fullmatch(r"A worker is now connected to 127\.0\.0\.1:\d+", lines[3])
    assert re.fullmatch(r"worker \d+ died \(0\)\. restarting\.\.\.", lines[6])
    assert lines[7] == "Yay, the worker responded after it was forked"
    assert lines[-2] == "The worker #2 has disconnected"
    assert re.fullmatch(r"worker \d+ died \(0\)\. restarting\.\.\.", lines[-1])
    assert len(lines) == 11


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_is_documented(name):
    readme = (DOCS / "README.md").read_text()
    assert name in readme, f"docs/cluster/README.md does not mention {name}"
