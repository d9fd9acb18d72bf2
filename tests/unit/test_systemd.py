"""sd_notify datagrams and LISTEN_FDS parsing, against a real notify socket."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from forkserve import systemd


def notify_socket(tmp_path: Path) -> tuple[socket.socket, str]:
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    return sock, path


def test_notify_sends_fields_as_one_datagram(tmp_path: Path) -> None:
    sock, path = notify_socket(tmp_path)
    with sock:
        assert systemd.notify("READY=1", "STATUS=2 workers", environ={"NOTIFY_SOCKET": path})
        assert sock.recv(1024) == b"READY=1\nSTATUS=2 workers"


def test_notify_without_socket_is_a_no_op() -> None:
    assert systemd.notify("READY=1", environ={}) is False


def test_reloading_carries_monotonic_usec(tmp_path: Path, monkeypatch) -> None:
    sock, path = notify_socket(tmp_path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    with sock:
        assert systemd.reloading()
        fields = sock.recv(1024).decode().split("\n")
    assert fields[0] == "RELOADING=1"
    assert fields[1].startswith("MONOTONIC_USEC=") and int(fields[1].split("=")[1]) > 0


def test_abstract_namespace_socket() -> None:
    name = f"forkserve-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        assert systemd.notify("STOPPING=1", environ={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(100) == b"STOPPING=1"


def test_watchdog_interval() -> None:
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "4000000"}) == 2.0
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}) is None
    assert systemd.watchdog_interval({}) is None


def test_listen_fds_for_this_process() -> None:
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "http:"}
    found = systemd.listen_fds(env)
    assert [(s.fd, s.name) for s in found] == [(3, "http"), (4, "fd4")]
    assert "LISTEN_FDS" not in env, "the variables are removed for children"


def test_listen_fds_for_another_process_are_ignored() -> None:
    assert systemd.listen_fds({"LISTEN_PID": "1", "LISTEN_FDS": "1"}) == []
    assert systemd.listen_fds({"LISTEN_PID": "x", "LISTEN_FDS": "1"}) == []
