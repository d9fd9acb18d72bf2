"""What the arbiter does when a worker exits: one pure function.

``exited_after_disconnect`` tells a deliberate exit (scale down, shutdown,
recycling) from a crash. A deliberate exit is replaced only while fewer
workers run than wanted; a crash is replaced, with an exponential back-off
once crashes repeat. A worker that could not boot (exit code 3 or 4 before
it was ready) stops the arbiter at startup instead of crash-looping; during
a reload (HUP) it abandons the reload, the old workers serving on; once the
server has served it is a crash like any other, retried with back-off while
the rest of the pool serves.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

from forkserve.errors import APP_LOAD_ERROR, WORKER_BOOT_ERROR

BACKOFF_FIRST = 0.1
BACKOFF_CAP = 5.0
CRASH_WINDOW = 10.0  # crashes further apart than this do not add up


class Action(enum.Enum):
    NOTHING = "nothing"
    SPAWN = "spawn"
    HALT = "halt"
    ABANDON_RELOAD = "abandon_reload"


class ExitFacts(NamedTuple):
    deliberate: bool
    code: int | None
    booted: bool
    stopping: bool
    running: int  # workers alive or starting, not counting this one
    wanted: int
    recent_crashes: int  # crashes within CRASH_WINDOW, this one included
    reloading: bool = False  # this worker was started by a reload still under way
    started: bool = False  # the pool has been ready once: startup is over


class Decision(NamedTuple):
    action: Action
    delay: float = 0.0
    reason: str = ""


def backoff(recent_crashes: int) -> float:
    """0 for a lone crash, then 0.1 s doubling per repeat, capped at 5 s."""
    if recent_crashes <= 1:
        return 0.0
    return min(BACKOFF_FIRST * 2 ** (recent_crashes - 2), BACKOFF_CAP)


def decide(facts: ExitFacts) -> Decision:
    if facts.stopping:
        return Decision(Action.NOTHING, reason="shutting down")
    # A worker told to leave while booting may fail its boot: that is not a
    # reason to stop the server, so intent is looked at first.
    failed_boot = (
        not facts.deliberate
        and not facts.booted
        and facts.code in (WORKER_BOOT_ERROR, APP_LOAD_ERROR)
    )
    if failed_boot and facts.reloading:
        return Decision(Action.ABANDON_RELOAD, reason="a new worker failed to boot")
    if failed_boot and not facts.started:
        return Decision(Action.HALT, reason="worker failed to boot")
    if facts.deliberate:
        if facts.running < facts.wanted:
            return Decision(Action.SPAWN, reason="replacing a worker that left")
        return Decision(Action.NOTHING, reason="left on purpose")
    if facts.running >= facts.wanted:
        return Decision(Action.NOTHING, reason="pool is full")
    reason = "failed to boot" if failed_boot else "crashed"
    return Decision(Action.SPAWN, backoff(facts.recent_crashes), reason=reason)
