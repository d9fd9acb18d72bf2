"""setup_primary(): two workers of another script, with different arguments.

Settings merge, so both workers are silent (as in Node): their output goes
to pipes the primary reads.
"""

import os

from forkserve import cluster

HERE = os.path.dirname(os.path.abspath(__file__))

cluster.setup_primary(
    exec=os.path.join(HERE, "_07_worker.py"),
    args=["--use", "https"],
    silent=True,
)
cluster.fork()  # https worker
cluster.setup_primary(
    exec=os.path.join(HERE, "_07_worker.py"),
    args=["--use", "http"],
)
cluster.fork()  # http worker


def on_exit(worker, code, signal):
    said = worker.process.stdout.read().decode().strip()
    print(f"silent worker {worker.id} said: {said}")


cluster.on("exit", on_exit)
cluster.run()
