"""The restart policy: what the arbiter does when a worker exits."""

from __future__ import annotations

import pytest

from forkserve.errors import APP_LOAD_ERROR, WORKER_BOOT_ERROR
from forkserve.restart import Action, ExitFacts, backoff, decide


def facts(**changes: object) -> ExitFacts:
    base: dict[str, object] = {
        "deliberate": False,
        "code": 1,
        "booted": True,
        "stopping": False,
        "running": 1,
        "wanted": 2,
        "recent_crashes": 1,
        "reloading": False,
        "started": False,
    }
    base.update(changes)
    return ExitFacts(**base)  # type: ignore[arg-type]


def test_a_crash_is_replaced_at_once() -> None:
    decision = decide(facts())
    assert decision.action is Action.SPAWN and decision.delay == 0


def test_repeated_crashes_back_off_with_a_cap() -> None:
    delays = [decide(facts(recent_crashes=n)).delay for n in range(1, 12)]
    assert delays[:4] == [0.0, 0.1, 0.2, 0.4]
    assert delays == sorted(delays) and max(delays) == 5.0


@pytest.mark.parametrize("code", [WORKER_BOOT_ERROR, APP_LOAD_ERROR])
def test_a_worker_that_cannot_boot_stops_the_server(code: int) -> None:
    assert decide(facts(code=code, booted=False)).action is Action.HALT


@pytest.mark.parametrize("code", [WORKER_BOOT_ERROR, APP_LOAD_ERROR])
def test_a_new_worker_that_cannot_boot_during_a_reload_abandons_it(code: int) -> None:
    decision = decide(facts(code=code, booted=False, reloading=True, started=True))
    assert decision.action is Action.ABANDON_RELOAD


@pytest.mark.parametrize("code", [WORKER_BOOT_ERROR, APP_LOAD_ERROR])
def test_a_boot_failure_after_startup_is_retried_with_backoff(code: int) -> None:
    first = decide(facts(code=code, booted=False, started=True))
    assert first.action is Action.SPAWN and first.reason == "failed to boot"
    again = decide(facts(code=code, booted=False, started=True, recent_crashes=4))
    assert again.action is Action.SPAWN and again.delay == backoff(4) > 0


def test_a_boot_failure_after_startup_with_a_full_pool_is_not_replaced() -> None:
    decision = decide(facts(code=APP_LOAD_ERROR, booted=False, started=True, running=2))
    assert decision.action is Action.NOTHING


def test_a_reload_is_abandoned_only_for_a_boot_failure() -> None:
    crashed = decide(facts(code=1, booted=False, reloading=True, started=True))
    assert crashed.action is Action.SPAWN
    told_to_leave = facts(
        deliberate=True, code=APP_LOAD_ERROR, booted=False, reloading=True, running=2
    )
    assert decide(told_to_leave).action is Action.NOTHING
    stopping = facts(code=APP_LOAD_ERROR, booted=False, reloading=True, stopping=True)
    assert decide(stopping).action is Action.NOTHING


def test_the_same_code_after_booting_is_a_crash() -> None:
    assert decide(facts(code=APP_LOAD_ERROR, booted=True)).action is Action.SPAWN


def test_a_deliberate_exit_is_replaced_only_below_the_wanted_count() -> None:
    assert decide(facts(deliberate=True, code=0, running=1)).action is Action.SPAWN
    assert decide(facts(deliberate=True, code=0, running=2)).action is Action.NOTHING


def test_a_worker_told_to_leave_while_booting_does_not_stop_the_server() -> None:
    decision = decide(facts(deliberate=True, code=WORKER_BOOT_ERROR, booted=False, running=2))
    assert decision.action is Action.NOTHING


def test_nothing_happens_while_stopping_or_when_the_pool_is_full() -> None:
    assert decide(facts(stopping=True)).action is Action.NOTHING
    assert decide(facts(running=2)).action is Action.NOTHING


def test_backoff_values() -> None:
    assert backoff(0) == backoff(1) == 0.0
    assert backoff(2) == 0.1
