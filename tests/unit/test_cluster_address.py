"""Address parsing and the 'listening' address dict."""

from __future__ import annotations

import os
import socket

import pytest

from forkserve.cluster import address as A


@pytest.mark.parametrize(
    "given, kind, host, port",
    [
        (8000, "tcp", None, 8000),
        (0, "tcp", None, 0),
        (("127.0.0.1", 81), "tcp", "127.0.0.1", 81),
        (("", 82), "tcp", None, 82),
        ("127.0.0.1:83", "tcp", "127.0.0.1", 83),
        ("localhost:84", "tcp", "localhost", 84),
        (":85", "tcp", None, 85),
        ("86", "tcp", None, 86),
        ("[::1]:87", "tcp", "::1", 87),
        ({"port": 88, "host": "127.0.0.1"}, "tcp", "127.0.0.1", 88),
    ],
)
def test_tcp_forms(given, kind, host, port):
    addr = A.parse(given)
    assert addr.kind == kind
    assert addr.port == port
    assert addr.host == (host or A.default_host())


def test_unix_forms(tmp_path):
    p = str(tmp_path / "s.sock")
    assert A.parse("unix:" + p) == A.Address("unix", path=p)
    assert A.parse({"path": p}).path == p
    assert A.parse(p).kind == "unix"
    assert A.parse("unix:" + p).address_type == -1


def test_fd_forms():
    assert A.parse({"fd": 7}) == A.Address("fd", fd=7)
    assert A.parse("fd://9").fd == 9


@pytest.mark.parametrize(
    "bad", [True, -1, 70000, "host:notaport", "[::1]80", "unix:", {"fd": -2}, 1.5, None, "a:b:c"]
)
def test_bad_forms(bad):
    with pytest.raises(ValueError):
        A.parse(bad)


def test_address_types():
    assert A.parse("127.0.0.1:1").address_type == 4
    assert A.parse("[::1]:1").address_type == 6
    assert A.parse("127.0.0.1:1", udp=True).address_type == "udp4"
    assert A.parse("[::1]:1", udp=True).address_type == "udp6"


def test_udp_unix_is_refused():
    with pytest.raises(ValueError):
        A.parse("unix:/tmp/x", udp=True)


def test_keys_tell_sockets_apart():
    keys = {
        A.parse("127.0.0.1:80").key(),
        A.parse("127.0.0.1:81").key(),
        A.parse("127.0.0.1:80", udp=True).key(),
        A.parse({"fd": 3}).key(),
        A.parse("unix:/tmp/a").key(),
    }
    assert len(keys) == 5
    assert A.parse("127.0.0.1:80").key() == A.parse(("127.0.0.1", 80)).key()


def test_message_round_trip():
    addr = A.parse("[::1]:5", udp=True)
    assert A.Address.from_message(addr.as_message()) == addr


def test_describe_tcp_udp_unix(tmp_path):
    tcp = A.open_socket(A.parse("127.0.0.1:0"))
    udp = A.open_socket(A.parse("127.0.0.1:0", udp=True))
    unix = A.open_socket(A.parse("unix:" + str(tmp_path / "u.sock")))
    try:
        d = A.describe(tcp)
        assert d["address"] == "127.0.0.1" and d["port"] > 0 and d["address_type"] == 4
        assert A.describe(udp)["address_type"] == "udp4"
        assert A.describe(unix) == {
            "address": str(tmp_path / "u.sock"),
            "port": None,
            "address_type": -1,
        }
    finally:
        for s in (tcp, udp, unix):
            s.close()


def test_describe_ipv6():
    try:
        sock = A.open_socket(A.parse("[::1]:0"))
    except OSError:
        pytest.skip("no IPv6 on this machine")
    with sock:
        d = A.describe(sock)
        assert d["address"] == "::1" and d["address_type"] == 6


def test_open_socket_fd_duplicates():
    base = socket.socket()
    base.bind(("127.0.0.1", 0))
    base.listen()
    sock = A.open_socket(A.parse({"fd": base.fileno()}))
    try:
        assert sock.fileno() != base.fileno()
        assert sock.getsockname() == base.getsockname()
    finally:
        sock.close()
        base.close()


def test_stale_unix_socket_is_replaced_live_one_is_not(tmp_path):
    path = str(tmp_path / "s.sock")
    first = A.open_socket(A.parse("unix:" + path))
    with pytest.raises(OSError):
        A.open_socket(A.parse("unix:" + path))
    first.close()
    assert os.path.exists(path)  # left behind, nobody listens
    second = A.open_socket(A.parse("unix:" + path))
    second.close()


def test_describe_target():
    assert A.describe_target(A.parse("[::1]:80")) == "[::1]:80"
    assert A.describe_target(A.parse("127.0.0.1:80")) == "127.0.0.1:80"
    assert A.describe_target(A.parse({"fd": 4})) == "fd 4"


@pytest.mark.parametrize("timeout", [None, 0.0, 5.0])
def test_acceptor_accepts_as_socket_accept_does(timeout: float | None) -> None:
    listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listening.bind(("127.0.0.1", 0))
    listening.listen(4)
    listening.settimeout(timeout)
    accept = A.Acceptor(listening)
    clients = [socket.create_connection(listening.getsockname(), timeout=5) for _ in range(2)]
    try:
        for client in clients:
            conn, peer = accept()
            with conn:
                assert peer == client.getsockname()
                assert (conn.family, conn.type, conn.proto) == (
                    listening.family,
                    listening.type,
                    listening.proto,
                )
                assert conn.gettimeout() is None and conn.getblocking()
                client.sendall(b"ping")
                assert conn.recv(4) == b"ping"
        if timeout == 0.0:
            with pytest.raises(BlockingIOError):
                accept()
    finally:
        for client in clients:
            client.close()
        listening.close()
