"""The primary closes the real socket when the last worker closes its listener."""

import socket

from _common import out, start

from forkserve import cluster


def worker_main():
    listener = cluster.listen(("127.0.0.1", 0))

    def on_message(msg, handle):
        if msg == "close":
            listener.close()
            cluster.worker.send("closed")
        elif msg == "bye":
            cluster.worker.disconnect()

    cluster.worker.on("message", on_message)


def probe(port):
    with socket.socket() as client:
        client.settimeout(2)
        try:
            client.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            return "refused"
        return "connected"


def primary_main():
    state = {"port": None, "closed": 0}

    def on_listening(worker, address):
        state["port"] = address["port"]
        if len([w for w in cluster.workers.values() if str(w.state) == "listening"]) == 2:
            cluster.workers[1].send("close")

    def on_message(worker, msg, handle):
        state["closed"] += 1
        if state["closed"] == 1:
            out("after-first-close", probe(state["port"]))
            cluster.workers[2].send("close")
        else:
            out("after-last-close", probe(state["port"]))
            out("handles-left", len(cluster.primary.handles))
            for w in list(cluster.workers.values()):
                w.send("bye")

    cluster.on("listening", on_listening)
    cluster.on("message", on_message)
    cluster.fork()
    cluster.fork()
    cluster.run()


start(worker_main, primary_main)
