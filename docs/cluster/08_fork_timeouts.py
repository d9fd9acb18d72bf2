"""The 'fork' event: a timeout per worker, cleared once it listens."""

import os

from forkserve import cluster

PORT = int(os.environ.get("EXAMPLE_PORT", "8000"))

if cluster.is_primary:
    timeouts = {}

    def error_msg():
        print("Something must be wrong with the connection ...", flush=True)

    def on_fork(worker):
        timeouts[worker.id] = cluster.loop.call_later(2, error_msg)

    def on_listening(worker, address):
        timeouts[worker.id].cancel()
        print(f"worker {worker.id} is listening on port {address['port']}", flush=True)
        worker.disconnect()  # end the example

    def on_exit(worker, code, signal):
        timeouts[worker.id].cancel()
        error_msg()

    cluster.on("fork", on_fork)
    cluster.on("listening", on_listening)
    cluster.on("exit", on_exit)
    cluster.fork()
else:
    cluster.listen(("127.0.0.1", PORT))

cluster.run()
