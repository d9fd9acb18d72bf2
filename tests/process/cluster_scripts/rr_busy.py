"""Two sync workers; a 'slow' request keeps its worker busy for SLOW seconds.

CREDITS: connections each worker may hold handed over and not yet taken."""

import os
import time

from _common import out, start

from forkserve import cluster

SLOW = float(os.environ.get("SLOW", "1.5"))
CREDITS = int(os.environ.get("CREDITS", "1"))


def worker_main():
    listener = cluster.listen(("127.0.0.1", 0), credits=CREDITS)
    reply = f"{cluster.worker.id}".encode()
    while True:
        conn, _addr = listener.accept()
        with conn:
            conn.settimeout(5)
            line = conn.recv(16)
            if line.startswith(b"slow"):
                out("w-slow", cluster.worker.id)
                time.sleep(SLOW)  # a sync handler holding its connection
            conn.sendall(reply)


def primary_main():
    seen = set()

    def on_listening(worker, address):
        seen.add(worker.id)
        if len(seen) == 2:
            out("ready", address["port"])

    cluster.on("listening", on_listening)
    cluster.fork()
    cluster.fork()
    cluster.run()


start(worker_main, primary_main)
