"""The 'exec' setting's script: reports how it was started."""

import os
import sys

from _common import out

from forkserve import cluster

out(
    "exec-worker",
    {
        "id": cluster.worker.id,
        "name": __name__,
        "argv": sys.argv,
        "utf8": sys.flags.utf8_mode,
        "optimize": sys.flags.optimize,
        "cwd": os.getcwd(),
    },
)
