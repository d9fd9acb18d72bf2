"""worker.disconnect() with a timeout: kill the worker if it does not disconnect in 2 s.

The worker's server has connections that never end; on 'shutdown' it would
close them. Here nobody is connected, so the worker disconnects at once.
"""

import os

from forkserve import cluster

PORT = int(os.environ.get("EXAMPLE_PORT", "8000"))

if cluster.is_primary:
    worker = cluster.fork()
    timeout = None

    def on_listening(address):
        global timeout
        worker.send("shutdown")
        worker.disconnect()
        timeout = cluster.loop.call_later(2, worker.kill)

    def on_disconnect():
        timeout.cancel()
        print(f"worker {worker.id} disconnected in time")

    worker.on("listening", on_listening)
    worker.on("disconnect", on_disconnect)
    worker.on("exit", lambda code, signal: print(f"worker {worker.id} exited: {code} {signal}"))

elif cluster.is_worker:

    async def never_ends(reader, writer):
        await reader.read()  # Connections never end

    server = cluster.listen(PORT).serve(never_ends)

    def on_message(msg, handle):
        if msg == "shutdown":
            # Initiate graceful close of any connections to server
            print("worker: shutting down", flush=True)

    cluster.worker.on("message", on_message)

cluster.run()
