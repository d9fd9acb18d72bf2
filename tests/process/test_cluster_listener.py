"""The Listener API in a worker: blocking accept(), fileno() with selectors,
accept_async(), serve(), close(); cluster.run() in both roles and
cluster.disconnect(callback)."""

from __future__ import annotations

import pytest
from cluster_helpers import STARTERS, Running, request

POLICIES = ["rr", "none"]


@pytest.mark.parametrize("starter", STARTERS)
@pytest.mark.parametrize("policy", POLICIES)
def test_listener_phases(policy, starter):
    env = {"FORKSERVE_SCHED_POLICY": policy}
    with Running("listener_api.py", starter=starter, env=env) as run:

        def phase(name):
            def found(records):
                for r in records:
                    if r[0] == "phase" and r[1]["phase"] == name:
                        return r[1]
                return None

            return run.wait_for(found, timeout=10, what=f"phase {name}")

        blocking = phase("blocking")
        assert blocking["mode"] == ("rr" if policy == "rr" else "shared")
        target = ("127.0.0.1", blocking["port"])
        assert [request(target) for _ in range(2)] == [b"blocking"] * 2
        assert run.wait_tag("w-closed")[0] == [True, -1]

        # A channel message makes fileno() readable; accept() then raises BlockingIOError.
        selected = phase("selectors")
        wake = run.wait_tag("w-blocking-io-error")[0]
        assert wake == [["poke"]]  # the message handler ran before accept() gave up
        target = ("127.0.0.1", selected["port"])
        assert [request(target) for _ in range(2)] == [b"selectors"] * 2

        asynchronous = phase("async")
        assert [request(("127.0.0.1", asynchronous["port"])) for _ in range(2)] == [b"async"] * 2
        assert [request(("127.0.0.1", asynchronous["serve"])) for _ in range(2)] == [b"serve"] * 2

        # The primary calls cluster.disconnect(callback): the worker's cluster.run()
        # returns once disconnected, the primary's once no worker is alive.
        assert run.wait_tag("w-run-returned")[0] == [False, True, True]
        assert run.wait_tag("p-disconnect-callback")[0] == [0]
        assert run.wait_tag("p-exit")[0] == [0, None]
        run.wait_tag("p-run-returned")
        assert run.wait_exit(10) == 0
        assert not [r for r in run.records if r[0] == "w-select-timeout"]
