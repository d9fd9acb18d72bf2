"""The supervision policy: what a reading of a worker's slot leads to."""

from __future__ import annotations

import os

from forkserve.scoreboard import FLAG_CANCELS_OWN, Counts, InFlight, SlotView
from forkserve.supervision import (
    LIFETIME,
    MEMORY,
    MEMORY_SAMPLES,
    REQUEST_TIMEOUT,
    SILENT,
    Limits,
    Watch,
    assess,
    rss_of,
)

NOW = 1000.0
MIB = 2**20


def view(
    heartbeat: float = NOW, requests: list[InFlight] | None = None, flags: int = 0
) -> SlotView:
    return SlotView(
        pid=1,
        heartbeat=heartbeat,
        started=NOW - 100,
        in_flight=len(requests or []),
        flags=flags,
        stack_fd=3,
        counts=Counts(),
        requests=requests or [],
    )


def test_a_silent_worker_is_killed_once_with_its_oldest_request() -> None:
    watch = Watch()
    late = InFlight("GET /spin", "10.0.0.1", 31.0)
    found = assess(watch, view(NOW - 31, [late]), None, 60, NOW, Limits(timeout=30))
    assert [(f.kind, f.kill, f.request) for f in found] == [(SILENT, True, late)]
    assert "31.0s" in found[0].detail
    assert assess(watch, view(NOW - 40, [late]), None, 70, NOW + 9, Limits(timeout=30)) == []


def test_a_beating_worker_or_no_timeout_is_left_alone() -> None:
    assert assess(Watch(), view(NOW - 5), None, 60, NOW, Limits(timeout=30)) == []
    assert assess(Watch(), view(NOW - 500), None, 60, NOW, Limits()) == []
    assert assess(Watch(), view(0.0), None, 60, NOW, Limits(timeout=1)) == []  # never beat yet


def test_a_late_request_is_reported_once_and_recycles() -> None:
    watch = Watch()
    limits = Limits(request_timeout=10)
    requests = [InFlight("GET /slow", "c", 12.0), InFlight("GET /ok", "c", 3.0)]
    found = assess(watch, view(requests=requests), None, 60, NOW, limits)
    assert [(f.kind, f.recycle, f.request and f.request.line) for f in found] == [
        (REQUEST_TIMEOUT, True, "GET /slow")
    ]
    # The same request a second later: already reported.
    again = [InFlight("GET /slow", "c", 13.0)]
    assert assess(watch, view(requests=again), None, 61, NOW + 1, limits) == []
    # Another request with the same line, started later, is new.
    other = [InFlight("GET /slow", "c", 11.0)]
    assert len(assess(watch, view(requests=other), None, 70, NOW + 10, limits)) == 1


def test_a_worker_that_cancels_its_own_requests_is_not_recycled_for_them() -> None:
    requests = [InFlight("GET /slow", "c", 12.0)]
    found = assess(
        Watch(),
        view(requests=requests, flags=FLAG_CANCELS_OWN),
        None,
        60,
        NOW,
        Limits(request_timeout=10),
    )
    assert found == []


def test_memory_must_stay_high_for_several_samples() -> None:
    watch = Watch()
    limits = Limits(max_memory=100 * MIB)
    for _ in range(MEMORY_SAMPLES - 1):
        assert assess(watch, view(), 150 * MIB, 60, NOW, limits) == []
    assert assess(watch, view(), 90 * MIB, 60, NOW, limits) == []  # a dip resets the count
    for _ in range(MEMORY_SAMPLES - 1):
        assert assess(watch, view(), 150 * MIB, 60, NOW, limits) == []
    found = assess(watch, view(), 150 * MIB, 60, NOW, limits)
    assert [(f.kind, f.recycle) for f in found] == [(MEMORY, True)]
    assert "150 MiB" in found[0].detail


def test_lifetime() -> None:
    limits = Limits(max_lifetime=3600)
    assert assess(Watch(), view(), None, 3599, NOW, limits) == []
    found = assess(Watch(), view(), None, 3601, NOW, limits)
    assert [(f.kind, f.recycle) for f in found] == [(LIFETIME, True)]


def test_rss_of_this_process_and_of_nothing() -> None:
    rss = rss_of(os.getpid())
    assert rss is not None and rss > MIB
    assert rss_of(2**22 + 7) is None
