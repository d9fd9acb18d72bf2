"""``forkserve ctl``: ask a running server through its control socket.

Which server: ``--socket PATH``, or ``--pid PIDFILE`` (its control socket is
beside the pidfile), or else the only live control socket in the runtime
directory (``control.runtime_dir()``). One request, one answer (the
protocol is in ``control.py`` and docs/operations.md); the answer is shown
for a human (a table for ``status``) or, with ``--json``, as it came.

Every failure is a ``CtlError`` with one line saying what to do; ``cli.py``
prints it and exits 1. Imports nothing from forkserve but ``control`` and
``errors``: no cluster, no HTTP, no arbiter.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Sequence
from typing import Any

from forkserve.control import SUFFIX, answers, beside_pidfile, runtime_dir
from forkserve.errors import ForkserveError

TIMEOUT = 15.0  # seconds: dump-stacks waits up to a second per worker, in parallel
ANSWER_MAX = 64 * 1024 * 1024
COMMANDS = ("status", "stats", "scale", "reload", "stop", "dump-stacks")
OLDEST_SHOWN = 10


class CtlError(ForkserveError):
    """The control socket cannot be found or reached, or the server said no."""

    exit_code = 1


# -- finding the server -------------------------------------------------------------


def find_socket(socket_path: str | None = None, pidfile: str | None = None) -> str:
    """The control socket to use (see the module docstring)."""
    if socket_path:
        return socket_path
    if pidfile:
        return beside_pidfile(pidfile)
    directory = runtime_dir()
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        names = []
    live = [
        os.path.join(directory, name)
        for name in names
        if name.endswith(SUFFIX) and answers(os.path.join(directory, name))
    ]
    if not live:
        raise CtlError(f"no running forkserve found (looked in {directory}); use --socket or --pid")
    if len(live) > 1:
        listing = "".join(f"\n  {path}" for path in live)
        raise CtlError(
            f"{len(live)} running forkserve servers found in {directory}; "
            f"choose one with --socket:{listing}"
        )
    return live[0]


def request(
    path: str, command: str, args: Sequence[Any] = (), timeout: float = TIMEOUT
) -> dict[str, Any]:
    """Send one request to the control socket at ``path``; return the answer."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    with sock:
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise CtlError(
                f"cannot connect to {path}: no such socket; is forkserve running "
                "(without --control-socket off)?"
            ) from None
        except ConnectionRefusedError:
            raise CtlError(
                f"cannot connect to {path}: connection refused; the server that made it is gone"
            ) from None
        except PermissionError:
            raise CtlError(
                f"cannot connect to {path}: permission denied; run as the server's user"
            ) from None
        except OSError as exc:
            raise CtlError(f"cannot connect to {path}: {exc.strerror or exc}") from None
        line = json.dumps({"command": command, "args": list(args)}) + "\n"
        chunks: list[bytes] = []
        size = 0
        try:
            sock.sendall(line.encode("utf-8"))
            while size <= ANSWER_MAX:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if chunk.endswith(b"\n"):
                    break
        except TimeoutError:
            raise CtlError(f"{path}: no answer within {timeout:g}s") from None
        except OSError as exc:
            raise CtlError(f"{path}: {exc.strerror or exc}") from None
    try:
        answer = json.loads(b"".join(chunks))
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or "ok" not in answer:
        raise CtlError(f"{path}: the server closed the connection without a valid answer")
    return answer


def run(
    command: str,
    args: Sequence[str],
    *,
    socket_path: str | None = None,
    pidfile: str | None = None,
    as_json: bool = False,
) -> tuple[str, int]:
    """What to print and the exit status, for ``forkserve ctl COMMAND ARGS``."""
    path = find_socket(socket_path, pidfile)
    answer = request(path, command, list(args))
    if as_json:
        return json.dumps(answer, indent=2), 0 if answer.get("ok") else 1
    if not answer.get("ok"):
        raise CtlError(str(answer.get("error") or "the server refused the command"))
    return format_result(command, answer.get("result")), 0


# -- showing answers ------------------------------------------------------------------


def printable(text: str) -> str:
    """``text`` with control characters escaped: request lines come from clients."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text)


def duration(seconds: float | None) -> str:
    """``4.2s``, ``3m05s``, ``2h03m``, ``5d04h``."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def _mib(value: Any) -> str:
    return f"{value / 2**20:.1f}" if isinstance(value, (int, float)) else "-"


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def table(
    header: Sequence[str], rows: Sequence[Sequence[str]], left: frozenset[int] = frozenset()
) -> list[str]:
    """Columns aligned: right, or left for the column indexes in ``left``."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = [
            cell.ljust(width) if index in left else cell.rjust(width)
            for index, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    return [line(header), *(line(row) for row in rows)]


def _counts(mapping: Any) -> str:
    if not isinstance(mapping, dict) or not any(mapping.values()):
        return "none"
    return ", ".join(f"{key} {value}" for key, value in mapping.items() if value)


def format_status(status: dict[str, Any]) -> str:
    workers = status.get("workers") or []
    lines = [
        f"forkserve {status.get('version', '?')} (pid {status.get('pid', '?')}): "
        f"{status.get('app', '?')}, -k {status.get('worker_class', '?')}, "
        f"{len(workers)} running ({status.get('workers_wanted', '?')} wanted), "
        f"sched {status.get('sched', '?')}, up {duration(status.get('uptime'))}",
        f"listening on {', '.join(status.get('listeners') or []) or '-'}",
    ]
    summary = f"requests {status.get('requests', 0)}; restarts: {_counts(status.get('restarts'))}"
    if status.get("rr_queue_length") is not None:
        summary += f"; waiting in the primary: {status['rr_queue_length']}"
    lines += [summary, ""]
    rows = [
        [
            _cell(worker.get("id")),
            _cell(worker.get("pid")),
            _cell(worker.get("state")),
            _cell(worker.get("requests")),
            _cell(worker.get("in_flight")),
            _mib(worker.get("rss")),
            duration(worker.get("uptime")),
        ]
        for worker in workers
    ]
    header = ["ID", "PID", "STATE", "REQUESTS", "IN FLIGHT", "RSS MiB", "UPTIME"]
    lines += table(header, rows, left=frozenset({2}))
    busy = sorted(
        (
            (float(item.get("age") or 0.0), worker, item)
            for worker in workers
            for item in worker.get("requests_in_flight") or []
        ),
        key=lambda entry: -entry[0],
    )
    if busy:
        lines += ["", "oldest requests in flight:"]
        for age, worker, item in busy[:OLDEST_SHOWN]:
            lines.append(
                f"  {age:7.1f}s  worker {worker.get('id')} (pid {worker.get('pid')})  "
                f"{printable(str(item.get('line', '')))}  "
                f"from {printable(str(item.get('client') or '-'))}"
            )
    return "\n".join(lines)


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value:g} ms"


def _latency(hist: Any, what: str) -> str:
    if not isinstance(hist, dict) or not hist.get("count"):
        return f"{what}: none yet"

    def bound(key: str) -> str:
        value = hist.get(key)
        if value is None:
            return f"> {_ms(hist.get('max_bound_ms'))}"
        return f"<= {_ms(value)}"

    return (
        f"{what}: mean {hist['mean_ms']:.3f} ms over {hist['count']}; "
        f"p50 {bound('p50_ms')}, p90 {bound('p90_ms')}, p99 {bound('p99_ms')}"
    )


def format_stats(stats: dict[str, Any]) -> str:
    by_method = stats.get("by_method") or {}
    methods = (
        ", ".join(
            f"{method} {sum(classes.values())} ({_counts(classes)})"
            for method, classes in by_method.items()
        )
        or "none"
    )
    lines = [
        f"requests: {stats.get('requests', 0)} ({_counts(stats.get('by_status'))})",
        f"by method: {methods}",
        _latency(stats.get("latency"), "latency"),
        f"in flight: {stats.get('in_flight', 0)}; timeouts: {stats.get('timeouts', 0)}; "
        f"restarts: {_counts(stats.get('restarts'))}",
        f"workers: {_counts(stats.get('workers'))} ({stats.get('workers_wanted', '?')} wanted)",
    ]
    rr = stats.get("rr")
    if isinstance(rr, dict):
        lines.append(f"waiting in the primary (--sched rr): {rr.get('queue_length', 0)}")
        lines.append(_latency(rr.get("wait"), "wait in the primary"))
    return "\n".join(lines)


def format_result(command: str, result: Any) -> str:
    """``result`` of ``command`` for a human."""
    if command == "status" and isinstance(result, dict):
        return format_status(result)
    if command == "stats" and isinstance(result, dict):
        return format_stats(result)
    if command == "scale" and isinstance(result, dict):
        wanted, was = result.get("workers_wanted"), result.get("was")
        if wanted == was:
            return f"already {wanted} workers"
        return f"scaling from {was} to {wanted} workers"
    if command == "reload":
        return "reloading: new workers replace the old ones as they become ready"
    if command == "stop":
        return "stopping: in-flight requests finish first"
    if command == "dump-stacks" and isinstance(result, list):
        if not result:
            return "no workers"
        parts = []
        for item in result:
            stack = "\n".join(f"  {line}" for line in str(item.get("stack", "")).splitlines())
            parts.append(f"worker {item.get('id')} (pid {item.get('pid')}):\n{stack}")
        return "\n\n".join(parts)
    return json.dumps(result, indent=2)
