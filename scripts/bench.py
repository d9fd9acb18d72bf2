#!/usr/bin/env python3
"""Benchmark harness: forkserve against gunicorn, uvicorn and granian.

Three modes, all on 127.0.0.1 only:

* throughput (default): wrk against a hello-world app, keep-alive and
  ``Connection: close`` workloads, rounds interleaved across servers;
* ``--balance``: how evenly requests spread over the workers (cpu app);
* ``--startup``: time to the first 200 and time for a killed worker to be
  replaced, with and without ``--preload``;
* ``--memory``: RSS, PSS and USS per worker, with and without ``--preload``,
  before and after a full garbage collection in every worker.

Peers run from their own virtualenv in ``.bench/venv`` (created on first run),
where forkserve is installed editable from the checkout. ``--startup`` and
``--memory`` also run from ``.bench/venv-wheel``, where forkserve is installed
as a user gets it (``--install``): an editable install adds an import finder to
every interpreter started from its venv.
See docs/benchmarks.md for what every number means.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.client
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parent.parent
APPS_DIR = REPO / "scripts" / "bench_apps"
BENCH_DIR = REPO / ".bench"
VENV = BENCH_DIR / "venv"
# The startup and memory modes also run from a venv where forkserve is installed
# as a user gets it (a wheel, not editable): an editable install adds an import
# finder to every interpreter of its venv, peers included.
WHEEL_VENV = BENCH_DIR / "venv-wheel"
WHEEL_SRC = BENCH_DIR / "wheel-src"  # a copy of the checkout to build from, so no build/ in it
INSTALLS = ("wheel", "editable")
LOG_DIR = BENCH_DIR / "logs"
GEN_APPS_DIR = BENCH_DIR / "apps"  # apps this script writes (the memory mode's)
HOST = "127.0.0.1"

PEER_PACKAGES = ["gunicorn", "uvicorn[standard]", "granian"]
PEER_IMPORTS = ["gunicorn", "uvicorn", "granian", "httptools", "uvloop"]
# forkserve's own dependencies: without setproctitle the --preload template
# carries the primary's command line and cannot be told from the workers.
VENV_IMPORTS = [*PEER_IMPORTS, "forkserve", "setproctitle"]
VERSION_PACKAGES = ["forkserve", "gunicorn", "uvicorn", "granian", "httptools", "uvloop"]

GTHREADS = 4
STOP_TIMEOUT = 10.0
MIB = 1024.0 * 1024.0

WORKLOADS = ("keepalive", "close")
QUICK_SERVERS = [
    "forkserve-sync-rr",
    "forkserve-sync-none",
    "gunicorn-sync",
    "forkserve-asgi-rr",
    "uvicorn",
]
BALANCE_SERVERS = ["forkserve-sync-rr", "forkserve-sync-none", "gunicorn-sync"]
STARTUP_SERVERS = ["forkserve-sync-rr", "forkserve-sync-none", "gunicorn-sync"]
MEMORY_SERVERS = [
    "forkserve-sync-none",
    "forkserve-threaded-none",
    "gunicorn-sync",
    "gunicorn-gthread",
]
# (candidate, baseline) of the memory mode: the same worker model.
MEMORY_COMPARISONS: list[tuple[str, str]] = [
    ("forkserve-sync-rr", "gunicorn-sync"),
    ("forkserve-sync-none", "gunicorn-sync"),
    ("forkserve-threaded-rr", "gunicorn-gthread"),
    ("forkserve-threaded-none", "gunicorn-gthread"),
]

# (candidate, baseline): ratios reported for each workload.
COMPARISONS: list[tuple[str, str]] = [
    ("forkserve-sync-rr", "gunicorn-sync"),
    ("forkserve-sync-none", "gunicorn-sync"),
    ("forkserve-threaded-rr", "gunicorn-gthread"),
    ("forkserve-threaded-none", "gunicorn-gthread"),
    ("forkserve-asgi-rr", "uvicorn"),
    ("forkserve-asgi-none", "uvicorn"),
    ("forkserve-sync-rr", "forkserve-sync-none"),
    ("forkserve-threaded-rr", "forkserve-threaded-none"),
    ("forkserve-asgi-rr", "forkserve-asgi-none"),
]


# --------------------------------------------------------------------------
# Server matrix
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerSpec:
    name: str
    family: str  # forkserve | gunicorn | uvicorn | granian
    interface: str  # wsgi | asgi
    option: str = ""  # worker class / scheduling detail


SERVERS: dict[str, ServerSpec] = {
    s.name: s
    for s in [
        ServerSpec("forkserve-sync-rr", "forkserve", "wsgi", "sync:rr"),
        ServerSpec("forkserve-sync-none", "forkserve", "wsgi", "sync:none"),
        ServerSpec("forkserve-threaded-rr", "forkserve", "wsgi", "threaded:rr"),
        ServerSpec("forkserve-threaded-none", "forkserve", "wsgi", "threaded:none"),
        ServerSpec("forkserve-asgi-rr", "forkserve", "asgi", "asgi:rr"),
        ServerSpec("forkserve-asgi-none", "forkserve", "asgi", "asgi:none"),
        ServerSpec("gunicorn-sync", "gunicorn", "wsgi", "sync"),
        ServerSpec("gunicorn-gthread", "gunicorn", "wsgi", "gthread"),
        ServerSpec("gunicorn-uvicorn", "gunicorn", "asgi", "uvicorn.workers.UvicornWorker"),
        ServerSpec("uvicorn", "uvicorn", "asgi"),
        ServerSpec("granian-wsgi", "granian", "wsgi"),
        ServerSpec("granian-asgi", "granian", "asgi"),
    ]
}


def app_target(spec: ServerSpec, app: str) -> str:
    """``module:attr`` of the bench app for this server (app: hello | cpu | memory)."""
    if app in ("cpu", "memory"):
        if spec.interface != "wsgi":
            raise ValueError(f"{spec.name}: the {app} app is WSGI only")
        return "cpu_wsgi:app" if app == "cpu" else f"{MEMORY_APP}:app"
    return f"hello_{spec.interface}:app"


def server_command(
    spec: ServerSpec, app: str, port: int, workers: int, preload: bool, venv: Path = VENV
) -> list[str]:
    """The argv that starts ``spec`` serving ``app`` on 127.0.0.1:port."""
    target = app_target(spec, app)
    vbin = venv / "bin"
    bind = f"{HOST}:{port}"
    if spec.family == "forkserve":
        klass, sched = spec.option.split(":")
        cmd = [str(vbin / "forkserve"), target, "-w", str(workers), "-k", klass]
        if klass == "threaded":
            cmd += ["--threads", str(GTHREADS)]
        cmd += ["--sched", sched, "-b", bind, "--log-level", "warning"]
        if preload:
            cmd.append("--preload")
        return cmd
    if spec.family == "gunicorn":
        cmd = [str(vbin / "gunicorn"), "-w", str(workers), "-k", spec.option]
        if spec.option == "gthread":
            cmd += ["--threads", str(GTHREADS)]
        cmd += ["-b", bind, "--log-level", "warning"]
        if preload:
            cmd.append("--preload")
        return [*cmd, target]
    if spec.family == "uvicorn":
        return [
            str(vbin / "uvicorn"),
            target,
            "--host",
            HOST,
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--http",
            "httptools",
            "--loop",
            "uvloop",
            "--no-access-log",
            "--log-level",
            "warning",
        ]
    if spec.family == "granian":
        return [
            str(vbin / "granian"),
            "--interface",
            spec.interface,
            "--host",
            HOST,
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--no-access-log",
            "--log-level",
            "warning",
            target,
        ]
    raise ValueError(spec.family)


# --------------------------------------------------------------------------
# Environment: peers venv and wrk
# --------------------------------------------------------------------------


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def venv_python() -> Path:
    return VENV / "bin" / "python"


def venv_ready() -> bool:
    py = venv_python()
    if not py.exists():
        return False
    code = "import " + ", ".join(VENV_IMPORTS)
    res = subprocess.run([str(py), "-c", code], capture_output=True, timeout=60, check=False)
    return res.returncode == 0


def ensure_venv(reinstall_forkserve: bool) -> None:
    """Create and fill ``.bench/venv`` unless it is already usable."""
    if venv_ready() and not reinstall_forkserve:
        log(f"peers venv: reusing {VENV}")
        return
    py = venv_python()
    if not py.exists():
        log(f"peers venv: creating {VENV}")
        BENCH_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, timeout=300)
        subprocess.run(
            [str(py), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True, timeout=600
        )
    if not venv_ready():
        log("peers venv: installing " + " ".join(PEER_PACKAGES))
        subprocess.run(
            [str(py), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True, timeout=900
        )
    log(f"peers venv: installing forkserve from {REPO}")
    pip_install_forkserve(py, "peers venv", ["-e", str(REPO)])


def pip_install_forkserve(py: Path, label: str, args: list[str]) -> None:
    """``pip install -q ARGS`` into a bench venv; a failure is logged, not raised
    (the forkserve rows then fail to start and say so)."""
    res = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", *args],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if res.returncode != 0:
        log(f"{label}: WARNING: installing forkserve failed; its rows will fail to start")
        log(res.stderr[-2000:])


def ensure_wheel_venv() -> None:
    """``.bench/venv-wheel``: gunicorn, and forkserve installed from the checkout as a wheel.

    forkserve is installed again on every run (``--no-deps --force-reinstall``)
    so that it is the checkout's code; pip byte-compiles it as for any user.
    """
    py = WHEEL_VENV / "bin" / "python"
    if not py.exists():
        log(f"wheel venv: creating {WHEEL_VENV}")
        BENCH_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(WHEEL_VENV)], check=True, timeout=300)
    shutil.rmtree(WHEEL_SRC, ignore_errors=True)
    WHEEL_SRC.mkdir(parents=True)
    shutil.copytree(
        REPO / "forkserve", WHEEL_SRC / "forkserve", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, WHEEL_SRC / name)
    ready = subprocess.run(
        [str(py), "-c", "import gunicorn, setproctitle, httptools"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    if ready.returncode != 0:
        log("wheel venv: installing gunicorn and forkserve's dependencies")
        subprocess.run(
            [str(py), "-m", "pip", "install", "-q", "gunicorn", str(WHEEL_SRC)],
            check=True,
            timeout=900,
        )
    log(f"wheel venv: installing forkserve from a copy of {REPO / 'forkserve'}")
    pip_install_forkserve(py, "wheel venv", ["--no-deps", "--force-reinstall", str(WHEEL_SRC)])


def compile_forkserve() -> None:
    """Write the checkout's bytecode before measuring.

    forkserve runs editable from the checkout: a stale or missing ``.pyc``
    (``PYTHONDONTWRITEBYTECODE`` set, a file edited since) is compiled again
    by every server start, which adds tens of milliseconds to the start and
    about a MiB to the primary, hence to every worker forked from it. The
    peers' ``.pyc`` files were written when pip installed them.
    """
    subprocess.run(
        [str(venv_python()), "-m", "compileall", "-q", str(REPO / "forkserve")],
        check=False,
        timeout=300,
        capture_output=True,
    )


def ensure_wrk() -> str:
    """Path of wrk, installing Debian's package if needed; exits when impossible."""
    found = shutil.which("wrk")
    if found:
        return found
    log("wrk not found; trying Debian's package")
    apt_get = shutil.which("apt-get")
    if apt_get is None or os.geteuid() != 0:
        sys.exit("error: wrk is missing; install it (Debian: apt-get install -y wrk) and rerun")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    policy = subprocess.run(
        ["apt-cache", "policy", "wrk"], capture_output=True, text=True, check=False, timeout=60
    )
    if "Candidate:" not in policy.stdout or "Candidate: (none)" in policy.stdout:
        subprocess.run([apt_get, "update"], env=env, check=False, timeout=600)
    res = subprocess.run([apt_get, "install", "-y", "wrk"], env=env, check=False, timeout=600)
    found = shutil.which("wrk")
    if res.returncode != 0 or not found:
        sys.exit("error: could not install wrk (apt-get install -y wrk failed); install it by hand")
    return found


def peer_versions() -> dict[str, str]:
    code = (
        "import json, importlib.metadata as m\n"
        "out = {}\n"
        f"for n in {VERSION_PACKAGES!r}:\n"
        "    try:\n"
        "        out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError:\n"
        "        out[n] = 'missing'\n"
        "print(json.dumps(out))\n"
    )
    res = subprocess.run(
        [str(venv_python()), "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    try:
        return dict(json.loads(res.stdout))
    except ValueError:
        return {}


def wrk_version(wrk: str) -> str:
    res = subprocess.run([wrk, "-v"], capture_output=True, text=True, timeout=10, check=False)
    text = (res.stdout + res.stderr).strip().splitlines()
    return text[0] if text else "unknown"


# --------------------------------------------------------------------------
# /proc helpers
# --------------------------------------------------------------------------


@dataclass
class ProcStat:
    pid: int
    state: str
    ppid: int
    pgrp: int


def read_stat(pid: int) -> ProcStat | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name sits in parentheses and may contain spaces.
    rest = raw[raw.rfind(")") + 2 :].split()
    return ProcStat(pid=pid, state=rest[0], ppid=int(rest[1]), pgrp=int(rest[2]))


def all_stats() -> Iterator[ProcStat]:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            st = read_stat(int(entry.name))
            if st is not None:
                yield st


def group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    return sorted(s.pid for s in all_stats() if s.pgrp == pgid and s.state not in "ZX")


def children_of(pid: int) -> list[int]:
    """Live direct children of ``pid`` (``/proc/<pid>/task/*/children``, else a scan)."""
    task_dir = Path(f"/proc/{pid}/task")
    pids: set[int] = set()
    try:
        tasks = list(task_dir.iterdir())
        for task in tasks:
            pids.update(int(p) for p in (task / "children").read_text().split())
    except FileNotFoundError:
        pids = {s.pid for s in all_stats() if s.ppid == pid}
    except OSError:
        return []
    live = []
    for child in sorted(pids):
        st = read_stat(child)
        if st is not None and st.state not in "ZX":
            live.append(child)
    return live


TEMPLATE_MARKER = "forkserve: template"  # --preload: the process workers fork from
HELPER_MARKERS = (
    "resource_tracker",
    "semaphore_tracker",
    "multiprocessing.forkserver",
    TEMPLATE_MARKER,
)


def cmdline_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def is_helper(pid: int) -> bool:
    """True for helper processes (multiprocessing's, forkserve's template): not workers."""
    cmdline = cmdline_of(pid)
    return any(marker in cmdline for marker in HELPER_MARKERS)


def worker_pids(leader: int) -> list[int]:
    """The leader's direct children, less multiprocessing helpers."""
    return [pid for pid in children_of(leader) if not is_helper(pid)]


def template_pids(leader: int) -> list[int]:
    """forkserve's ``--preload`` template(s) among the leader's children (by title)."""
    return [pid for pid in children_of(leader) if TEMPLATE_MARKER in cmdline_of(pid)]


def check_template(spec: ServerSpec, leader: int, preload: bool) -> None:
    """Raise ServerFailed when forkserve's template cannot be told from its workers.

    Workers are the leader's children less the template, which is known by its
    process title; without titles every measure would count (or kill) it as a
    worker.
    """
    if spec.family == "forkserve" and preload and not template_pids(leader):
        raise ServerFailed(
            "cannot tell the --preload template from the workers (no process titles); "
            "install setproctitle in .bench/venv (--reinstall-forkserve)"
        )


@dataclass(frozen=True)
class Smaps:
    """One process's memory in KiB, from ``/proc/<pid>/smaps_rollup``.

    ``uss`` (unique set size) is what the process alone maps: its private
    clean and dirty pages, freed if it exits. ``pss`` adds its share of the
    pages it shares (a page shared by n processes counts 1/n).
    """

    rss: int = 0
    pss: int = 0
    uss: int = 0


def smaps_rollup(pid: int) -> Smaps:
    """RSS, PSS and USS of a process in KiB; zeros if unreadable."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return Smaps()
    fields: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
            fields[parts[0][:-1]] = int(parts[1])
    return Smaps(
        rss=fields.get("Rss", 0),
        pss=fields.get("Pss", 0),
        uss=fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0),
    )


@dataclass
class MemSample:
    processes: int
    total_rss_kib: int
    total_pss_kib: int
    leader_rss_kib: int
    worker_rss_kib: list[int]
    worker_pss_kib: list[int] = field(default_factory=list)
    worker_uss_kib: list[int] = field(default_factory=list)

    @staticmethod
    def _mean_mib(values: list[int]) -> float | None:
        return statistics.mean(values) / 1024.0 if values else None

    @property
    def per_worker_mib(self) -> float | None:
        return self._mean_mib(self.worker_rss_kib)

    @property
    def pss_per_worker_mib(self) -> float | None:
        return self._mean_mib(self.worker_pss_kib)

    @property
    def uss_per_worker_mib(self) -> float | None:
        return self._mean_mib(self.worker_uss_kib)

    def summary(self) -> dict[str, Any]:
        return asdict(self) | {
            "per_worker_mib": self.per_worker_mib,
            "pss_per_worker_mib": self.pss_per_worker_mib,
            "uss_per_worker_mib": self.uss_per_worker_mib,
        }


def measure_memory(leader: int) -> MemSample:
    """Memory of the leader's process group; workers are the leader's direct children."""
    members = group_pids(leader)
    kids = set(worker_pids(leader))
    sample = MemSample(len(members), 0, 0, 0, [])
    for pid in members:
        mem = smaps_rollup(pid)
        sample.total_rss_kib += mem.rss
        sample.total_pss_kib += mem.pss
        if pid == leader:
            sample.leader_rss_kib = mem.rss
        elif pid in kids:
            sample.worker_rss_kib.append(mem.rss)
            sample.worker_pss_kib.append(mem.pss)
            sample.worker_uss_kib.append(mem.uss)
    return sample


# --------------------------------------------------------------------------
# Server process management
# --------------------------------------------------------------------------


class ServerFailed(Exception):
    pass


class Interrupted(BaseException):
    """Raised from the SIGTERM handler so that every ``finally`` runs."""


LIVE_SERVERS: set[Server] = set()
LIVE_PROCS: set[subprocess.Popen[bytes]] = set()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def kill_group(proc: subprocess.Popen[Any], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM the process group of ``proc``, wait, then SIGKILL what is left."""
    pgid = proc.pid
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    while group_pids(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if proc.poll() is None or group_pids(pgid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


class Server:
    def __init__(
        self,
        spec: ServerSpec,
        argv: list[str],
        port: int,
        tag: str,
        env: dict[str, str] | None = None,
    ) -> None:
        self.spec = spec
        self.argv = argv
        self.port = port
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = LOG_DIR / f"{spec.name}-{tag}.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(APPS_DIR), str(GEN_APPS_DIR)])
        env["PYTHONUNBUFFERED"] = "1"
        env.pop("VIRTUAL_ENV", None)
        env.update(self.env)
        with open(self.log_path, "wb") as logf:
            logf.write(("$ " + shlex.join(self.argv) + "\n").encode())
            logf.flush()
            self.proc = subprocess.Popen(
                self.argv,
                cwd=APPS_DIR,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        LIVE_SERVERS.add(self)

    def stop(self) -> None:
        if self.proc is not None:
            try:
                kill_group(self.proc)
            finally:
                LIVE_SERVERS.discard(self)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[1:]
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def failure_reason(self) -> str:
        tail = [ln.strip() for ln in self.log_tail(20).splitlines() if ln.strip()]
        last = tail[-1] if tail else "no output"
        code = self.proc.poll() if self.proc is not None else None
        how = f"exited with {code}" if code is not None else "not ready"
        return f"{how}: {last[:160]}"

    def wait_ready(self, deadline_s: float, path: str = "/", interval: float = 0.05) -> float:
        """Seconds until GET path answers 200; raises ServerFailed on exit or deadline."""
        t0 = time.monotonic()
        deadline = t0 + deadline_s
        while True:
            if not self.alive():
                raise ServerFailed(self.failure_reason())
            status, _ = http_get(self.port, path, timeout=1.0)
            if status == 200:
                return time.monotonic() - t0
            if time.monotonic() > deadline:
                raise ServerFailed(f"no 200 from GET {path} within {deadline_s:.0f}s")
            time.sleep(interval)


@contextlib.contextmanager
def running_server(
    spec: ServerSpec,
    app: str,
    workers: int,
    tag: str,
    ready_timeout: float,
    preload: bool = False,
    ready_path: str = "/",
    env: dict[str, str] | None = None,
    venv: Path = VENV,
) -> Iterator[Server]:
    port = free_port()
    argv = server_command(spec, app, port, workers, preload, venv)
    server = Server(spec, argv, port, tag, env)
    try:
        try:
            server.start()
        except OSError as exc:
            raise ServerFailed(f"cannot exec: {exc}")
        server.wait_ready(ready_timeout, ready_path)
        yield server
    finally:
        server.stop()


def http_get(
    port: int, path: str = "/", timeout: float = 2.0, conn: http.client.HTTPConnection | None = None
) -> tuple[int, bytes]:
    """One GET on a fresh connection (or ``conn``); (0, b"") on any error."""
    own = conn is None
    c = conn or http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        c.request("GET", path, headers={"Connection": "close"} if own else {})
        resp = c.getresponse()
        return resp.status, resp.read()
    except (OSError, http.client.HTTPException):
        if not own:
            c.close()
        return 0, b""
    finally:
        if own:
            c.close()


# --------------------------------------------------------------------------
# wrk
# --------------------------------------------------------------------------


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    socket_errors: dict[str, int]
    non2xx: int

    @property
    def errors(self) -> int:
        return sum(self.socket_errors.values()) + self.non2xx


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def parse_wrk(text: str) -> WrkResult:
    rps_m = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    if rps_m is None:
        raise ValueError("no Requests/sec in wrk output:\n" + text[-500:])
    pct: dict[str, float] = {}
    for m in re.finditer(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.M):
        pct[m.group(1)] = float(m.group(2)) * _UNITS_MS[m.group(3)]
    req_m = re.search(r"^\s+(\d+) requests in", text, re.M)
    sock = {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    sock_m = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    if sock_m:
        sock = dict(zip(sock, (int(g) for g in sock_m.groups()), strict=True))
    non_m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return WrkResult(
        rps=float(rps_m.group(1)),
        p50_ms=pct.get("50", float("nan")),
        p99_ms=pct.get("99", float("nan")),
        requests=int(req_m.group(1)) if req_m else 0,
        socket_errors=sock,
        non2xx=int(non_m.group(1)) if non_m else 0,
    )


def run_wrk(
    wrk: str, port: int, duration: int, connections: int, close: bool, threads: int = 1
) -> WrkResult:
    argv = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration}s",
        "--timeout",
        "5s",
        "--latency",
    ]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://{HOST}:{port}/")
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    LIVE_PROCS.add(proc)
    try:
        out, _ = proc.communicate(timeout=duration + 30)
    except subprocess.TimeoutExpired:
        raise ServerFailed(f"wrk did not finish within {duration + 30}s")
    finally:
        if proc.poll() is None:
            kill_group(proc, timeout=2)
        LIVE_PROCS.discard(proc)
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise ServerFailed(f"wrk exited {proc.returncode}: {text.strip()[-200:]}")
    return parse_wrk(text)


# --------------------------------------------------------------------------
# Throughput mode
# --------------------------------------------------------------------------


@dataclass
class Row:
    round: int
    server: str
    workload: str
    ok: bool
    error: str = ""
    rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    requests: int = 0
    socket_errors: dict[str, int] = field(default_factory=dict)
    non2xx: int = 0
    memory: dict[str, Any] | None = None


def throughput_round(
    spec: ServerSpec,
    rnd: int,
    args: argparse.Namespace,
    wrk: str,
    workloads: list[str],
    rows: list[Row],
) -> None:
    """One fresh server, a warm-up, then each workload; appends one Row per workload."""
    first = len(rows)
    try:
        with running_server(spec, "hello", args.workers, f"r{rnd}", args.ready_timeout) as srv:
            run_wrk(wrk, srv.port, 1, args.connections, close=False)  # warm-up, discarded
            for wl in workloads:
                if not srv.alive():
                    raise ServerFailed(srv.failure_reason())
                try:
                    res = run_wrk(wrk, srv.port, args.duration, args.connections, wl == "close")
                except (ServerFailed, ValueError) as exc:
                    rows.append(Row(rnd, spec.name, wl, False, f"failed: {exc}"))
                    continue
                mem = measure_memory(srv.pid)
                rows.append(
                    Row(
                        rnd,
                        spec.name,
                        wl,
                        True,
                        rps=res.rps,
                        p50_ms=res.p50_ms,
                        p99_ms=res.p99_ms,
                        requests=res.requests,
                        socket_errors=res.socket_errors,
                        non2xx=res.non2xx,
                        memory=mem.summary(),
                    )
                )
    except ServerFailed as exc:
        done = {r.workload for r in rows[first:]}
        label = "failed" if done else "failed to start"
        rows += [
            Row(rnd, spec.name, wl, False, f"{label}: {exc}") for wl in workloads if wl not in done
        ]


def med(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarize(rows: list[Row], servers: list[str], workloads: list[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for name in servers:
        for wl in workloads:
            mine = [r for r in rows if r.server == name and r.workload == wl]
            good = [r for r in mine if r.ok]
            errs: dict[str, int] = {}
            for r in good:
                for k, v in r.socket_errors.items():
                    errs[k] = errs.get(k, 0) + v
                errs["non2xx"] = errs.get("non2xx", 0) + r.non2xx
            mems = [r.memory for r in good if r.memory]
            out.append(
                {
                    "server": name,
                    "workload": wl,
                    "rounds_ok": len(good),
                    "rounds": len(mine),
                    "failure": next((r.error for r in mine if not r.ok), ""),
                    "rps": med([r.rps for r in good]),
                    "p50_ms": med([r.p50_ms for r in good]),
                    "p99_ms": med([r.p99_ms for r in good]),
                    "errors": errs,
                    "errors_total": sum(errs.values()),
                    "rss_worker_mib": med([m["per_worker_mib"] for m in mems]),
                    "uss_worker_mib": med([m["uss_per_worker_mib"] for m in mems]),
                    "rss_total_mib": med([m["total_rss_kib"] / 1024.0 for m in mems]),
                    "pss_total_mib": med([m["total_pss_kib"] / 1024.0 for m in mems]),
                    "processes": med([float(m["processes"]) for m in mems]),
                }
            )
    return out


def ratios(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_key = {(s["server"], s["workload"]): s for s in summary}
    out: list[dict[str, Any]] = []
    for cand, base in COMPARISONS:
        for (name, wl), s in by_key.items():
            if name != cand or (base, wl) not in by_key:
                continue
            b = by_key[(base, wl)]

            def ratio(key: str, s: dict[str, Any] = s, b: dict[str, Any] = b) -> float | None:
                x, y = s.get(key), b.get(key)
                return x / y if x is not None and y else None

            out.append(
                {
                    "candidate": cand,
                    "baseline": base,
                    "workload": wl,
                    "rps": ratio("rps"),
                    "p99": ratio("p99_ms"),
                    "rss_worker": ratio("rss_worker_mib"),
                }
            )
    return out


def fmt(v: float | None, spec: str = ".1f") -> str:
    return "n/a" if v is None or v != v else format(v, spec)


def fmt_errors(errs: dict[str, int]) -> str:
    total = sum(errs.values())
    parts = [f"{k} {v}" for k, v in errs.items() if v]
    return f"{total} ({', '.join(parts)})" if parts else "0"


def throughput_tables(summary: list[dict[str, Any]], rats: list[dict[str, Any]]) -> str:
    lines = [
        "| server | workload | req/s (median) | p50 ms | p99 ms | errors | RSS/worker MiB "
        "| USS/worker MiB | RSS total MiB | PSS total MiB |",
        "|---|---|--:|--:|--:|---|--:|--:|--:|--:|",
    ]
    for s in summary:
        if not s["rounds_ok"]:
            reason = s["failure"] or ("failed" if s["rounds"] else "not run")
            short = reason.split(":", 1)[0]
            lines.append(f"| {s['server']} | {s['workload']} | {short} | | | | | | | |")
            continue
        partial = "" if s["rounds_ok"] == s["rounds"] else f" ({s['rounds_ok']}/{s['rounds']})"
        lines.append(
            f"| {s['server']} | {s['workload']} | {fmt(s['rps'], '.0f')}{partial} "
            f"| {fmt(s['p50_ms'], '.2f')} | {fmt(s['p99_ms'], '.2f')} "
            f"| {fmt_errors(s['errors'])} | {fmt(s['rss_worker_mib'])} "
            f"| {fmt(s['uss_worker_mib'])} "
            f"| {fmt(s['rss_total_mib'])} | {fmt(s['pss_total_mib'])} |"
        )
    failures = [s for s in summary if not s["rounds_ok"] and s["failure"]]
    seen: set[str] = set()
    notes = []
    for s in failures:
        if s["server"] not in seen:
            seen.add(s["server"])
            notes.append(f"- {s['server']}: {s['failure']}")
    if notes:
        lines += ["", "Failures:", *notes]
    if rats:
        lines += [
            "",
            "Ratios (candidate / baseline; req/s > 1 is better, p99 and RSS < 1 are better):",
            "",
            "| candidate | baseline | workload | req/s | p99 | RSS/worker |",
            "|---|---|---|--:|--:|--:|",
        ]
        for r in rats:
            lines.append(
                f"| {r['candidate']} | {r['baseline']} | {r['workload']} "
                f"| {fmt(r['rps'], '.2f')} | {fmt(r['p99'], '.2f')} "
                f"| {fmt(r['rss_worker'], '.2f')} |"
            )
    return "\n".join(lines)


def run_throughput(args: argparse.Namespace, wrk: str, report: dict[str, Any]) -> None:
    servers: list[str] = args.servers
    workloads: list[str] = args.workloads
    rows: list[Row] = []
    rng = random.Random(args.seed)
    try:
        for rnd in range(1, args.rounds + 1):
            order = list(servers)
            if args.order == "shuffle":
                rng.shuffle(order)
            log(f"round {rnd}/{args.rounds}: {', '.join(order)}")
            for name in order:
                t0 = time.monotonic()
                first = len(rows)
                throughput_round(SERVERS[name], rnd, args, wrk, workloads, rows)
                took = time.monotonic() - t0
                for r in rows[first:]:
                    if r.ok:
                        log(
                            f"  {name:24} {r.workload:9} {r.rps:10.0f} req/s  "
                            f"p50 {r.p50_ms:.2f} ms  p99 {r.p99_ms:.2f} ms"
                        )
                    else:
                        log(f"  {name:24} {r.workload:9} {r.error[:110]}")
                log(f"  ({took:.1f}s)")
    finally:
        summary = summarize(rows, servers, workloads)
        rats = ratios(summary)
        report["throughput"] = {
            "rows": [asdict(r) for r in rows],
            "summary": summary,
            "ratios": rats,
        }
        report.setdefault("tables", {})["throughput"] = throughput_tables(summary, rats)


# --------------------------------------------------------------------------
# Balance mode
# --------------------------------------------------------------------------


def balance_client(
    port: int, total: int, concurrency: int, deadline_s: float, keepalive: bool
) -> tuple[dict[int, int], int, float]:
    """Send ``total`` GET / and count answers per pid; (counts, failures, seconds)."""
    counts: dict[int, int] = {}
    failures = 0
    issued = 0
    lock = threading.Lock()
    t0 = time.monotonic()
    deadline = t0 + deadline_s

    def take() -> bool:
        nonlocal issued
        with lock:
            if issued >= total or time.monotonic() > deadline:
                return False
            issued += 1
            return True

    def record(status: int, body: bytes) -> None:
        nonlocal failures
        with lock:
            if status == 200 and body.strip().isdigit():
                pid = int(body)
                counts[pid] = counts.get(pid, 0) + 1
            else:
                failures += 1

    def worker() -> None:
        conn: http.client.HTTPConnection | None = None
        try:
            while take():
                if keepalive:
                    if conn is None:
                        conn = http.client.HTTPConnection(HOST, port, timeout=5.0)
                    status, body = http_get(port, "/", conn=conn)
                    if status == 0:  # the server closed an idle connection: retry once
                        conn.close()
                        status, body = http_get(port, "/", conn=conn)
                else:
                    status, body = http_get(port, "/", timeout=5.0)
                record(status, body)
        finally:
            if conn is not None:
                conn.close()

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = [pool.submit(worker) for _ in range(concurrency)]
        for fut in futures:
            fut.result(timeout=deadline_s + 30)
    return counts, failures, time.monotonic() - t0


def spread_pct(counts: list[int]) -> float | None:
    if not counts or sum(counts) == 0:
        return None
    mean = statistics.mean(counts)
    return max(abs(c - mean) for c in counts) / mean * 100.0


def balance_one(
    srv: Server, args: argparse.Namespace, workload: str, concurrency: int
) -> dict[str, Any]:
    counts, failed, took = balance_client(
        srv.port,
        args.balance_requests,
        concurrency,
        args.balance_deadline,
        keepalive=workload == "keepalive",
    )
    workers = set(worker_pids(srv.pid))
    per_worker = {pid: counts.get(pid, 0) for pid in workers | set(counts)}
    return {
        "ok": True,
        "answered": sum(counts.values()),
        "failed": failed,
        "seconds": took,
        "per_worker": {str(k): v for k, v in sorted(per_worker.items())},
        "spread_pct": spread_pct(list(per_worker.values())),
    }


def run_balance(args: argparse.Namespace, report: dict[str, Any]) -> None:
    results: list[dict[str, Any]] = []
    skipped: list[str] = []
    try:
        for name in args.balance_servers:
            spec = SERVERS[name]
            for wl in args.workloads:
                levels = list(args.balance_concurrency)
                if wl == "keepalive":
                    # Fewer persistent connections than workers cannot be balanced.
                    low = [c for c in levels if c < args.workers]
                    skipped += [f"{name} keepalive c={c}" for c in low]
                    levels = [c for c in levels if c >= args.workers]
                if not levels:
                    continue
                base = {"server": name, "workload": wl}
                try:
                    with running_server(
                        spec, "cpu", args.workers, f"balance-{wl}", args.ready_timeout
                    ) as srv:
                        for _ in range(20):  # warm-up
                            http_get(srv.port, "/pid")
                        for c in levels:
                            entry = base | {"concurrency": c} | balance_one(srv, args, wl, c)
                            results.append(entry)
                            log(
                                f"  balance {name:22} {wl:9} c={c:<3} "
                                f"spread {fmt(entry['spread_pct'])}% "
                                f"counts {sorted(entry['per_worker'].values(), reverse=True)}"
                            )
                except ServerFailed as exc:
                    done = {e["concurrency"] for e in results if e.items() >= base.items()}
                    for c in levels:
                        if c not in done:
                            err = f"failed to start: {exc}"
                            results.append(base | {"concurrency": c, "ok": False, "error": err})
                    log(f"  balance {name:22} {wl:9} {str(exc)[:110]}")
    finally:
        report["balance"] = results
        report.setdefault("tables", {})["balance"] = balance_table(results, skipped, args)


def balance_table(
    results: list[dict[str, Any]], skipped: list[str], args: argparse.Namespace
) -> str:
    lines = [
        f"Balance: {args.balance_requests} requests per line to the cpu app "
        f"(~2 ms CPU each; c = concurrent clients; {args.workers} workers)",
        "",
        "| server | workload | c | answered | failed | seconds | per-worker counts | spread % |",
        "|---|---|--:|--:|--:|--:|---|--:|",
    ]
    for e in results:
        head = f"| {e['server']} | {e['workload']} | {e['concurrency']} "
        if not e["ok"]:
            lines.append(head + "| failed to start | | | | |")
            continue
        counts = ", ".join(str(v) for v in sorted(e["per_worker"].values(), reverse=True))
        lines.append(
            head + f"| {e['answered']} | {e['failed']} "
            f"| {e['seconds']:.1f} | {counts} | {fmt(e['spread_pct'])} |"
        )
    if skipped:
        lines += [
            "",
            "Skipped (keep-alive with fewer connections than workers): " + ", ".join(skipped),
        ]
    notes = [f"- {e['server']}: {e['error']}" for e in results if not e["ok"]]
    if notes:
        lines += ["", "Failures:", *dict.fromkeys(notes)]
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Startup mode
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """A server of the startup and memory modes: with or without ``--preload``."""

    spec: ServerSpec
    preload: bool
    install: str = "editable"  # which venv: "editable" (.bench/venv) or "wheel"

    @property
    def label(self) -> str:
        return self.spec.name + (" --preload" if self.preload else "") + f" [{self.install}]"

    @property
    def tag(self) -> str:
        return ("preload" if self.preload else "plain") + f"-{self.install}"

    @property
    def venv(self) -> Path:
        return WHEEL_VENV if self.install == "wheel" else VENV


def variants(names: list[str], installs: Sequence[str] = ("editable",)) -> list[Variant]:
    return [
        Variant(SERVERS[name], preload, install)
        for install in installs
        for name in names
        for preload in (False, True)
    ]


def on_cpu_s(pid: int) -> float | None:
    """Seconds ``pid`` has run on a CPU (``/proc/<pid>/schedstat``, ns resolution)."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def time_to_first_200(v: Variant, args: argparse.Namespace, i: int) -> tuple[float, float | None]:
    """Seconds from just before the spawn to the first 200 of ``GET /pid``, and the
    primary's CPU time by then: the start's own cost, much less sensitive than the
    wall time to what else the machine runs."""
    port = free_port()
    argv = server_command(v.spec, "cpu", port, args.workers, v.preload, v.venv)
    server = Server(v.spec, argv, port, f"startup-{v.tag}-{i}")
    try:
        t0 = time.monotonic()
        try:
            server.start()
        except OSError as exc:
            raise ServerFailed(f"cannot exec: {exc}")
        server.wait_ready(args.ready_timeout, "/pid", interval=0.005)
        return time.monotonic() - t0, on_cpu_s(server.pid)
    finally:
        server.stop()


def wait_workers(leader: int, count: int, deadline: float) -> list[int]:
    while True:
        kids = worker_pids(leader)
        if len(kids) >= count or time.monotonic() > deadline:
            return kids
        time.sleep(0.01)


def serving_workers(srv: Server, v: Variant, count: int) -> list[int]:
    """The worker pids of a ready server, once all ``count`` run; ServerFailed otherwise."""
    kids = wait_workers(srv.pid, count, time.monotonic() + 10)
    check_template(v.spec, srv.pid, v.preload)
    if len(kids) < count:
        raise ServerFailed(f"{len(kids)} of {count} worker processes found")
    return kids


def measure_respawn(v: Variant, args: argparse.Namespace, i: int) -> dict[str, float | None]:
    """SIGKILL one worker of a fresh server and time its replacement.

    A fresh server per kill: each kill is a lone crash. Kills in a row on one
    server would measure forkserve's restart back-off instead (crashes that
    repeat within 10 s wait 0.1 s, then 0.2 s, ... up to 5 s).
    """
    with running_server(
        v.spec,
        "cpu",
        args.workers,
        f"respawn-{v.tag}",
        args.ready_timeout,
        preload=v.preload,
        ready_path="/pid",
        venv=v.venv,
    ) as srv:
        kids = serving_workers(srv, v, args.workers)
        time.sleep(0.3)  # every worker booted, not just the one that answered
        victim = kids[i % len(kids)]
        before = set(worker_pids(srv.pid))
        t0 = time.monotonic()
        deadline = t0 + args.ready_timeout
        os.kill(victim, signal.SIGKILL)
        t_pid = t_ok = t_new = None
        new: set[int] = set()
        while time.monotonic() < deadline:
            if t_pid is None:
                new = set(worker_pids(srv.pid)) - before
                if new:
                    t_pid = time.monotonic() - t0
                else:
                    time.sleep(0.001)
                    continue
            status, body = http_get(srv.port, "/pid", timeout=1.0)
            if status == 200:
                if t_ok is None:
                    t_ok = time.monotonic() - t0
                if body.strip().isdigit() and int(body) in new:
                    t_new = time.monotonic() - t0
                    break
            else:
                time.sleep(0.001)
    return {"new_pid_s": t_pid, "serving_s": t_ok, "new_worker_served_s": t_new}


T = TypeVar("T")


def shuffled_rounds(count: int, items: list[T], rng: random.Random) -> Iterator[tuple[int, T]]:
    """``(round, item)`` for ``count`` rounds, every item once a round, in a new order each."""
    for i in range(count):
        order = list(items)
        rng.shuffle(order)
        for item in order:
            yield i, item


def run_startup(args: argparse.Namespace, report: dict[str, Any]) -> None:
    """Cold starts, then lone-crash respawns; variants interleaved within each repetition."""
    vs = variants(args.startup_servers, args.installs)
    entries: dict[str, dict[str, Any]] = {
        v.label: {
            "server": v.spec.name,
            "preload": v.preload,
            "install": v.install,
            "first_200_s": [],
            "primary_cpu_s": [],
            "respawns": [],
            "ok": True,
        }
        for v in vs
    }
    rng = random.Random(args.seed)

    def attempt(v: Variant, what: str, run: Callable[[], Any]) -> Any:
        entry = entries[v.label]
        if not entry["ok"]:
            return None
        try:
            return run()
        except ServerFailed as exc:
            entry |= {"ok": False, "error": f"{what}: {exc}"}
            log(f"  startup {v.label:32} {what}: {str(exc)[:90]}")
            return None

    try:
        for i, v in shuffled_rounds(args.startup_runs, vs, rng):
            started = attempt(v, "start", functools.partial(time_to_first_200, v, args, i))
            if started is not None:
                entries[v.label]["first_200_s"].append(started[0])
                entries[v.label]["primary_cpu_s"].append(started[1])
        for v in vs:
            log(
                f"  startup {v.label:32} first 200 median "
                f"{fmt(ms(med(entries[v.label]['first_200_s'])))} ms"
            )
        for i, v in shuffled_rounds(args.respawns, vs, rng):
            respawn = attempt(v, "respawn", functools.partial(measure_respawn, v, args, i))
            if respawn is not None:
                entries[v.label]["respawns"].append(respawn)
        for v in vs:
            rs = entries[v.label]["respawns"]
            log(
                f"  startup {v.label:32} kill -> 200 from the new worker median "
                f"{fmt(ms(med([r['new_worker_served_s'] for r in rs])))} ms"
            )
    finally:
        results = list(entries.values())
        report["startup"] = results
        report.setdefault("tables", {})["startup"] = startup_table(results, args)


def startup_table(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"Startup ({args.workers} workers; {args.startup_runs} starts and {args.respawns} "
        "worker kills per line, each kill on a fresh server; medians, ms)",
        "",
        "| server | install | preload | start -> first 200 | min..max "
        "| primary CPU by the first 200 | kill -> new pid "
        "| kill -> new pid and a 200 | kill -> 200 from the new worker |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    for e in results:
        t = e.get("first_200_s") or []
        head = f"| {e['server']} | {e['install']} | {'yes' if e['preload'] else 'no'} "
        if not t:
            lines.append(head + "| failed to start | | | | | |")
            continue
        rs = e.get("respawns") or []
        lines.append(
            head + f"| {fmt(ms(med(t)))} "
            f"| {fmt(ms(min(t)))}..{fmt(ms(max(t)))} "
            f"| {fmt(ms(med(e.get('primary_cpu_s') or [])))} "
            f"| {fmt(ms(med([r['new_pid_s'] for r in rs])))} "
            f"| {fmt(ms(med([r['serving_s'] for r in rs])))} "
            f"| {fmt(ms(med([r['new_worker_served_s'] for r in rs])))} |"
        )
    notes = [
        f"- {e['server']}{' --preload' if e['preload'] else ''} [{e['install']}]: {e['error']}"
        for e in results
        if not e["ok"]
    ]
    if notes:
        lines += ["", "Failures:", *notes]
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Memory mode
# --------------------------------------------------------------------------

MEMORY_APP = "memory_wsgi"
MEMORY_APP_SOURCE = '''\
"""Written by scripts/bench.py for its --memory mode (regenerated on every run).

At import, about BENCH_BALLAST_MIB MiB of long-lived Python objects (dicts,
lists, strings), as an app's modules, caches and tables would be: with
--preload they are loaded once and shared copy-on-write by the workers.
GET / answers the worker's pid. GET /gc runs a full gc.collect(), waits
50 ms (so that concurrent requests reach other workers) and answers
"<pid> <gc.get_freeze_count()>".
"""

import gc
import os
import time

ENTRY_BYTES = 390  # one dict, one str, one 2-item list and two ints (tracemalloc)
COUNT = int(float(os.environ.get("BENCH_BALLAST_MIB", "0")) * 1048576 / ENTRY_BYTES)
BALLAST = [{"id": i, "name": f"item-{i:08d}", "tags": [i, -i]} for i in range(COUNT)]


def app(environ, start_response):
    body = str(os.getpid())
    if environ.get("PATH_INFO") == "/gc":
        gc.collect()
        time.sleep(0.05)
        body += f" {gc.get_freeze_count()}"
    data = body.encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(data)))])
    return [data]
'''


def write_memory_app() -> None:
    GEN_APPS_DIR.mkdir(parents=True, exist_ok=True)
    path = GEN_APPS_DIR / f"{MEMORY_APP}.py"
    if not path.exists() or path.read_text() != MEMORY_APP_SOURCE:
        path.write_text(MEMORY_APP_SOURCE)


def collect_in_workers(srv: Server, workers: list[int], deadline_s: float) -> dict[int, int]:
    """``GET /gc`` until every worker ran a full collection; pid -> its frozen objects."""
    frozen: dict[int, int] = {}
    deadline = time.monotonic() + deadline_s
    burst = len(workers) * (GTHREADS + 1)  # enough to keep a threaded worker's pool busy
    with ThreadPoolExecutor(max_workers=burst) as pool:
        while not set(workers) <= set(frozen) and time.monotonic() < deadline:
            answers = list(pool.map(lambda _: http_get(srv.port, "/gc", 5.0), range(burst)))
            for status, body in answers:
                parts = body.split()
                if status == 200 and len(parts) == 2 and parts[0].isdigit():
                    frozen[int(parts[0])] = int(parts[1])
    return frozen


def memory_run(v: Variant, ballast_mib: float, args: argparse.Namespace) -> dict[str, Any]:
    """One fresh server: memory after a warm-up, then after a full collection in each worker."""
    env = {"BENCH_BALLAST_MIB": str(ballast_mib)}
    tag = f"memory-{v.tag}-{ballast_mib:g}"
    with running_server(
        v.spec,
        "memory",
        args.workers,
        tag,
        args.ready_timeout,
        preload=v.preload,
        env=env,
        venv=v.venv,
    ) as srv:
        kids = serving_workers(srv, v, args.workers)
        counts, failed, _ = balance_client(
            srv.port, args.memory_requests, 2 * args.workers, args.balance_deadline, False
        )
        time.sleep(0.5)
        before = measure_memory(srv.pid)
        frozen = collect_in_workers(srv, kids, 15.0)
        time.sleep(0.3)
        after = {pid: smaps_rollup(pid).uss for pid in kids if pid in frozen}
    return {
        "answered": sum(counts.values()),
        "failed": failed,
        "memory": before.summary(),
        "uss_after_gc_mib": statistics.mean(after.values()) / 1024.0 if after else None,
        "collected_in": len(after),
        "frozen_objects": med([float(n) for n in frozen.values()]),
    }


def run_memory(args: argparse.Namespace, report: dict[str, Any]) -> None:
    write_memory_app()
    vs = variants(args.memory_servers, args.installs)
    cases = [(v, b) for v in vs for b in sorted({0.0, args.ballast_mib})]
    rows: list[dict[str, Any]] = []
    rng = random.Random(args.seed)
    try:
        for rnd in range(1, args.rounds + 1):
            order = list(cases)
            rng.shuffle(order)
            log(f"memory round {rnd}/{args.rounds}")
            for v, ballast in order:
                base = {
                    "round": rnd,
                    "server": v.spec.name,
                    "preload": v.preload,
                    "install": v.install,
                    "ballast_mib": ballast,
                }
                try:
                    row = base | {"ok": True} | memory_run(v, ballast, args)
                except ServerFailed as exc:
                    row = base | {"ok": False, "error": str(exc)}
                    log(f"  memory {v.label:32} ballast {ballast:g}: {str(exc)[:90]}")
                else:
                    mem = row["memory"]
                    log(
                        f"  memory {v.label:32} ballast {ballast:4g} MiB: RSS "
                        f"{fmt(mem['per_worker_mib'])} PSS {fmt(mem['pss_per_worker_mib'])} "
                        f"USS {fmt(mem['uss_per_worker_mib'])} -> after gc "
                        f"{fmt(row['uss_after_gc_mib'])} MiB per worker"
                    )
                rows.append(row)
    finally:
        summary = memory_summary(rows, cases)
        report["memory"] = {"rows": rows, "summary": summary}
        report.setdefault("tables", {})["memory"] = memory_table(summary, args)


def memory_summary(
    rows: list[dict[str, Any]], cases: list[tuple[Variant, float]]
) -> list[dict[str, Any]]:
    out = []
    for v, ballast in cases:
        mine = [
            r
            for r in rows
            if r["server"] == v.spec.name
            and r["preload"] == v.preload
            and r["install"] == v.install
            and r["ballast_mib"] == ballast
        ]
        good = [r for r in mine if r["ok"]]
        mems = [r["memory"] for r in good]
        out.append(
            {
                "server": v.spec.name,
                "preload": v.preload,
                "install": v.install,
                "ballast_mib": ballast,
                "rounds_ok": len(good),
                "rounds": len(mine),
                "failure": next((r["error"] for r in mine if not r["ok"]), ""),
                "rss_worker_mib": med([m["per_worker_mib"] for m in mems]),
                "pss_worker_mib": med([m["pss_per_worker_mib"] for m in mems]),
                "uss_worker_mib": med([m["uss_per_worker_mib"] for m in mems]),
                "uss_after_gc_mib": med([r["uss_after_gc_mib"] for r in good]),
                "leader_rss_mib": med([m["leader_rss_kib"] / 1024.0 for m in mems]),
                "pss_total_mib": med([m["total_pss_kib"] / 1024.0 for m in mems]),
                "frozen_objects": med([r["frozen_objects"] for r in good]),
            }
        )
    return out


def memory_table(summary: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"Memory ({args.workers} workers; medians over {args.rounds} rounds of the mean over "
        f"workers, MiB; after {args.memory_requests} requests; ballast: MiB of long-lived "
        "objects the app creates at import)",
        "",
        "| server | install | preload | ballast | RSS/worker | PSS/worker | USS/worker "
        "| USS/worker after gc.collect() | primary RSS | PSS total | frozen objects |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for s in summary:
        head = (
            f"| {s['server']} | {s['install']} | {'yes' if s['preload'] else 'no'} "
            f"| {s['ballast_mib']:g} "
        )
        if not s["rounds_ok"]:
            lines.append(head + "| failed | | | | | | |")
            continue
        lines.append(
            head + f"| {fmt(s['rss_worker_mib'])} | {fmt(s['pss_worker_mib'])} "
            f"| {fmt(s['uss_worker_mib'])} | {fmt(s['uss_after_gc_mib'])} "
            f"| {fmt(s['leader_rss_mib'])} | {fmt(s['pss_total_mib'])} "
            f"| {fmt(s['frozen_objects'], '.0f')} |"
        )
    by_key = {(s["server"], s["preload"], s["ballast_mib"], s["install"]): s for s in summary}
    ratio_lines = []
    for cand, base in MEMORY_COMPARISONS:
        for (name, preload, ballast, install), s in by_key.items():
            b = by_key.get((base, preload, ballast, install))
            if name != cand or b is None:
                continue

            def ratio(key: str, s: dict[str, Any] = s, b: dict[str, Any] = b) -> str:
                x, y = s.get(key), b.get(key)
                return fmt(x / y, ".2f") if x is not None and y else "n/a"

            ratio_lines.append(
                f"| {cand} | {base} | {install} | {'yes' if preload else 'no'} | {ballast:g} "
                f"| {ratio('rss_worker_mib')} | {ratio('pss_worker_mib')} "
                f"| {ratio('uss_worker_mib')} | {ratio('uss_after_gc_mib')} |"
            )
    if ratio_lines:
        lines += [
            "",
            "Ratios (candidate / baseline, < 1 is less memory):",
            "",
            "| candidate | baseline | install | preload | ballast | RSS/worker | PSS/worker "
            "| USS/worker | USS after gc |",
            "|---|---|---|---|--:|--:|--:|--:|--:|",
            *ratio_lines,
        ]
    notes = [
        f"- {s['server']}{' --preload' if s['preload'] else ''} [{s['install']}] "
        f"ballast {s['ballast_mib']:g}: "
        f"{s['failure']}"
        for s in summary
        if s["failure"]
    ]
    if notes:
        lines += ["", "Failures:", *notes]
    return "\n".join(lines)


def ms(v: float | None) -> float | None:
    return None if v is None else v * 1000.0


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def csv_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def csv_ints(value: str) -> list[int]:
    try:
        out = [int(v) for v in csv_list(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {value!r}")
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError("levels must be >= 1")
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark forkserve against gunicorn, uvicorn and granian (loopback only).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="1 round, 3 s, reduced server list")
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 3; quick: 1)")
    p.add_argument("--duration", type=int, default=None, help="seconds per wrk run (10; quick 3)")
    p.add_argument("--workers", type=int, default=2, help="worker processes for every server")
    p.add_argument("--connections", type=int, default=64, help="wrk connections (-c)")
    p.add_argument(
        "--servers",
        type=csv_list,
        default=None,
        help="comma-separated server names (see --list); default: all (quick: reduced)",
    )
    p.add_argument("--workloads", type=csv_list, default=list(WORKLOADS), help="keepalive,close")
    p.add_argument("--order", choices=["shuffle", "fixed"], default="shuffle")
    p.add_argument("--seed", type=int, default=None, help="seed for --order shuffle")
    p.add_argument("--json", default="bench-results.json", help="where to write JSON results")
    p.add_argument("--ready-timeout", type=float, default=20.0, help="seconds to wait for a 200")
    p.add_argument("--balance", action="store_true", help="run the worker balance mode")
    p.add_argument("--balance-requests", type=int, default=2000)
    p.add_argument(
        "--balance-concurrency",
        type=csv_ints,
        default=[1, 16],
        help="comma-separated client concurrency levels",
    )
    p.add_argument("--balance-deadline", type=float, default=60.0, help="seconds per server")
    p.add_argument("--startup", action="store_true", help="run the startup/respawn mode")
    p.add_argument("--startup-runs", type=int, default=20, help="cold starts per server")
    p.add_argument(
        "--respawns", type=int, default=20, help="worker kills per server (a fresh server each)"
    )
    p.add_argument("--memory", action="store_true", help="run the memory mode")
    p.add_argument(
        "--ballast-mib",
        type=float,
        default=32.0,
        help="MiB of long-lived objects the memory app creates at import (0 turns it off)",
    )
    p.add_argument(
        "--memory-requests", type=int, default=1000, help="warm-up requests before measuring"
    )
    p.add_argument(
        "--reinstall-forkserve",
        action="store_true",
        help="pip install -e the repo into .bench/venv again",
    )
    p.add_argument(
        "--install",
        choices=["both", *INSTALLS],
        default="both",
        help="--startup/--memory: run from .bench/venv-wheel (forkserve installed as a wheel, "
        "as users get it), from .bench/venv (editable), or both",
    )
    p.add_argument("--list", action="store_true", help="list server names and exit")
    args = p.parse_args(argv)

    explicit_servers = args.servers is not None
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.duration is None:
        args.duration = 3 if args.quick else 10
    if args.servers is None:
        args.servers = list(QUICK_SERVERS) if args.quick else list(SERVERS)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 31)
    unknown = [s for s in args.servers if s not in SERVERS]
    if unknown:
        p.error(f"unknown server(s) {', '.join(unknown)}; known: {', '.join(SERVERS)}")
    bad = [w for w in args.workloads if w not in WORKLOADS]
    if bad:
        p.error(f"unknown workload(s) {', '.join(bad)}; known: {', '.join(WORKLOADS)}")
    if args.rounds < 1 or args.duration < 1 or args.workers < 1 or args.connections < 1:
        p.error("--rounds, --duration, --workers and --connections must be >= 1")
    wsgi_only = [s for s in args.servers if SERVERS[s].interface == "wsgi"]
    args.balance_servers = wsgi_only if explicit_servers else list(BALANCE_SERVERS)
    args.startup_servers = wsgi_only if explicit_servers else list(STARTUP_SERVERS)
    args.memory_servers = wsgi_only if explicit_servers else list(MEMORY_SERVERS)
    args.installs = list(INSTALLS) if args.install == "both" else [args.install]
    if args.quick:
        args.startup_runs = min(args.startup_runs, 5)
        args.respawns = min(args.respawns, 3)
        args.balance_requests = min(args.balance_requests, 1000)
        args.memory_requests = min(args.memory_requests, 300)
    return args


def on_sigterm(signum: int, frame: object) -> None:
    raise Interrupted()


def cleanup() -> None:
    for proc in list(LIVE_PROCS):
        kill_group(proc, timeout=2)
    for srv in list(LIVE_SERVERS):
        srv.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.list:
        for s in SERVERS.values():
            print(f"{s.name:26} {s.family:10} {s.interface}")
        return 0
    command = shlex.join([sys.executable, *sys.argv])
    signal.signal(signal.SIGTERM, on_sigterm)
    report: dict[str, Any] = {
        "command": command,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {
            k: v for k, v in vars(args).items() if k not in {"list", "reinstall_forkserve"}
        },
    }
    status = 0
    t_start = time.monotonic()
    try:
        ensure_venv(args.reinstall_forkserve)
        compile_forkserve()
        if (args.startup or args.memory) and "wheel" in args.installs:
            ensure_wheel_venv()
        wrk = ensure_wrk()
        report["environment"] = {
            "python": platform.python_version(),
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "wrk": wrk_version(wrk),
            "packages": peer_versions(),
        }
        header = [
            f"command: {command}",
            f"settings: rounds={args.rounds} duration={args.duration}s workers={args.workers} "
            f"connections={args.connections} order={args.order} seed={args.seed}",
            "versions: "
            + ", ".join(f"{k} {v}" for k, v in report["environment"]["packages"].items())
            + f"; {report['environment']['wrk']}; {report['environment']['cpus']} cpus",
        ]
        print("\n".join(header), flush=True)
        if not args.balance and not args.startup and not args.memory:
            run_throughput(args, wrk, report)
        if args.balance:
            run_balance(args, report)
        if args.startup:
            run_startup(args, report)
        if args.memory:
            run_memory(args, report)
    except (KeyboardInterrupt, Interrupted):
        log("interrupted; stopping servers")
        status = 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let cleanup finish
        cleanup()
        report["elapsed_s"] = time.monotonic() - t_start
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    print()
    print("\n\n".join(report.get("tables", {}).values()))
    print(f"\n(elapsed {report['elapsed_s']:.0f}s; JSON in {args.json}; server logs in {LOG_DIR})")
    return status


if __name__ == "__main__":
    sys.exit(main())
