"""WORKERS workers with blocking accept loops answer their id (round-robin fairness)."""

import os

from _common import out, start

from forkserve import cluster

WORKERS = int(os.environ.get("WORKERS", "4"))


def worker_main():
    listener = cluster.listen(("127.0.0.1", 0))
    reply = f"{cluster.worker.id}".encode()
    while True:
        try:
            conn, _addr = listener.accept()
        except OSError:
            return
        with conn:
            conn.sendall(reply)


def primary_main():
    seen = set()

    def on_listening(worker, address):
        seen.add(worker.id)
        if len(seen) == WORKERS:
            out("ready", address["port"])

    cluster.on("listening", on_listening)
    for _ in range(WORKERS):
        cluster.fork()
    cluster.run()


start(worker_main, primary_main)
