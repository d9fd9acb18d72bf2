"""IPC between primary and worker: messages, serialization, send() results, handles."""

from __future__ import annotations

import pytest
from cluster_helpers import STARTERS, run_script


@pytest.fixture(scope="module", params=[(s, m) for s in STARTERS for m in ("json", "advanced")])
def ipc(request):
    starter, mode = request.param
    result = run_script("ipc.py", starter=starter, env={"MODE": mode})
    assert result.returncode == 0, result
    result.mode = mode
    return result


def test_messages_both_ways_keep_their_types(ipc):
    if ipc.mode == "advanced":
        expected = {"set": "set", "bytes": "bytes", "tuple": "tuple", "nested": "list"}
    else:
        expected = {"list": "list", "text": "str", "num": "float", "none": "NoneType"}
    assert ipc.one("w-hello") == [expected, True]
    assert ipc.one("p-echo") == [expected, True]


def test_send_returns_true_and_calls_back_after_write(ipc):
    assert ipc.one("p-send") == [True, [None]]
    assert ipc.one("w-send") is True


def test_json_unserializable_raises_in_sender_and_sends_nothing(ipc):
    if ipc.mode != "json":
        assert not ipc.tagged("p-typeerror") and not ipc.tagged("w-typeerror")
        return
    assert "JSON" in ipc.one("p-typeerror")
    assert "JSON" in ipc.one("w-typeerror")
    # Nothing of the refused message arrived: the first user message is the echo.
    assert ipc.one("p-messages")[0] == "echo"


def test_listening_socket_primary_to_worker(ipc):
    assert ipc.one("w-listener") == ["socket", True]
    assert ipc.one("p-listener") == "accepted by worker"


def test_connected_socket_primary_to_worker_closed_after_send(ipc):
    assert ipc.one("p-pconn-sent") == [[None, False]]  # callback ran, sender copy closed
    assert ipc.one("w-pconn") == "socket"
    assert ipc.one("p-pconn") == "written by worker"


def test_connected_socket_worker_to_primary_keep_open(ipc):
    assert ipc.tagged("p-wconn") == [["socket", False], ["socket", True]]
    results = {row[0]: row[1:] for row in ipc.tagged("w-wconn")}
    assert results[False] == ["written by primary", None, False]  # closed after sending
    assert results[True] == ["written by primary", None, True]  # keep_open


def test_internal_messages_never_reach_message_handlers(ipc):
    assert ipc.one("p-messages") == [
        "echo",
        "listener-ready",
        "pconn-done",
        "wconn",
        "wconn",
        "wconn-done",
        "internal-done",
    ]


def test_send_on_closed_channel_primary(ipc):
    assert ipc.one("p-exit") == [0, None, True]
    assert ipc.one("p-closed-send") == [False, ["ChannelClosed"]]
    assert ipc.one("p-closed-send-nocb") is False
    assert ipc.one("p-error-event") == "ChannelClosed"


def test_send_on_closed_channel_worker(ipc):
    assert ipc.one("w-closed-send") == [False, ["ChannelClosed"]]
    assert ipc.one("w-closed-send-nocb") is False
    assert ipc.one("w-error-event") == "ChannelClosed"


def test_run_returns(ipc):
    assert ipc.tagged("p-done") == [[]]
