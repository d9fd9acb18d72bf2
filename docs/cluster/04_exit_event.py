"""The Worker 'exit' event: how did the worker end?"""

from forkserve import cluster

if cluster.is_primary:
    worker = cluster.fork()

    def on_exit(code, signal):
        if signal:
            print(f"worker was killed by signal: {signal}")
        elif code != 0:
            print(f"worker exited with error code: {code}")
        else:
            print("worker success!")

    worker.on("exit", on_exit)

cluster.run()
