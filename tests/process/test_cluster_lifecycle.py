"""Worker lifecycle: events with their arguments and order, exited_after_disconnect, state.

Each MODE of ``lifecycle.py`` ends the worker one way; the primary records
every event on the Worker ('w') and on the cluster ('c') with (in
cluster.workers, exited_after_disconnect, state, is_connected, is_dead, args).
"""

from __future__ import annotations

import pytest
from cluster_helpers import STARTERS, run_script

# mode -> (deliberate, code, signal)
ENDINGS = {
    "disconnect": (True, 0, None),
    "kill": (True, None, "SIGTERM"),
    "destroy": (True, None, "SIGTERM"),
    "killsig": (True, None, "SIGKILL"),
    "killnum": (True, None, "SIGTERM"),
    "selfkill": (True, 0, None),
    "selfdisconnect": (True, 0, None),
    "pkill": (False, None, "SIGTERM"),
    "pkillname": (False, None, "SIGKILL"),
    "pkillnum": (False, None, "SIGKILL"),
    "pkillint": (False, None, "SIGINT"),
    "oskill": (False, None, "SIGTERM"),
    "crash": (False, 3, None),
    "exception": (False, 1, None),
    "clean": (False, 0, None),
}

RACY_KILLS = {"kill", "destroy", "killsig", "killnum"}

SEQUENCE = [
    ("c", "fork"),
    ("w", "online"),
    ("c", "online"),
    ("w", "listening"),
    ("c", "listening"),
    ("w", "disconnect"),
    ("c", "disconnect"),
    ("w", "exit"),
    ("c", "exit"),
]


_RESULTS: dict[tuple[str, str], object] = {}


def lifecycle(mode, starter):
    """Run each (mode, start method) once per session; several tests read it."""
    key = (mode, starter)
    if key not in _RESULTS:
        _RESULTS[key] = run_script("lifecycle.py", starter=starter, env={"MODE": mode})
    return _RESULTS[key]


@pytest.mark.parametrize("starter", STARTERS)
@pytest.mark.parametrize("mode", list(ENDINGS))
def test_ending(mode, starter):
    result = lifecycle(mode, starter)
    assert result.returncode == 0, result
    deliberate, code, signal = ENDINGS[mode]
    events = result.tagged("event")
    order = [(row[0], row[1]) for row in events]
    expected = SEQUENCE if mode != "clean" else [s for s in SEQUENCE if s[1] != "listening"]
    assert order == expected, result
    rows = {(row[0], row[1]): row for row in events}

    # Before anything happens: not decided yet.
    assert result.one("forked") == [1, True, None, "none"]
    for key in (("c", "fork"), ("w", "online"), ("c", "online"), ("w", "listening")):
        if key in rows:
            assert rows[key][3] is None, (key, rows[key])

    # States seen at each event.
    assert rows[("w", "online")][4] == "online"
    if mode != "clean":
        assert rows[("w", "listening")][4] == "listening"
        address = rows[("w", "listening")][7][0]
        assert address["address"] == "127.0.0.1" and address["address_type"] == 4
        assert rows[("c", "listening")][7] == [address]
    for who in "wc":
        _, _, _, ead, state, connected, _dead, args = rows[(who, "disconnect")]
        assert state == "disconnected" and connected is False and args == []
        _, _, in_workers, ead, state, connected, dead, args = rows[(who, "exit")]
        assert state == "dead" and dead is True and connected is False
        if mode in RACY_KILLS:
            # kill() closes the channel, then signals: a worker that sees EOF and
            # exits before the signal lands reports a clean exit instead.
            assert args in ([code, signal], [0, None]), args
        else:
            assert args == [code, signal]
        assert ead is deliberate
        # Removed from cluster.workers before the later of 'disconnect'/'exit'.
        assert in_workers is False
    assert result.one("done") == 0


@pytest.mark.parametrize("starter", STARTERS)
def test_disconnect_removes_from_workers_at_once(starter):
    result = lifecycle("disconnect", starter)
    assert result.one("eAD-before") is None
    # As in Node: worker.disconnect() in the primary removes it right away.
    assert result.one("after-call") == [False, True]
    assert result.one("w-disconnect-event") is True  # its listener was closed first


@pytest.mark.parametrize("starter", STARTERS)
def test_kill_in_primary_is_deliberate_at_once(starter):
    result = lifecycle("kill", starter)
    assert result.one("after-call") == [True, True]


@pytest.mark.parametrize("starter", STARTERS)
def test_process_kill_is_not_deliberate(starter):
    result = lifecycle("pkill", starter)
    assert result.one("after-call") == [True, None]


@pytest.mark.parametrize("starter", STARTERS)
def test_worker_side_kill_and_disconnect(starter):
    killed = lifecycle("selfkill", starter)
    assert killed.one("w-eAD-before-kill") is None
    disconnected = lifecycle("selfdisconnect", starter)
    assert disconnected.one("w-eAD-after-disconnect") is True
    assert disconnected.one("w-disconnect-event") is True


@pytest.mark.parametrize("starter", STARTERS)
def test_ids_unique_never_reused(starter):
    result = run_script("ids.py", starter=starter)
    assert result.returncode == 0, result
    assert result.one("initial") == [[1, 2], False, True]
    exits = {row[0]: row[1:] for row in result.tagged("exit")}
    assert exits[1] in ([None, "SIGKILL", True, False], [0, None, True, False])
    assert exits[2] == [0, None, True, False]
    assert exits[3] == [0, None, True, False]
    replacement_id, workers = result.one("replacement")
    assert replacement_id == 3 and workers == [2, 3]
    assert result.one("pids-unique") is True
    assert result.one("disconnect-callback") == []
    assert result.one("done") == []
