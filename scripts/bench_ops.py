#!/usr/bin/env python3
"""Operations benchmark: a worker's replacement after SIGKILL, and a HUP reload.

* respawn: one sync worker; SIGKILL it; the time until a request is answered
  by a new pid (the request waits in the listen backlog meanwhile). Median
  and p90 of ``--kills`` kills per server, ``--kill-interval`` (10.5 s)
  apart: forkserve backs off from crashes that repeat within 10 s, and this
  measures a lone crash.
* reload: ``--workers`` sync workers (4); SIGHUP; the time until every old
  worker is gone and as many concurrent held requests (``/hold``, 20 ms) are
  answered by as many different new workers. Median of ``--reloads`` HUPs;
  the probe makes the resolution about 20-30 ms.

Servers: forkserve from this checkout (``python -m forkserve``), with and
without ``--preload``; gunicorn beside it, with and without ``--preload``,
when ``.bench/venv/bin/gunicorn`` exists (``scripts/bench.py`` creates that
virtualenv). Every server runs in its own process group on 127.0.0.1 and is
stopped by group; measurements are interleaved across servers; every wait
has a deadline and the whole run is bounded by ``--max-seconds``.

    .venv/bin/python scripts/bench_ops.py [--kills 20] [--reloads 10] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
APPS_DIR = REPO / "scripts" / "bench_apps"
BENCH_DIR = REPO / ".bench"
GUNICORN = BENCH_DIR / "venv" / "bin" / "gunicorn"
LOG_DIR = BENCH_DIR / "logs"
HOST = "127.0.0.1"
APP = "pid_wsgi:app"
HOLD = 0.02  # seconds a reload probe holds each worker
READY_TIMEOUT = 30.0
STEP_TIMEOUT = 30.0


class Failed(Exception):
    """A server did not start, or a measurement missed its deadline."""


class Interrupted(BaseException):
    """SIGTERM: unwind so that every server is stopped."""


# -- processes ---------------------------------------------------------------------


def children_of(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as fh:
                found.extend(int(item) for item in fh.read().split())
    return found


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def is_template(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().startswith(b"forkserve: template")
    except OSError:
        return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def get_pid(port: int, path: str = "/", timeout: float = 5.0) -> int | None:
    """The pid a worker answers with, or None on any error."""
    request = f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode()
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sock.sendall(request)
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
    except OSError:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200") or not body.strip().isdigit():
        return None
    return int(body)


@dataclass
class Spec:
    name: str
    family: str  # forkserve | gunicorn
    preload: bool

    def argv(self, port: int, workers: int) -> list[str]:
        bind = f"{HOST}:{port}"
        if self.family == "forkserve":
            cmd = [sys.executable, "-m", "forkserve", APP, "-w", str(workers), "-k", "sync"]
            cmd += ["-b", bind, "--log-level", "warning"]
        else:
            cmd = [str(GUNICORN), "-w", str(workers), "-k", "sync", "-b", bind]
            cmd += ["--log-level", "warning"]
        if self.preload:
            cmd.append("--preload")
        if self.family == "gunicorn":
            cmd.append(APP)
        return cmd

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FORKSERVE_")}
        env.pop("WEB_CONCURRENCY", None)
        env.pop("VIRTUAL_ENV", None)
        paths = [str(APPS_DIR)] + ([str(REPO)] if self.family == "forkserve" else [])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        return env


class Server:
    def __init__(self, spec: Spec, workers: int, tag: str) -> None:
        self.spec = spec
        self.workers_wanted = workers
        self.port = free_port()
        self.log_path = LOG_DIR / f"ops-{spec.name}-{tag}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Server:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.spec.argv(self.port, self.workers_wanted),
                cwd=APPS_DIR,
                env=self.spec.env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + READY_TIMEOUT
        while get_pid(self.port, timeout=1.0) is None or len(self.workers()) != self.workers_wanted:
            if self.proc.poll() is not None:
                raise Failed(
                    f"{self.spec.name} exited with {self.proc.returncode}; see {self.log_path}"
                )
            if time.monotonic() > deadline:
                raise Failed(f"{self.spec.name} not ready within {READY_TIMEOUT:.0f}s")
            time.sleep(0.05)
        return self

    def workers(self) -> list[int]:
        return [p for p in children_of(self.pid) if alive(p) and not is_template(p)]

    def settle(self, before: set[int]) -> None:
        """Wait until the pool is full again with none of ``before`` left, then a moment."""
        deadline = time.monotonic() + STEP_TIMEOUT
        while True:
            pids = self.workers()
            if len(pids) == self.workers_wanted and not set(pids) & before:
                break
            if time.monotonic() > deadline:
                raise Failed(
                    f"{self.spec.name}: the pool did not refill within {STEP_TIMEOUT:.0f}s"
                )
            time.sleep(0.01)
        time.sleep(0.3)

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


# -- measurements --------------------------------------------------------------------


def measure_respawn(server: Server) -> float:
    """SIGKILL the only worker; seconds until a new pid answers."""
    (victim,) = server.workers()
    started = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    deadline = started + STEP_TIMEOUT
    while time.monotonic() < deadline:
        pid = get_pid(server.port, timeout=max(0.1, deadline - time.monotonic()))
        if pid is not None and pid != victim:
            elapsed = time.monotonic() - started
            server.settle({victim})
            return elapsed
        time.sleep(0.001)
    raise Failed(f"{server.spec.name}: no new worker answered within {STEP_TIMEOUT:.0f}s")


def probe(server: Server, pool: ThreadPoolExecutor) -> set[int | None]:
    """Pids answering as many concurrent held requests as there are workers."""
    count = server.workers_wanted
    path = f"/hold?{HOLD}"
    return set(pool.map(lambda _: get_pid(server.port, path, timeout=5.0), range(count)))


def measure_reload(server: Server, pool: ThreadPoolExecutor) -> float:
    """SIGHUP; seconds until every old worker is gone and every new one serves."""
    old = set(server.workers())
    started = time.monotonic()
    os.kill(server.pid, signal.SIGHUP)
    deadline = started + STEP_TIMEOUT
    while time.monotonic() < deadline:
        if any(alive(pid) for pid in old):
            time.sleep(0.002)
            continue
        answered = probe(server, pool)
        if None not in answered and len(answered) == server.workers_wanted and not answered & old:
            elapsed = time.monotonic() - started
            server.settle(old)
            return elapsed
    raise Failed(f"{server.spec.name}: the reload did not complete within {STEP_TIMEOUT:.0f}s")


# -- running -----------------------------------------------------------------------------


@dataclass
class Series:
    server: str
    preload: bool
    times: list[float] = field(default_factory=list)
    error: str | None = None

    def summary(self) -> dict[str, Any]:
        ms = sorted(t * 1000.0 for t in self.times)
        median = statistics.median(ms) if ms else None
        p90 = statistics.quantiles(ms, n=10, method="inclusive")[8] if len(ms) >= 2 else None
        return {
            "server": self.server,
            "preload": self.preload,
            "runs": len(ms),
            "median_ms": median,
            "p90_ms": p90,
            "min_ms": ms[0] if ms else None,
            "max_ms": ms[-1] if ms else None,
            "times_ms": [round(v, 2) for v in ms],
            "error": self.error,
        }


def run(
    specs: list[Spec],
    workers: int,
    runs: int,
    tag: str,
    deadline: float,
    measure: Any,
    interval: float = 0.0,
) -> list[Series]:
    """Start every server, then measure round by round, interleaved, each server at
    most once per ``interval`` seconds; stop them all."""
    servers: list[Server] = []
    series = {spec.name: Series(spec.name, spec.preload) for spec in specs}
    last: dict[str, float] = {}
    try:
        for spec in specs:
            try:
                servers.append(Server(spec, workers, tag).start())
            except (Failed, OSError) as exc:
                series[spec.name].error = str(exc)
        for index in range(runs):
            for server in list(servers):
                wait = last.get(server.spec.name, 0.0) + interval - time.monotonic()
                if time.monotonic() + max(wait, 0.0) > deadline:
                    series[server.spec.name].error = "stopped at --max-seconds"
                    continue
                if wait > 0:
                    time.sleep(wait)
                last[server.spec.name] = time.monotonic()
                try:
                    series[server.spec.name].times.append(measure(server))
                except Failed as exc:
                    series[server.spec.name].error = str(exc)
                    servers.remove(server)
                    server.stop()
            log(f"  {tag}: round {index + 1}/{runs}")
    finally:
        for server in servers:
            server.stop()
    return list(series.values())


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def table(title: str, results: list[dict[str, Any]], p90: bool) -> str:
    head = "| server | preload | runs | median ms |" + (" p90 ms |" if p90 else "")
    head += " min..max ms |"
    rule = "|---|---|--:|--:|" + ("--:|" if p90 else "") + "--:|"
    lines = [title, "", head, rule]
    for row in results:
        cells = [row["server"], "yes" if row["preload"] else "no", str(row["runs"])]
        cells.append(fmt(row["median_ms"]))
        if p90:
            cells.append(fmt(row["p90_ms"]))
        cells.append(f"{fmt(row['min_ms'])}..{fmt(row['max_ms'])}")
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {row['server']}: {row['error']}" for row in results if row["error"]]
    return "\n".join(lines + (["", *notes] if notes else []))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def gunicorn_version() -> str | None:
    if not GUNICORN.exists():
        return None
    try:
        done = subprocess.run(
            [str(GUNICORN), "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (done.stdout or done.stderr).strip() or None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs per server")
    parser.add_argument(
        "--kill-interval", type=float, default=10.5, help="seconds between kills of a server"
    )
    parser.add_argument("--reloads", type=int, default=10, help="HUPs per server")
    parser.add_argument("--workers", type=int, default=4, help="workers for the reload runs")
    parser.add_argument("--max-seconds", type=float, default=900.0, help="bound of the run")
    parser.add_argument("--no-gunicorn", action="store_true", help="forkserve only")
    parser.add_argument("--json", type=Path, default=BENCH_DIR / "bench_ops.json")
    args = parser.parse_args()

    def interrupted(signum: int, frame: Any) -> None:
        raise Interrupted

    signal.signal(signal.SIGTERM, interrupted)
    specs = [Spec("forkserve", "forkserve", False), Spec("forkserve", "forkserve", True)]
    version = None if args.no_gunicorn else gunicorn_version()
    if version:
        specs += [Spec("gunicorn", "gunicorn", False), Spec("gunicorn", "gunicorn", True)]
    for spec in specs:
        spec.name = f"{spec.family}{' --preload' if spec.preload else ''}"
    deadline = time.monotonic() + args.max_seconds
    log(f"respawn: {args.kills} kills x {len(specs)} servers")
    respawn = run(specs, 1, args.kills, "respawn", deadline, measure_respawn, args.kill_interval)
    log(f"reload: {args.reloads} HUPs x {len(specs)} servers, {args.workers} workers")
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        reload = run(
            specs, args.workers, args.reloads, "reload", deadline,
            lambda server: measure_reload(server, pool),
        )  # fmt: skip
    report = {
        "meta": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "gunicorn": version,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
        },
        "respawn": [s.summary() for s in respawn],
        "reload": [s.summary() for s in reload],
    }
    tables = [
        table(
            f"SIGKILL of the only sync worker -> a new pid answers (ms; kills "
            f"{args.kill_interval:g} s apart)",
            report["respawn"],
            p90=True,
        ),
        table(
            f"SIGHUP with {args.workers} sync workers -> every old worker gone and "
            f"{args.workers} new ones answering (ms)",
            report["reload"],
            p90=False,
        ),
    ]
    report["tables"] = tables
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print("\n\n".join(tables))
    print(f"\nJSON: {args.json}")
    failed = any(row["error"] for row in report["respawn"] + report["reload"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
