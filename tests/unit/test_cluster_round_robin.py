"""RoundRobinQueue: pure bookkeeping of the SCHED_RR hand-off."""

from __future__ import annotations

from collections import Counter

from forkserve.cluster.round_robin import RoundRobinQueue


def owners(assignments):
    return [(a.worker_id, a.conn) for a in assignments]


def test_pending_until_a_worker_joins():
    q = RoundRobinQueue()
    assert q.push("c1") == []
    assert list(q.pending) == ["c1"]
    assert owners(q.add(1)) == [(1, "c1")]
    assert not q.pending


def test_round_robin_order_with_prompt_acks():
    q = RoundRobinQueue()
    for w in (1, 2, 3):
        q.add(w)
    seen = []
    for n in range(9):
        (a,) = q.push(f"c{n}")
        seen.append(a.worker_id)
        conn, more = q.ack(a.worker_id, a.token, accepted=True)
        assert conn == f"c{n}" and more == []
    assert seen == [1, 2, 3] * 3


def test_busy_worker_is_skipped():
    q = RoundRobinQueue()
    q.add(1)
    q.add(2)
    (first,) = q.push("a")
    assert first.worker_id == 1
    assert not q.is_free(1)
    # Worker 1 has not taken "a": everything else goes to worker 2, one at a time.
    got = []
    for n in range(5):
        (a,) = q.push(f"b{n}")
        got.append(a.worker_id)
        q.ack(a.worker_id, a.token, True)
    assert got == [2] * 5


def test_connections_wait_while_nobody_is_free():
    q = RoundRobinQueue()
    q.add(1)
    (a,) = q.push("a")
    assert q.push("b") == []
    assert q.push("c") == []
    assert list(q.pending) == ["b", "c"]
    conn, nxt = q.ack(1, a.token, True)
    assert conn == "a"
    assert owners(nxt) == [(1, "b")]


def test_refused_connection_goes_back_to_the_front():
    q = RoundRobinQueue()
    q.add(1)
    (a,) = q.push("a")
    q.push("b")
    conn, nxt = q.ack(1, a.token, accepted=False)
    assert conn == "a"
    assert owners(nxt) == [(1, "a")]
    assert list(q.pending) == ["b"]


def test_removed_worker_gives_back_its_connections():
    q = RoundRobinQueue()
    q.add(1, credits=2)
    q.push("a")
    q.push("b")
    q.push("c")
    assert list(q.pending) == ["c"]
    assert owners(q.remove(1)) == []
    assert list(q.pending) == ["a", "b", "c"]
    assert owners(q.add(2)) == [(2, "a")]


def test_ack_from_unknown_worker_or_token_is_ignored():
    q = RoundRobinQueue()
    q.add(1)
    (a,) = q.push("a")
    assert q.ack(9, a.token, True) == (None, [])
    assert q.ack(1, a.token + 100, True) == (None, [])
    assert q.ack(1, a.token, True)[0] == "a"
    assert q.ack(1, a.token, True) == (None, [])  # not twice


def test_credits_let_a_worker_hold_several():
    q = RoundRobinQueue()
    q.add(1, credits=3)
    q.add(2, credits=1)
    got = [a.worker_id for n in range(4) for a in q.push(n)]
    assert sorted(got) == [1, 1, 1, 2]
    assert got[:2] == [1, 2]  # round robin order still holds
    assert q.push(99) == []


def test_add_twice_is_a_no_op():
    q = RoundRobinQueue()
    q.add(1)
    assert q.add(1) == []
    assert q.workers == [1]


def test_max_pending_full():
    q = RoundRobinQueue(max_pending=2)
    q.push(1)
    assert not q.full
    q.push(2)
    assert q.full


def test_drain_returns_everything_held():
    q = RoundRobinQueue()
    q.add(1)
    q.push("a")
    q.push("b")
    assert sorted(q.drain()) == ["a", "b"]
    assert not q.pending


def test_fair_over_many():
    q = RoundRobinQueue()
    for w in range(1, 5):
        q.add(w)
    counts = Counter()
    for n in range(400):
        for a in q.push(n):
            counts[a.worker_id] += 1
            q.ack(a.worker_id, a.token, True)
    assert counts == {1: 100, 2: 100, 3: 100, 4: 100}


def test_tokens_are_unique():
    q = RoundRobinQueue()
    q.add(1, credits=10)
    tokens = [a.token for n in range(10) for a in q.push(n)]
    assert len(set(tokens)) == 10
