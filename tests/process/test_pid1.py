"""forkserve as a container's entrypoint: PID 1 of a fresh PID namespace."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import APPS, ROOT, answers_200, children_of, free_port, http_get, wait_for


def get(port: int, path: str) -> bytes:
    return http_get("127.0.0.1", port, path).partition(b"\r\n\r\n")[2]


@pytest.mark.skipif(os.getuid() != 0 or shutil.which("unshare") is None, reason="needs root")
def test_pid1_reaps_orphans_and_stops_gracefully_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=f"{APPS}{os.pathsep}{ROOT}")
    env.pop("WEB_CONCURRENCY", None)
    argv = ["unshare", "--fork", "--pid", "--mount-proc", "--kill-child",
            sys.executable, "-m", "forkserve", "wsgi_apps:app", "-w", "1",
            "-b", f"127.0.0.1:{port}"]  # fmt: skip
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        wait_for(lambda: answers_200("127.0.0.1", port), 20)
        assert get(port, "/zombies") == b"0"
        for _ in range(3):
            assert get(port, "/orphan") == b"orphaned"
        time.sleep(0.5)  # the orphans' sleep ends; their SIGCHLD goes to PID 1
        wait_for(lambda: get(port, "/zombies") == b"0", 5)
        (primary,) = children_of(proc.pid)  # forkserve, seen from outside the namespace
        os.kill(primary, signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()
        assert "graceful stop" in log.read_text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
