"""Each setup_primary setting, observed from the worker, for both start methods."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from cluster_helpers import STARTERS, run_script


def settings(mode, starter, **env):
    result = run_script("settings.py", starter=starter, env={"MODE": mode, **env})
    assert result.returncode == 0, result
    return result


def test_exec_args_exec_argv_cwd(tmp_path):
    """exec/args/exec_argv only mean something for a fresh interpreter (ExecStarter)."""
    result = settings("exec", "exec", WORK_DIR=str(tmp_path))
    by_id = {r[0]["id"]: r[0] for r in result.tagged("exec-worker")}
    assert set(by_id) == {1, 2}, result
    first, second = by_id[1], by_id[2]
    assert first["name"] == "__main__"
    assert first["argv"][0].endswith("settings_worker.py")
    assert first["argv"][1:] == ["--use", "https"]
    assert first["utf8"] == 1 and first["optimize"] == 1
    assert first["cwd"] == str(tmp_path)
    # Only later forks see a change.
    assert second["argv"][1:] == ["--use", "http"]
    assert second["utf8"] == 0 and second["optimize"] == 0


@pytest.mark.parametrize("starter", STARTERS)
def test_cwd(starter, tmp_path):
    result = settings("cwd", starter, WORK_DIR=str(tmp_path))
    assert result.one("worker")["cwd"] == str(tmp_path)


@pytest.mark.parametrize("starter", STARTERS)
def test_silent_pipes_output_to_the_primary(starter):
    result = settings("silent", starter)
    _worker_id, code, signal, streams = result.one("exit")
    assert (code, signal) == (0, None)
    assert streams == {
        "stdout": "plain stdout from worker 1\n",
        "stderr": "plain stderr from worker 1\n",
    }
    assert "plain stdout" not in result.stdout.replace(streams["stdout"].strip(), "", 1)
    assert "plain stderr" not in result.stderr


@pytest.mark.parametrize("starter", STARTERS)
@pytest.mark.parametrize("stdio", ["ignore", "pipe", "inherit"])
def test_stdio(starter, stdio):
    result = settings(f"stdio-{stdio}", starter)
    _id, code, _signal, streams = result.one("exit")
    assert code == 0
    printed = [line for line in result.stdout.splitlines() if line.startswith("plain stdout")]
    printed_err = [line for line in result.stderr.splitlines() if line.startswith("plain stderr")]
    if stdio == "ignore":
        assert streams == {"stdout": None, "stderr": None}
        assert printed == [] and printed_err == []
    elif stdio == "pipe":
        assert streams["stdout"] == "plain stdout from worker 1\n"
        assert streams["stderr"] == "plain stderr from worker 1\n"
        assert printed == [] and printed_err == []
    else:
        assert streams == {"stdout": None, "stderr": None}
        assert printed == ["plain stdout from worker 1"]
        assert printed_err == ["plain stderr from worker 1"]


def _can_run_as(uid, gid):
    try:
        subprocess.run([sys.executable, "-c", "pass"], user=uid, group=gid, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


@pytest.mark.parametrize("starter", STARTERS)
def test_uid_gid(starter):
    uid, gid = os.getuid(), os.getgid()
    if uid == 0:
        try:
            import pwd

            nobody = pwd.getpwnam("nobody")
            if starter == "fork" or _can_run_as(nobody.pw_uid, nobody.pw_gid):
                uid, gid = nobody.pw_uid, nobody.pw_gid
        except KeyError:
            pass
    result = settings("uid", starter, RUN_UID=str(uid), RUN_GID=str(gid))
    info = result.one("worker")
    assert (info["uid"], info["gid"]) == (uid, gid)


@pytest.mark.parametrize("starter", STARTERS)
def test_inspect_port(starter):
    result = settings("inspect", starter)
    ports = {r[0]["id"]: r[0]["inspect"] for r in result.tagged("worker")}
    # A number, a callable (called per fork), then the default: primary's port + id.
    assert ports == {1: "9400", 2: "9501", 3: "9502", 4: str(9229 + 4)}
