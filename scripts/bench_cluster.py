#!/usr/bin/env python3
"""Benchmark of the cluster core: worker start-up and the round-robin hand-off.

(a) time from ``cluster.fork()`` to ``'online'`` for both start methods
    (ExecStarter: a fresh interpreter; ForkStarter: ``os.fork()``), one worker
    at a time, median and p90;
(b) SCHED_RR against SCHED_NONE in the same run: 2 workers that write one byte
    and close; a bounded client loop (N concurrent connectors over loopback)
    measures connections/s and the latency connect -> first byte.

Loopback only and bounded in time; every server runs in its own session and
is killed by process group. Usage::

    python scripts/bench_cluster.py            # 50 starts per method, 3 s per policy
    python scripts/bench_cluster.py --quick    # 10 starts, 1 s per policy
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# -- server side (this script, run with --serve) ------------------------------


def emit(tag: str, value: object) -> None:
    os.write(1, (json.dumps([tag, value]) + "\n").encode())


def serve_online(starter: str, count: int) -> None:
    from forkserve import cluster

    if cluster.is_worker:
        return
    if starter == "fork":
        cluster.primary.starter = cluster.ForkStarter(lambda: 0)
    samples: list[float] = []
    started = {"at": 0.0}

    def fork_one() -> None:
        started["at"] = time.perf_counter()
        cluster.fork()

    def on_online(worker: object) -> None:
        samples.append(time.perf_counter() - started["at"])

    def on_exit(worker: object, code: object, sig: object) -> None:
        if len(samples) < count:
            fork_one()

    cluster.on("online", on_online)
    cluster.on("exit", on_exit)
    fork_one()
    cluster.run()
    emit("online", samples)


def serve_handoff(workers: int) -> None:
    from forkserve import cluster

    def worker_main() -> int:
        listener = cluster.listen(("127.0.0.1", 0))
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return 0
            try:
                conn.send(b"x")
            except OSError:
                pass
            conn.close()

    if cluster.is_worker:
        worker_main()
        return
    cluster.primary.starter = cluster.ForkStarter(worker_main)
    ready: set[int] = set()

    def on_listening(worker: object, address: dict) -> None:
        ready.add(id(worker))
        if len(ready) == workers:
            emit("ready", address["port"])

    cluster.on("listening", on_listening)
    for _ in range(workers):
        cluster.fork()
    cluster.run()


# -- client side ----------------------------------------------------------------


class Server:
    """A --serve child in its own session; killed with its group on exit."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("FORKSERVE_")}
        full_env["PYTHONPATH"] = str(ROOT)
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", *args],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=full_env,
            start_new_session=True,
        )

    def read(self, tag: str, timeout: float) -> object:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        os.set_blocking(fd, False)
        buf = b""
        while time.monotonic() < deadline:
            import select

            ready, _, _ = select.select([fd], [], [], 0.2)
            if not ready:
                continue
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record[0] == tag:
                    return record[1]
        raise TimeoutError(f"server did not report {tag!r} within {timeout}s")

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def measure_online(starter: str, count: int) -> list[float]:
    with Server(["online", starter, str(count)]) as server:
        samples = server.read("online", timeout=30 + count * 2)
    assert isinstance(samples, list)
    return samples


def measure_handoff(policy: str, seconds: float, connectors: int) -> dict[str, float]:
    with Server(["handoff", "2"], env={"FORKSERVE_SCHED_POLICY": policy}) as server:
        port = server.read("ready", timeout=30)
        assert isinstance(port, int)
        latencies: list[list[float]] = [[] for _ in range(connectors)]
        errors = [0] * connectors
        stop = time.monotonic() + seconds

        def connector(slot: int) -> None:
            mine = latencies[slot]
            while time.monotonic() < stop:
                start = time.perf_counter()
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                        if sock.recv(1) != b"x":
                            errors[slot] += 1
                            continue
                except OSError:
                    errors[slot] += 1
                    continue
                mine.append(time.perf_counter() - start)

        began = time.monotonic()
        threads = [threading.Thread(target=connector, args=(i,)) for i in range(connectors)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(seconds + 10)
        elapsed = time.monotonic() - began
    flat = [value for chunk in latencies for value in chunk]
    return {
        "connections": len(flat),
        "per_second": len(flat) / elapsed,
        "median_ms": statistics.median(flat) * 1000 if flat else float("nan"),
        "p90_ms": percentile(flat, 0.9) * 1000 if flat else float("nan"),
        "errors": sum(errors),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples, shorter runs")
    parser.add_argument("--starts", type=int, help="worker starts per method (default 50)")
    parser.add_argument("--seconds", type=float, help="client loop per policy (default 3)")
    parser.add_argument("--connectors", type=int, default=4, help="concurrent connectors")
    parser.add_argument("--serve", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.serve:
        kind, *rest = args.serve
        if kind == "online":
            serve_online(rest[0], int(rest[1]))
        else:
            serve_handoff(int(rest[0]))
        return

    starts = args.starts or (10 if args.quick else 50)
    seconds = args.seconds or (1.0 if args.quick else 3.0)
    command = " ".join(["python", "scripts/bench_cluster.py", *sys.argv[1:]])
    print(f"$ {command}")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, loopback only\n")

    print(f"(a) fork() -> 'online', {starts} starts each")
    print(f"{'start method':<14}{'median ms':>12}{'p90 ms':>12}{'min ms':>12}")
    for starter in ("exec", "fork"):
        samples = measure_online(starter, starts)
        ms = [s * 1000 for s in samples]
        print(
            f"{starter:<14}{statistics.median(ms):>12.2f}"
            f"{percentile(ms, 0.9):>12.2f}{min(ms):>12.2f}"
        )

    print(f"\n(b) hand-off to 2 workers, {args.connectors} connectors, {seconds:g} s per policy")
    print(f"{'policy':<14}{'conn/s':>12}{'median ms':>12}{'p90 ms':>12}{'errors':>10}")
    results = {}
    for policy in ("none", "rr"):
        results[policy] = row = measure_handoff(policy, seconds, args.connectors)
        print(
            f"{policy:<14}{row['per_second']:>12.0f}{row['median_ms']:>12.3f}"
            f"{row['p90_ms']:>12.3f}{row['errors']:>10d}"
        )
    added = results["rr"]["median_ms"] - results["none"]["median_ms"]
    ratio = results["rr"]["per_second"] / max(results["none"]["per_second"], 1e-9)
    print(f"\nround robin adds {added:.3f} ms per connection (median); rr/none rate = {ratio:.2f}")


if __name__ == "__main__":
    main()
