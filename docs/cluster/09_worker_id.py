"""cluster.worker: who am I?"""

from forkserve import cluster

if cluster.is_primary:
    print("I am primary", flush=True)
    cluster.fork()
    cluster.fork()
elif cluster.is_worker:
    print(f"I am worker #{cluster.worker.id}", flush=True)

cluster.run()
