#!/usr/bin/env python3
"""CPU time per request of forkserve's primary and workers, two source trees side by side.

Throughput on a small shared machine is noisy; CPU time per request is much
less so. This starts forkserve from each tree in turn (interleaved, rounds
alternating the order), drives it with ``wrk`` over loopback, and reads the
processes' utime+stime from ``/proc``: the primary's per connection or
request, the workers' summed per request. Medians over rounds.

    python scripts/cpu_per_request.py --old /tmp/forkserve-old -- -k sync --sched rr
    python scripts/cpu_per_request.py --workloads keepalive -- -k asgi

``--old`` is a second checkout (``git worktree add /tmp/forkserve-old <rev>``);
without it only this tree is measured. Everything after ``--`` goes to
forkserve. Loopback only; every server runs in its own session and is
stopped by its process group.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as fh:
            out.extend(int(x) for x in fh.read().split())
    return out


def measure(tree: Path, args: argparse.Namespace, workload: str) -> tuple[float, float, float]:
    """(primary µs per request, workers µs per request, req/s) for one run."""
    port = free_port()
    asgi = "asgi" in args.forkserve
    app = args.app or ("hello_asgi:app" if asgi else "hello_wsgi:app")
    env = dict(os.environ, PYTHONPATH=f"{tree}{os.pathsep}{tree / 'scripts' / 'bench_apps'}")
    argv = [sys.executable, "-m", "forkserve", app, "-w", str(args.workers)]
    argv += ["-b", f"127.0.0.1:{port}", "--log-level", "warning", *args.forkserve]
    proc = subprocess.Popen(
        argv, cwd=tree, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit(f"forkserve from {tree} did not start") from None
                time.sleep(0.05)
        time.sleep(0.5)
        workers = children(proc.pid)
        primary0 = cpu_seconds(proc.pid)
        workers0 = sum(cpu_seconds(pid) for pid in workers)
        cmd = ["wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s"]
        if workload == "close":
            cmd += ["-H", "Connection: close"]
        cmd.append(f"http://127.0.0.1:{port}/")
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.duration + 30).stdout
        found = re.search(r"(\d+) requests in", out)
        rate = re.search(r"Requests/sec:\s+(\S+)", out)
        if not found or not rate or int(found.group(1)) == 0:
            raise SystemExit(f"wrk measured nothing:\n{out}")
        total = int(found.group(1))
        primary = (cpu_seconds(proc.pid) - primary0) / total * 1e6
        spent = sum(cpu_seconds(pid) for pid in workers) - workers0
        return primary, spent / total * 1e6, float(rate.group(1))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def main(argv: list[str]) -> int:
    if "--" in argv:
        split = argv.index("--")
        argv, forkserve = argv[:split], argv[split + 1 :]
    else:
        forkserve = []
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, help="a second checkout to compare with")
    parser.add_argument("--app", help="app (default: scripts/bench_apps hello)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=int, default=4, help="seconds per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workloads", default="keepalive,close")
    args = parser.parse_args(argv)
    args.forkserve = forkserve
    trees = {"this": ROOT}
    if args.old is not None:
        trees["old"] = args.old.resolve()
    workloads = args.workloads.split(",")
    runs: dict[tuple[str, str], list[tuple[float, float, float]]] = {
        (name, w): [] for name in trees for w in workloads
    }
    for rnd in range(args.rounds):
        names = list(trees) if rnd % 2 == 0 else list(reversed(trees))
        for workload in workloads:
            for name in names:
                runs[(name, workload)].append(measure(trees[name], args, workload))
                print(f"round {rnd + 1} {workload} {name}: done", file=sys.stderr)
    print(f"forkserve {' '.join(forkserve)} -w {args.workers}, wrk -c{args.connections}, "
          f"{args.rounds} rounds of {args.duration}s, medians")  # fmt: skip
    print("| tree | workload | primary µs/req | workers µs/req | req/s |")
    print("|---|---|--:|--:|--:|")
    for workload in workloads:
        for name in trees:
            rows = runs[(name, workload)]
            primary, workers, rate = (statistics.median(r[i] for r in rows) for i in range(3))
            print(f"| {name} | {workload} | {primary:.1f} | {workers:.1f} | {rate:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
