"""Helpers shared by process tests: free ports, bounded waits, /proc lookups."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
APPS = Path(__file__).resolve().parent / "apps"

# The HTTP request corpus: tests/requests/{valid,invalid}/*.http
CORPUS = Path(__file__).resolve().parent / "requests"
INVALID = sorted((CORPUS / "invalid").glob("*.http"))
VALID = sorted((CORPUS / "valid").glob("*.http"))
# Vectors that stop in the middle of a message: the server can only tell once
# the client half-closes. Pipelined bytes may legitimately complete them.
INCOMPLETE = frozenset(
    {"head_incomplete", "cl_body_incomplete", "chunk_body_incomplete", "chunk_no_last_chunk"}
)
# Vectors whose head is valid and whose body framing is not: the app is
# called (bodies are streamed) but reading the body fails before the end.
BODY_LEVEL = frozenset(
    {p.stem for p in INVALID if p.stem.startswith("chunk_")}
    | {"chunked_over_max_body", "cl_body_incomplete"}
)


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s")
        time.sleep(interval)


def children_of(pid: int) -> list[int]:
    """Direct child pids of ``pid`` (from /proc)."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as fh:
                out.extend(int(x) for x in fh.read().split())
    return out


def is_template(pid: int) -> bool:
    """True for a template process (``--preload``), told by its process title."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().startswith(b"forkserve: template")
    except OSError:
        return False


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def http_get(host: str, port: int, path: str = "/", timeout: float = 5.0) -> bytes:
    """One ``GET`` with ``Connection: close`` over a fresh connection: the raw reply."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def answers_200(host: str, port: int, path: str = "/") -> bool:
    """True once a server on ``host:port`` answers 200 (for ``wait_for``)."""
    try:
        return http_get(host, port, path, timeout=2.0).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def closed_by_server(sock: socket.socket, timeout: float = 2.0) -> bool:
    """True once the server closes ``sock`` (EOF or reset) within ``timeout``."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and its key, made with openssl
    (the test is skipped without the command)."""
    import pytest

    if shutil.which("openssl") is None:
        pytest.skip("no openssl command")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key
