"""Counting requests in the primary from workers' messages (Node's 'message' example).

Every second the primary prints how many requests the workers reported.
"""

import asyncio
import os

from forkserve import cluster

PORT = int(os.environ.get("EXAMPLE_PORT", "8000"))
WORKERS = int(os.environ.get("EXAMPLE_WORKERS", "0")) or cluster.available_parallelism()

if cluster.is_primary:
    # Keep track of http requests
    num_reqs = 0

    async def report():
        while True:
            await asyncio.sleep(1)
            print(f"numReqs = {num_reqs}", flush=True)

    cluster.loop.create_task(report())

    # Count requests
    def message_handler(msg, handle):
        global num_reqs
        if isinstance(msg, dict) and msg.get("cmd") == "notifyRequest":
            num_reqs += 1

    # Start workers and listen for messages containing notifyRequest
    for _ in range(WORKERS):
        cluster.fork()

    for worker in cluster.workers.values():
        worker.on("message", message_handler)

else:
    # Worker processes have a http server.
    async def handle(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nhello world\n")
        await writer.drain()
        writer.close()

        # Notify primary about the request
        cluster.worker.send({"cmd": "notifyRequest"})

    cluster.listen(PORT).serve(handle)

cluster.run()
