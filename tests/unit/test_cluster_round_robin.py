"""RoundRobinQueue: pure bookkeeping of the SCHED_RR hand-off."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from forkserve.cluster.ipc import NONBLOCKING, Handoff
from forkserve.cluster.round_robin import RoundRobinHandle, RoundRobinQueue, WaitStats


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


def test_held_lists_pending_and_in_flight_and_keeps_them():
    q = RoundRobinQueue()
    q.add(1)
    q.push("a")
    q.push("b")
    assert sorted(q.held()) == ["a", "b"]
    assert list(q.pending) == ["b"]
    assert sorted(q.held()) == ["a", "b"]


def test_in_flight_of_a_removed_worker_goes_to_the_next_free_one_first():
    q = RoundRobinQueue()
    q.add(1)
    q.add(2)
    (a,) = q.push("a")
    (b,) = q.push("b")
    q.push("c")
    assert (a.worker_id, b.worker_id) == (1, 2)
    _, nxt = q.ack(2, b.token, True)  # worker 2 took "b" and, free again, gets "c"
    (c,) = nxt
    assert (c.worker_id, c.conn) == (2, "c")
    assert owners(q.remove(1)) == []  # nobody is free: "a" waits, first in line
    assert list(q.pending) == ["a"]
    conn, nxt = q.ack(2, c.token, True)
    assert conn == "c" and owners(nxt) == [(2, "a")]


# -- RoundRobinHandle, on a recording loop ---------------------------------------------------


class FakeTimer:
    def __init__(self, delay: float, callback: Any, args: tuple[Any, ...]) -> None:
        self.delay = delay
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def fire(self) -> None:
        assert not self.cancelled
        self.callback(*self.args)


class FakeLoop:
    """add_reader/remove_reader/call_later, run by hand."""

    def __init__(self) -> None:
        self.readers: dict[int, tuple[Any, tuple[Any, ...]]] = {}
        self.timers: list[FakeTimer] = []

    def add_reader(self, fd: int, callback: Any, *args: Any) -> None:
        self.readers[fd] = (callback, args)

    def remove_reader(self, fd: int) -> bool:
        return self.readers.pop(fd, None) is not None

    def call_later(self, delay: float, callback: Any, *args: Any) -> FakeTimer:
        timer = FakeTimer(delay, callback, args)
        self.timers.append(timer)
        return timer

    def ready(self, fd: int) -> None:
        callback, args = self.readers[fd]
        callback(*args)


class FakeListening:
    """A listening socket whose accept() hands out the server ends of socketpairs."""

    def __init__(self) -> None:
        self.waiting: list[socket.socket] = []
        self.closed = False

    family = socket.AF_UNIX
    type = socket.SOCK_STREAM
    proto = 0

    def setblocking(self, flag: bool) -> None:
        pass

    def fileno(self) -> int:
        return -1 if self.closed else 1000

    def _accept(self) -> tuple[int, Any]:
        # What socket.accept() wraps (the handle's Acceptor calls it).
        if not self.waiting:
            raise BlockingIOError
        return self.waiting.pop(0).detach(), ("127.0.0.1", 1)

    def gettimeout(self) -> float | None:
        return 0.0

    def getsockname(self) -> Any:
        return ("127.0.0.1", 0)

    def close(self) -> None:
        self.closed = True


class Rig:
    def __init__(self, **options: Any) -> None:
        self.loop = FakeLoop()
        self.listening = FakeListening()
        self.sent: list[tuple[int, int, socket.socket, bytes]] = []
        self.accepted: list[float] = []
        self.handoffs: list[Handoff] = []
        self.clients: list[socket.socket] = []
        self.handle = RoundRobinHandle(
            "k",
            self.listening,  # type: ignore[arg-type]
            self.loop,  # type: ignore[arg-type]
            self.send_conn,
            **options,
        )

    def send_conn(self, worker_id: int, conn: socket.socket, handoff: Handoff) -> bool:
        assert handoff.key == "k"
        self.sent.append((worker_id, handoff.token, conn, handoff.data))
        self.accepted.append(handoff.accepted_at)
        self.handoffs.append(handoff)
        return True

    def connect(self) -> socket.socket:
        """A client connects; the primary's listening socket becomes readable."""
        client, server = socket.socketpair()
        self.clients.append(client)
        self.listening.waiting.append(server)
        self.loop.ready(1000)
        return client

    def watched(self) -> list[socket.socket]:
        return list(self.handle.watching)

    def close(self) -> None:
        self.handle.close()
        for client in self.clients:
            client.close()


@pytest.fixture
def rig_factory() -> Iterator[Any]:
    rigs: list[Rig] = []

    def make(**options: Any) -> Rig:
        rig = Rig(**options)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.close()


def test_handle_without_options_hands_over_at_once(rig_factory: Any) -> None:
    rig = rig_factory()
    rig.handle.add(1)
    rig.connect()
    assert [(w, d) for w, _, _, d in rig.sent] == [(1, b"")]
    assert rig.watched() == []


def test_the_peer_address_and_family_travel_with_the_connection(rig_factory: Any) -> None:
    rig = rig_factory()
    rig.handle.add(1)
    rig.connect()
    (handoff,) = rig.handoffs
    assert handoff.peer == ("127.0.0.1", 1)  # as accept() gave it
    assert handoff.family == socket.AF_UNIX and handoff.flags == 0


def test_a_parked_connection_goes_out_again_with_its_peer_and_flags(rig_factory: Any) -> None:
    rig = rig_factory(park_timeout=5.0)
    rig.handle.add(1)
    client, server = socket.socketpair()
    rig.clients.append(client)
    client.sendall(b"GET / HTTP/1.1\r\n\r\n")
    rig.handle.park(server, ("10.0.0.7", 4321), NONBLOCKING)
    (handoff,) = rig.handoffs
    assert rig.sent[0][2] is server
    assert handoff.peer == ("10.0.0.7", 4321) and handoff.flags == NONBLOCKING


def test_wait_for_data_holds_a_silent_connection_until_it_speaks(rig_factory: Any) -> None:
    rig = rig_factory(wait_for_data=2.0)
    rig.handle.add(1)
    client = rig.connect()
    (conn,) = rig.watched()
    assert rig.sent == []
    assert [t.delay for t in rig.loop.timers] == [2.0]
    client.sendall(b"GET / HTTP/1.1\r\n")
    rig.loop.ready(conn.fileno())
    assert [(w, c, d) for w, _, c, d in rig.sent] == [(1, conn, b"")]
    assert rig.loop.timers[0].cancelled
    assert conn.fileno() not in rig.loop.readers
    assert conn.recv(100, socket.MSG_PEEK) == b"GET / HTTP/1.1\r\n"  # only peeked at


def test_wait_for_data_deadline_goes_to_on_expired(rig_factory: Any) -> None:
    expired: list[tuple[socket.socket, bytes]] = []
    rig = rig_factory(wait_for_data=1.0, on_expired=lambda c, d: expired.append((c, d)))
    rig.handle.add(1)
    rig.connect()
    (conn,) = rig.watched()
    rig.loop.timers[0].fire()
    assert expired == [(conn, b"")]
    assert rig.watched() == [] and rig.sent == []
    assert conn.fileno() not in rig.loop.readers


def test_wait_for_data_deadline_closes_by_default(rig_factory: Any) -> None:
    rig = rig_factory(wait_for_data=1.0)
    rig.handle.add(1)
    client = rig.connect()
    rig.loop.timers[0].fire()
    client.settimeout(1)
    assert client.recv(10) == b""


def test_a_client_that_only_closes_never_reaches_a_worker(rig_factory: Any) -> None:
    rig = rig_factory(wait_for_data=1.0)
    rig.handle.add(1)
    client = rig.connect()
    (conn,) = rig.watched()
    client.close()
    rig.loop.ready(conn.fileno())
    assert rig.sent == [] and rig.watched() == []
    assert conn.fileno() == -1


def test_head_complete_buffers_and_the_bytes_travel_with_the_connection(
    rig_factory: Any,
) -> None:
    seen: list[bytes] = []

    def complete(buffer: bytes) -> bool | None:
        seen.append(buffer)
        return True if b"\r\n\r\n" in buffer else None

    rig = rig_factory(wait_for_data=1.0, head_complete=complete)
    rig.handle.add(1)
    rig.handle.add(2)
    client = rig.connect()
    (conn,) = rig.watched()
    client.sendall(b"GET / HTTP/1.1\r\n")
    rig.loop.ready(conn.fileno())
    assert rig.sent == []
    client.sendall(b"Host: x\r\n\r\n")
    rig.loop.ready(conn.fileno())
    head = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    assert seen == [b"GET / HTTP/1.1\r\n", head]
    assert [(w, c, d) for w, _, c, d in rig.sent] == [(1, conn, head)]
    assert conn.getblocking()
    # Worker 1 dies before taking it: worker 2 gets it, with the same bytes.
    rig.handle.remove(1)
    assert [(w, c, d) for w, _, c, d in rig.sent[1:]] == [(2, conn, head)]
    # Once taken, the primary forgets the connection and its bytes.
    token = rig.sent[-1][1]
    rig.handle.ack(2, token, True)
    assert conn.fileno() == -1
    assert rig.handle._info == {}


def test_head_complete_false_closes(rig_factory: Any) -> None:
    rig = rig_factory(wait_for_data=1.0, head_complete=lambda buffer: False)
    rig.handle.add(1)
    client = rig.connect()
    (conn,) = rig.watched()
    client.sendall(b"\x16\x03\x01")
    rig.loop.ready(conn.fileno())
    assert rig.sent == [] and rig.watched() == []
    assert conn.fileno() == -1


def test_a_partial_head_at_the_deadline_goes_to_on_expired_with_its_bytes(
    rig_factory: Any,
) -> None:
    expired: list[bytes] = []
    rig = rig_factory(
        wait_for_data=1.0,
        head_complete=lambda buffer: None,
        on_expired=lambda c, d: (expired.append(d), c.close()),
    )
    rig.handle.add(1)
    client = rig.connect()
    (conn,) = rig.watched()
    client.sendall(b"GE")
    rig.loop.ready(conn.fileno())
    rig.loop.timers[0].fire()
    assert expired == [b"GE"] and rig.sent == []


def test_overflow_goes_to_on_overflow_and_the_queue_keeps_its_order(rig_factory: Any) -> None:
    overflowed: list[socket.socket] = []
    rig = rig_factory(max_pending=2, on_overflow=overflowed.append)
    rig.handle.add(1)
    for _ in range(5):
        rig.connect()
    # One in the worker's hand, two waiting, two refused at once.
    assert len(rig.sent) == 1
    assert len(rig.handle.queue.pending) == 2
    assert len(overflowed) == 2
    assert 1000 in rig.loop.readers  # still accepting, to answer the next ones
    queued = list(rig.handle.queue.pending)
    rig.handle.ack(1, rig.sent[0][1], True)
    assert rig.sent[1][2] is queued[0]
    for conn in overflowed:
        conn.close()


def test_without_on_overflow_a_full_queue_stops_accepting(rig_factory: Any) -> None:
    rig = rig_factory(max_pending=1)
    rig.handle.add(1)
    rig.connect()
    rig.connect()
    assert rig.handle.queue.full
    assert 1000 not in rig.loop.readers  # the kernel's backlog holds the next ones


def test_kept_handle_survives_an_empty_pool(rig_factory: Any) -> None:
    rig = rig_factory()
    rig.handle.add(1)
    rig.connect()
    rig.connect()
    first, second = rig.sent[0][2], rig.handle.queue.pending[0]
    assert rig.handle.remove(1, keep=True) is False
    assert not rig.handle.closed
    assert 1000 not in rig.loop.readers  # nobody to hand new ones to
    assert list(rig.handle.queue.pending) == [first, second]
    rig.handle.add(2)
    assert rig.sent[-1][0] == 2 and rig.sent[-1][2] is first
    assert 1000 in rig.loop.readers


def test_handle_closes_with_its_last_worker_by_default(rig_factory: Any) -> None:
    rig = rig_factory(wait_for_data=1.0)
    rig.handle.add(1)
    rig.connect()
    (watched,) = rig.watched()
    assert rig.handle.remove(1) is True
    assert rig.handle.closed and rig.listening.closed
    assert watched.fileno() == -1
    assert rig.loop.readers == {}


def test_fds_lists_every_socket_the_primary_holds(rig_factory: Any) -> None:
    rig = rig_factory(wait_for_data=1.0)
    rig.handle.add(1)
    for _ in range(3):
        rig.connect()
    watched = rig.watched()
    for client in rig.clients[:2]:
        client.sendall(b"x")
    for conn in watched[:2]:
        rig.loop.ready(conn.fileno())
    # One in flight, one pending, one still watched.
    fds = set(rig.handle.fds())
    assert fds == {1000} | {conn.fileno() for conn in watched}


# -- timing: accept time travels with the connection; queue wait statistics ----------


def test_wait_stats_buckets_are_upper_bounds() -> None:
    stats = WaitStats()
    for seconds in (0.0, 0.0001, 0.0002, 3.0, 99.0):
        stats.observe(seconds)
    assert stats.count == 5
    assert stats.counts[0] == 2  # 0 and exactly the first bound
    assert stats.counts[1] == 1
    assert stats.counts[stats.bounds.index(5.0)] == 1
    assert stats.counts[-1] == 1  # above every bound
    assert stats.total == pytest.approx(102.0003)


def test_accept_time_travels_with_the_connection_and_the_wait_is_counted(
    rig_factory: Any,
) -> None:
    wait = WaitStats()
    rig = rig_factory(wait=wait)
    rig.handle.add(1)
    before = time.monotonic()
    rig.connect()
    rig.connect()
    assert rig.handle.queue_length == 1  # worker 1 is busy with the first
    (accepted,) = rig.accepted
    assert before <= accepted <= time.monotonic()
    assert wait.count == 0  # handed over, not taken yet
    token = rig.sent[0][1]
    rig.handle.ack(1, token, accepted=True)
    assert wait.count == 1 and rig.handle.queue_length == 0
    assert rig.accepted[1] >= accepted  # the second went out on the ack


def test_a_refused_connection_keeps_its_accept_time(rig_factory: Any) -> None:
    rig = rig_factory()
    rig.handle.add(1)
    rig.connect()
    _, token, conn, _ = rig.sent[0]
    rig.handle.ack(1, token, accepted=False)
    assert len(rig.sent) == 2 and rig.sent[1][2] is conn
    assert rig.accepted[1] == rig.accepted[0]
    assert rig.handle.wait.count == 0


def test_a_watched_connection_counts_from_its_accept(rig_factory: Any) -> None:
    rig = rig_factory(wait_for_data=5.0)
    rig.handle.add(1)
    client = rig.connect()
    (conn,) = rig.watched()
    before_data = time.monotonic()
    client.sendall(b"GET")
    rig.loop.ready(conn.fileno())
    assert rig.accepted[0] <= before_data


def test_the_listener_gives_the_accept_time_once() -> None:
    from forkserve.cluster.listener import Listener

    listener = Listener("rr", {"address": "127.0.0.1", "port": 0})
    a, b = socket.socketpair()
    try:
        listener._deliver(b, Handoff("k", 1, 123.5))
        conn, _ = listener.accept()
        assert conn is b
        assert listener.take_accepted_at(conn) == 123.5
        assert listener.take_accepted_at(conn) is None
    finally:
        listener.close()
        a.close()
        b.close()


def test_the_listener_hands_out_the_peer_it_was_told_and_a_blocking_socket() -> None:
    import select

    from forkserve.cluster.listener import Listener

    listener = Listener("rr", {"address": "127.0.0.1", "port": 0})
    pairs = [socket.socketpair() for _ in range(2)]
    try:
        listener.setblocking(False)
        first, second = pairs[0][1], pairs[1][1]
        second.setblocking(False)  # as a worker that set a timeout leaves it
        listener._deliver(first, Handoff("k", 1, peer=("192.0.2.1", 5000)))
        listener._deliver(second, Handoff("k", 2, flags=NONBLOCKING))
        poller = select.epoll()
        poller.register(listener.fileno(), select.EPOLLIN)
        assert poller.poll(0)  # a connection waits: readable
        assert listener.accept() == (first, ("192.0.2.1", 5000))
        assert poller.poll(0)  # one more waits
        conn, peer = listener.accept()
        assert conn is second and conn.getblocking()
        assert peer == second.getpeername()  # not told: asked of the kernel
        assert poller.poll(0) == []  # nothing waits: not readable
        with pytest.raises(BlockingIOError):
            listener.accept()
        poller.close()
    finally:
        listener.close()
        for a, b in pairs:
            a.close()
            b.close()


def test_a_deferred_park_rides_with_the_next_acknowledgement() -> None:
    from forkserve.cluster import ipc
    from forkserve.cluster.child import Child

    primary_end, child_end = ipc.socketpair()
    child = Child(1, child_end)
    primary = ipc.Channel(primary_end)
    client, conn = socket.socketpair()
    try:
        assert [f.body["act"] for f in primary.receive()] == ["online"]
        conn.settimeout(5.0)  # as a worker waiting for a request leaves it
        assert child.park("k", conn, ("192.0.2.9", 80), defer=True)
        conn.close()  # the worker closes its socket as usual
        assert primary.receive() == []  # held back for the acknowledgement
        child.ack("k", 7, accepted=True)
        (frame,) = primary.receive()
        assert frame.kind is ipc.Kind.CONN and len(frame.fds) == 1
        parked, taken = ipc.unpack_taken(frame.body)
        assert (parked.state, parked.peer, parked.flags) == (
            ipc.PARKED,
            ("192.0.2.9", 80),
            ipc.NONBLOCKING,
        )
        assert (taken.key, taken.token, taken.state) == ("k", 7, ipc.TAKEN)
        with socket.socket(fileno=frame.fds[0]) as copy:  # the connection lives on
            client.sendall(b"x")
            assert copy.recv(1) == b"x"
        # Without a later acknowledgement, waiting for the channel sends it.
        other_client, other = socket.socketpair()
        with other_client, other:
            child.park("k", other, None, defer=True)
            child.wait_readable(0)
            (frame,) = primary.receive()
            assert [r.state for r in ipc.unpack_taken(frame.body)] == [ipc.PARKED]
            for fd in frame.fds:
                os.close(fd)
    finally:
        client.close()
        primary.close()
        child.channel.close()
        child.loop.close()
        asyncio.set_event_loop(None)
