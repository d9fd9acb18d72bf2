"""Reading config files: Python (module-level names) and TOML.

Returns the raw key/value pairs a file sets; checking them against the
settings table is ``config.py``'s job. Imports only ``forkserve.errors``.
"""

from __future__ import annotations

import inspect
import sys
import types
from typing import Any

from forkserve.errors import ConfigError


def read_python(path: str, display: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            source = handle.read()
        code = compile(source, path, "exec")
    except OSError as exc:
        raise ConfigError(f"config file {display}: {exc.strerror or exc}") from None
    except SyntaxError as exc:
        raise ConfigError(f"{display} line {exc.lineno}: syntax error: {exc.msg}") from None
    namespace: dict[str, Any] = {"__file__": path, "__name__": "__forkserve_config__"}
    try:
        exec(code, namespace)
    except Exception as exc:
        line = _innermost_line(exc, path)
        raise ConfigError(
            f"{display}{line}: {type(exc).__name__} while running the config file: {exc}"
        ) from None
    found = {}
    for key, value in namespace.items():
        if key.startswith("_") or isinstance(value, types.ModuleType):
            continue
        imported = getattr(value, "__module__", "__forkserve_config__")
        if (inspect.isroutine(value) or inspect.isclass(value)) and (
            imported != "__forkserve_config__"
        ):
            continue
        found[key] = value
    return found


def _innermost_line(exc: BaseException, path: str) -> str:
    line = ""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == path:
            line = f" line {tb.tb_lineno}"
        tb = tb.tb_next
    return line


def read_toml(path: str, display: str, table: str | None) -> dict[str, Any]:
    # Imported on use: workers fork from the primary and need no TOML parser.
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on 3.10 only
        import tomli as tomllib

    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"config file {display}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{display}: invalid TOML: {exc}") from None
    if table == "tool.forkserve":
        section = data.get("tool", {}).get("forkserve", {})
    elif isinstance(data.get("forkserve"), dict):
        others = [key for key in data if key != "forkserve"]
        if others:
            raise ConfigError(
                f"{display}: {others[0]!r} is outside the [forkserve] table; "
                "put every setting in the table or none"
            )
        section = data["forkserve"]
    else:
        section = data
    if not isinstance(section, dict):
        raise ConfigError(f"{display}: [{table}] must be a table")
    return {key.replace("-", "_"): value for key, value in section.items()}
