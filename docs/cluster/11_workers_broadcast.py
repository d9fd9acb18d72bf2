"""cluster.workers: send one message to every worker."""

from forkserve import cluster

if cluster.is_primary:
    for _ in range(2):
        cluster.fork()

    for worker in cluster.workers.values():
        worker.send("big announcement to all workers")
else:

    def on_message(msg, handle):
        print(f"worker {cluster.worker.id} got: {msg}", flush=True)
        cluster.worker.disconnect()

    cluster.worker.on("message", on_message)

cluster.run()
