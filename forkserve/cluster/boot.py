"""Bootstrap of a worker started as a fresh interpreter (``ExecStarter``).

Sets up the worker role (which tells the primary it is online) before the
worker's script runs as ``__main__``, then serves the cluster loop until the
worker is idle, as Node runs its loop after the script. Exit statuses follow
the interpreter's: 0, the ``SystemExit`` code, or 1 after a traceback.
"""

from __future__ import annotations

import os
import runpy
import sys
import traceback


def main() -> None:
    from forkserve import cluster

    role = cluster._become_worker()
    script = sys.argv[1] if len(sys.argv) > 1 else ""
    sys.argv = sys.argv[1:]
    if not os.path.exists(script):
        print(f"forkserve worker: can't open file {script!r}: no such file", file=sys.stderr)
        raise SystemExit(2)
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    try:
        runpy.run_path(script, run_name="__main__")
    except (SystemExit, KeyboardInterrupt):
        # The interpreter reports these itself (KeyboardInterrupt: death by SIGINT).
        raise
    except BaseException:
        traceback.print_exc()
        raise SystemExit(1) from None
    raise SystemExit(role.run_to_exit())
