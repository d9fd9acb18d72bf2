"""Value converters for the settings table.

Each takes a string (a flag or an environment variable) or a Python/TOML value
and returns the setting's value, or raises ``ValueError`` whose text is the
form expected; ``config.load_config`` turns that into a one-line
``ConfigError`` naming the key and where it came from. Imports nothing from
forkserve.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable
from typing import Any


def _integer(value: Any, expected: str) -> int:
    if isinstance(value, bool):
        raise ValueError(expected)
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip(), 10)
        except ValueError:
            raise ValueError(expected) from None
    raise ValueError(expected)


def positive_int(value: Any) -> int:
    """An integer >= 1."""
    number = _integer(value, "expected a positive integer")
    if number < 1:
        raise ValueError("expected a positive integer")
    return number


def non_negative_int(value: Any) -> int:
    """An integer >= 0."""
    number = _integer(value, "expected an integer >= 0")
    if number < 0:
        raise ValueError("expected an integer >= 0")
    return number


def int_range(low: int, high: int) -> Callable[[Any], int]:
    """A converter for an integer from ``low`` to ``high`` inclusive."""
    expected = f"expected an integer from {low} to {high}"

    def convert(value: Any) -> int:
        number = _integer(value, expected)
        if not low <= number <= high:
            raise ValueError(expected)
        return number

    convert.__name__ = f"int_range_{low}_{high}"
    return convert


def seconds(value: Any) -> float:
    """A finite number of seconds >= 0."""
    expected = "expected a number of seconds"
    if isinstance(value, bool):
        raise ValueError(expected)
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(expected) from None
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(expected)
    return float(value)


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def boolean(value: Any) -> bool:
    """``true``/``false`` (also yes/no, on/off, 1/0) or a bool."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError("expected true or false")


def text(value: Any) -> str:
    """A string."""
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value


def optional_text(value: Any) -> str | None:
    """A string; ``None`` or an empty string means unset."""
    if value is None or value == "":
        return None
    return text(value)


def octal_mode(value: Any) -> int:
    """A permission mode: an int, or ``0o22``, ``022``, ``0x12`` or decimal text."""
    expected = "expected an octal mode such as 0o22 or 022"
    if isinstance(value, str):
        raw = value.strip().lower()
        try:
            if raw.startswith(("0o", "0x", "0b")):
                value = int(raw, 0)
            elif len(raw) > 1 and raw.startswith("0"):
                value = int(raw, 8)
            else:
                value = int(raw, 10)
        except ValueError:
            raise ValueError(expected) from None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o777:
        raise ValueError(expected)
    return value


def _items(value: Any, separators: str, expected: str) -> list[str]:
    if isinstance(value, str):
        for sep in separators:
            value = value.replace(sep, " ")
        return value.split()
    if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        return list(value)
    raise ValueError(expected)


_BIND_FORM = "expected host:port, [ipv6]:port, unix:/path, fd://N or fd://NAME"


def _bind_address(item: str) -> str:
    if item.startswith("unix:"):
        if len(item) == len("unix:"):
            raise ValueError(_BIND_FORM)
        return item
    if item.startswith("fd://"):
        # fd://N, or fd://NAME for a socket systemd passed (LISTEN_FDNAMES).
        label = item[len("fd://") :]
        if not label or not (label.isdigit() or label.replace("-", "_").isidentifier()):
            raise ValueError(_BIND_FORM)
        return item
    if item.startswith("["):
        host, sep, rest = item[1:].partition("]")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(_BIND_FORM) from None
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(_BIND_FORM)
        port = rest[1:] if rest else "8000"
        display = f"[{host}]"
    else:
        if item.count(":") > 1:  # a bare IPv6 address is ambiguous without brackets
            raise ValueError(_BIND_FORM)
        display, _, port = item.partition(":")
        port = port or "8000"
        if not display:
            raise ValueError(_BIND_FORM)
    if not port.isdigit() or int(port) > 65535:
        raise ValueError(_BIND_FORM)
    return f"{display}:{int(port)}"


def bind_list(value: Any) -> tuple[str, ...]:
    """Addresses to listen on, comma or space separated; the form is checked, not opened."""
    items = _items(value, ", ", _BIND_FORM)
    if not items:
        raise ValueError(_BIND_FORM)
    return tuple(_bind_address(item) for item in items)


def optional_host_port(value: Any) -> str | None:
    """``host:port`` or ``[ipv6]:port`` with an explicit port; empty means unset."""
    if value is None or value == "":
        return None
    expected = "expected host:port or [ipv6]:port"
    if not isinstance(value, str) or value.startswith(("unix:", "fd://")) or ":" not in value:
        raise ValueError(expected)
    try:
        return _bind_address(value.strip())
    except ValueError:
        raise ValueError(expected) from None


_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def byte_size(value: Any) -> int:
    """A size in bytes: an integer, or a number with K, M or G (powers of 1024)."""
    expected = "expected a size such as 536870912, 512M or 2G"
    if isinstance(value, bool):
        raise ValueError(expected)
    if isinstance(value, int):
        if value < 0:
            raise ValueError(expected)
        return value
    if not isinstance(value, str):
        raise ValueError(expected)
    raw = value.strip().lower().removesuffix("b").removesuffix("i")
    unit = raw[-1:] if raw[-1:] in ("k", "m", "g") else ""
    number = raw[: len(raw) - len(unit)].strip()
    try:
        amount = float(number)
    except ValueError:
        raise ValueError(expected) from None
    if not math.isfinite(amount) or amount < 0:
        raise ValueError(expected)
    return int(amount * _SIZE_UNITS[unit])


def env_list(value: Any) -> tuple[str, ...]:
    """``KEY=VALUE`` pairs; a string is split like a shell command line."""
    expected = "expected KEY=VALUE"
    if isinstance(value, str):
        import shlex  # only for --env as one string: not in the primary, so not in every worker

        try:
            items = shlex.split(value)
        except ValueError:
            raise ValueError(expected) from None
    else:
        items = _items(value, "", expected)
    for item in items:
        key, sep, _ = item.partition("=")
        if not sep or not key or any(c.isspace() for c in key):
            raise ValueError(expected)
    return tuple(items)


def path_list(value: Any) -> tuple[str, ...]:
    """Directories, comma separated."""
    return tuple(_items(value, ",", "expected comma-separated directories"))


def trusted_ips(value: Any) -> tuple[str, ...]:
    """``*``, or IP addresses and CIDR networks, comma separated."""
    expected = "expected '*' or comma-separated IP addresses or networks"
    items = _items(value, ", ", expected)
    for item in items:
        if item == "*":
            continue
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(expected) from None
    return tuple(items)


def user_id(value: Any) -> int | None:
    """A user name or numeric uid; the name is resolved now."""
    import pwd  # only with --user

    return _account_id(value, pwd.getpwnam, "expected a user name or uid")


def group_id(value: Any) -> int | None:
    """A group name or numeric gid; the name is resolved now."""
    import grp  # only with --group

    return _account_id(value, grp.getgrnam, "expected a group name or gid")


def _account_id(value: Any, lookup: Callable[[str], Any], expected: str) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError(expected)
    if isinstance(value, int):
        if value < 0:
            raise ValueError(expected)
        return value
    if isinstance(value, str):
        if value.strip().isdigit():
            return int(value)
        try:
            return int(lookup(value.strip())[2])
        except KeyError:
            raise ValueError(f"{expected} known to this system") from None
    raise ValueError(expected)


def hook(value: Any) -> Callable[..., Any] | None:
    """A callable (Python config files only)."""
    if value is None:
        return None
    if not callable(value):
        raise ValueError("expected a callable defined in a Python config file")
    return value


def arity(*params: str) -> Callable[[Any], None]:
    """A validator: the hook must accept exactly these positional arguments."""

    def validate(value: Any) -> None:
        if value is None:
            return
        import inspect  # only for a hook from a config file

        try:
            inspect.signature(value).bind(*params)
        except TypeError:
            raise ValueError(f"expected a callable taking ({', '.join(params)})") from None
        except ValueError:  # builtins without a signature: trust them
            return

    return validate


def logconfig_suffix(value: Any) -> None:
    """A validator: a log config file must be JSON, TOML or an ini file."""
    if value is not None and not value.endswith((".json", ".toml", ".ini", ".conf")):
        raise ValueError("expected a .json, .toml, .ini or .conf file")
