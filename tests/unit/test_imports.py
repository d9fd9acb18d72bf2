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
}


def modules_after(code: str) -> set[str]:
    """The names in ``sys.modules`` after running ``code`` in a fresh interpreter."""
    result = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"],
        capture_output=True,
        text=True,
        cwd=REPO,
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
    ],
    ids=["toml", "log-config", "suggestion", "upgrade", "metrics-bind"],
)
def test_deferred_paths_import_on_use(code: str, module: str, tmp_path: Path) -> None:
    # Run from tmp_path so the files the snippets write land there.
    result = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint({module!r} in sys.modules)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "True"
