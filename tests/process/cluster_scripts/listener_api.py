"""The Listener API in phases: blocking accept(), fileno() with selectors,
accept_async(), serve(), then cluster.run() in the worker and
cluster.disconnect(callback) in the primary.

The worker tells the primary (a user message) when each phase listens; the
primary prints it, and the test connects.
"""

import os
import selectors

from _common import out, start

from forkserve import cluster


def worker_main():
    me = cluster.worker
    pokes = []
    me.on("message", lambda msg, handle: pokes.append(msg))

    # Phase 1: a sync worker, blocking accept().
    first = cluster.listen(("127.0.0.1", 0))
    me.send({"phase": "blocking", "port": first.address["port"], "mode": first.mode})
    for _ in range(2):
        conn, _addr = first.accept()
        conn.sendall(b"blocking")
        conn.close()
    first.close()
    out("w-closed", first.closed, first.fileno())

    # Phase 2: fileno() in a selector; a channel message wakes it too.
    second = cluster.listen(("127.0.0.1", 0))
    second.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(second, selectors.EVENT_READ)
    me.send({"phase": "selectors-poke"})
    served = 0
    announced = False
    while served < 2:
        events = sel.select(10)
        if not events:
            out("w-select-timeout")
            break
        try:
            conn, _addr = second.accept()
        except BlockingIOError:
            out("w-blocking-io-error", list(pokes))
            if not announced:
                announced = True
                me.send({"phase": "selectors", "port": second.address["port"]})
            continue
        conn.sendall(b"selectors")
        conn.close()
        served += 1
    sel.close()
    second.close()

    # Phase 3: asyncio on the cluster loop, then cluster.run() until disconnected.
    third = cluster.listen(("127.0.0.1", 0))
    fourth = cluster.listen(("127.0.0.1", 0))

    async def take_two():
        for _ in range(2):
            conn, _addr = await third.accept_async()
            conn.sendall(b"async")
            conn.close()
        third.close()

    count = {"served": 0}

    async def handle(reader, writer):
        writer.write(b"serve")
        await writer.drain()
        writer.close()
        count["served"] += 1
        if count["served"] == 2:
            me.send({"phase": "served"})

    cluster.loop.create_task(take_two())
    fourth.serve(handle)
    me.send({"phase": "async", "port": third.address["port"], "serve": fourth.address["port"]})
    cluster.run()
    out("w-run-returned", me.is_connected(), fourth.closed, os.getpid() == me.process.pid)


def primary_main():
    def on_message(worker, msg, handle):
        out("phase", msg)
        if msg["phase"] == "selectors-poke":
            worker.send("poke")
        elif msg["phase"] == "served":
            cluster.disconnect(lambda: out("p-disconnect-callback", len(cluster.workers)))

    cluster.on("message", on_message)
    cluster.on("exit", lambda worker, code, signal: out("p-exit", code, signal))
    cluster.fork()
    cluster.run()
    out("p-run-returned")


start(worker_main, primary_main)
