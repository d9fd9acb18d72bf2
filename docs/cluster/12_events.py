"""The small event examples of the Node document, together.

'online', 'listening', 'disconnect' on a Worker and on the cluster, and an
'exit' handler that restarts a worker (once, to keep the example finite).
"""

import os

from forkserve import cluster

PORT = int(os.environ.get("EXAMPLE_PORT", "8000"))

if cluster.is_primary:
    restarted = []

    worker = cluster.fork()
    worker.on("online", lambda: print("Worker is online"))
    worker.on("listening", lambda address: print("Worker is listening"))
    worker.on("disconnect", lambda: print("Worker has disconnected"))

    cluster.on("online", lambda w: print("Yay, the worker responded after it was forked"))
    cluster.on(
        "listening",
        lambda w, address: print(
            f"A worker is now connected to {address['address']}:{address['port']}"
        ),
    )
    cluster.on("disconnect", lambda w: print(f"The worker #{w.id} has disconnected"))

    def on_exit(w, code, signal):
        print(f"worker {w.process.pid} died ({signal or code}). restarting...")
        if not restarted:
            restarted.append(cluster.fork())

    cluster.on("exit", on_exit)
    # End each worker once it listens; the restarted one ends the example.
    cluster.on("listening", lambda w, address: w.disconnect())
else:
    cluster.listen(("127.0.0.1", PORT))

cluster.run()
