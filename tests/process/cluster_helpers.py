"""Helpers for the cluster process tests: run a scenario script in its own session.

Every scenario runs as ``python <script> <args>`` with ``start_new_session=True``;
whatever happens, the whole process group is killed afterwards. Scripts print one
JSON array per line (``["tag", value, ...]``, see ``cluster_scripts/_common.py``).
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = Path(__file__).resolve().parent / "cluster_scripts"
PYTHON = sys.executable
STARTERS = ["exec", "fork", "template"]


def base_env(starter: str = "exec", **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORKSERVE_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["CLUSTER_TEST_STARTER"] = starter
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group of ``proc`` and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


@dataclass
class Result:
    returncode: int | None
    stdout: str
    stderr: str
    records: list[list] = field(default_factory=list)

    def tagged(self, tag: str) -> list[list]:
        return [r[1:] for r in self.records if r and r[0] == tag]

    def one(self, tag: str):
        found = self.tagged(tag)
        assert len(found) == 1, f"expected one {tag!r}, got {found}\n{self}"
        return found[0][0] if len(found[0]) == 1 else found[0]

    def tags(self) -> list[str]:
        return [r[0] for r in self.records]

    def __str__(self) -> str:
        return (
            f"--- returncode {self.returncode}\n"
            f"--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"
        )


def parse_records(text: str) -> list[list]:
    records = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, list) and value and isinstance(value[0], str):
                records.append(value)
    return records


def spawn(
    script: str | Path,
    args: tuple[str, ...],
    starter: str,
    env: dict[str, str] | None,
    cwd: str | Path | None,
    pass_fds: tuple[int, ...] = (),
) -> tuple[Path, subprocess.Popen[bytes]]:
    """Start a scenario script in its own session, its output piped."""
    path = Path(script)
    if not path.is_absolute():
        path = SCRIPTS / path
    full_env = base_env(starter)
    full_env.update(env or {})
    proc = subprocess.Popen(
        [PYTHON, str(path), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=full_env,
        cwd=str(cwd or ROOT),
        start_new_session=True,
        pass_fds=pass_fds,
    )
    return path, proc


def run_script(
    script: str | Path,
    *args: str,
    starter: str = "exec",
    env: dict[str, str] | None = None,
    timeout: float = 20.0,
    cwd: str | Path | None = None,
) -> Result:
    """Run a scenario to completion (bounded by ``timeout``); kill its group afterwards."""
    path, proc = spawn(script, args, starter, env, cwd)
    try:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            out, err = proc.communicate(timeout=5)
            raise AssertionError(
                f"{path.name} did not finish within {timeout}s\n"
                f"{Result(None, out.decode(errors='replace'), err.decode(errors='replace'))}"
            ) from None
    finally:
        kill_group(proc)
    text = out.decode(errors="replace")
    return Result(proc.returncode, text, err.decode(errors="replace"), parse_records(text))


class Running:
    """A scenario left running: read its records as they come, with deadlines."""

    def __init__(
        self,
        script: str | Path,
        *args: str,
        starter: str = "exec",
        env=None,
        cwd=None,
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        _, self.proc = spawn(script, args, starter, env, cwd, pass_fds)
        self._buf = b""
        self.lines: list[str] = []
        self.records: list[list] = []
        self._sel = selectors.DefaultSelector()
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        self._sel.register(self.proc.stdout, selectors.EVENT_READ)
        self._eof = False

    def __enter__(self) -> Running:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        kill_group(self.proc)
        self._sel.close()

    def _pump(self, timeout: float) -> None:
        if self._eof:
            time.sleep(min(timeout, 0.05))
            return
        for _key, _ in self._sel.select(timeout):
            assert self.proc.stdout is not None
            try:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
            except BlockingIOError:
                continue
            if not chunk:
                self._eof = True
                return
            self._buf += chunk
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                text = line.decode(errors="replace")
                self.lines.append(text)
                self.records.extend(parse_records(text))

    def wait_for(self, predicate, timeout: float = 10.0, what: str = "output"):
        """Poll the output until ``predicate(records)`` is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate(self.records)
            if value:
                return value
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"timed out waiting for {what}; output so far:\n" + self.dump()
                )
            self._pump(min(remaining, 0.2))

    def wait_tag(self, tag: str, count: int = 1, timeout: float = 10.0) -> list[list]:
        def found(records):
            hits = [r[1:] for r in records if r[0] == tag]
            return hits if len(hits) >= count else None

        return self.wait_for(found, timeout, what=f"{count} x {tag!r}")

    def wait_exit(self, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None or not self._eof:
            if time.monotonic() > deadline:
                raise AssertionError("process did not exit in time:\n" + self.dump())
            self._pump(0.1)
        return self.proc.returncode

    def dump(self) -> str:
        err = b""
        if self.proc.poll() is not None and self.proc.stderr is not None:
            try:
                err = self.proc.stderr.read() or b""
            except Exception:
                err = b""
        return "\n".join(self.lines) + "\n--- stderr\n" + err.decode(errors="replace")


def free_port(family: int = socket.AF_INET, host: str = "127.0.0.1") -> int:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def pid_gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (gone, or a zombie waiting for its reaper)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("State:"):
                    return "Z" in line.split()[1]
    except FileNotFoundError:
        return True
    return False


def wait_until(predicate, timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def request(address, payload: bytes = b"", timeout: float = 5.0, family=None) -> bytes:
    """Connect, send ``payload``, read until EOF."""
    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        fam = family or (socket.AF_INET6 if ":" in address[0] else socket.AF_INET)
        sock = socket.socket(fam, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    with sock:
        sock.connect(address)
        if payload:
            sock.sendall(payload)
        chunks = []
        while True:
            data = sock.recv(4096)
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)
