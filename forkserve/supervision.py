"""What the primary concludes from a worker's scoreboard slot, once a second.

One pure function, ``assess``, holds the whole policy: a worker whose serve
loop stopped beating for ``--timeout`` is killed; a request running past
``--request-timeout`` is reported (and its worker recycled, unless the
worker cancels its own requests, as the asgi class does); a worker whose
RSS stays above ``--max-worker-memory`` for ``MEMORY_SAMPLES`` readings in a
row, or that has run ``--max-worker-lifetime``, is recycled. The arbiter
acts on the findings: it recycles one worker at a time, the replacement
ready before its predecessor leaves.

No I/O here besides ``rss_of`` reading ``/proc``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import NamedTuple

from forkserve.scoreboard import FLAG_CANCELS_OWN, InFlight, SlotView

MEMORY_SAMPLES = 3  # readings in a row above the limit before recycling
_PAGE = os.sysconf("SC_PAGE_SIZE")

SILENT = "timeout"
REQUEST_TIMEOUT = "request-timeout"
MEMORY = "memory"
LIFETIME = "lifetime"


class Limits(NamedTuple):
    timeout: float = 0.0
    request_timeout: float = 0.0
    max_memory: int = 0
    max_lifetime: float = 0.0


@dataclass(slots=True)
class Watch:
    """What the primary remembers between readings of one worker."""

    over_memory: int = 0
    recycling: bool = False
    killing: bool = False
    reported: list[tuple[str, str, float]] = field(default_factory=list)


class Finding(NamedTuple):
    kind: str  # SILENT, REQUEST_TIMEOUT, MEMORY or LIFETIME
    detail: str
    request: InFlight | None = None
    recycle: bool = False  # replace the worker (one at a time)
    kill: bool = False  # kill it now


def assess(
    watch: Watch, view: SlotView, rss: int | None, age: float, now: float, limits: Limits
) -> list[Finding]:
    """The findings about one ready worker; ``watch`` is updated in place.

    ``age`` is how long the worker has run; ``rss`` its resident memory in
    bytes (None when unknown); ``now`` the monotonic time of the reading.
    Recycling findings repeat while the condition holds: the arbiter acts on
    the first and marks ``watch.recycling``.
    """
    if watch.killing:
        return []
    silent = now - view.heartbeat if view.heartbeat else 0.0
    if limits.timeout > 0 and silent > limits.timeout:
        watch.killing = True
        oldest = view.requests[0] if view.requests else None
        return [
            Finding(
                SILENT,
                f"no heartbeat for {silent:.1f}s (--timeout {limits.timeout:g})",
                oldest,
                kill=True,
            )
        ]
    findings: list[Finding] = []
    if limits.request_timeout > 0:
        cancels_own = bool(view.flags & FLAG_CANCELS_OWN)
        for request in view.requests:
            if request.age <= limits.request_timeout:
                break  # oldest first
            if cancels_own or not _first_report(watch, request, now):
                continue
            findings.append(
                Finding(
                    REQUEST_TIMEOUT,
                    f"request running {request.age:.1f}s "
                    f"(--request-timeout {limits.request_timeout:g})",
                    request,
                    recycle=True,
                )
            )
    if limits.max_memory > 0 and rss is not None:
        watch.over_memory = watch.over_memory + 1 if rss > limits.max_memory else 0
        if watch.over_memory >= MEMORY_SAMPLES:
            findings.append(
                Finding(
                    MEMORY,
                    f"RSS {rss / 2**20:.0f} MiB above --max-worker-memory "
                    f"{limits.max_memory / 2**20:.0f} MiB for {watch.over_memory} samples",
                    recycle=True,
                )
            )
    if limits.max_lifetime > 0 and age > limits.max_lifetime:
        findings.append(
            Finding(
                LIFETIME,
                f"ran {age:.0f}s (--max-worker-lifetime {limits.max_lifetime:g})",
                recycle=True,
            )
        )
    return findings


def _first_report(watch: Watch, request: InFlight, now: float) -> bool:
    """True the first time this request (line, client, start time) is seen late."""
    start = now - request.age
    for line, client, seen in watch.reported:
        if line == request.line and client == request.client and abs(seen - start) < 0.5:
            return False
    watch.reported.append((request.line, request.client, start))
    del watch.reported[:-64]
    return True


def rss_of(pid: int) -> int | None:
    """Resident set size of ``pid`` in bytes, None if it is gone."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as handle:
            return int(handle.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None
