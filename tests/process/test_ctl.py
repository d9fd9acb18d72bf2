"""``forkserve ctl`` against real servers: status, stats, stacks, scale, reload,
stop; where the control socket is, its mode, and the errors a user sees."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from forkserve import ctl
from tests.conftest import Server
from tests.helpers import wait_for

APP = "wsgi_apps:app"


def runtime_env(tmp_path: Path) -> dict[str, str]:
    """A runtime directory of the test's own, for the server and the client."""
    run = tmp_path / "run"
    run.mkdir(mode=0o700, exist_ok=True)
    return {"XDG_RUNTIME_DIR": str(run)}


def forkserve_ctl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "forkserve", "ctl", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def ask(path: Path | str, command: str, *args: Any) -> Any:
    answer = ctl.request(str(path), command, list(args))
    assert answer["ok"], answer
    return answer["result"]


def in_background(call: Callable[[], Any]) -> threading.Thread:
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread


def test_status_stats_stacks_errors_and_stop(serve: Any, tmp_path: Path) -> None:
    env = runtime_env(tmp_path)
    pidfile = tmp_path / "app.pid"
    server: Server = serve(APP, "-w", "2", "--pid", str(pidfile), env=env, workers=2)
    path = tmp_path / "app.ctl"  # auto: beside --pid
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert not (tmp_path / "run" / "forkserve").exists()

    slow = in_background(lambda: server.get("/sleep?3", timeout=10))

    def slow_in_flight() -> bool:
        status = ask(path, "status")
        return any(
            item["line"] == "GET /sleep?3"
            for worker in status["workers"]
            for item in worker["requests_in_flight"]
        )

    wait_for(slow_in_flight, 5)
    shown = forkserve_ctl(env, "--pid", str(pidfile), "status")
    assert shown.returncode == 0, shown.stderr
    for pid in server.workers():
        assert str(pid) in shown.stdout
    assert shown.stdout.count("serving") == 2
    assert "oldest requests in flight:" in shown.stdout
    assert "GET /sleep?3  from 127.0.0.1" in shown.stdout

    stacks = forkserve_ctl(env, "--pid", str(pidfile), "dump-stacks")
    assert stacks.returncode == 0, stacks.stderr
    assert stacks.stdout.count("worker ") == 2
    assert "wsgi_apps.py" in stacks.stdout and " in app" in stacks.stdout
    assert "stack of worker" in server.output  # logged too

    before = ask(path, "stats")["by_method"]["GET"]["2xx"]
    for _ in range(5):
        assert server.get("/").startswith(b"HTTP/1.1 200")
    stats = ask(path, "stats")
    assert stats["by_method"]["GET"]["2xx"] >= before + 5
    assert stats["latency"]["count"] == stats["requests"]

    wrong = forkserve_ctl(env, "--pid", str(pidfile), "frobnicate")
    assert wrong.returncode == 1 and wrong.stdout == ""
    assert wrong.stderr.splitlines() == [
        "forkserve ctl: error: unknown command 'frobnicate'; "
        "commands: dump-stacks, reload, scale, stats, status, stop"
    ]
    bad_scale = forkserve_ctl(env, "--pid", str(pidfile), "scale", "none")
    assert bad_scale.returncode == 1
    assert bad_scale.stderr.strip().endswith("expected a number of workers >= 1, got 'none'")

    slow.join(10)
    stopped = forkserve_ctl(env, "--pid", str(pidfile), "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert server.wait(15) == 0
    assert not path.exists()


def test_scale_and_reload_through_the_runtime_directory(serve: Any, tmp_path: Path) -> None:
    env = runtime_env(tmp_path)
    server: Server = serve(APP, "-w", "2", env=env, workers=2)
    directory = tmp_path / "run" / "forkserve"
    assert stat.S_IMODE(os.lstat(directory).st_mode) == 0o700
    assert os.listdir(directory) == [f"{server.pid}.ctl"]
    assert stat.S_IMODE(os.stat(directory / f"{server.pid}.ctl").st_mode) == 0o600

    scaled = forkserve_ctl(env, "scale", "3")  # found without --socket or --pid
    assert scaled.returncode == 0, scaled.stderr
    assert scaled.stdout.strip() == "scaling from 2 to 3 workers"
    wait_for(lambda: len(server.workers()) == 3, 10)
    path = directory / f"{server.pid}.ctl"
    assert ask(path, "scale", 1) == {"workers_wanted": 1, "was": 3}
    wait_for(lambda: len(server.workers()) == 1, 10)
    old = set(server.workers())
    assert ask(path, "reload") == {"reloading": True}
    wait_for(lambda: len(server.workers()) == 1 and not set(server.workers()) & old, 15)
    status = ask(path, "status")
    assert [worker["pid"] for worker in status["workers"]] == server.workers()
    assert status["workers_wanted"] == 1


def test_no_socket_when_off_and_ctl_says_nothing_runs(serve: Any, tmp_path: Path) -> None:
    env = runtime_env(tmp_path)
    serve(APP, "--control-socket", "off", env=env)
    directory = tmp_path / "run" / "forkserve"
    assert not directory.exists() or not os.listdir(directory)
    result = forkserve_ctl(env, "status")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"forkserve ctl: error: no running forkserve found (looked in {directory}); "
        "use --socket or --pid"
    ]


def test_a_control_socket_in_use_is_refused(serve: Any, tmp_path: Path) -> None:
    env = runtime_env(tmp_path)
    path = tmp_path / "shared.ctl"
    serve(APP, "--control-socket", str(path), env=env)
    second: Server = serve(APP, "--control-socket", str(path), env=env, ready=False)
    assert second.wait(15) == 1
    output = second.output
    assert "Traceback" not in output
    assert (
        f"forkserve: error: control socket {path}: a running server answers there; stop it, "
        "or choose another --control-socket (or --pid)"
    ) in output.splitlines()
    assert ask(path, "status")["pid"] != second.pid  # the first one still has it
