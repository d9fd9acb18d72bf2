"""Workers of a primary that dies: one idle on its loop, one blocked in accept()."""

import os

from _common import out, start

from forkserve import cluster


def worker_main():
    if cluster.worker.id == 1:
        cluster.worker.on("message", lambda msg, handle: None)
        return
    listener = cluster.listen(("127.0.0.1", 0))
    out("blocking-accept", cluster.worker.id)
    while True:
        conn, _ = listener.accept()
        conn.close()


def primary_main():
    ready = set()

    def mark(worker, *_):
        ready.add(worker.id)
        if ready == {1, 2}:
            out("pids", [w.process.pid for w in cluster.workers.values()], os.getpid())

    cluster.fork().on("online", lambda: None)
    cluster.fork()
    cluster.on("online", lambda worker: worker.id == 1 and mark(worker))
    cluster.on("listening", mark)
    cluster.run()


start(worker_main, primary_main)
