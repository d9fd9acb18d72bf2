"""Each setup_primary setting, observed from the worker. MODE picks the setting."""

import os
import sys

from _common import out, start

from forkserve import cluster

MODE = os.environ.get("MODE", "")
HERE = os.path.dirname(os.path.abspath(__file__))


def worker_main():
    w = cluster.worker
    if MODE in ("silent", "stdio-ignore", "stdio-pipe", "stdio-inherit"):
        print(f"plain stdout from worker {w.id}", flush=True)
        print(f"plain stderr from worker {w.id}", file=sys.stderr, flush=True)
        return
    out(
        "worker",
        {
            "id": w.id,
            "cwd": os.getcwd(),
            "uid": os.getuid(),
            "gid": os.getgid(),
            "inspect": os.environ.get("FORKSERVE_INSPECT_PORT"),
        },
    )


def primary_main():
    if MODE == "exec":
        cluster.setup_primary(
            exec=os.path.join(HERE, "settings_worker.py"),
            args=["--use", "https"],
            exec_argv=["-X", "utf8", "-O"],
            cwd=os.environ["WORK_DIR"],
        )
        cluster.fork()
        cluster.setup_primary(args=["--use", "http"], exec_argv=[])
        cluster.fork()
    elif MODE == "cwd":
        cluster.setup_primary(cwd=os.environ["WORK_DIR"])
        cluster.fork()
    elif MODE == "silent":
        cluster.setup_primary(silent=True)
        cluster.fork()
    elif MODE.startswith("stdio-"):
        cluster.setup_primary(stdio=[MODE[6:]] * 3, silent=False)
        cluster.fork()
    elif MODE == "uid":
        uid, gid = int(os.environ["RUN_UID"]), int(os.environ["RUN_GID"])
        cluster.setup_primary(uid=uid, gid=gid)
        cluster.fork()
    elif MODE == "inspect":
        cluster.setup_primary(inspect_port=9400)
        cluster.fork()
        ports = iter([9501, 9502])
        cluster.setup_primary(inspect_port=lambda: next(ports))
        cluster.fork()
        cluster.fork()
        cluster.setup_primary(inspect_port=None)
        cluster.fork()
    else:
        raise SystemExit(f"unknown MODE {MODE!r}")

    def on_exit(worker, code, signal):
        proc = worker.process
        streams = {}
        for name in ("stdout", "stderr"):
            stream = getattr(proc, name)
            streams[name] = None if stream is None else stream.read().decode()
        out("exit", worker.id, code, signal, streams)

    cluster.on("exit", on_exit)
    cluster.run()


start(worker_main, primary_main)
