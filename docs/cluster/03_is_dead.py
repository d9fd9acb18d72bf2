"""worker.is_dead(): each worker answers one request, then kills itself."""

import os
import signal

from forkserve import cluster

PORT = int(os.environ.get("EXAMPLE_PORT", "8000"))
WORKERS = int(os.environ.get("EXAMPLE_WORKERS", "0")) or cluster.available_parallelism()

if cluster.is_primary:
    print(f"Primary {os.getpid()} is running", flush=True)

    # Fork workers.
    for _ in range(WORKERS):
        cluster.fork()

    cluster.on("fork", lambda worker: print("worker is dead:", worker.is_dead(), flush=True))
    cluster.on(
        "exit", lambda worker, code, signal: print("worker is dead:", worker.is_dead(), flush=True)
    )
else:
    # Workers can share any TCP connection. In this case, it is an HTTP server.
    async def handle(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        body = f"Current process\n {os.getpid()}".encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()
        os.kill(os.getpid(), signal.SIGTERM)

    cluster.listen(PORT).serve(handle)

cluster.run()
