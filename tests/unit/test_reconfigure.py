"""What a reload may change: restart-only settings keep their running value."""

from __future__ import annotations

from pathlib import Path

from forkserve.config import load_config
from forkserve.reconfigure import RESTART_ONLY, fixed_settings, reconfigure


def config_of(tmp_path: Path, text: str, **cli: str):
    path = tmp_path / "forkserve.conf.py"
    path.write_text(text)
    return load_config({"config": str(path), **cli}, {}, app="app:app", cwd=str(tmp_path))


def test_reloadable_settings_change(tmp_path: Path) -> None:
    running = config_of(tmp_path, "workers = 2\nloglevel = 'info'\n")
    loaded = config_of(tmp_path, "workers = 3\nloglevel = 'debug'\n")
    result = reconfigure(
        running, loaded, fixed_settings(running, round_robin=False, head_buffering=False)
    )
    assert result.config.workers == 3 and result.config.loglevel == "debug"
    assert result.kept == ()
    assert result.changed == ("loglevel", "workers")


def test_restart_only_settings_keep_their_running_value(tmp_path: Path) -> None:
    running = config_of(tmp_path, "bind = ['127.0.0.1:9001']\nbacklog = 100\nworkers = 2\n")
    loaded = config_of(tmp_path, "bind = ['127.0.0.1:9002']\nbacklog = 50\nworkers = 4\n")
    result = reconfigure(running, loaded, RESTART_ONLY)
    assert result.kept == ("backlog", "bind")
    assert result.config.bind == ("127.0.0.1:9001",) and result.config.backlog == 100
    assert result.config.sources["backlog"] == running.sources["backlog"]
    assert result.config.workers == 4
    assert result.changed == ("workers",)


def test_what_the_primary_set_up_for_round_robin_and_head_buffering_is_kept(
    tmp_path: Path,
) -> None:
    running = config_of(tmp_path, "header_timeout = 5\n")
    loaded = config_of(tmp_path, "header_timeout = 9\nworker_class = 'threaded'\n")
    plain = reconfigure(
        running, loaded, fixed_settings(running, round_robin=False, head_buffering=False)
    )
    assert plain.kept == () and plain.config.header_timeout == 9
    rr = fixed_settings(running, round_robin=True, head_buffering=True)
    kept = reconfigure(running, loaded, rr)
    assert kept.kept == ("header_timeout", "worker_class")
    assert kept.config.worker_class == "auto"


def test_hooks_redefined_by_a_reread_file_are_not_changes(tmp_path: Path) -> None:
    source = "def when_ready(arbiter):\n    pass\n"
    running = config_of(tmp_path, source)
    loaded = config_of(tmp_path, source)
    assert running.when_ready is not loaded.when_ready
    result = reconfigure(running, loaded, RESTART_ONLY)
    assert result.changed == ()
    assert result.config.when_ready is loaded.when_ready
