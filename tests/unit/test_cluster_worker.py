"""Worker: the state table, signals, and delegation to the role backend."""

from __future__ import annotations

import signal

import pytest

from forkserve.cluster.worker_object import TRANSITIONS, State, Worker, signal_name, signal_number


class FakeBackend:
    def __init__(self):
        self.calls = []

    def worker_send(self, worker, message, handle, callback, keep_open):
        self.calls.append(("send", message, handle, keep_open))
        return True

    def worker_disconnect(self, worker):
        self.calls.append(("disconnect",))

    def worker_kill(self, worker, sig):
        self.calls.append(("kill", sig))

    def worker_is_connected(self, worker):
        return True

    def worker_is_dead(self, worker):
        return False


def make():
    backend = FakeBackend()
    return Worker(3, object(), backend), backend


def test_initial_facts():
    w, _ = make()
    assert w.id == 3
    assert w.state is State.NONE and str(w.state) == "none"
    assert w.exited_after_disconnect is None


LEGAL = [
    ("none", "online"),
    ("none", "listening"),
    ("none", "disconnected"),
    ("none", "dead"),
    ("online", "listening"),
    ("online", "disconnected"),
    ("online", "dead"),
    ("listening", "listening"),
    ("listening", "disconnected"),
    ("listening", "dead"),
    ("disconnected", "dead"),
    ("dead", "disconnected"),
]


@pytest.mark.parametrize("start, end", LEGAL)
def test_legal_transitions(start, end):
    w, _ = make()
    w._state = State(start)
    w.state = end
    assert w.state is State(end)


ILLEGAL = [
    (a.value, b.value) for a in State for b in State if a is not b and b not in TRANSITIONS[a]
]


@pytest.mark.parametrize("start, end", ILLEGAL)
def test_illegal_transitions(start, end):
    w, _ = make()
    w._state = State(start)
    with pytest.raises(RuntimeError, match="illegal state change"):
        w.state = end


def test_illegal_list_is_not_empty():
    assert ("dead", "online") in ILLEGAL
    assert ("disconnected", "online") in ILLEGAL


def test_unknown_state_is_refused():
    w, _ = make()
    with pytest.raises(ValueError):
        w.state = "sleeping"


@pytest.mark.parametrize(
    "given, number",
    [("SIGTERM", signal.SIGTERM), ("term", signal.SIGTERM), ("SIGKILL", 9), (15, 15)],
)
def test_signal_number(given, number):
    assert signal_number(given) == number


def test_signal_number_unknown():
    with pytest.raises(ValueError):
        signal_number("SIGNOPE")


def test_signal_name():
    assert signal_name(9) == "SIGKILL"
    assert signal_name(15) == "SIGTERM"


def test_methods_delegate_to_the_backend():
    w, backend = make()
    assert w.send({"a": 1}) is True
    w.send("x", "h", keep_open=True)
    assert w.disconnect() is w
    w.kill()
    w.destroy("SIGKILL")
    assert w.is_connected() is True and w.is_dead() is False
    assert backend.calls == [
        ("send", {"a": 1}, None, False),
        ("send", "x", "h", True),
        ("disconnect",),
        ("kill", "SIGTERM"),
        ("kill", "SIGKILL"),
    ]


def test_repr():
    w, _ = make()
    assert "id=3" in repr(w)
