"""forkserve.upgrade: the environment protocol, matching inherited sockets to
binds, the pidfile moves and the readiness message."""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

import pytest

from forkserve import systemd, upgrade
from forkserve.errors import ConfigError
from forkserve.upgrade import Inherited

# -- the environment protocol ---------------------------------------------------------


def test_inherited_fds_round_trip_names_with_separators() -> None:
    items = [(5, "127.0.0.1:8000"), (6, "unix:/run/a,b:c.sock"), (7, "[::1]:80"), (8, "fd://web")]
    text = upgrade.encode_inherited(items)
    assert upgrade.decode_inherited(text) == tuple(Inherited(fd, name) for fd, name in items)
    assert upgrade.decode_inherited("[]") == ()


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("5,6", "not JSON"),
        ('{"5": "x"}', "expected a list"),
        ('[[5, "x", 1]]', "bad entry"),
        ('[["5", "x"]]', "bad entry"),
        ('[[true, "x"]]', "bad entry"),
        ('[[-1, "x"]]', "bad entry"),
        ("[[5, 6]]", "bad entry"),
    ],
)
def test_bad_inherited_fds_are_refused(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        upgrade.decode_inherited(text)


def test_child_environ_passes_everything_but_systemds_sockets() -> None:
    environ = {
        "PATH": "/bin",
        "NOTIFY_SOCKET": "/run/notify",
        "LISTEN_FDS": "1",
        "LISTEN_PID": "10",
        "LISTEN_FDNAMES": "http",
        "WATCHDOG_USEC": "1000",
        "WATCHDOG_PID": "10",
    }
    env = upgrade.child_environ(environ, from_pid=10, inherited=[(5, "x:1")], notify="@n")
    assert env == {
        "PATH": "/bin",
        "NOTIFY_SOCKET": "/run/notify",
        "WATCHDOG_USEC": "1000",
        upgrade.UPGRADE_FROM_ENV: "10",
        upgrade.INHERITED_FDS_ENV: '[[5, "x:1"]]',
        upgrade.UPGRADE_NOTIFY_ENV: "@n",
    }
    assert "LISTEN_FDS" in environ, "the caller's mapping is left alone"


def test_take_handover_reads_and_removes_the_variables() -> None:
    env = upgrade.child_environ(
        {"PATH": "/bin"}, from_pid=42, inherited=[(5, "a:1"), (6, "unix:/s")], notify="@n"
    )
    handover = upgrade.take_handover(env)
    assert handover == upgrade.Handover(42, (Inherited(5, "a:1"), Inherited(6, "unix:/s")), "@n")
    assert env == {"PATH": "/bin"}
    assert upgrade.take_handover(env) is None


def test_take_handover_without_an_upgrade_is_none() -> None:
    assert upgrade.take_handover({"PATH": "/bin"}) is None


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({upgrade.UPGRADE_FROM_ENV: "x"}, "FORKSERVE_UPGRADE_FROM='x': expected a pid"),
        (
            {upgrade.UPGRADE_FROM_ENV: "4", upgrade.INHERITED_FDS_ENV: "nope"},
            "FORKSERVE_INHERITED_FDS: not JSON",
        ),
    ],
)
def test_a_bad_handover_is_one_config_error(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        upgrade.take_handover(env)
    assert "\n" not in str(caught.value)
    assert env == {}


def test_capture_command_reruns_this_forkserve(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr("sys.argv", ["/usr/bin/forkserve", "app:app", "-w", "2"])
    monkeypatch.chdir(tmp_path)
    command = upgrade.capture_command()
    assert command.argv[1:] == ("-m", "forkserve", "app:app", "-w", "2")
    assert command.cwd == str(tmp_path)


# -- matching inherited sockets to binds -------------------------------------------------

V4 = Inherited(5, "0.0.0.0:8000", socket.AF_INET, ("127.0.0.1", 8000))
V4_OTHER = Inherited(6, "127.0.0.1:9000", socket.AF_INET, ("127.0.0.1", 9000))
V6 = Inherited(7, "[::1]:8000", socket.AF_INET6, ("::1", 8000, 0, 0))
UNIX = Inherited(8, "unix:/run/app.sock", socket.AF_UNIX, "/run/app.sock")
ACTIVATED = Inherited(9, "fd://3", socket.AF_INET, ("0.0.0.0", 80))
NAMED = Inherited(10, "fd://http", socket.AF_INET, ("0.0.0.0", 80))


@pytest.mark.parametrize(
    ("bind", "item", "expected"),
    [
        ("127.0.0.1:8000", V4, True),  # by address, whatever the old bind was called
        ("127.0.0.1:8001", V4, False),
        ("127.0.0.2:8000", V4, False),
        ("127.0.0.1:0", V4, True),  # port 0 took whatever port the old one got
        ("[::1]:8000", V6, True),
        ("[::1]:8000", V4, False),  # another family
        ("127.0.0.1:8000", V6, False),
        ("unix:/run/app.sock", UNIX, True),
        ("unix:/run/other.sock", UNIX, False),
        ("/run/app.sock", UNIX, True),
        ("unix:/run/app.sock", V4, False),
        ("fd://3", ACTIVATED, True),  # descriptors match by name: numbers were the old one's
        ("fd://4", ACTIVATED, False),
        ("fd://http", NAMED, True),
        ("fd://http", ACTIVATED, False),
        ("0.0.0.0:80", ACTIVATED, True),
        ("not a bind", V4, False),
    ],
)
def test_serves(bind: str, item: Inherited, expected: bool) -> None:
    assert upgrade.serves(bind, item) is expected


def test_match_binds_uses_each_socket_once_in_bind_order() -> None:
    inherited = [V4_OTHER, V4, UNIX]
    chosen = upgrade.match_binds(
        ["unix:/run/app.sock", "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:7000"], inherited
    )
    assert chosen == [UNIX, V4_OTHER, V4, None]
    assert upgrade.match_binds([], inherited) == []
    assert upgrade.match_binds(["127.0.0.1:8000"], []) == [None]


def test_binds_for_socket_activation_without_bind() -> None:
    # Without -b the old primary served what systemd passed; the new one gets no LISTEN_FDS.
    assert upgrade.binds_for(["127.0.0.1:8000"], True, [ACTIVATED, V4]) == ["fd://3"]
    assert upgrade.binds_for(["127.0.0.1:8000"], True, [V4]) == ["127.0.0.1:8000"]
    assert upgrade.binds_for(["127.0.0.1:9000"], False, [ACTIVATED]) == ["127.0.0.1:9000"]


def test_adopt_binds_takes_matching_sockets_and_closes_the_rest(tmp_path: Path) -> None:
    kept = socket.create_server(("127.0.0.1", 0))
    dropped = socket.create_server(("127.0.0.1", 0))
    port = kept.getsockname()[1]
    kept_fd, dropped_fd = os.dup(kept.fileno()), os.dup(dropped.fileno())
    path = str(tmp_path / "fresh.sock")
    inherited = [Inherited(kept_fd, f"127.0.0.1:{port}"), Inherited(dropped_fd, "127.0.0.1:1")]
    try:
        binds = upgrade.adopt_binds(
            [f"unix:{path}", f"127.0.0.1:{port}"], inherited, backlog=16, unix_mode=0o600
        )
        try:
            assert [bound.name for bound in binds] == [f"unix:{path}", f"127.0.0.1:{port}"]
            assert binds[1].fileno() == kept_fd
            assert not os.get_inheritable(kept_fd)
            assert binds[0].unix_path == path and os.path.exists(path)
            with pytest.raises(OSError):
                os.fstat(dropped_fd)  # no bind matched it: closed
        finally:
            for bound in binds:
                bound.close()
        assert not os.path.exists(path)
    finally:
        kept.close()
        dropped.close()


# -- the pidfile ----------------------------------------------------------------------------


def test_pidfile_set_aside_and_restored(tmp_path: Path) -> None:
    pidfile = tmp_path / "fs.pid"
    oldbin = tmp_path / "fs.pid.oldbin"
    pidfile.write_text("100\n")
    assert upgrade.set_pidfile_aside(str(pidfile), 100)
    assert not pidfile.exists() and oldbin.read_text() == "100\n"
    pidfile.write_text("200\n")  # a new primary that died without removing its own
    upgrade.restore_pidfile(str(pidfile), 100)
    assert pidfile.read_text() == "100\n" and not oldbin.exists()


def test_pidfile_of_another_process_is_left_alone(tmp_path: Path) -> None:
    pidfile = tmp_path / "fs.pid"
    pidfile.write_text("300\n")
    assert not upgrade.set_pidfile_aside(str(pidfile), 100)
    assert not upgrade.set_pidfile_aside(None, 100)
    assert pidfile.read_text() == "300\n"
    oldbin = tmp_path / "fs.pid.oldbin"
    oldbin.write_text("300\n")
    upgrade.restore_pidfile(str(pidfile), 100)
    upgrade.remove_oldbin(str(pidfile), 100)
    assert oldbin.exists() and pidfile.read_text() == "300\n"
    upgrade.remove_oldbin(str(pidfile), 300)
    assert not oldbin.exists()


# -- the readiness message -------------------------------------------------------------------


def test_the_notify_socket_reports_the_senders_pid() -> None:
    sock, address = upgrade.open_notify_socket()
    with sock:
        assert address.startswith("@forkserve-upgrade-")
        assert systemd.notify("READY=1", environ={"NOTIFY_SOCKET": address})
        data, ancdata, _, _ = sock.recvmsg(64, socket.CMSG_SPACE(12))
    assert data == b"READY=1"
    assert upgrade.sender_pid(ancdata) == os.getpid()


def test_sender_pid_without_credentials_is_none() -> None:
    assert upgrade.sender_pid([]) is None
    ucred = struct.pack("iII", 7, 0, 0)
    assert upgrade.sender_pid([(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, ucred)]) == 7
    assert upgrade.sender_pid([(socket.SOL_SOCKET, socket.SCM_RIGHTS, ucred)]) is None


def test_ready_with_mainpid_is_one_message(tmp_path: Path, monkeypatch) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert systemd.ready("2 workers serving", mainpid=1234)
        assert sock.recv(1024) == b"MAINPID=1234\nREADY=1\nSTATUS=2 workers serving"
