"""SIGUSR2: a new primary on the same sockets, with real servers and clients.

The new primary is a child of the old one, in the same process group, so
the ``serve`` fixture's cleanup (SIGTERM, then SIGKILL to the group) stops
both. Every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Server
from tests.helpers import APPS, ROOT, answers_200, free_port, http_get, pid_alive, wait_for
from tests.load import Load

pytestmark = pytest.mark.timeout(60)


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip() or 0) or None
    except (OSError, ValueError):
        return None


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as handle:
        return int(handle.read().rsplit(")", 1)[1].split()[1])


def upgrade(server: Server, pidfile: Path) -> int:
    """Send USR2 and wait until the new primary serves; its pid."""
    server.signal(signal.SIGUSR2)
    new = wait_for(lambda: (pid := read_pid(pidfile)) != server.pid and pid, 15)
    wait_for(lambda: f"the new primary (pid {new}) is serving" in server.output, 15)
    return int(new)


def served_by(get: Callable[[], bytes]) -> int:
    """The primary whose worker answers ``/pid``."""
    reply = get()
    assert reply.startswith(b"HTTP/1.1 200"), reply
    return parent_of(int(reply.rpartition(b"\r\n\r\n")[2]))


@pytest.mark.parametrize("sched", ["none", "rr"])
def test_usr2_then_term_to_the_old_primary_loses_no_request(
    serve, tmp_path: Path, sched: str
) -> None:
    pidfile = tmp_path / "fs.pid"
    oldbin = tmp_path / "fs.pid.oldbin"
    server = serve("wsgi_apps:app", "-w", "2", "--sched", sched, "--pid", str(pidfile), workers=2)
    with Load(server.host, server.port, clients=20, duration=5.0) as load:
        wait_for(lambda: load.ok >= 20, 5)
        new = upgrade(server, pidfile)
        assert read_pid(oldbin) == server.pid
        server.signal(signal.SIGTERM)
        assert server.wait(15) == 0
    assert load.ok > 100, load.summary()
    assert pid_alive(new)
    assert served_by(lambda: server.get("/pid")) == new
    assert read_pid(pidfile) == new
    assert not oldbin.exists()
    assert "Traceback" not in server.output
    assert load.failures == [], load.summary()


def test_under_systemd_usr2_alone_moves_the_service_to_the_new_primary(
    serve, tmp_path: Path
) -> None:
    notify_path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(15)
        server = serve("wsgi_apps:app", "-w", "2", env={"NOTIFY_SOCKET": str(notify_path)})
        assert "READY=1" in notify.recv(4096).decode().split("\n")
        with Load(server.host, server.port, clients=20, duration=5.0) as load:
            wait_for(lambda: load.ok >= 20, 5)
            server.signal(signal.SIGUSR2)
            while True:
                fields = notify.recv(4096).decode().split("\n")
                if any(field.startswith("MAINPID=") for field in fields):
                    break
            assert "READY=1" in fields
            new = int(next(f for f in fields if f.startswith("MAINPID="))[len("MAINPID=") :])
            assert new != server.pid
            assert server.wait(15) == 0, "the old primary stops by itself"
        assert load.failures == [], load.summary()
        assert pid_alive(new)
        assert served_by(lambda: server.get("/pid")) == new
        notify.setblocking(False)
        later = []
        with contextlib.suppress(BlockingIOError):
            while True:
                later.append(notify.recv(4096).decode())
        assert not any("STOPPING=1" in message for message in later), later


def test_a_failed_upgrade_keeps_the_old_primary_serving(serve, tmp_path: Path) -> None:
    conf = tmp_path / "conf.py"
    conf.write_text("workers = 2\n")
    pidfile = tmp_path / "fs.pid"
    server = serve("wsgi_apps:app", "-c", str(conf), "--pid", str(pidfile), workers=2)
    conf.write_text('workers = "many"\n')
    server.signal(signal.SIGUSR2)
    failed = "upgrade failed: the new primary exited with code 2; still serving"
    wait_for(lambda: failed in server.output, 15)
    assert read_pid(pidfile) == server.pid
    assert not (tmp_path / "fs.pid.oldbin").exists()
    assert served_by(lambda: server.get("/pid")) == server.pid
    assert "Traceback" not in server.output
    conf.write_text("workers = 2\n")
    server.signal(signal.SIGUSR2)
    started = "SIGUSR2: started a new primary"
    wait_for(lambda: server.output.count(started) == 2, 15)
    server.signal(signal.SIGUSR2)  # while that new primary runs: ignored
    new = wait_for(lambda: (pid := read_pid(pidfile)) != server.pid and pid, 15)
    wait_for(lambda: f"the new primary (pid {new}) is serving" in server.output, 15)
    wait_for(lambda: "SIGUSR2 ignored: an upgrade is in progress" in server.output, 15)
    assert server.output.count(started) == 2
    assert server.output.count(failed) == 1


def test_a_unix_socket_survives_a_rollback_and_an_upgrade(serve, tmp_path: Path) -> None:
    path = tmp_path / "fs.sock"
    pidfile = tmp_path / "fs.pid"
    server = serve("wsgi_apps:app", "-w", "1", "--pid", str(pidfile), bind=f"unix:{path}")
    # TERM to the new primary rolls back: the old one keeps the socket file and its pidfile.
    first = upgrade(server, pidfile)
    os.kill(first, signal.SIGTERM)
    wait_for(lambda: "upgrade rolled back" in server.output, 15)
    assert path.exists()
    assert read_pid(pidfile) == server.pid
    assert served_by(lambda: server.get("/pid")) == server.pid
    # TERM to the old primary finishes the upgrade: the new one serves the same file.
    new = upgrade(server, pidfile)
    server.signal(signal.SIGTERM)
    assert server.wait(15) == 0
    assert path.exists()
    assert served_by(lambda: server.get("/pid")) == new
    assert server.get("/osenv?FORKSERVE_UPGRADE_FROM").endswith(b"\r\n\r\n-"), "not stale"
    # The last primary to leave removes the file.
    os.kill(new, signal.SIGTERM)
    wait_for(lambda: not path.exists(), 15)


def test_socket_activation_and_daemon_upgrade(tmp_path: Path) -> None:
    """LISTEN_FDS (fd 3, as systemd passes it) with --daemon: the new primary
    inherits the activated socket and is not daemonized again."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    pidfile = tmp_path / "fs.pid"
    env = dict(os.environ, PYTHONPATH=f"{APPS}{os.pathsep}{ROOT}", LISTEN_FDS="1")
    env.pop("WEB_CONCURRENCY", None)
    fd = listener.fileno()
    launcher = (
        "import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3); os.close(fd); "
        "os.environ['LISTEN_PID'] = str(os.getpid()); "
        "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])"
    )
    argv = [sys.executable, "-c", launcher, str(fd), "-m", "forkserve", "wsgi_apps:app"]
    argv += ["--daemon", "--pid", str(pidfile)]
    done = subprocess.run(
        argv, env=env, capture_output=True, timeout=30, cwd=tmp_path, pass_fds=(fd,)
    )
    listener.close()
    assert done.returncode == 0, done.stderr
    old = wait_for(lambda: read_pid(pidfile), 10)
    group = os.getpgid(old)
    try:
        wait_for(lambda: answers_200("127.0.0.1", port), 15)
        os.kill(old, signal.SIGUSR2)
        new = wait_for(lambda: (pid := read_pid(pidfile)) != old and pid, 15)

        def served_by_new() -> bool:
            reply = http_get("127.0.0.1", port, "/pid", timeout=2.0)
            return parent_of(int(reply.rpartition(b"\r\n\r\n")[2])) == new

        wait_for(served_by_new, 15)
        assert parent_of(new) == old, "not daemonized again"
        os.kill(old, signal.SIGTERM)
        wait_for(lambda: not pid_alive(old), 15)
        assert served_by_new()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)


def test_metrics_and_control_socket_follow_an_upgrade_and_come_back_after_a_rollback(
    serve, tmp_path: Path
) -> None:
    metrics_port = free_port()
    pidfile = tmp_path / "fs.pid"
    control = tmp_path / "fs.ctl"
    server = serve(
        "wsgi_apps:app",
        "-w",
        "1",
        "--pid",
        str(pidfile),
        "--metrics-bind",
        f"127.0.0.1:{metrics_port}",
        workers=1,
    )

    def metrics_up() -> bool:
        return http_get("127.0.0.1", metrics_port, "/metrics").startswith(b"HTTP/1.1 200")

    assert metrics_up() and control.exists()
    # The new primary takes the metrics socket over (no "address in use") and the ctl path.
    first = upgrade(server, pidfile)
    assert "address already in use" not in server.output
    assert metrics_up()
    # Rolled back: the old primary has its control socket again.
    os.kill(first, signal.SIGTERM)
    wait_for(lambda: "upgrade rolled back" in server.output, 15)
    wait_for(control.exists, 10)
    ctl = subprocess.run(
        [sys.executable, "-m", "forkserve", "ctl", "--socket", str(control), "--json", "status"],
        capture_output=True,
        timeout=30,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert ctl.returncode == 0, ctl.stderr
    assert json.loads(ctl.stdout)["result"]["pid"] == server.pid
    assert metrics_up()
