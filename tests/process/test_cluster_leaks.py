"""No leaks: after many fork/exit cycles the primary's descriptors and children are
back where they started and nothing is left unreaped.

ForkStarter runs 200 cycles. ExecStarter starts a fresh interpreter per worker
(a few hundred ms of CPU each on a 2-core machine), so it runs 50 cycles, three
at a time, to keep the suite fast. Each worker takes a shared listener (a handle
in the primary), sends a message and disconnects.
"""

from __future__ import annotations

import pytest
from cluster_helpers import run_script


@pytest.mark.parametrize("starter, cycles, concurrency", [("fork", 200, 2), ("exec", 50, 3)])
def test_fork_exit_cycles_leave_nothing_behind(starter, cycles, concurrency):
    result = run_script(
        "leaks.py",
        starter=starter,
        env={"CYCLES": str(cycles), "CONCURRENCY": str(concurrency)},
        timeout=80,
    )
    assert result.returncode == 0, result
    assert not result.tagged("bad-exit"), result
    info = result.one("result")
    assert info["cycles"] == cycles
    assert info["messages"] == cycles
    assert info["baseline"] is not None
    assert info["after"] == info["baseline"], "descriptors leaked"
    assert info["children"] == []
    assert info["zombies"] == "none"
    assert info["workers"] == 0 and info["handles"] == 0
