"""Worker ids: unique, from 1, never reused; is_dead/is_connected; cluster.workers."""

from _common import out, start

from forkserve import cluster


def worker_main():
    cluster.worker.on("message", lambda msg, handle: None)  # stay until disconnected


def primary_main():
    first = cluster.fork()
    second = cluster.fork()
    out("initial", sorted(cluster.workers), first.is_dead(), first.is_connected())
    pids = {first.process.pid, second.process.pid}
    online = []

    def on_online(worker):
        online.append(worker.id)
        if sorted(online) == [1, 2]:
            first.kill("SIGKILL")

    def on_exit(worker, code, signal):
        out("exit", worker.id, code, signal, worker.is_dead(), worker.is_connected())
        if worker.id == 1:
            third = cluster.fork()
            pids.add(third.process.pid)
            out("replacement", third.id, sorted(cluster.workers))
        elif worker.id == 3:
            out("pids-unique", len(pids) == 3)

    def on_online_third(worker):
        if worker.id == 3:
            cluster.disconnect(lambda: out("disconnect-callback", sorted(cluster.workers)))

    cluster.on("online", on_online)
    cluster.on("online", on_online_third)
    cluster.on("exit", on_exit)
    cluster.run()
    out("done", sorted(cluster.workers))


start(worker_main, primary_main)
