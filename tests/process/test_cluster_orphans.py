"""No orphans: SIGKILL the primary and every worker exits within 2 s."""

from __future__ import annotations

import os
import signal

import pytest
from cluster_helpers import STARTERS, Running, pid_gone, wait_until


@pytest.mark.parametrize("starter", STARTERS)
def test_workers_exit_when_primary_is_killed(starter):
    with Running("orphans.py", starter=starter) as run:
        run.wait_tag("blocking-accept")
        (pids, primary_pid) = run.wait_tag("pids")[0]
        assert len(pids) == 2
        assert primary_pid == run.proc.pid
        assert not any(pid_gone(pid) for pid in pids)
        os.kill(primary_pid, signal.SIGKILL)
        run.proc.wait(timeout=5)
        gone = wait_until(lambda: all(pid_gone(pid) for pid in pids), timeout=2.0)
        alive = [pid for pid in pids if not pid_gone(pid)]
        assert gone, f"workers still running 2 s after the primary died: {alive}"
