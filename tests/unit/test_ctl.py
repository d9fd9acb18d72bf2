"""The control socket's paths, binding and protocol, and ``forkserve ctl``'s
client and output. No server process: the protocol runs on an event loop here."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from forkserve import control, ctl
from forkserve.control import CommandError, ControlServer
from forkserve.errors import BindError


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    return tmp_path / "forkserve"


@pytest.fixture
def listening(tmp_path: Path) -> Iterator[Any]:
    """``listen(path)``: a plain listening Unix socket (a live "server")."""
    opened: list[socket.socket] = []

    def listen(path: str | Path) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        sock.listen(4)
        opened.append(sock)
        return sock

    yield listen
    for sock in opened:
        sock.close()


# -- where ---------------------------------------------------------------------------


def test_control_path_settings(tmp_path: Path, runtime: Path) -> None:
    assert control.control_path("off", None, 42) is None
    assert control.control_path("auto", str(tmp_path / "app.pid"), 42) == str(tmp_path / "app.ctl")
    assert control.control_path("auto", str(tmp_path / "app.lock"), 42) == str(
        tmp_path / "app.lock.ctl"
    )
    assert control.control_path(str(tmp_path / "x.sock"), None, 42) == str(tmp_path / "x.sock")
    assert control.control_path("auto", None, 42) == str(runtime / "42.ctl")
    info = os.lstat(runtime)
    assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700


def test_runtime_dir_without_xdg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    expected = (
        "/run/forkserve"
        if os.geteuid() == 0 and os.access("/run", os.W_OK)
        else f"/tmp/forkserve-{os.getuid()}"
    )
    assert control.runtime_dir() == expected


def test_a_runtime_dir_that_is_not_ours_or_not_a_directory_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("")
    with pytest.raises(BindError, match="not a directory"):
        control.ensure_private_dir(str(target))
    wide = tmp_path / "wide"
    wide.mkdir(mode=0o777)
    os.chmod(wide, 0o777)
    control.ensure_private_dir(str(wide))
    assert stat.S_IMODE(os.lstat(wide).st_mode) == 0o700


def test_stale_sockets_of_dead_servers_are_swept(runtime: Path, listening: Any) -> None:
    runtime.mkdir(mode=0o700)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(runtime / "999999999.ctl"))
    dead.close()  # the file stays, nobody listens
    listening(runtime / f"{os.getpid()}.ctl")
    control.sweep_stale(str(runtime))
    assert sorted(os.listdir(runtime)) == [f"{os.getpid()}.ctl"]


# -- binding -----------------------------------------------------------------------------


def test_bind_is_0600_and_replaces_a_stale_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "app.ctl")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    sock = control.bind_control_socket(path)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert control.answers(path)
    finally:
        sock.close()


def test_bind_refuses_a_live_server_and_other_files(tmp_path: Path, listening: Any) -> None:
    path = tmp_path / "app.ctl"
    live = listening(path)
    with pytest.raises(BindError, match="a running server answers there"):
        control.bind_control_socket(str(path))
    live.close()
    path.unlink()
    path.write_text("precious")
    with pytest.raises(BindError, match="not a socket"):
        control.bind_control_socket(str(path))
    assert path.read_text() == "precious"


def test_bind_takes_the_path_over_from_the_primary_it_upgrades(
    tmp_path: Path, listening: Any
) -> None:
    path = tmp_path / "app.ctl"
    listening(path)  # listened on by this process: its pid is the holder's
    assert control.listening_pid(str(path)) == os.getpid()
    sock = control.bind_control_socket(str(path), successor_of=os.getpid())
    sock.close()


def test_parse_scale() -> None:
    assert control.parse_scale(["3"]) == 3
    assert control.parse_scale([2]) == 2
    for bad in (["0"], ["-1"], ["x"], [1.5], [True], [], ["1", "2"]):
        with pytest.raises(CommandError):
            control.parse_scale(bad)


# -- the protocol --------------------------------------------------------------------------


def answer(server: ControlServer, line: str) -> dict[str, Any]:
    return asyncio.run(server.answer(line.encode()))


def protocol_server() -> ControlServer:
    async def slow(args: list[Any]) -> list[Any]:
        await asyncio.sleep(0)
        return args

    def refuse(args: list[Any]) -> None:
        raise CommandError("refused: because")

    def broken(args: list[Any]) -> None:
        raise RuntimeError("bug")

    return ControlServer(
        "/nonexistent", {"echo": slow, "refuse": refuse, "broken": broken, "status": dict}
    )


def test_protocol_answers() -> None:
    server = protocol_server()
    assert answer(server, '{"command": "echo", "args": [1, "a"]}') == {
        "ok": True,
        "result": [1, "a"],
    }
    assert answer(server, '{"command": "refuse"}') == {"ok": False, "error": "refused: because"}
    assert answer(server, '{"command": "broken"}') == {"ok": False, "error": "broken failed: bug"}
    unknown = answer(server, '{"command": "nope"}')
    assert not unknown["ok"]
    assert unknown["error"] == "unknown command 'nope'; commands: broken, echo, refuse, status"
    for bad in ("not json", "[1]", '{"cmd": "x"}', '{"command": 1}'):
        assert answer(server, bad) == {
            "ok": False,
            "error": 'expected a JSON object such as {"command": "status"}',
        }
    assert answer(server, '{"command": "echo", "args": 3}')["error"] == (
        "echo: args must be a JSON array"
    )


def test_a_server_and_the_client_over_a_real_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "t.ctl")
    server = ControlServer(path, {"status": lambda args: {"pid": 7, "args": args}})

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        loop = asyncio.get_running_loop()
        server.start(loop)
        first = await loop.run_in_executor(None, ctl.request, path, "status", ["x"])
        second = await loop.run_in_executor(None, ctl.request, path, "bogus", [])
        return first, second

    try:
        first, second = asyncio.run(scenario())
    finally:
        server.close()
    assert first == {"ok": True, "result": {"pid": 7, "args": ["x"]}}
    assert not second["ok"] and "unknown command 'bogus'" in second["error"]
    assert not os.path.exists(path)  # removed on close


# -- the client ------------------------------------------------------------------------------


def test_find_socket(runtime: Path, listening: Any, tmp_path: Path) -> None:
    assert ctl.find_socket("/x.sock", None) == "/x.sock"
    assert ctl.find_socket(None, "/srv/app.pid") == "/srv/app.ctl"
    with pytest.raises(ctl.CtlError) as none:
        ctl.find_socket()
    assert str(none.value) == (
        f"no running forkserve found (looked in {runtime}); use --socket or --pid"
    )
    runtime.mkdir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(runtime / "1.ctl"))
    stale.close()
    listening(runtime / "2.ctl")
    assert ctl.find_socket() == str(runtime / "2.ctl")
    listening(runtime / "3.ctl")
    with pytest.raises(ctl.CtlError, match="2 running forkserve servers") as several:
        ctl.find_socket()
    assert str(runtime / "3.ctl") in str(several.value)


def test_request_errors_are_one_line(tmp_path: Path, listening: Any) -> None:
    with pytest.raises(ctl.CtlError, match="no such socket"):
        ctl.request(str(tmp_path / "none.ctl"), "status")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "stale.ctl"))
    stale.close()
    with pytest.raises(ctl.CtlError, match="connection refused"):
        ctl.request(str(tmp_path / "stale.ctl"), "status")
    mute = listening(tmp_path / "mute.ctl")
    with pytest.raises(ctl.CtlError, match=r"no answer within 0\.2s"):
        ctl.request(str(tmp_path / "mute.ctl"), "status", timeout=0.2)
    mute.close()


STATUS = {
    "pid": 4120,
    "version": "1.0",
    "app": "app:app",
    "worker_class": "sync",
    "sched": "rr",
    "listeners": ["127.0.0.1:8000"],
    "workers_wanted": 2,
    "uptime": 3723.0,
    "requests": 12,
    "restarts": {"crash": 1},
    "rr_queue_length": 0,
    "workers": [
        {
            "id": 1,
            "pid": 4121,
            "state": "serving",
            "uptime": 65.0,
            "rss": 25 * 2**20,
            "requests": 7,
            "in_flight": 1,
            "requests_in_flight": [{"line": "GET /slow\x1b[31m", "client": "10.0.0.1", "age": 2.5}],
        },
        {
            "id": 12,
            "pid": 4188,
            "state": "booting",
            "uptime": 0.4,
            "rss": None,
            "requests": None,
            "in_flight": None,
            "requests_in_flight": [],
        },
    ],
}


def test_format_status() -> None:
    text = ctl.format_status(STATUS)
    lines = text.splitlines()
    assert lines[0] == (
        "forkserve 1.0 (pid 4120): app:app, -k sync, 2 running (2 wanted), sched rr, up 1h02m"
    )
    assert "restarts: crash 1" in text and "waiting in the primary: 0" in text
    header = next(line for line in lines if line.startswith("ID"))
    assert header == "ID   PID  STATE    REQUESTS  IN FLIGHT  RSS MiB  UPTIME"
    assert any(
        line.split() == ["1", "4121", "serving", "7", "1", "25.0", "1m05s"] for line in lines
    )
    assert any(line.split() == ["12", "4188", "booting", "-", "-", "-", "0.4s"] for line in lines)
    oldest = lines[lines.index("oldest requests in flight:") + 1]
    assert "worker 1 (pid 4121)" in oldest and "GET /slow\\x1b[31m" in oldest  # escaped
    assert "\x1b" not in text


def test_format_stats_and_others() -> None:
    data = {
        "requests": 3,
        "by_status": {"1xx": 0, "2xx": 2, "3xx": 0, "4xx": 1, "5xx": 0},
        "by_method": {"GET": {"2xx": 2, "4xx": 1}},
        "latency": {"count": 3, "mean_ms": 1.5, "p50_ms": 5.0, "p90_ms": 5.0, "p99_ms": None,
                    "max_bound_ms": 10000.0},
        "in_flight": 0,
        "timeouts": 0,
        "restarts": {},
        "workers": {"booting": 0, "serving": 2, "retiring": 0, "leaving": 0},
        "workers_wanted": 2,
        "rr": None,
    }  # fmt: skip
    text = ctl.format_stats(data)
    assert "requests: 3 (2xx 2, 4xx 1)" in text
    assert "by method: GET 3 (2xx 2, 4xx 1)" in text
    assert "latency: mean 1.500 ms over 3; p50 <= 5 ms, p90 <= 5 ms, p99 > 10000 ms" in text
    assert "workers: serving 2 (2 wanted)" in text
    assert ctl.format_result("scale", {"workers_wanted": 3, "was": 2}) == (
        "scaling from 2 to 3 workers"
    )
    stacks = ctl.format_result("dump-stacks", [{"id": 1, "pid": 9, "stack": "a\nb"}])
    assert stacks == "worker 1 (pid 9):\n  a\n  b"
    assert json.loads(ctl.format_result("future", {"x": 1})) == {"x": 1}


def test_duration() -> None:
    assert ctl.duration(4.25) == "4.2s"
    assert ctl.duration(185) == "3m05s"
    assert ctl.duration(7380) == "2h03m"
    assert ctl.duration(446400) == "5d04h"
    assert ctl.duration(None) == "-"


# -- the command line ------------------------------------------------------------------------


def test_cli_dispatches_ctl_and_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from forkserve.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["ctl", "--socket", str(tmp_path / "none.ctl"), "status"])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("forkserve ctl: error: cannot connect to ") and err.count("\n") == 1
    with pytest.raises(SystemExit) as exit_:
        main(["ctl", "--socket", "a", "--pid", "b", "status"])
    assert exit_.value.code == 2
    assert "use --socket or --pid, not both" in capsys.readouterr().err


def test_asgi_connection_wait_is_taken_out_of_the_scope() -> None:
    from forkserve.workers.asgi import QUEUED_KEY, take_queued

    holder = [1.5]
    first: dict[str, Any] = {"type": "http", "state": {"db": 1, QUEUED_KEY: holder}}
    second: dict[str, Any] = {"type": "http", "state": {"db": 1, QUEUED_KEY: holder}}
    assert take_queued(first) == 1.5
    assert first["state"] == {"db": 1}  # the application never sees it
    assert take_queued(second) == 0.0  # later requests of the connection waited nowhere
    assert take_queued({"type": "http", "state": {}}) is None
    assert take_queued({"type": "http"}) is None
