"""Roles, fork(env), settings and 'setup', primary-only calls in a worker."""

import os
import sys

from _common import out, start

from forkserve import cluster


def try_call(name, fn):
    try:
        fn()
    except RuntimeError as exc:
        out("refused", name, str(exc))
    else:
        out("allowed", name)


def worker_main():
    w = cluster.worker
    out(
        "worker-role",
        {
            "is_primary": cluster.is_primary,
            "is_worker": cluster.is_worker,
            "is_master": cluster.is_master,
            "id": w.id,
            "pid_ok": w.process.pid == os.getpid(),
            "workers": cluster.workers,
            "id_env": os.environ.get("FORKSERVE_WORKER_ID"),
            "extra": os.environ.get("EXTRA_VAR"),
            "number": os.environ.get("NUMBER_VAR"),
            "state": str(w.state),
            "connected": w.is_connected(),
            "dead": w.is_dead(),
        },
    )
    try_call("fork", lambda: cluster.fork())
    try_call("setup_primary", lambda: cluster.setup_primary(silent=True))
    try_call("setup_master", lambda: cluster.setup_master())
    try_call("disconnect", lambda: cluster.disconnect())


def primary_main():
    out(
        "primary-role",
        {
            "is_primary": cluster.is_primary,
            "is_worker": cluster.is_worker,
            "is_master": cluster.is_master,
            "worker": cluster.worker,
            "workers": len(cluster.workers),
            "settings": dict(cluster.settings),
            "policy": cluster.scheduling_policy,
            "sched": [cluster.SCHED_NONE, cluster.SCHED_RR],
            "cpus": cluster.available_parallelism(),
        },
    )
    order = []
    cluster.on("setup", lambda settings: order.append(("setup", dict(settings))))
    cluster.on("fork", lambda worker: order.append(("fork", worker.id)))
    try:
        cluster.setup_primary(bogus=1)
    except TypeError as exc:
        out("unknown-setting", str(exc))
    cluster.setup_primary(args=["one"], windows_hide=True)
    order.append(("returned", "setup_primary"))
    out("settings-1", dict(cluster.settings))
    cluster.setup_master(args=["two"], silent=False)
    out("settings-2", dict(cluster.settings))
    w1 = cluster.fork({"EXTRA_VAR": "from-env", "NUMBER_VAR": 42})
    order.append(("returned", "fork"))
    out("fork-returned", w1.id, w1.id in cluster.workers, str(w1.state))

    def on_exit(worker, code, signal):
        out("exit", worker.id, code, signal)
        out("order", order)

    cluster.on("exit", on_exit)
    cluster.run()
    out("primary-done", len(cluster.workers))


start(worker_main, primary_main)
sys.exit(0)
