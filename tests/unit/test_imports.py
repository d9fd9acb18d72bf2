"""What the primary imports before it forks is resident in every worker.

Workers are forked from the primary, so every module it has imported by then
takes memory in each of them. Modules that serve only an option that is off by
default, or an error path, are imported where they are used; this checks, in a
fresh interpreter, that importing the command line and the arbiter leaves them
out. It also checks that each of those paths still imports what it needs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]

# module -> what needs it (and imports it on use)
DEFERRED = {
    "configparser": "--log-config with an .ini/.conf file",
    "logging.config": "--log-config",
    "logging.handlers": "--log-config (through logging.config)",
    "socketserver": "--log-config (through logging.config)",
    "tomllib": "TOML config and log config files",
    "tomli": "TOML files on Python 3.10",
    "difflib": "a 'did you mean' suggestion after a mistyped name",
    "secrets": "SIGUSR2 (the upgrade's notify socket)",
    "hmac": "SIGUSR2 (through secrets)",
    "forkserve.metrics": "--metrics-bind, --statsd-host, forkserve ctl stats",
    "forkserve.statsd": "--statsd-host",
    "forkserve.reloader": "--reload",
    "forkserve.ctl": "forkserve ctl (the client)",
    "watchfiles": "--reload",
    "ctypes": "--preload (the template's prctl)",
    "click": "--help, --version, --print-config, --check-config, ctl, a command line error",
    "shlex": "FORKSERVE_CMD_ARGS, --env given as one string",
    "pwd": "--user",
    "grp": "--group",
    "forkserve.reconfigure": "SIGHUP",
    "pickle": "cluster messages with serialization 'advanced'",
    "tempfile": "the stack-dump file where os.memfd_create is missing",
}

# Command lines that start a server: read without click, as click reads them.
PLAIN_COMMAND_LINES = [
    ["app:app"],
    ["app:app", "-w", "4", "-k", "sync", "-b", "127.0.0.1:8000", "--log-level", "warning"],
    ["-w4", "--bind=[::1]:8000", "-b", "unix:/tmp/s", "app:app", "--preload"],
    ["--sched", "RR", "app:app", "--worker-class=Threaded", "--threads", "8"],
    ["app:app", "--access-logfile", "-", "--error-logfile", "-", "-e", "A=1", "-e", "B=2"],
    ["--bind=", "app:app", "--name", ""],
]
# Anything else goes to click: help, actions, errors, "--", values that look like options.
CLICK_COMMAND_LINES = [
    [],
    ["-w", "2"],
    ["--help"],
    ["-h", "app:app"],
    ["app:app", "--version"],
    ["app:app", "--check-config"],
    ["app:app", "--print-config"],
    ["app:app", "other:app"],
    ["app:app", "--wrokers", "2"],
    ["app:app", "-k", "gevent"],
    ["app:app", "--workers"],
    ["app:app", "--name", "-x"],
    ["app:app", "--preload=yes"],
    ["--", "app:app"],
]


def modules_after(code: str, cwd: Path = REPO) -> set[str]:
    """The names in ``sys.modules`` after running ``code`` in a fresh interpreter."""
    result = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


# forkserve.cli imports the arbiter (and through it the workers) when it serves.
@pytest.mark.parametrize("entry", ["forkserve.cli", "forkserve.arbiter"])
def test_startup_leaves_optional_modules_out(entry: str) -> None:
    loaded = modules_after(f"import {entry}")
    assert entry in loaded
    found = {name: DEFERRED[name] for name in sorted(loaded & DEFERRED.keys())}
    assert not found, f"imported by 'import {entry}' (needed only for): {found}"


@pytest.mark.parametrize("args", PLAIN_COMMAND_LINES)
def test_plain_command_line_reads_as_click_does(args: list[str]) -> None:
    from click.core import ParameterSource

    from forkserve.cli import _plain_command_line, command

    ctx = command.make_context("forkserve", list(args))
    expected: dict[str, Any] = {
        name: value
        for name, value in ctx.params.items()
        if name != "app" and ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE
    }
    plain = _plain_command_line(args)
    assert plain is not None
    app, given = plain
    assert app == ctx.params["app"]
    # click answers a choice with its canonical spelling; load_config folds case the same way
    assert {k: v.lower() if k in ("sched", "worker_class") else v for k, v in given.items()} == (
        expected
    )


@pytest.mark.parametrize("args", CLICK_COMMAND_LINES)
def test_other_command_lines_go_to_click(args: list[str]) -> None:
    from forkserve.cli import _plain_command_line

    assert _plain_command_line(args) is None


def test_serving_command_line_leaves_click_out() -> None:
    # A plain command line whose configuration fails: it reaches load_config (so the
    # path a server takes) and exits before the arbiter.
    loaded = modules_after(
        "from forkserve.cli import main\n"
        "try:\n"
        "    main(['app:app', '-w', '0', '-b', '127.0.0.1:0'])\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 2, exc.code\n"
    )
    assert "forkserve.config" in loaded
    assert "click" not in loaded


@pytest.mark.parametrize(
    ("code", "module"),
    [
        (
            "from forkserve.config_files import read_toml\n"
            "open('c.toml', 'w').write('workers = 3\\n')\n"
            "assert read_toml('c.toml', 'c.toml', None) == {'workers': 3}",
            "tomllib" if sys.version_info >= (3, 11) else "tomli",
        ),
        (
            "from forkserve.log import apply_log_config\n"
            "open('l.ini', 'w').write('[loggers]\\nkeys=root\\n[handlers]\\nkeys=\\n"
            "[formatters]\\nkeys=\\n[logger_root]\\nhandlers=\\n')\n"
            "apply_log_config('l.ini')",
            "configparser",
        ),
        (
            "from forkserve.config import _suggest\n"
            "assert _suggest('wokers', ['workers']) == \"; did you mean 'workers'?\"",
            "difflib",
        ),
        (
            "from forkserve.upgrade import open_notify_socket\nopen_notify_socket()[0].close()",
            "secrets",
        ),
        (
            "from forkserve.monitor import open_metrics_socket\n"
            "open_metrics_socket('127.0.0.1:0').close()",
            "forkserve.statsd",
        ),
        (
            "from forkserve.config import load_config\n"
            "load_config({}, {'FORKSERVE_CMD_ARGS': '-w 3'}, app='a:app')",
            "shlex",
        ),
        ("from forkserve.converters import user_id\nassert user_id('root') == 0", "pwd"),
        ("from forkserve.converters import group_id\nassert group_id('0') == 0", "grp"),
        (
            "from forkserve.cluster import ipc\n"
            "payload = ipc.encode(ipc.Kind.PICKLE, {1, 2})\n"
            "decoder = ipc.FrameDecoder()\n"
            "decoder.feed(payload)\n"
            "(frame,) = decoder.frames()\n"
            "assert frame.body == {1, 2}",
            "pickle",
        ),
        (
            "from forkserve.cli import main\n"
            "try:\n"
            "    main(['--version'])\n"
            "except SystemExit as exc:\n"
            "    assert exc.code == 0, exc.code",
            "click",
        ),
    ],
    ids=[
        "toml",
        "log-config",
        "suggestion",
        "upgrade",
        "metrics-bind",
        "cmd-args",
        "user",
        "group",
        "pickle",
        "version",
    ],
)
def test_deferred_paths_import_on_use(code: str, module: str, tmp_path: Path) -> None:
    # Run from tmp_path so the files the snippets write land there.
    assert module in modules_after(code, cwd=tmp_path)


def test_a_worker_boot_leaves_tempfile_out() -> None:
    # The stack-dump file of a worker with a scoreboard slot is a memory file.
    loaded = modules_after(
        "import os, signal\n"
        "from forkserve.workers.base import install_stack_dump\n"
        "class Slot:\n"
        "    def set_stack_fd(self, fd):\n"
        "        self.fd = fd\n"
        "slot = Slot()\n"
        "install_stack_dump(slot)\n"
        "os.kill(os.getpid(), signal.SIGUSR2)\n"
        "with open(f'/proc/self/fd/{slot.fd}') as dump:\n"
        "    assert 'most recent call first' in dump.read()\n"
    )
    assert "forkserve.workers.base" in loaded
    assert "tempfile" not in loaded
