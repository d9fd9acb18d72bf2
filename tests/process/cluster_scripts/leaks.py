"""CYCLES fork/exit cycles (CONCURRENCY at a time): descriptors and children come back.

Each worker takes a shared listener (a handle in the primary), sends one
message and disconnects.
"""

import os

from _common import out, start

from forkserve import cluster

CYCLES = int(os.environ.get("CYCLES", "200"))
CONCURRENCY = int(os.environ.get("CONCURRENCY", "2"))
WARMUP = 4


def open_fds():
    return sorted(int(fd) for fd in os.listdir("/proc/self/fd"))


def children():
    pid = os.getpid()
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found.extend(int(p) for p in f.read().split())
    return found


def worker_main():
    listener = cluster.listen(("127.0.0.1", 0))
    cluster.worker.send({"id": cluster.worker.id})
    listener.close()
    cluster.worker.disconnect()


def primary_main():
    state = {"forked": 0, "exited": 0, "baseline": None, "messages": 0}

    def fork_one():
        state["forked"] += 1
        cluster.fork()

    def on_exit(worker, code, signal):
        state["exited"] += 1
        if code != 0:
            out("bad-exit", worker.id, code, signal)
        in_flight = state["forked"] - state["exited"]
        if state["baseline"] is None and in_flight == 0 and state["exited"] >= WARMUP:
            state["baseline"] = open_fds()  # warm, and nothing in flight
        limit = 1 if state["exited"] < WARMUP else CONCURRENCY
        while state["forked"] < CYCLES and state["forked"] - state["exited"] < limit:
            fork_one()

    def on_message(worker, msg, handle):
        state["messages"] += 1

    cluster.on("exit", on_exit)
    cluster.on("message", on_message)
    fork_one()
    cluster.run()
    try:
        os.waitpid(-1, os.WNOHANG)
        zombies = "unreaped children"
    except ChildProcessError:
        zombies = "none"
    out(
        "result",
        {
            "cycles": state["exited"],
            "messages": state["messages"],
            "baseline": state["baseline"],
            "after": open_fds(),
            "children": children(),
            "zombies": zombies,
            "workers": len(cluster.workers),
            "handles": len(cluster.primary.handles),
        },
    )


start(worker_main, primary_main, deadline=60)
