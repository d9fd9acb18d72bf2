"""The IPC codec: frames, FrameDecoder, and a Channel over a real socketpair (no processes)."""

from __future__ import annotations

import os
import socket

import pytest

from forkserve.cluster import ipc
from forkserve.cluster.ipc import HEADER, Channel, ChannelClosed, FrameDecoder, Kind


def frame(kind, body, nfds=0):
    return ipc.encode(kind, body, nfds)


def test_header_layout():
    data = frame(Kind.JSON, {"a": 1})
    length, kind, nfds = HEADER.unpack_from(data)
    assert HEADER.size == 6
    assert length == len(data) - HEADER.size
    assert kind == Kind.JSON and nfds == 0
    assert data[HEADER.size :] == b'{"a":1}'


@pytest.mark.parametrize(
    "kind, body",
    [
        (Kind.INTERNAL, {"act": "online"}),
        (Kind.JSON, ["x", 1, 2.5, None, True, {"k": "v"}]),
        (Kind.JSON, "text é"),
        (Kind.PICKLE, {"set": {1, 2}, "bytes": b"\x00\xff", "tuple": (1, (2, 3))}),
    ],
)
def test_round_trip(kind, body):
    decoder = FrameDecoder()
    decoder.feed(frame(kind, body))
    (out,) = decoder.frames()
    assert out.kind is kind
    assert out.body == body
    assert out.fds == ()


def test_pickle_keeps_types():
    decoder = FrameDecoder()
    decoder.feed(frame(Kind.PICKLE, ({1}, b"b", (1,))))
    body = decoder.frames()[0].body
    assert isinstance(body, tuple)
    assert isinstance(body[0], set) and isinstance(body[1], bytes) and isinstance(body[2], tuple)


@pytest.mark.parametrize("body", [{1, 2}, b"bytes", float("nan"), object()])
def test_json_refuses_what_it_cannot_carry(body):
    with pytest.raises(TypeError):
        ipc.encode(Kind.JSON, body)


def test_pickle_refuses_unpicklable():
    with pytest.raises(TypeError):
        ipc.encode(Kind.PICKLE, lambda: None)


def test_too_many_fds():
    with pytest.raises(TypeError):
        ipc.encode(Kind.JSON, 1, ipc.MAX_FDS + 1)


def test_decoder_byte_by_byte():
    data = frame(Kind.JSON, {"n": 1}) + frame(Kind.JSON, {"n": 2}) + frame(Kind.INTERNAL, {"x": 3})
    decoder = FrameDecoder()
    seen = []
    for i in range(len(data)):
        decoder.feed(data[i : i + 1])
        seen.extend(f.body for f in decoder.frames())
    assert seen == [{"n": 1}, {"n": 2}, {"x": 3}]


def test_decoder_partial_header_and_payload():
    data = frame(Kind.JSON, "x" * 1000)
    decoder = FrameDecoder()
    decoder.feed(data[:3])
    assert decoder.frames() == []
    decoder.feed(data[3:500])
    assert decoder.frames() == []
    decoder.feed(data[500:])
    assert [f.body for f in decoder.frames()] == ["x" * 1000]


def test_decoder_gives_fds_to_the_frame_that_announces_them():
    decoder = FrameDecoder()
    data = frame(Kind.JSON, "a") + frame(Kind.JSON, "b", 2) + frame(Kind.JSON, "c", 1)
    # The kernel may deliver descriptors earlier than the bytes of their frame.
    decoder.feed(data[:5], [10, 11, 12])
    decoder.feed(data[5:])
    frames = decoder.frames()
    assert [(f.body, f.fds) for f in frames] == [("a", ()), ("b", (10, 11)), ("c", (12,))]


def test_decoder_missing_fds_is_an_error():
    decoder = FrameDecoder()
    decoder.feed(frame(Kind.JSON, "a", 1))
    with pytest.raises(ValueError):
        decoder.frames()


def test_decoder_close_closes_stray_fds():
    r, w = os.pipe()
    decoder = FrameDecoder()
    decoder.feed(b"", [r])
    decoder.close()
    with pytest.raises(OSError):
        os.fstat(r)
    os.close(w)


def test_handoff_frame_round_trip():
    item = ipc.Handoff(
        "tcp:127.0.0.1:8000",
        2**40 + 7,
        12345.678,
        b"GET / HTTP/1.1\r\n\xff",
        int(socket.AF_INET),
        ("127.0.0.1", 54321),
        ipc.NONBLOCKING,
    )
    assert ipc.unpack_handoff(ipc.pack_handoff(item)) == item
    bare = ipc.Handoff("k", 1)
    assert ipc.unpack_handoff(ipc.pack_handoff(bare)) == bare


@pytest.mark.parametrize(
    "peer",
    [
        None,
        ("127.0.0.1", 80),
        ("::1", 443, 0, 0),
        ("fe80::1%eth0", 8080, 5, 2),
        "",
        "/run/app.sock",
        "/tmp/\udcff-odd",
        b"\x00abstract",
    ],
)
def test_peer_addresses_survive_the_frame(peer):
    assert ipc.decode_peer(ipc.encode_peer(peer)) == peer


def test_taken_frame_carries_several_records():
    records = [
        ipc.Record("a", 1, ipc.TAKEN),
        ipc.Record("tcp:[::1]:80", 2, ipc.REFUSED),
        ipc.Record("b", 0, ipc.PARKED, ipc.NONBLOCKING, int(socket.AF_INET6), ("::1", 9, 0, 0)),
    ]
    assert ipc.unpack_taken(ipc.pack_taken(records)) == records


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x00" * 17,
        ipc.pack_handoff(ipc.Handoff("key", 1, peer=("h", 1)))[:-1],
        ipc.pack_handoff(ipc.Handoff("key", 1, peer=("h", 1))).replace(b"th", b"xh"),
    ],
)
def test_malformed_handoff_is_a_value_error(payload):
    with pytest.raises(ValueError):
        ipc.unpack_handoff(payload)


def test_malformed_taken_is_a_value_error():
    with pytest.raises(ValueError):
        ipc.unpack_taken(ipc.pack_taken([ipc.Record("key", 1, ipc.TAKEN)])[:-1])
    with pytest.raises(ValueError):
        ipc.unpack_taken(b"\x00\x01")
    with pytest.raises(ValueError):
        ipc.unpack_taken(ipc.pack_taken([ipc.Record("key", 1, 9)]))


def test_a_known_family_wraps_a_descriptor_without_asking_the_kernel():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        wrapped = ipc.socket_from_fd(os.dup(a.fileno()), int(socket.AF_UNIX))
        with wrapped:
            assert wrapped.family == socket.AF_UNIX and wrapped.type == socket.SOCK_STREAM
            wrapped.sendall(b"x")
            assert b.recv(1) == b"x"
    finally:
        a.close()
        b.close()


def test_conn_frames_pass_bytes_through_the_decoder():
    decoder = FrameDecoder()
    payload = ipc.pack_taken([ipc.Record("k", 9, ipc.TAKEN)])
    decoder.feed(ipc.encode(Kind.CONN, payload))
    (got,) = decoder.frames()
    assert got.kind is Kind.CONN and got.body == payload


def test_unknown_frame_kind_is_an_error():
    decoder = FrameDecoder()
    decoder.feed(HEADER.pack(1, 200, 0) + b"x")
    with pytest.raises(ValueError):
        decoder.frames()


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    left, right = Channel(a), Channel(b)
    yield left, right
    left.close()
    right.close()


def receive_all(channel, count):
    out = []
    for _ in range(1000):
        out.extend(channel.receive())
        if len(out) >= count:
            return out
        channel.flush(1.0)
        import select

        select.select([channel.fileno()], [], [], 1.0)
    raise AssertionError(f"expected {count} frames, got {out}")


def test_channel_messages_and_callback(pair):
    left, right = pair
    results = []
    assert left.send(Kind.JSON, {"hello": 1}, callback=results.append) is True
    assert left.send(Kind.INTERNAL, {"act": "x"}) is True
    assert results == [None]
    frames = receive_all(right, 2)
    assert [(f.kind, f.body) for f in frames] == [
        (Kind.JSON, {"hello": 1}),
        (Kind.INTERNAL, {"act": "x"}),
    ]


def test_channel_passes_a_socket(pair):
    left, right = pair
    x, y = socket.socketpair()
    left.send(Kind.JSON, "sock", handles=(x,), close_after=(x,))
    assert x.fileno() == -1  # closed once written
    (got,) = receive_all(right, 1)
    assert got.body == "sock" and len(got.fds) == 1
    received = ipc.socket_from_fd(got.fds[0])
    received.sendall(b"ping")
    assert y.recv(4) == b"ping"
    received.close()
    y.close()


def test_channel_large_message(pair):
    left, right = pair
    body = "z" * (3 * ipc.READ_SIZE)
    left.send(Kind.JSON, body)
    got = []
    import threading

    t = threading.Thread(target=lambda: got.extend(receive_all(right, 1)))
    t.start()
    assert left.flush(10.0)
    t.join(10)
    assert got[0].body == body


def test_unserializable_sends_nothing(pair):
    left, right = pair
    with pytest.raises(TypeError):
        left.send(Kind.JSON, {1, 2})
    left.send(Kind.JSON, "after")
    assert [f.body for f in receive_all(right, 1)] == ["after"]


def test_send_on_closed_channel(pair):
    left, _right = pair
    left.close()
    errors = []
    assert left.send(Kind.JSON, "x", callback=errors.append) is False
    assert isinstance(errors[0], ChannelClosed)


def test_peer_close_sets_eof(pair):
    left, right = pair
    left.close()
    assert right.receive() == []
    assert right.eof is True


def test_write_to_dead_peer_fails_callback(pair):
    left, right = pair
    right.close()
    errors = []
    left.send(Kind.JSON, "x" * 10, callback=errors.append)
    for _ in range(3):
        if errors:
            break
        left.send(Kind.JSON, "y", callback=errors.append)
    assert errors and isinstance(errors[0], BaseException)
    assert left.connected is False


def test_is_connection():
    a, b = socket.socketpair()
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert ipc.is_connection(a)
        assert not ipc.is_connection(lsock)
        assert not ipc.is_connection(udp)
        assert not ipc.is_connection(3)
    finally:
        for s in (a, b, lsock, udp):
            s.close()
