#!/usr/bin/env python3
"""Worker CPU time per request: forkserve trees (or gunicorn) side by side.

Throughput on a shared machine moves with whatever else runs; the CPU a
worker spends per request moves much less. Each run starts one server with
one worker, drives it with wrk for ``--duration`` seconds, and divides the
worker processes' user and system time (``/proc/<pid>/task/*/stat``, every
thread) by the requests served. Servers are interleaved (the order flips
every round) and the table shows medians.

A server is ``NAME=SPEC``:

- ``fs:TREE[:ARGS]``: ``forkserve`` from the checkout at TREE (for example a
  ``git worktree`` of an older commit) with extra ARGS (``-k threaded``);
- ``gunicorn:sync`` or ``gunicorn:gthread``: gunicorn from ``.bench/venv``
  (``scripts/bench.py`` creates it), ``--threads 4`` for gthread;
- ``uvicorn``: uvicorn from ``.bench/venv`` with httptools and uvloop,
  ``--workers`` as given (with one worker uvicorn serves in its own
  process, which is then the one measured).

ASGI servers (``uvicorn``, and ``fs`` specs whose ARGS hold ``-k asgi``)
serve ``hello_asgi:app``, the others ``hello_wsgi:app``.

``--phases`` runs forkserve specs with the worker's request path wrapped in
``time.thread_time()`` probes and prints the CPU per request of each phase
(accept, read and parse, environ, app, response head, send, close, ...).
The probes cost about 1 µs each, so the phase total is above the plain one.

Loopback only, bounded in time; each server runs in its own session and is
stopped by process group. Usage::

    git worktree add /tmp/fs-old HEAD~3
    python scripts/bench_cpu.py old=fs:/tmp/fs-old new=fs:. --rounds 5
    python scripts/bench_cpu.py new=fs:.:"-k threaded" gthread=gunicorn:gthread
    python scripts/bench_cpu.py new=fs:. --phases --workloads close
    python scripts/bench_cpu.py new=fs:.:"-k asgi" uv=uvicorn --workers 2 --connections 64
    python scripts/bench_cpu.py old=fs:/tmp/fs-old:"--sched rr" new=fs:.:"--sched rr" \
        --workers 2 --connections 64

The primary's CPU per request (the arbiter's, for gunicorn) is shown beside
the workers': under ``--sched rr`` every connection passes through it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
APP = "hello_wsgi:app"
ASGI_APP = "hello_asgi:app"
TICK = os.sysconf("SC_CLK_TCK")

# -- the phase probes (this script, run inside the server with --probe) --------

PHASES = (
    # (module, class, method, phase)
    ("selectors", "EpollSelector", "select", "select"),
    ("forkserve.cluster.listener", "Listener", "accept", "accept"),
    ("forkserve.workers.base", "WorkerBase", "prepare_connection", "connection setup"),
    ("forkserve.http.wsgi", "WSGIConnection", "__init__", "connection setup"),
    ("forkserve.http.wsgi", "WSGIConnection", "_read_head", "recv + parse head"),
    ("forkserve.http.wsgi", "WSGIConnection", "_environ", "environ"),
    ("forkserve.scoreboard", "Slot", "begin", "scoreboard"),
    ("forkserve.scoreboard", "Slot", "end", "scoreboard"),
    ("forkserve.http.wsgi", "WSGIConnection", "_make_head", "response head"),
    ("forkserve.http.wsgi", "WSGIConnection", "_sendall", "send"),
    ("socket", "socket", "close", "close"),
)
INSIDE_REQUEST = ("recv + parse head", "environ", "scoreboard", "app", "response head", "send")


def probe_and_serve(out: str, argv: list[str]) -> None:
    """Wrap the request path in thread-CPU probes, then run forkserve's CLI."""
    import importlib

    clock = time.thread_time
    spent: dict[str, float] = {}
    state = {"requests": 0, "since": 0.0}

    def wrap(owner: Any, name: str, phase: str) -> None:
        original = getattr(owner, name)

        def probed(*args: Any, **kwargs: Any) -> Any:
            started = clock()
            try:
                return original(*args, **kwargs)
            finally:
                spent[phase] = spent.get(phase, 0.0) + clock() - started

        setattr(owner, name, probed)

    for module, cls, method, phase in PHASES:
        wrap(getattr(importlib.import_module(module), cls), method, phase)
    wsgi = importlib.import_module("forkserve.http.wsgi").WSGIConnection
    init = wsgi.__init__

    def init_probing_app(self: Any, transport: Any, app: Any, *args: Any, **kwargs: Any) -> None:
        def probed_app(environ: Any, start_response: Any) -> Any:
            started = clock()
            try:
                return app(environ, start_response)
            finally:
                spent["app"] = spent.get("app", 0.0) + clock() - started

        init(self, transport, probed_app, *args, **kwargs)

    wsgi.__init__ = init_probing_app
    handle = wsgi.handle_request

    def handle_request(self: Any) -> bool:
        started = clock()
        try:
            return bool(handle(self))
        finally:
            spent["handle_request"] = spent.get("handle_request", 0.0) + clock() - started
            state["requests"] += 1
            if state["requests"] == 200:  # warmed up: count from here
                spent.clear()
                state["since"] = clock()
            elif state["requests"] % 500 == 0:
                report = {
                    "requests": state["requests"] - 200,
                    "total": clock() - state["since"],
                    "spent": spent,
                }
                with open(f"{out}.{os.getpid()}", "w") as file:
                    json.dump(report, file)

    wsgi.handle_request = handle_request
    from forkserve.cli import main as cli_main

    sys.argv = ["forkserve", *argv]
    cli_main()


# -- the driver -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def thread_cpu(pid: int) -> tuple[int, int]:
    user = system = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/stat") as file:
            fields = file.read().rsplit(")", 1)[1].split()
        user += int(fields[11])
        system += int(fields[12])
    return user, system


def children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as file:
            found += [int(item) for item in file.read().split()]
    return found


def is_worker(pid: int) -> bool:
    """Not a helper process of multiprocessing (its resource tracker)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return b"resource_tracker" not in file.read()
    except OSError:
        return False


def command(
    spec: str, port: int, probe_out: str | None, workers: int = 1
) -> tuple[list[str], Path, dict[str, str]]:
    kind, _, rest = spec.partition(":")
    bind = f"127.0.0.1:{port}"
    env = dict(os.environ)
    if kind == "fs":
        tree_text, _, extra = rest.partition(":")
        tree = Path(tree_text).resolve()
        env["PYTHONPATH"] = f"{tree}{os.pathsep}{tree / 'scripts' / 'bench_apps'}"
        extra_args = shlex.split(extra)
        app = ASGI_APP if is_asgi(extra_args) else APP
        args = [app, "-w", str(workers), "-b", bind, "--log-level", "warning", *extra_args]
        if probe_out is not None:
            return [sys.executable, __file__, "--probe", probe_out, "--", *args], tree, env
        return [sys.executable, "-m", "forkserve", *args], tree, env
    if kind == "gunicorn":
        gunicorn = ROOT / ".bench" / "venv" / "bin" / "gunicorn"
        apps = ROOT / "scripts" / "bench_apps"
        env["PYTHONPATH"] = str(apps)
        threads = ["--threads", "4"] if rest == "gthread" else []
        argv = [str(gunicorn), "-w", str(workers), "-k", rest, *threads, "--log-level", "warning"]
        return [*argv, "-b", bind, APP], apps, env
    if kind == "uvicorn":
        uvicorn = ROOT / ".bench" / "venv" / "bin" / "uvicorn"
        apps = ROOT / "scripts" / "bench_apps"
        env["PYTHONPATH"] = str(apps)
        host, _, port_text = bind.rpartition(":")
        argv = [str(uvicorn), ASGI_APP, "--host", host, "--port", port_text]
        argv += ["--workers", str(workers), "--http", "httptools", "--loop", "uvloop"]
        return [*argv, "--no-access-log", "--log-level", "warning"], apps, env
    raise SystemExit(
        f"unknown server spec {spec!r}: use fs:TREE[:ARGS], gunicorn:sync|gthread or uvicorn"
    )


def is_asgi(args: list[str]) -> bool:
    """The forkserve arguments choose the asgi worker class."""
    for i, arg in enumerate(args):
        if arg in ("-k", "--worker-class") and args[i + 1 : i + 2] == ["asgi"]:
            return True
        if arg in ("-kasgi", "--worker-class=asgi"):
            return True
    return False


def wait_ready(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"no server on port {port}")


def run_once(
    spec: str, workload: str, options: argparse.Namespace, probe_out: str | None
) -> dict[str, Any]:
    port = free_port()
    argv, cwd, env = command(spec, port, probe_out, options.workers)
    server = subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_ready(port, time.monotonic() + 20)
        time.sleep(0.7)  # the worker finishes booting
        workers = children(server.pid)
        if spec.startswith("uvicorn") and options.workers == 1:
            workers = [server.pid]  # one worker: uvicorn serves in its own process
        workers = [pid for pid in workers if is_worker(pid)]
        before = [thread_cpu(pid) for pid in workers]
        primary_before = sum(thread_cpu(server.pid))
        wrk = ["wrk", "-t1", f"-c{options.connections}", f"-d{options.duration}s"]
        if workload == "close":
            wrk += ["-H", "Connection: close"]
        out = subprocess.run(
            [*wrk, f"http://127.0.0.1:{port}/"],
            capture_output=True,
            text=True,
            timeout=options.duration + 30,
        ).stdout
        after = [thread_cpu(pid) for pid in workers]
        primary = (sum(thread_cpu(server.pid)) - primary_before) / TICK
        if workers == [server.pid]:
            primary = 0.0
        found = re.search(r"(\d+) requests in", out)
        requests = int(found.group(1)) if found else 0
        user = sum(a[0] - b[0] for a, b in zip(after, before, strict=True)) / TICK
        system = sum(a[1] - b[1] for a, b in zip(after, before, strict=True)) / TICK
        return {
            "requests": requests,
            "user_us": user / max(requests, 1) * 1e6,
            "sys_us": system / max(requests, 1) * 1e6,
            "primary_us": primary / max(requests, 1) * 1e6,
            "rps": requests / options.duration,
            "workers": workers,
        }
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(5)


def read_phases(probe_out: str, workers: list[int]) -> dict[str, float]:
    for pid in workers:
        path = Path(f"{probe_out}.{pid}")
        if path.exists():
            report = json.loads(path.read_text())
            path.unlink()
            n = max(report["requests"], 1)
            phases = {name: value / n * 1e6 for name, value in report["spent"].items()}
            handled = phases.pop("handle_request", 0.0)
            phases["rest of the request"] = handled - sum(
                phases.get(name, 0.0) for name in INSIDE_REQUEST
            )
            total = report["total"] / n * 1e6
            outside = handled + sum(
                phases.get(name, 0.0) for name in ("select", "accept", "connection setup", "close")
            )
            phases["rest of the serve loop"] = total - outside
            phases["total (with probes)"] = total
            return phases
    return {}


def main() -> int:
    if sys.argv[1:2] == ["--probe"]:  # inside a server started by --phases
        probe_and_serve(sys.argv[2], sys.argv[4:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("servers", nargs="*", metavar="NAME=SPEC")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--workloads", default="keepalive,close")
    parser.add_argument("--phases", action="store_true", help="per-phase CPU (forkserve only)")
    options = parser.parse_args()
    if not options.servers:
        parser.error("give at least one NAME=SPEC")
    specs = dict(item.split("=", 1) for item in options.servers)
    workloads = options.workloads.split(",")
    names = list(specs)
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-cpu-") as tmp:
        for round_no in range(options.rounds):
            order = names if round_no % 2 == 0 else names[::-1]
            for workload in workloads:
                for name in order:
                    probe = f"{tmp}/phases" if options.phases else None
                    print(f"round {round_no + 1}: {name} {workload}", file=sys.stderr)
                    result = run_once(specs[name], workload, options, probe)
                    if probe is not None:
                        result["phases"] = read_phases(probe, result["workers"])
                    results.setdefault((name, workload), []).append(result)
    print(f"# {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}")
    print(
        f"# {options.workers} worker(s), wrk -t1 -c{options.connections} -d{options.duration}s, "
        f"medians of {options.rounds}"
    )
    print("| workload | server | workers CPU/request | user | sys | primary CPU/request | req/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for workload in workloads:
        for name in names:
            runs = results[(name, workload)]
            total = statistics.median(r["user_us"] + r["sys_us"] for r in runs)
            user = statistics.median(r["user_us"] for r in runs)
            system = statistics.median(r["sys_us"] for r in runs)
            rps = statistics.median(r["rps"] for r in runs)
            primary = statistics.median(r["primary_us"] for r in runs)
            print(
                f"| {workload} | {name} | {total:.0f} µs | {user:.0f} | {system:.0f} "
                f"| {primary:.0f} µs | {rps:.0f} |"
            )
    if options.phases:
        for workload in workloads:
            print(f"\n{workload}: CPU per request by phase (µs, medians)")
            print("| phase | " + " | ".join(names) + " |")
            print("|---|" + "---:|" * len(names))
            phase_names: list[str] = []
            for name in names:
                for run in results[(name, workload)]:
                    for phase in run.get("phases", {}):
                        if phase not in phase_names:
                            phase_names.append(phase)
            for phase in phase_names:
                cells = []
                for name in names:
                    values = [
                        r["phases"][phase]
                        for r in results[(name, workload)]
                        if phase in r.get("phases", {})
                    ]
                    cells.append(f"{statistics.median(values):.1f}" if values else "-")
                print(f"| {phase} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
