"""The access log line: gunicorn's format language over an ``AccessRecord``.

Atoms are ``%(name)s`` keys: h l u t r m U q H s B b f a T D M L p,
``{header}i`` (request), ``{header}o`` (response), ``{var}e`` (environ),
and forkserve's own ``W`` (worker id) and ``Q`` (milliseconds the connection
waited in the primary). Every atom is escaped (control and non-printable
characters as ``\\xNN``, plus ``"`` and ``\\``) so a client cannot forge log
lines or fields. Bodies are never logged.

This module must not import sockets, threads, signals, selectors, asyncio or
anything from forkserve except ``forkserve.errors``.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

DEFAULT_FORMAT = '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s"'


_NO_ENVIRON: Mapping[str, Any] = MappingProxyType({})


class AccessRecord(NamedTuple):
    """What the access log may see of one request (never its body)."""

    method: str
    target: str
    http_version: str  # "1.1" or "1.0"
    status: int
    bytes_sent: int  # body bytes, not counting the head or chunk framing
    request_headers: Sequence[tuple[str, str]]
    response_headers: Sequence[tuple[str, str]]
    start_time: float  # epoch seconds
    duration: float  # seconds
    client: str
    pid: int
    worker_id: int | None = None
    queued_ms: float | None = None
    environ: Mapping[str, Any] = _NO_ENVIRON


def _escape_char(ch: str) -> str:
    code = ord(ch)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def escape(value: str) -> str:
    """``value`` with control, non-printable, quote and backslash characters
    written as escapes; one atom can never become two fields or two lines."""
    if value.isprintable() and '"' not in value and "\\" not in value:
        return value
    return "".join(
        ch if ch.isprintable() and ch != '"' and ch != "\\" else _escape_char(ch) for ch in value
    )


def _header(headers: Sequence[tuple[str, str]], name: str) -> str | None:
    name = name.lower()
    found = [v for n, v in headers if n.lower() == name]
    return ", ".join(found) if found else None


def _basic_user(headers: Sequence[tuple[str, str]]) -> str | None:
    auth = _header(headers, "authorization")
    if not auth or auth[:6].lower() != "basic ":
        return None
    try:
        decoded = base64.b64decode(auth[6:].strip(), validate=True).decode("latin-1")
    except (binascii.Error, ValueError):
        return None
    return decoded.split(":", 1)[0]


class _Atoms(Mapping[str, str]):
    """Computes only the atoms the format asks for."""

    __slots__ = ("_r",)

    def __init__(self, record: AccessRecord) -> None:
        self._r = record

    def __iter__(self) -> Any:
        return iter(())

    def __len__(self) -> int:
        return 0

    def __getitem__(self, key: str) -> str:
        value = self._value(key)
        return "-" if value is None else escape(value)

    def _value(self, key: str) -> str | None:
        r = self._r
        if key.startswith("{") and len(key) > 2 and key[-2] == "}":
            name, kind = key[1:-2], key[-1]
            if kind == "i":
                return _header(r.request_headers, name)
            if kind == "o":
                return _header(r.response_headers, name)
            if kind == "e":
                value = r.environ.get(name)
                return None if value is None else str(value)
            return None
        getter = _ATOMS.get(key)
        return None if getter is None else getter(r)


_ATOMS: dict[str, Callable[[AccessRecord], str | None]] = {
    "h": lambda r: r.client or None,
    "l": lambda r: None,
    "u": lambda r: _basic_user(r.request_headers),
    "t": lambda r: time.strftime("[%d/%b/%Y:%H:%M:%S %z]", time.localtime(r.start_time)),
    "r": lambda r: f"{r.method} {r.target} HTTP/{r.http_version}",
    "m": lambda r: r.method,
    "U": lambda r: r.target.partition("?")[0],
    "q": lambda r: r.target.partition("?")[2],
    "H": lambda r: f"HTTP/{r.http_version}",
    "s": lambda r: str(r.status),
    "B": lambda r: str(r.bytes_sent),
    "b": lambda r: str(r.bytes_sent) if r.bytes_sent else None,
    "f": lambda r: _header(r.request_headers, "referer"),
    "a": lambda r: _header(r.request_headers, "user-agent"),
    "T": lambda r: str(int(r.duration)),
    "D": lambda r: str(int(r.duration * 1_000_000)),
    "M": lambda r: str(int(r.duration * 1000)),
    "L": lambda r: f"{r.duration:.6f}",
    "p": lambda r: f"<{r.pid}>",
    "W": lambda r: None if r.worker_id is None else str(r.worker_id),
    "Q": lambda r: None if r.queued_ms is None else f"{r.queued_ms:.3f}",
}


def format_access(fmt: str, record: AccessRecord) -> str:
    """One access log line for ``record``; unknown atoms render as "-"."""
    return fmt % _Atoms(record)
