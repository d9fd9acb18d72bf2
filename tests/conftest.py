"""Shared fixtures: start forkserve for real, on loopback, and always stop it.

``serve(...)`` starts ``forkserve`` in its own session (process group) on a
free 127.0.0.1 port, waits with a deadline until it answers, and at teardown
sends SIGTERM to the group, waits, then SIGKILLs it. When a test fails, the
server's output is printed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import APPS, ROOT, children_of, free_port, is_template, pid_alive, wait_for

FORKSERVE = [sys.executable, "-m", "forkserve"]


class Server:
    """A running forkserve process group."""

    def __init__(
        self,
        args: list[str],
        env: dict[str, str],
        cwd: Path,
        log_path: Path,
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        self.args = args
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            args,
            env=env,
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            pass_fds=pass_fds,
        )
        self.host = "127.0.0.1"
        self.port = 0
        self.unix_path: str | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def workers(self) -> list[int]:
        """The primary's live children, less the template process (``--preload``)."""
        return [pid for pid in children_of(self.pid) if pid_alive(pid) and not is_template(pid)]

    def templates(self) -> list[int]:
        """The live template processes (``--preload``): children titled as such."""
        return [pid for pid in children_of(self.pid) if pid_alive(pid) and is_template(pid)]

    def connect(self, timeout: float = 5.0) -> socket.socket:
        if self.unix_path:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(self.unix_path)
            return sock
        sock = socket.create_connection((self.host, self.port), timeout=timeout)
        return sock

    def request(self, raw: bytes, timeout: float = 5.0) -> bytes:
        """Send raw bytes, read until the server closes (or the timeout)."""
        with self.connect(timeout) as sock:
            sock.sendall(raw)
            chunks = []
            with contextlib.suppress(TimeoutError, ConnectionResetError):
                while True:
                    data = sock.recv(65536)
                    if not data:
                        break
                    chunks.append(data)
            return b"".join(chunks)

    def get(self, path: str = "/", headers: str = "", timeout: float = 5.0) -> bytes:
        raw = f"GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{headers}\r\n"
        return self.request(raw.encode("latin-1"), timeout)

    def url(self, path: str = "/") -> str:
        return f"http://{self.host}:{self.port}{path}"

    def ready(self, timeout: float = 15.0, workers: int | None = None) -> Server:
        def answers() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"forkserve exited early ({self.proc.returncode}):\n{self.output}"
                )
            try:
                reply = self.get("/", timeout=2.0)
            except OSError:
                return False
            return reply.startswith(b"HTTP/1.1 ")

        wait_for(answers, timeout)
        if workers is not None:
            wait_for(lambda: len(self.workers()) == workers, timeout)
        return self

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float = 15.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self._log.close()


@pytest.fixture
def serve(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """``serve("app:obj", "-w", "2", ready=True)`` -> a started Server."""
    servers: list[Server] = []

    def start(
        app: str | None,
        *args: str,
        ready: bool = True,
        bind: str | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        workers: int | None = None,
        pass_fds: tuple[int, ...] = (),
    ) -> Server:
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = os.pathsep.join(
            [str(APPS), str(ROOT), full_env.get("PYTHONPATH", "")]
        )
        full_env.pop("WEB_CONCURRENCY", None)
        full_env.update(env or {})
        argv = list(FORKSERVE)
        if app is not None:
            argv.append(app)
        port = 0
        unix_path = None
        if bind is None:
            port = free_port()
            argv += ["-b", f"127.0.0.1:{port}"]
        elif bind.startswith("unix:"):
            unix_path = bind[5:]
            argv += ["-b", bind]
        elif bind.startswith("fd://"):
            argv += ["-b", bind]
        elif bind != "none":
            argv += ["-b", bind]
            port = int(bind.rsplit(":", 1)[1])
        argv += list(args)
        log_path = tmp_path / f"server-{len(servers)}.log"
        server = Server(argv, full_env, cwd or ROOT, log_path, pass_fds)
        server.port = port
        server.unix_path = unix_path
        servers.append(server)
        if ready:
            server.ready(workers=workers)
        return server

    yield start
    failed = getattr(request.node, "rep_call", None)
    for server in servers:
        server.stop()
        if failed is not None and failed.failed:
            print(f"--- forkserve output ({' '.join(server.args)}) ---\n{server.output}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
