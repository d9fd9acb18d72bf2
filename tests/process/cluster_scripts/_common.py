"""Shared by the scenario scripts: the start method and one JSON record per output line.

A scenario is ``start(worker_main, primary_main)``: the primary runs
``primary_main()``; a worker runs ``worker_main()``, either as the script
started afresh (ExecStarter) or as the function a forked child calls
(ForkStarter, chosen by ``CLUSTER_TEST_STARTER=fork``, or TemplateStarter, by
``CLUSTER_TEST_STARTER=template``).
"""

from __future__ import annotations

import json
import os
import threading

from forkserve import cluster

STARTER = os.environ.get("CLUSTER_TEST_STARTER", "exec")


def out(tag, *values):
    """Print one record as a single write, so lines of several processes never mix."""
    line = json.dumps([tag, *values], default=repr) + "\n"
    os.write(1, line.encode())


def start(worker_main, primary_main, *, deadline: float = 30.0):
    if cluster.is_primary:
        if STARTER == "fork":
            cluster.primary.starter = cluster.ForkStarter(worker_main)
        elif STARTER == "template":
            use_template(worker_main)
        watchdog(float(os.environ.get("CLUSTER_TEST_DEADLINE", deadline)))
        primary_main()
    else:
        worker_main()


def use_template(worker_main) -> None:
    """Fork workers from a template process (TemplateStarter), ready before any fork."""
    primary = cluster.primary
    starter = cluster.TemplateStarter(worker_main, loop=primary.loop)
    primary.starter = starter
    template = starter.spawn_template(primary.close_inherited)
    primary.loop.run_until_complete(template.ready())
    starter.use(template)


def watchdog(seconds: float) -> None:
    """A scenario never outlives its budget, even if the test harness is gone."""

    def fire():
        try:
            out("watchdog", seconds)  # fails if nobody reads the output any more
        except OSError:
            pass
        os.killpg(os.getpgrp(), 9)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
