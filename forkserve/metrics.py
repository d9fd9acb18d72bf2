"""What the primary knows about the server's work, as numbers: a ``Snapshot``,
its Prometheus text rendering, and the ``/metrics`` endpoint.

A ``Snapshot`` is taken by the arbiter from every worker's scoreboard slot
plus what the workers that have exited served (nothing is lost when a
worker recycles or is killed), the restarts by cause, and, under round
robin, the primary's queue. ``render`` writes it in the text exposition
format 0.0.4 (``# HELP``, ``# TYPE``, escaped label values, cumulative
histogram buckets); ``stats`` as JSON-ready data for ``forkserve ctl stats``.
Both are pure.

``MetricsServer`` is a deliberately small HTTP/1.1 server on the primary's
loop: ``GET`` or ``HEAD /metrics``, one request per connection. A request
head must arrive within ``HEAD_TIMEOUT`` and ``HEAD_MAX`` bytes; anything
else is answered 400, 404 or 405 and closed, so a hostile client costs the
primary at most a few kilobytes and seconds.

Imports nothing from forkserve but ``scoreboard`` and ``sideband``.
"""

from __future__ import annotations

import asyncio
import math
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from email.utils import formatdate

from forkserve.scoreboard import BUCKETS, METHODS, STATUS_CLASSES, Counts
from forkserve.sideband import SidebandServer, receive, send_all

PREFIX = "forkserve_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PATH = "/metrics"
HEAD_MAX = 8192
HEAD_TIMEOUT = 5.0
SEND_TIMEOUT = 10.0
MAX_CLIENTS = 32
# Worker states counted in forkserve_workers, always all of them (a series
# that comes and goes is hard to graph).
WORKER_STATES = ("booting", "serving", "retiring", "leaving")


@dataclass(frozen=True, slots=True)
class Histogram:
    """Observations by bucket: ``counts[i]`` of at most ``bounds[i]`` (and more
    than the bound before); the last count is above every bound."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    total: float  # the sum of the observations

    @property
    def count(self) -> int:
        return sum(self.counts)

    @property
    def mean(self) -> float | None:
        count = self.count
        return self.total / count if count else None

    def cumulative(self) -> list[int]:
        out, running = [], 0
        for value in self.counts:
            running += value
            out.append(running)
        return out

    def quantile(self, q: float) -> float | None:
        """The upper bound of the bucket holding the ``q`` quantile (``inf``
        above the last bound); None without observations."""
        count = self.count
        if not count:
            return None
        rank = q * count
        for bound, running in zip((*self.bounds, math.inf), self.cumulative(), strict=True):
            if running >= rank:
                return bound
        return math.inf

    def minus(self, earlier: Histogram | None) -> Histogram:
        """What was observed since ``earlier`` (same bounds)."""
        if earlier is None:
            return self
        return Histogram(
            self.bounds,
            tuple(a - b for a, b in zip(self.counts, earlier.counts, strict=True)),
            self.total - earlier.total,
        )


@dataclass(frozen=True, slots=True)
class WorkerSample:
    id: int
    pid: int
    state: str
    rss: int | None  # bytes; None when unknown
    requests: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The numbers of one moment, over every worker (past ones included)."""

    start_time: float  # epoch seconds
    counts: Counts
    in_flight: int
    workers: tuple[WorkerSample, ...] = ()
    workers_wanted: int = 0
    restarts: Mapping[str, int] = field(default_factory=dict)
    rr_queue_length: int | None = None  # None unless the policy is round robin
    rr_wait: Histogram | None = None

    @property
    def latency(self) -> Histogram:
        return Histogram(BUCKETS, tuple(self.counts.histogram), self.counts.latency_sum)

    def workers_by_state(self) -> dict[str, int]:
        found = dict.fromkeys(WORKER_STATES, 0)
        for worker in self.workers:
            if worker.state in found:
                found[worker.state] += 1
        return found


# -- the text exposition format ------------------------------------------------------


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def number(value: float) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


Sample = tuple[str, Mapping[str, str], float]  # (name suffix, labels, value)


def family(name: str, kind: str, help_text: str, samples: Iterable[Sample]) -> list[str]:
    """The lines of one metric family (``name`` without the prefix)."""
    full = PREFIX + name
    lines = [f"# HELP {full} {escape_help(help_text)}", f"# TYPE {full} {kind}"]
    for suffix, labels, value in samples:
        if labels:
            text = ",".join(f'{key}="{escape_label(val)}"' for key, val in labels.items())
            lines.append(f"{full}{suffix}{{{text}}} {number(value)}")
        else:
            lines.append(f"{full}{suffix} {number(value)}")
    return lines


def histogram_samples(histogram: Histogram) -> list[Sample]:
    samples: list[Sample] = []
    for bound, running in zip((*histogram.bounds, math.inf), histogram.cumulative(), strict=True):
        samples.append(("_bucket", {"le": number(float(bound))}, running))
    samples.append(("_sum", {}, histogram.total))
    samples.append(("_count", {}, histogram.count))
    return samples


def render(snapshot: Snapshot) -> str:
    """``snapshot`` in the Prometheus text format 0.0.4."""
    counts = snapshot.counts
    lines: list[str] = []
    lines += family("up", "gauge", "1 while the server runs.", [("", {}, 1)])
    lines += family(
        "start_time_seconds",
        "gauge",
        "When the primary started, in seconds since the epoch.",
        [("", {}, snapshot.start_time)],
    )
    lines += family(
        "requests_total",
        "counter",
        "Requests answered, by method and status class.",
        [
            ("", {"method": method, "status": status}, value)
            for method, row in zip(METHODS, counts.by_method_status, strict=True)
            for status, value in zip(STATUS_CLASSES, row, strict=True)
            if value
        ],
    )
    lines += family(
        "request_duration_seconds",
        "histogram",
        "Time from a request's head to the end of its response.",
        histogram_samples(snapshot.latency),
    )
    lines += family(
        "requests_in_flight", "gauge", "Requests being served now.", [("", {}, snapshot.in_flight)]
    )
    lines += family(
        "request_timeouts_total",
        "counter",
        "Requests that ran past --request-timeout.",
        [("", {}, counts.timeouts)],
    )
    lines += family(
        "worker_restarts_total",
        "counter",
        "Workers replaced, by cause (crash, timeout, request-timeout, memory, lifetime, "
        "max-requests, reload).",
        [("", {"cause": cause}, value) for cause, value in sorted(snapshot.restarts.items())],
    )
    lines += family(
        "workers",
        "gauge",
        "Worker processes, by state.",
        [("", {"state": state}, value) for state, value in snapshot.workers_by_state().items()],
    )
    lines += family(
        "workers_wanted", "gauge", "The size of the pool.", [("", {}, snapshot.workers_wanted)]
    )
    lines += family(
        "worker_rss_bytes",
        "gauge",
        "Resident memory of each worker.",
        [
            ("", {"worker": str(w.id), "pid": str(w.pid)}, w.rss)
            for w in snapshot.workers
            if w.rss is not None
        ],
    )
    lines += family(
        "worker_requests_total",
        "counter",
        "Requests answered by each running worker.",
        [("", {"worker": str(w.id)}, w.requests) for w in snapshot.workers],
    )
    if snapshot.rr_queue_length is not None:
        lines += family(
            "rr_queue_length",
            "gauge",
            "Connections waiting in the primary for a free worker (--sched rr).",
            [("", {}, snapshot.rr_queue_length)],
        )
    if snapshot.rr_wait is not None:
        lines += family(
            "rr_queue_wait_seconds",
            "histogram",
            "Time from the primary's accept to a worker taking the connection (--sched rr).",
            histogram_samples(snapshot.rr_wait),
        )
    return "\n".join(lines) + "\n"


# -- the same numbers for forkserve ctl stats -----------------------------------------


def _ms(seconds: float | None) -> float | None:
    if seconds is None or math.isinf(seconds):
        return None
    return round(seconds * 1000.0, 3)


def histogram_stats(histogram: Histogram) -> dict[str, object]:
    """JSON-ready: count, mean and quantiles in ms (a quantile is its bucket's
    upper bound; None above the last bound), and the cumulative buckets."""
    return {
        "count": histogram.count,
        "sum_seconds": round(histogram.total, 6),
        "mean_ms": _ms(histogram.mean),
        "p50_ms": _ms(histogram.quantile(0.5)),
        "p90_ms": _ms(histogram.quantile(0.9)),
        "p99_ms": _ms(histogram.quantile(0.99)),
        "max_bound_ms": _ms(histogram.bounds[-1]),
        "buckets": [
            [number(float(bound)), running]
            for bound, running in zip(
                (*histogram.bounds, math.inf), histogram.cumulative(), strict=True
            )
        ],
    }


def stats(snapshot: Snapshot) -> dict[str, object]:
    """``snapshot`` as JSON-ready data (``forkserve ctl stats``)."""
    counts = snapshot.counts
    by_method = {
        method: {status: value for status, value in zip(STATUS_CLASSES, row, strict=True) if value}
        for method, row in zip(METHODS, counts.by_method_status, strict=True)
        if any(row)
    }
    result: dict[str, object] = {
        "requests": counts.requests,
        "by_status": counts.by_status_class(),
        "by_method": by_method,
        "latency": histogram_stats(snapshot.latency),
        "in_flight": snapshot.in_flight,
        "timeouts": counts.timeouts,
        "restarts": dict(snapshot.restarts),
        "workers": snapshot.workers_by_state(),
        "workers_wanted": snapshot.workers_wanted,
        "rr": None,
    }
    if snapshot.rr_queue_length is not None:
        result["rr"] = {
            "queue_length": snapshot.rr_queue_length,
            "wait": histogram_stats(snapshot.rr_wait) if snapshot.rr_wait is not None else None,
        }
    return result


# -- the endpoint ----------------------------------------------------------------------

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
}


def parse_head(head: bytes) -> tuple[str, str] | None:
    """``(method, path)`` of a request head (RFC 9112 origin-form), None if malformed."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        return None
    lines = text.replace("\r\n", "\n").split("\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        return None
    method, target, version = parts
    if not method.isalpha() or not method.isupper() or version not in ("HTTP/1.1", "HTTP/1.0"):
        return None
    if not target.startswith("/") or any(ch <= " " or ch == "\x7f" for ch in target):
        return None
    for line in lines[1:]:
        if not line:
            break
        name, colon, _ = line.partition(":")
        if not colon or not name or name != name.strip() or not name.isprintable():
            return None  # no field name, or obs-fold and whitespace before the colon
    return method, target.partition("?")[0]


def respond(head: bytes, body_of: Callable[[], str]) -> bytes:
    """The whole response to a request head (``read_head``'s)."""
    if len(head) > HEAD_MAX:
        return _response(431, "request head too large\n")
    parsed = parse_head(head)
    if parsed is None:
        return _response(400, "bad request\n")
    method, path = parsed
    if path != PATH:
        return _response(404, f"not found; metrics are at {PATH}\n")
    if method not in ("GET", "HEAD"):
        return _response(405, "only GET and HEAD\n", [("Allow", "GET, HEAD")])
    return _response(200, body_of(), [("Content-Type", CONTENT_TYPE)], head_only=method == "HEAD")


def _response(
    status: int,
    text: str,
    headers: list[tuple[str, str]] | None = None,
    head_only: bool = False,
) -> bytes:
    body = text.encode("utf-8")
    fields = headers or [("Content-Type", "text/plain; charset=utf-8")]
    fields = [
        *fields,
        ("Content-Length", str(len(body))),
        ("Date", formatdate(usegmt=True)),
        ("Connection", "close"),
    ]
    lines = [f"HTTP/1.1 {status} {_REASONS[status]}", *(f"{k}: {v}" for k, v in fields)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else body)


async def read_head(conn: socket.socket) -> bytes | None:
    """A request head, up to its empty line (past ``HEAD_MAX`` bytes without
    one: what was read, longer than that); None if the client closed first."""
    buffer = b""
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            end = buffer.find(b"\n\n")
        if end >= 0:
            return buffer[:end]
        if len(buffer) > HEAD_MAX:
            return buffer
        chunk = await receive(conn, 4096, HEAD_TIMEOUT)
        if not chunk:
            return None
        buffer += chunk


class MetricsServer:
    """``GET /metrics`` on ``sock`` (listening), answered with ``body_of()``."""

    def __init__(self, sock: socket.socket, body_of: Callable[[], str]) -> None:
        self.body_of = body_of
        self._server = SidebandServer(sock, self._serve, name="metrics", max_clients=MAX_CLIENTS)

    @property
    def sock(self) -> socket.socket:
        """The listening socket (a new primary takes it over on SIGUSR2)."""
        return self._server.sock

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._server.start(loop)

    async def _serve(self, conn: socket.socket) -> None:
        head = await asyncio.wait_for(read_head(conn), HEAD_TIMEOUT)
        if head is None:
            return
        await send_all(conn, respond(head, self.body_of), SEND_TIMEOUT)

    def close_in_child(self) -> None:
        self._server.close_in_child()

    def close(self) -> None:
        self._server.close()
