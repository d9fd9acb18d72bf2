"""Logging setup: formats, files, levels, --log-config and reopening after rotation."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from forkserve.config import Config, load_config
from forkserve.errors import ConfigError
from forkserve.log import LOGGERS, reopen_log_files, setup_logging

LINE = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4}\] \[\d+\] \[(\w+)\] (.*)$")


@pytest.fixture(autouse=True)
def reset_loggers() -> Iterator[None]:
    yield
    for name in (*LOGGERS, "custom"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()
        logger.setLevel(logging.NOTSET)
        logger.propagate = True
        logger.disabled = False


def make(tmp_path: Path, **cli: Any) -> Config:
    return load_config(cli, {}, app="m:app", cwd=str(tmp_path))


def test_error_log_format_and_file(tmp_path: Path) -> None:
    setup_logging(make(tmp_path, error_logfile="error.log"))
    logging.getLogger("forkserve.arbiter").info("worker %d (pid %d) booted", 1, 42)
    logging.getLogger("forkserve.worker").debug("not shown at info")
    lines = (tmp_path / "error.log").read_text().splitlines()
    assert len(lines) == 1
    match = LINE.match(lines[0])
    assert match is not None, lines[0]
    assert match.groups() == ("INFO", "worker 1 (pid 42) booted")


def test_error_log_defaults_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(make(tmp_path, loglevel="warning"))
    logging.getLogger("forkserve.worker").info("quiet")
    logging.getLogger("forkserve.worker").warning("loud")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "quiet" not in captured.err
    match = LINE.match(captured.err.strip())
    assert match is not None and match.groups() == ("WARNING", "loud")


def test_access_log_is_plain_and_separate(tmp_path: Path) -> None:
    setup_logging(make(tmp_path, error_logfile="error.log", access_logfile="access.log"))
    logging.getLogger("forkserve.access").info('127.0.0.1 - - "GET / HTTP/1.1" 200 2')
    assert (tmp_path / "access.log").read_text() == '127.0.0.1 - - "GET / HTTP/1.1" 200 2\n'
    assert (tmp_path / "error.log").read_text() == ""
    assert logging.getLogger("forkserve.access").propagate is False


def test_access_log_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(make(tmp_path, access_logfile="-"))
    logging.getLogger("forkserve.access").info("GET /")
    assert capsys.readouterr().out == "GET /\n"


def test_access_log_disabled_by_default(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(make(tmp_path))
    logging.getLogger("forkserve.access").info("GET /")
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", "")


def test_setup_is_idempotent(tmp_path: Path) -> None:
    config = make(tmp_path, error_logfile="error.log", access_logfile="access.log")
    setup_logging(config)
    setup_logging(config)
    logging.getLogger("forkserve.arbiter").info("once")
    logging.getLogger("forkserve.access").info("once")
    assert (tmp_path / "error.log").read_text().count("once") == 1
    assert (tmp_path / "access.log").read_text().count("once") == 1


def test_unwritable_log_file(tmp_path: Path) -> None:
    config = make(tmp_path, error_logfile=str(tmp_path / "missing-dir" / "e.log"))
    with pytest.raises(ConfigError, match=r"missing-dir/e\.log: No such file or directory"):
        setup_logging(config)


def test_reopen_after_rotation(tmp_path: Path) -> None:
    setup_logging(make(tmp_path, error_logfile="error.log", access_logfile="access.log"))
    logging.getLogger("forkserve.arbiter").info("before")
    logging.getLogger("forkserve.access").info("before")
    (tmp_path / "error.log").rename(tmp_path / "error.log.1")
    (tmp_path / "access.log").rename(tmp_path / "access.log.1")
    reopen_log_files()
    logging.getLogger("forkserve.arbiter").info("after")
    logging.getLogger("forkserve.access").info("after")
    assert "before" in (tmp_path / "error.log.1").read_text()
    assert "after" not in (tmp_path / "error.log.1").read_text()
    assert "after" in (tmp_path / "error.log").read_text()
    assert (tmp_path / "access.log").read_text() == "after\n"


DICT_CONFIG = {
    "version": 1,
    "formatters": {"bare": {"format": "custom:%(message)s"}},
    "handlers": {
        "file": {
            "class": "logging.FileHandler",
            "filename": "{dir}/custom.log",
            "formatter": "bare",
        }
    },
    "loggers": {"custom": {"handlers": ["file"], "level": "INFO"}},
}


def test_log_config_json(tmp_path: Path) -> None:
    import json

    text = json.dumps(DICT_CONFIG).replace("{dir}", str(tmp_path))
    (tmp_path / "log.json").write_text(text)
    setup_logging(make(tmp_path, logconfig="log.json", error_logfile="error.log"))
    logging.getLogger("custom").info("hi")
    logging.getLogger("forkserve.arbiter").info("still here")
    assert (tmp_path / "custom.log").read_text() == "custom:hi\n"
    assert "still here" in (tmp_path / "error.log").read_text()


def test_log_config_toml(tmp_path: Path) -> None:
    (tmp_path / "log.toml").write_text(
        f"""
        [formatters.bare]
        format = "toml:%(message)s"
        [handlers.file]
        class = "logging.FileHandler"
        filename = "{tmp_path}/custom.log"
        formatter = "bare"
        [loggers.custom]
        handlers = ["file"]
        level = "INFO"
        """.replace("        ", "")
    )
    setup_logging(make(tmp_path, logconfig="log.toml"))
    logging.getLogger("custom").info("hi")
    assert (tmp_path / "custom.log").read_text() == "toml:hi\n"


def test_log_config_ini(tmp_path: Path) -> None:
    (tmp_path / "log.ini").write_text(
        "[loggers]\nkeys=root,custom\n\n"
        "[handlers]\nkeys=file\n\n"
        "[formatters]\nkeys=bare\n\n"
        "[logger_root]\nhandlers=\n\n"
        "[logger_custom]\nhandlers=file\nqualname=custom\nlevel=INFO\npropagate=0\n\n"
        f"[handler_file]\nclass=FileHandler\nargs=('{tmp_path}/custom.log',)\nformatter=bare\n\n"
        "[formatter_bare]\nformat=ini:%(message)s\n"
    )
    setup_logging(make(tmp_path, logconfig="log.ini"))
    logging.getLogger("custom").info("hi")
    assert (tmp_path / "custom.log").read_text() == "ini:hi\n"


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("bad.json", "{not json"),
        ("bad.toml", "= nope"),
        ("bad.json", '{"handlers": {"h": {"class": "no.such.Handler"}}}'),
        ("bad.json", "[1, 2]"),
        ("bad.ini", "[loggers]\nkeys=root\n"),
    ],
)
def test_bad_log_config(tmp_path: Path, name: str, content: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(ConfigError) as info:
        setup_logging(make(tmp_path, logconfig=name))
    message = str(info.value)
    assert message.startswith(f"log config {tmp_path / name}: ")
    assert "\n" not in message
