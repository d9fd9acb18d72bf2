"""The scoreboard: a worker's writes are what the primary reads, across fork."""

from __future__ import annotations

import os
import threading
import time

import pytest

from forkserve.scoreboard import (
    BUCKETS,
    ENTRIES,
    LINE_MAX,
    METHODS,
    SLOT_ENV,
    Counts,
    Scoreboard,
    bucket_index,
    method_index,
    slot_from_environ,
    status_index,
)


def test_a_request_is_in_flight_until_it_ends() -> None:
    board = Scoreboard(4)
    index = board.allocate()
    assert index is not None
    slot = board.attach(index)
    token = slot.begin("GET", "/slow?x=1", "127.0.0.1")
    view = board.read(index)
    assert view.in_flight == 1
    assert [(r.line, r.client) for r in view.requests] == [("GET /slow?x=1", "127.0.0.1")]
    assert view.pid == os.getpid()
    slot.end(token, "GET", 200)
    view = board.read(index)
    assert view.in_flight == 0
    assert view.requests == []
    assert view.counts.requests == 1
    assert view.counts.by_status_class()["2xx"] == 1
    assert view.counts.by_method_status[method_index("GET")][status_index(200)] == 1
    assert sum(view.counts.histogram) == 1


def test_writes_in_a_forked_child_are_seen_by_the_parent() -> None:
    board = Scoreboard(2)
    index = board.allocate()
    assert index is not None
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        slot = board.attach(index)
        for status in (200, 404, 500):
            slot.end(slot.begin("POST", "/x", "::1"), "POST", status)
        slot.begin("PUT", "/stuck", "::1")
        os._exit(0)
    os.waitpid(pid, 0)
    view = board.read(index)
    assert view.pid == pid
    assert view.counts.requests == 3
    assert view.counts.by_status_class() == {"1xx": 0, "2xx": 1, "3xx": 0, "4xx": 1, "5xx": 1}
    # What a killed worker was doing stays readable after it is gone.
    assert [r.line for r in view.requests] == ["PUT /stuck"]


def test_allocate_clears_a_released_slot_and_runs_out() -> None:
    board = Scoreboard(1)
    index = board.allocate()
    assert index is not None
    slot = board.attach(index)
    slot.end(slot.begin("GET", "/", "c"), "GET", 200)
    assert board.allocate() is None
    board.release(index)
    again = board.allocate()
    assert again == index
    assert board.read(again).counts.requests == 0


def test_more_requests_than_entries_are_counted_not_listed() -> None:
    board = Scoreboard(1)
    index = board.allocate()
    assert index is not None
    slot = board.attach(index)
    tokens = [slot.begin("GET", f"/{n}", "c") for n in range(ENTRIES + 5)]
    view = board.read(index)
    assert view.in_flight == ENTRIES + 5
    assert len(view.requests) == ENTRIES
    for token in tokens:
        slot.end(token, "GET", 200)
    assert board.read(index).in_flight == 0
    assert board.read(index).counts.requests == ENTRIES + 5


def test_long_request_lines_are_cut_and_oldest_comes_first() -> None:
    board = Scoreboard(1)
    index = board.allocate()
    assert index is not None
    slot = board.attach(index)
    slot.begin("GET", "/" + "a" * 1000, "c")
    time.sleep(0.01)
    slot.begin("DELETE", "/new", "c")
    requests = board.read(index).requests
    assert len(requests[0].line) == LINE_MAX
    assert requests[0].age > requests[1].age
    assert requests[1].line == "DELETE /new"


def test_threads_do_not_lose_counts() -> None:
    board = Scoreboard(1)
    index = board.allocate()
    assert index is not None
    slot = board.attach(index)

    def work() -> None:
        for _ in range(2000):
            slot.end(slot.begin("GET", "/", "c"), "GET", 204)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    view = board.read(index)
    assert view.counts.requests == 8000
    assert view.in_flight == 0


def test_heartbeat_and_silence() -> None:
    board = Scoreboard(1)
    index = board.allocate()
    assert index is not None
    assert board.read(index).heartbeat == 0
    slot = board.attach(index)
    first = board.read(index).heartbeat
    time.sleep(0.02)
    slot.beat()
    assert board.read(index).heartbeat > first
    assert board.read(index).silent_for < 1.0


def test_counts_add_up() -> None:
    one, two = Counts(requests=1, latency_sum=0.5), Counts(requests=2, latency_sum=0.25)
    one.by_method_status[0][1] = 1
    two.by_method_status[0][1] = 2
    one.histogram[0] = 1
    two.histogram[-1] = 2
    one.add(two)
    assert one.requests == 3
    assert one.latency_sum == 0.75
    assert one.by_method_status[0][1] == 3
    assert one.histogram[0] == 1 and one.histogram[-1] == 2


@pytest.mark.parametrize(
    ("seconds", "index"),
    [(0.0, 0), (0.005, 0), (0.006, 1), (10.0, len(BUCKETS) - 1), (11, len(BUCKETS))],
)
def test_bucket_index(seconds: float, index: int) -> None:
    assert bucket_index(seconds) == index


def test_method_and_status_classes() -> None:
    assert method_index("BREW") == len(METHODS) - 1
    assert status_index(101) == 0 and status_index(599) == 4 and status_index(0) == 4


def test_slot_from_environ_takes_the_variable_away(monkeypatch: pytest.MonkeyPatch) -> None:
    board = Scoreboard(2)
    index = board.allocate()
    monkeypatch.setenv(SLOT_ENV, str(index))
    slot = slot_from_environ(board)
    assert slot is not None and slot.index == index
    assert SLOT_ENV not in os.environ
    assert slot_from_environ(board) is None


def test_a_single_thread_slot_counts_like_a_locked_one() -> None:
    board = Scoreboard(2)
    locked_index, single_index = board.allocate(), board.allocate()
    assert locked_index is not None and single_index is not None
    locked, single = board.attach(locked_index), board.attach(single_index)
    single.set_single_thread()
    cases = [("GET", 200), ("POST", 201), ("BREW", 418), ("GET", 503), ("HEAD", 99), ("PUT", 600)]
    for slot in (locked, single):
        for method, status in cases:
            slot.end(slot.begin(method, "/", "c"), method, status)
    mine, theirs = board.read(single_index).counts, board.read(locked_index).counts
    assert mine.by_method_status == theirs.by_method_status
    assert mine.histogram == theirs.histogram
    assert mine.requests == theirs.requests == len(cases)
    # Out-of-range statuses count as 5xx, unknown methods as OTHER (as before).
    assert mine.by_method_status[method_index("HEAD")][status_index(99)] == 1
    assert mine.by_method_status[method_index("BREW")][status_index(418)] == 1


def test_totals_are_derived_from_the_counts_and_the_entries() -> None:
    board = Scoreboard(1)
    index = board.allocate()
    assert index is not None
    slot = board.attach(index)
    first = slot.begin("GET", "/a", "c")
    second = slot.begin("GET", "/b", "c")
    view = board.read(index)
    assert (view.in_flight, view.counts.requests) == (2, 0)
    slot.end(first, "GET", 200)
    view = board.read(index)
    assert (view.in_flight, view.counts.requests) == (1, 1)
    assert [r.line for r in view.requests] == ["GET /b"]
    # A timeout the primary counts is not a request.
    board.count_timeout(index)
    assert board.read(index).counts.requests == 1
    slot.end(second, "GET", 200)
    assert board.read(index).in_flight == 0


def test_unlisted_requests_reuse_their_tokens() -> None:
    board = Scoreboard(1)
    index = board.allocate()
    assert index is not None
    slot = board.attach(index)
    slot.set_single_thread()
    for _ in range(3):
        tokens = [slot.begin("GET", f"/{n}", "c") for n in range(ENTRIES + 3)]
        assert len(set(tokens)) == ENTRIES + 3
        assert board.read(index).in_flight == ENTRIES + 3
        for token in reversed(tokens):
            slot.end(token, "GET", 200)
        assert board.read(index).in_flight == 0
    view = board.read(index)
    assert view.counts.requests == 3 * (ENTRIES + 3)
    assert view.requests == []
    # Three rounds of three unlisted requests used three spare tokens, not nine.
    assert max(tokens) == ENTRIES + 2


def test_an_entry_reused_by_a_shorter_line_shows_only_that_line() -> None:
    board = Scoreboard(1)
    index = board.allocate()
    assert index is not None
    slot = board.attach(index)
    slot.end(slot.begin("GET", "/a/long/path?with=query", "2001:db8::1"), "GET", 200)
    slot.begin("GET", "/", "::1")
    (request,) = board.read(index).requests
    assert (request.line, request.client) == ("GET /", "::1")


def test_a_repeated_request_gets_a_fresh_start_time() -> None:
    board = Scoreboard(1)
    index = board.allocate()
    assert index is not None
    slot = board.attach(index)
    slot.set_single_thread()
    slot.end(slot.begin("GET", "/health", "10.0.0.1"), "GET", 200)
    time.sleep(0.05)
    token = slot.begin("GET", "/health", "10.0.0.1")
    (request,) = board.read(index).requests
    assert (request.line, request.client) == ("GET /health", "10.0.0.1")
    assert request.age < 0.05
    slot.end(token, "GET", 200)
    assert board.read(index).requests == []
    slot.begin("GET", "/health", "10.0.0.2")
    assert [r.client for r in board.read(index).requests] == ["10.0.0.2"]
