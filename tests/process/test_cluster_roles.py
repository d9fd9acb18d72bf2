"""Roles, fork(env), setup_primary and 'setup', role checks: both start methods."""

from __future__ import annotations

import pytest
from cluster_helpers import STARTERS, run_script


@pytest.fixture(scope="module", params=STARTERS)
def roles(request):
    result = run_script("roles.py", starter=request.param)
    assert result.returncode == 0, result
    return result


def test_primary_role(roles):
    info = roles.one("primary-role")
    assert info["is_primary"] is True and info["is_master"] is True
    assert info["is_worker"] is False
    assert info["worker"] is None
    assert info["workers"] == 0
    assert info["settings"] == {}
    assert info["policy"] == 2 and info["sched"] == [1, 2]
    assert info["cpus"] >= 1


def test_worker_role(roles):
    info = roles.one("worker-role")
    assert info["is_primary"] is False and info["is_master"] is False
    assert info["is_worker"] is True
    assert info["id"] == 1 and info["pid_ok"] is True
    assert info["workers"] is None
    assert info["id_env"] is None, "FORKSERVE_WORKER_ID must be removed in the worker"
    assert info["state"] == "online"
    assert info["connected"] is True and info["dead"] is False


def test_fork_env_reaches_the_worker(roles):
    info = roles.one("worker-role")
    assert info["extra"] == "from-env"
    assert info["number"] == "42"


@pytest.mark.parametrize("name", ["fork", "setup_primary", "setup_master", "disconnect"])
def test_primary_only_calls_refused_in_worker(roles, name):
    refused = {r[0]: r[1] for r in roles.tagged("refused")}
    assert name in refused, roles
    message = refused[name]
    assert "primary" in message and "worker" in message
    assert name.replace("setup_master", "setup_primary") in message


def test_unknown_setting_is_a_type_error(roles):
    assert "bogus" in roles.one("unknown-setting")


def test_settings_defaults_and_merging(roles):
    first = roles.one("settings-1")
    assert first["args"] == ["one"]
    assert first["exec"].endswith("roles.py")
    assert first["silent"] is False and first["serialization"] == "json"
    assert isinstance(first["exec_argv"], list)
    assert first["windows_hide"] is True
    second = roles.one("settings-2")
    assert second["args"] == ["two"]  # later wins
    assert second["windows_hide"] is True  # earlier values kept


def test_setup_emitted_after_the_call_returns_and_on_fork(roles):
    order = roles.one("order")
    kinds = [item[0] for item in order]
    assert kinds == ["returned", "returned", "setup", "setup", "setup", "fork"]
    assert order[2][1]["args"] == ["one"]
    assert order[3][1]["args"] == ["two"]
    assert order[4][1]["args"] == ["two"]  # the fork's implicit setup_primary()
    assert order[5] == ["fork", 1]


def test_fork_returns_the_worker_registered(roles):
    assert roles.one("fork-returned") == [1, True, "none"]


def test_run_returns_when_all_exited(roles):
    assert roles.one("exit") == [1, 0, None]
    assert roles.one("primary-done") == 0
