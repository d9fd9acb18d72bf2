"""The command line: generated options, help, version, print/check config, exit codes.

None of these start a server: each path tested here returns before the arbiter.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from forkserve import __version__
from forkserve.cli import command
from forkserve.config import SETTINGS

ROOT = Path(__file__).resolve().parents[2]

GUNICORN_FLAGS = [
    "-b", "--bind", "-w", "--workers", "-k", "--worker-class", "--threads",
    "--worker-connections", "--backlog", "-t", "--timeout", "--graceful-timeout",
    "--keep-alive", "--max-requests", "--max-requests-jitter", "--preload", "--chdir",
    "--pythonpath", "-e", "--env", "-p", "--pid", "-u", "--user", "-g", "--group", "-m",
    "--umask", "--access-logfile", "--access-logformat", "--error-logfile", "--log-file",
    "--log-level", "--log-config", "--forwarded-allow-ips", "--limit-request-line",
    "--limit-request-fields", "--limit-request-field_size", "--certfile", "--keyfile",
    "--ca-certs", "-n", "--name", "--check-config", "--print-config", "-v", "--version",
    "-c", "--config",
]  # fmt: skip


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, import_state: None) -> Iterator[None]:
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("FORKSERVE_") or name in ("WEB_CONCURRENCY", "PORT"):
            monkeypatch.delenv(name)
    yield


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(command, list(args), env=env, prog_name="forkserve")


def one_error_line(result: Result) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_help_lists_gunicorn_flags_and_sections() -> None:
    result = run("--help")
    assert result.exit_code == 0
    words = set(result.output.replace(",", " ").split())
    for flag in GUNICORN_FLAGS:
        assert flag in words, flag
    for setting in SETTINGS:
        for flag in setting.flags:
            assert flag in words, flag
    for heading in (
        "Server options:",
        "Workers options:",
        "Logging options:",
        "HTTP options:",
        "ASGI options:",
        "Other options:",
    ):
        assert heading in result.output
    assert "FORKSERVE_WORKERS" in result.output
    assert "-h" in words and "--help" in words
    assert run("-h").output == result.output


def test_version() -> None:
    result = run("--version")
    assert (result.exit_code, result.output) == (0, f"forkserve {__version__}\n")
    assert run("-v").output == f"forkserve {__version__}\n"


def test_print_config_without_app() -> None:
    result = run("--print-config", "-w", "3", env={"FORKSERVE_TIMEOUT": "9"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == len(SETTINGS) + 1
    assert any(line.split() == ["workers", "=", "3", "#", "command", "line"] for line in lines)
    assert any(
        line.split() == ["timeout", "=", "9.0", "#", "environment", "FORKSERVE_TIMEOUT"]
        for line in lines
    )


def test_print_config_is_stable() -> None:
    assert run("--print-config", "x:app").stdout == run("--print-config", "x:app").stdout


def test_check_config_ok(tmp_path: Path) -> None:
    (tmp_path / "webcli1.py").write_text("def app(environ, start_response):\n    return []\n")
    result = run("--check-config", "-w", "2", "webcli1:app")
    assert result.exit_code == 0, result.output
    assert result.stdout == "config ok: webcli1:app is WSGI; 2 sync worker(s) on 127.0.0.1:8000\n"


def test_check_config_asgi_threaded(tmp_path: Path) -> None:
    (tmp_path / "webcli2.py").write_text("async def app(scope, receive, send):\n    pass\n")
    assert run("--check-config", "webcli2:app").stdout.startswith(
        "config ok: webcli2:app is ASGI; 1 asgi worker(s)"
    )
    (tmp_path / "webcli3.py").write_text("def app(environ, start_response):\n    return []\n")
    assert (
        "1 threaded worker(s), 4 threads each"
        in run("--check-config", "-k", "threaded", "webcli3:app").stdout
    )


def test_check_config_bad_app(tmp_path: Path) -> None:
    (tmp_path / "webcli4.py").write_text("raise RuntimeError('no database')\n")
    result = run("--check-config", "webcli4:app")
    assert result.exit_code == 1
    assert one_error_line(result) == (
        f"forkserve: error: error importing 'webcli4': RuntimeError: no database "
        f"(at {tmp_path / 'webcli4.py'}:1)"
    )


def test_check_config_bad_config(tmp_path: Path) -> None:
    result = run("--check-config", "-w", "0", "webcli5:app")
    assert result.exit_code == 2
    assert one_error_line(result) == (
        'forkserve: error: command line --workers="0": expected a positive integer'
    )


def test_check_config_mismatched_worker_class(tmp_path: Path) -> None:
    (tmp_path / "webcli6.py").write_text("async def app(scope, receive, send):\n    pass\n")
    result = run("--check-config", "-k", "sync", "webcli6:app")
    assert result.exit_code == 2
    assert "worker class 'sync' cannot serve an ASGI application" in one_error_line(result)


def test_unknown_flag_is_a_usage_error() -> None:
    result = run("--wrokers", "2", "x:app")
    assert result.exit_code == 2
    assert "No such option" in result.stderr
    assert "--workers" in result.stderr


def test_bad_choice_is_a_usage_error() -> None:
    result = run("-k", "gevent", "x:app")
    assert result.exit_code == 2
    assert "gevent" in result.stderr


def test_missing_app() -> None:
    result = run("-w", "2")
    assert result.exit_code == 2
    assert "Missing argument 'APP'" in result.stderr


def test_bad_config_file(tmp_path: Path) -> None:
    (tmp_path / "forkserve.toml").write_text('workers = "eight"\n')
    result = run("-c", "forkserve.toml", "x:app")
    assert result.exit_code == 2
    assert one_error_line(result) == (
        'forkserve: error: forkserve.toml: workers = "eight": expected a positive integer'
    )


def test_bad_cmd_args() -> None:
    result = run("x:app", env={"FORKSERVE_CMD_ARGS": "--bogus"})
    assert result.exit_code == 2
    assert one_error_line(result).startswith(
        "forkserve: error: FORKSERVE_CMD_ARGS: no such option --bogus"
    )


def test_unimportable_app_fails_before_the_server(tmp_path: Path) -> None:
    result = run("nosuchappmodule:app")
    assert result.exit_code == 1
    assert one_error_line(result) == (
        f"forkserve: error: cannot import 'nosuchappmodule' (cwd {tmp_path}): no module named "
        "'nosuchappmodule'; check --chdir or --pythonpath"
    )


def test_debug_level_shows_traceback() -> None:
    result = run("-w", "x", "--log-level", "debug", "x:app")
    assert result.exit_code == 2
    assert "Traceback" in result.stderr
    assert result.stderr.rstrip().endswith(
        'forkserve: error: command line --workers="x": expected a positive integer'
    )


def subprocess_run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORKSERVE_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "forkserve", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_python_dash_m(tmp_path: Path) -> None:
    result = subprocess_run("--version", cwd=tmp_path)
    assert (result.returncode, result.stdout) == (0, f"forkserve {__version__}\n")
    (tmp_path / "forkserve.conf.py").write_text("workers = 'x'\n")
    result = subprocess_run("x:app", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == (
        f'forkserve: error: {tmp_path / "forkserve.conf.py"}: workers = "x": '
        "expected a positive integer\n"
    )


def test_console_script_check_config(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("forkserve")
    if not script.exists():
        pytest.skip("forkserve console script not installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORKSERVE_")}
    result = subprocess.run(
        [str(script), "--check-config", "--chdir", str(ROOT), "examples.hello_asgi:app"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("config ok: examples.hello_asgi:app is ASGI")
