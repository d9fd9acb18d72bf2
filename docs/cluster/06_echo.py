"""worker.send(): the worker echoes back every message from the primary."""

from forkserve import cluster

if cluster.is_primary:
    worker = cluster.fork()
    worker.send("hi there")

    def on_message(msg, handle):
        print(f"primary got back: {msg}")
        worker.disconnect()  # end the example

    worker.on("message", on_message)

elif cluster.is_worker:
    cluster.worker.on("message", lambda msg, handle: cluster.worker.send(msg))

cluster.run()
