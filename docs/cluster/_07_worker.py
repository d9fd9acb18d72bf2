"""The worker script of 07_setup_primary.py (run by it, not on its own)."""

import sys

from forkserve import cluster

print(f"worker {cluster.worker.id} started with {' '.join(sys.argv[1:])}", flush=True)
