"""systemd integration, tested as systemd would drive it: an inherited
listening socket at fd 3 (LISTEN_FDS) and a notify socket we listen on."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import APPS, ROOT, http_get


def start_activated(
    tmp_path: Path, sock: socket.socket, extra: list[str], names: str = ""
) -> tuple[subprocess.Popen[bytes], socket.socket]:
    notify_path = str(tmp_path / "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(20)
    env = dict(os.environ)
    env.update(
        PYTHONPATH=f"{APPS}{os.pathsep}{ROOT}",
        NOTIFY_SOCKET=notify_path,
        LISTEN_FDS="1",
        LISTEN_FDNAMES=names,
    )
    env.pop("WEB_CONCURRENCY", None)
    fd = sock.fileno()
    # The socket goes to fd 3 and LISTEN_PID must be the server's own pid:
    # a tiny launcher moves the descriptor, sets the variable, then execs.
    launcher = (
        "import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3); os.close(fd); "
        "os.environ['LISTEN_PID'] = str(os.getpid()); "
        "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])"
    )
    argv = [sys.executable, "-c", launcher, str(fd), "-m", "forkserve", "wsgi_apps:app", *extra]
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(
        argv,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        pass_fds=(fd,),
    )
    return proc, notify


def stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def get(port: int) -> bytes:
    return http_get("127.0.0.1", port, "/pid")


def next_message(notify: socket.socket) -> str:
    """The next notification that is not a periodic ``STATUS=`` update alone."""
    while True:
        message = notify.recv(4096).decode()
        if not message.startswith("STATUS=") or "\n" in message:
            return message


@pytest.mark.parametrize("bind", [None, "fd://http"])
def test_socket_activation_and_notify(tmp_path: Path, bind: str | None) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    extra = ["-w", "2"] + (["-b", bind] if bind else [])
    proc, notify = start_activated(tmp_path, listener, extra, names="http")
    listener.close()  # only the server holds it now
    try:
        message = notify.recv(4096).decode()
        assert "READY=1" in message.split("\n")
        assert "STATUS=2 workers serving" in message
        assert get(port).startswith(b"HTTP/1.1 200")
        os.kill(proc.pid, signal.SIGHUP)
        assert next_message(notify).startswith("RELOADING=1\nMONOTONIC_USEC=")
        assert "READY=1" in next_message(notify)
        os.kill(proc.pid, signal.SIGTERM)
        assert next_message(notify) == "STOPPING=1"
        assert proc.wait(15) == 0
    finally:
        stop(proc)
        notify.close()


def test_unknown_socket_name_is_one_clear_error(tmp_path: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    proc, notify = start_activated(tmp_path, listener, ["-b", "fd://api"], names="http")
    listener.close()
    try:
        assert proc.wait(20) == 1
        out = (tmp_path / "server.log").read_text()
        assert "no socket named 'api' was passed by systemd (names: http)" in out
        assert "Traceback" not in out
    finally:
        stop(proc)
        notify.close()


def test_watchdog_pings(tmp_path: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    os.environ["WATCHDOG_USEC"] = "400000"
    try:
        proc, notify = start_activated(tmp_path, listener, [])
    finally:
        del os.environ["WATCHDOG_USEC"]
    listener.close()
    try:
        seen = []
        deadline = time.monotonic() + 10
        while seen.count("WATCHDOG=1") < 3 and time.monotonic() < deadline:
            seen.extend(notify.recv(4096).decode().split("\n"))
        assert seen.count("WATCHDOG=1") >= 3
    finally:
        stop(proc)
        notify.close()


def test_status_reports_workers_and_requests_served(tmp_path: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    proc, notify = start_activated(tmp_path, listener, ["-w", "2"])
    listener.close()
    try:
        assert "READY=1" in notify.recv(4096).decode()
        for _ in range(5):
            assert get(port).startswith(b"HTTP/1.1 200")
        deadline = time.monotonic() + 10
        status = ""
        while "5 requests" not in status and time.monotonic() < deadline:
            status = notify.recv(4096).decode()
        assert status == "STATUS=2 workers serving, 5 requests"
    finally:
        stop(proc)
        notify.close()
