"""Logging setup: the error log, the access log, --log-config and USR1 reopening.

Loggers are stdlib ``logging``: ``forkserve.arbiter`` and ``forkserve.worker``
write to the error log (stderr or ``--error-logfile``) through the
``forkserve`` logger; ``forkserve.access`` writes plain lines to
``--access-logfile`` and does not propagate. ``setup_logging`` may be called
again (after a reload): it replaces the handlers it installed before.

This module is a leaf: it must not import click, ``forkserve.arbiter``,
``forkserve.workers``, ``forkserve.cluster`` or ``forkserve.http``.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

from forkserve.errors import ConfigError

if TYPE_CHECKING:
    from forkserve.config import Config

ROOT = "forkserve"
ARBITER = "forkserve.arbiter"
WORKER = "forkserve.worker"
ACCESS = "forkserve.access"
LOGGERS = (ROOT, ARBITER, WORKER, ACCESS)

ERROR_FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S %z"
_MARK = "_forkserve_handler"


def _handler(target: str, default_stream: Any) -> logging.Handler:
    """A stream handler for ``-``, otherwise a file handler appending to ``target``."""
    if target == "-":
        handler: logging.Handler = logging.StreamHandler(default_stream)
    else:
        try:
            handler = logging.FileHandler(target, mode="a", encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"log file {target}: {exc.strerror}; check --error-logfile/--access-logfile"
            ) from None
    setattr(handler, _MARK, True)
    return handler


def _drop_own_handlers(logger: logging.Logger) -> None:
    for handler in list(logger.handlers):
        if getattr(handler, _MARK, False):
            logger.removeHandler(handler)
            handler.close()


def setup_logging(config: Config) -> None:
    """Install forkserve's handlers from ``config``; idempotent.

    Raises ``ConfigError`` for a log file that cannot be opened or a bad
    ``--log-config`` file.
    """
    for name in LOGGERS:
        _drop_own_handlers(logging.getLogger(name))

    root = logging.getLogger(ROOT)
    root.setLevel(config.loglevel.upper())
    root.propagate = False
    error = _handler(config.error_logfile, sys.stderr)
    error.setFormatter(logging.Formatter(ERROR_FORMAT, DATE_FORMAT))
    root.addHandler(error)
    for name in (ARBITER, WORKER):
        logging.getLogger(name).setLevel(logging.NOTSET)

    access = logging.getLogger(ACCESS)
    access.propagate = False
    if config.access_logfile is None:
        access.disabled = True
    else:
        access.disabled = False
        access.setLevel(logging.INFO)
        handler = _handler(config.access_logfile, sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)

    if config.logconfig:
        apply_log_config(config.logconfig)


def apply_log_config(path: str) -> None:
    """Apply a dictConfig (``.json``, ``.toml``) or fileConfig (``.ini``, ``.conf``) file.

    Loggers not named in the file are left enabled. Raises ``ConfigError``.
    """
    # Imported here, not at the top: every worker is forked from the primary,
    # so what the primary imports for this rarely used option would sit in each.
    import configparser
    import json
    import logging.config

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on 3.10 only
        import tomli as tomllib

    try:
        if path.endswith((".ini", ".conf")):
            logging.config.fileConfig(path, disable_existing_loggers=False)
            return
        with open(path, "rb") as handle:
            if path.endswith(".json"):
                data = json.load(handle)
            else:
                data = tomllib.load(handle)
        if not isinstance(data, dict):
            raise ValueError("expected a table/object at the top level")
        data.setdefault("version", 1)
        data.setdefault("disable_existing_loggers", False)
        logging.config.dictConfig(data)
    except OSError as exc:
        raise ConfigError(f"log config {path}: {exc.strerror or exc}") from None
    except (ValueError, TypeError, KeyError, AttributeError, ImportError) as exc:
        # json/toml decode errors are ValueErrors; dictConfig raises ValueError too.
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(
            f"log config {path}: {detail}; expected a logging dictConfig (.json, .toml) "
            "or fileConfig (.ini, .conf) file"
        ) from None
    except configparser.Error as exc:
        detail = str(exc).splitlines()[0]
        raise ConfigError(f"log config {path}: {detail}; expected a logging fileConfig file")


def reopen_log_files() -> None:
    """Reopen every file handler of forkserve's loggers (for USR1 after log rotation)."""
    seen: set[int] = set()
    for name in LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if not isinstance(handler, logging.FileHandler) or id(handler) in seen:
                continue
            seen.add(id(handler))
            handler.acquire()
            try:
                # Append even if the handler was opened with "w": a rotated file is new.
                stream = open(handler.baseFilename, "a", encoding=handler.encoding)  # noqa: SIM115
                old = handler.setStream(stream)
                if old is not None:
                    old.close()
            finally:
                handler.release()
