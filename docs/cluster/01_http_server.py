"""Node's first cluster example: workers share port 8000, each an HTTP server.

Run: python docs/cluster/01_http_server.py   (EXAMPLE_PORT / EXAMPLE_WORKERS to change)
"""

import os

from forkserve import cluster

PORT = int(os.environ.get("EXAMPLE_PORT", "8000"))
WORKERS = int(os.environ.get("EXAMPLE_WORKERS", "0")) or cluster.available_parallelism()

if cluster.is_primary:
    print(f"Primary {os.getpid()} is running", flush=True)

    # Fork workers.
    for _ in range(WORKERS):
        cluster.fork()

    cluster.on("exit", lambda worker, code, signal: print(f"worker {worker.process.pid} died"))
else:
    # Workers can share any TCP connection.
    # In this case it is an HTTP server.
    async def hello(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nhello world\n")
        await writer.drain()
        writer.close()

    cluster.listen(PORT).serve(hello)

    print(f"Worker {os.getpid()} started", flush=True)

cluster.run()
