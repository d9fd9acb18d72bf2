"""EventEmitter: Node's semantics."""

from __future__ import annotations

import asyncio

import pytest

from forkserve.cluster.events import EventEmitter


def test_on_emit_order_and_arguments():
    em = EventEmitter()
    seen = []
    em.on("x", lambda *a: seen.append(("first", a)))
    em.on("x", lambda *a: seen.append(("second", a)))
    assert em.emit("x", 1, "two") is True
    assert seen == [("first", (1, "two")), ("second", (1, "two"))]


def test_emit_without_handlers_returns_false():
    assert EventEmitter().emit("nothing") is False


def test_once_runs_once():
    em = EventEmitter()
    seen = []
    em.once("x", seen.append)
    em.emit("x", 1)
    em.emit("x", 2)
    assert seen == [1]
    assert em.listeners("x") == []


def test_off_removes_the_latest_registration():
    em = EventEmitter()
    seen = []

    def h(v):
        seen.append(v)

    em.on("x", h)
    em.on("x", h)
    em.off("x", h)
    em.emit("x", 1)
    assert seen == [1]
    em.off("x", h)
    assert em.emit("x", 2) is False


def test_handler_added_during_emit_runs_next_time():
    em = EventEmitter()
    seen = []

    def adder():
        seen.append("adder")
        em.on("x", lambda: seen.append("late"))

    em.on("x", adder)
    em.emit("x")
    assert seen == ["adder"]
    em.emit("x")
    assert seen == ["adder", "adder", "late"]


def test_unhandled_error_is_raised():
    em = EventEmitter()
    with pytest.raises(ValueError, match="boom"):
        em.emit("error", ValueError("boom"))
    with pytest.raises(RuntimeError):
        em.emit("error", "not an exception")


def test_handled_error_is_not_raised():
    em = EventEmitter()
    got = []
    em.on("error", got.append)
    exc = ValueError("x")
    assert em.emit("error", exc)
    assert got == [exc]


def test_listeners_and_count():
    em = EventEmitter()

    def h():
        pass

    em.on("a", h).once("a", h)
    assert em.listeners("a") == [h, h]
    assert em.listener_count("a") == 2
    em.remove_all_listeners("a")
    assert em.listener_count("a") == 0


def test_coroutine_handler_runs_on_the_loop():
    loop = asyncio.new_event_loop()
    em = EventEmitter()
    em._loop = loop
    seen = []

    async def handler(v):
        await asyncio.sleep(0)
        seen.append(v)

    em.on("x", handler)
    em.emit("x", 5)
    assert seen == []
    loop.run_until_complete(asyncio.sleep(0.01))
    loop.close()
    assert seen == [5]


def test_coroutine_handler_without_loop_is_an_error():
    em = EventEmitter()

    async def handler():
        pass

    em.on("x", handler)
    with pytest.raises(RuntimeError):
        em.emit("x")
