"""worker.exited_after_disconnect: a voluntary exit is not a crash."""

from forkserve import cluster

if cluster.is_primary:

    def on_exit(worker, code, signal):
        if worker.exited_after_disconnect is True:
            print("Oh, it was just voluntary \u2013 no need to worry")

    cluster.on("exit", on_exit)

    worker = cluster.fork()
    # kill worker
    worker.on("online", lambda: worker.kill())
else:
    cluster.worker.on("message", lambda msg, handle: None)  # stay until killed

cluster.run()
