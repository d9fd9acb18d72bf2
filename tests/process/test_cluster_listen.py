"""cluster.listen: every address form, TCP and UDP, both policies, both start methods."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import time

import pytest
from cluster_helpers import STARTERS, Running, free_port, has_ipv6, request, run_script

POLICIES = ["rr", "none"]


def start_form(form, starter, policy, workers=2, pass_fds=(), **env):
    env = {
        "FORM": form,
        "WORKERS": str(workers),
        "FORKSERVE_SCHED_POLICY": policy,
        **{k: str(v) for k, v in env.items()},
    }
    run = Running("listen.py", starter=starter, env=env, pass_fds=pass_fds)
    try:
        addresses, policy_value, _seen = run.wait_tag("ready", timeout=15)[0]
        listens = {row[0]: row[1:] for row in run.wait_tag("w-listen", workers)}
    except BaseException:
        run.close()
        raise
    return run, {int(k): v for k, v in addresses.items()}, policy_value, listens


def ask(address, count, family=None):
    return [request(address, timeout=5, family=family).decode().strip() for _ in range(count)]


TCP_FORMS = ["port", "tuple", "hostport", "v6", "unix", "fd", "socket", "port0"]


class Served:
    """One scenario run listening on every TCP form at once (2 workers)."""

    def __init__(self, policy, starter, tmp_path):
        self.policy = policy
        self.forms = [f for f in TCP_FORMS if f != "v6" or has_ipv6()]
        self.ports = {"port": free_port(), "tuple": free_port(), "hostport": free_port()}
        if "v6" in self.forms:
            self.ports["v6"] = free_port(socket.AF_INET6, "::1")
        self.sock_path = str(tmp_path / "cluster.sock")
        # A listening socket of the *primary* (inherited from here): {'fd': n}.
        self.base = socket.socket()
        self.base.bind(("127.0.0.1", 0))
        self.base.listen()
        self.ports["fd"] = self.base.getsockname()[1]
        env = {
            "FORM": ",".join(self.forms),
            "WORKERS": "2",
            "FORKSERVE_SCHED_POLICY": policy,
            "SOCK_PATH": self.sock_path,
            "LISTEN_FD": str(self.base.fileno()),
            **{f"PORT_{k.upper()}": str(v) for k, v in self.ports.items() if k != "fd"},
        }
        self.run = Running("listen.py", starter=starter, env=env, pass_fds=(self.base.fileno(),))
        try:
            _, self.policy_value, seen = self.run.wait_tag("ready", timeout=15)[0]
            rows = self.run.wait_tag("w-listen", 2 * len(self.forms))
        except BaseException:
            self.close()
            raise
        self.seen = seen
        self.by_form = {}
        for worker_id, address, mode, reuse, form in rows:
            self.by_form.setdefault(form, {})[worker_id] = (address, mode, reuse)

    def close(self):
        self.run.close()
        self.base.close()


@pytest.fixture(scope="module", params=[(p, s) for p in POLICIES for s in STARTERS])
def served(request, tmp_path_factory):
    policy, starter = request.param
    server = Served(policy, starter, tmp_path_factory.mktemp("listen"))
    yield server
    server.close()


def test_listening_events_match_worker_addresses(served):
    assert served.policy_value == {"rr": 2, "none": 1}[served.policy]
    for worker_id in (1, 2):
        from_events = sorted(
            json.dumps(a, sort_keys=True) for w, a in served.seen if w == worker_id
        )
        from_worker = sorted(
            json.dumps(info[worker_id][0], sort_keys=True) for info in served.by_form.values()
        )
        assert from_events == from_worker


@pytest.mark.parametrize("form", TCP_FORMS)
def test_tcp_form(served, form):
    if form not in served.forms:
        pytest.skip("no IPv6 on this machine")
    info = served.by_form[form]
    assert set(info) == {1, 2}
    modes = {mode for _a, mode, _r in info.values()}
    ports = {a["port"] for a, _m, _r in info.values()}
    addresses = [a for a, _m, _r in info.values()]
    if form == "socket":
        assert modes == {"own"}
        assert len(ports) == 2  # each worker's own socket, nothing shared
        for worker_id, (address, _m, _r) in info.items():
            assert ask(("127.0.0.1", address["port"]), 2) == [f"worker {worker_id}"] * 2
        return
    assert modes == ({"rr"} if served.policy == "rr" else {"shared"})
    if form == "unix":
        assert addresses == [{"address": served.sock_path, "port": None, "address_type": -1}] * 2
        target = served.sock_path
    else:
        assert len(ports) == 1, addresses  # every worker sees the same port
        port = ports.pop()
        if form in served.ports:
            assert port == served.ports[form]
        types = {a["address_type"] for a in addresses}
        hosts = {a["address"] for a in addresses}
        if form == "v6":
            assert types == {6} and hosts == {"::1"}
            target = ("::1", port)
        elif form == "port":
            # Like Node: all interfaces, dual-stack where IPv6 exists.
            assert hosts <= {"::", "0.0.0.0"} and types <= {4, 6} and len(hosts) == 1
            target = ("127.0.0.1", port)
        else:
            assert types == {4} and hosts == {"127.0.0.1"}
            target = ("127.0.0.1", port)
    replies = ask(target, 8)
    assert set(replies) <= {"worker 1", "worker 2"}, replies
    if served.policy == "rr":
        assert replies.count("worker 1") == replies.count("worker 2") == 4, replies


@pytest.mark.parametrize("starter", STARTERS)
@pytest.mark.parametrize("family", ["udp", "udp6"])
def test_udp_shared_datagram_socket(family, starter):
    if family == "udp6" and not has_ipv6():
        pytest.skip("no IPv6 on this machine")
    run, addresses, _, listens = start_form(family, starter, "rr", PORT=0)
    with run:
        ports = {a["port"] for a in addresses.values()}
        assert len(ports) == 1
        assert {a["address_type"] for a in addresses.values()} == {
            family + ("4" if family == "udp" else "")
        }
        assert {mode for _a, mode, _r, _f in listens.values()} == {"shared"}
        run.wait_tag("w-udp-fileno-is-socket", 2)
        assert all(row[1] is True for row in run.wait_tag("w-udp-fileno-is-socket", 2))
        host = "::1" if family == "udp6" else "127.0.0.1"
        fam = socket.AF_INET6 if family == "udp6" else socket.AF_INET
        with socket.socket(fam, socket.SOCK_DGRAM) as client:
            client.settimeout(5)
            client.sendto(b"ping", (host, ports.pop()))
            data, _ = client.recvfrom(100)
        assert data in (b"worker 1\nping", b"worker 2\nping")


@pytest.mark.parametrize("starter", STARTERS)
def test_exclusive_binds_its_own(starter):
    run, addresses, _, listens = start_form(
        "tuple", starter, "rr", PORT=0, OPTIONS=json.dumps({"exclusive": True})
    )
    with run:
        assert {mode for _a, mode, _r, _f in listens.values()} == {"own"}
        ports = {a["port"] for a in addresses.values()}
        assert len(ports) == 2
        for worker_id, address in addresses.items():
            assert ask(("127.0.0.1", address["port"]), 1) == [f"worker {worker_id}"]


@pytest.mark.parametrize("policy", POLICIES)
def test_reuse_port_and_backlog_reach_the_socket(policy):
    port = free_port()
    run, _addresses, _, listens = start_form(
        "tuple", "fork", policy, PORT=port, OPTIONS=json.dumps({"reuse_port": True, "backlog": 7})
    )
    with run:
        if policy == "none":
            # The worker holds the primary's socket: SO_REUSEPORT is set on it.
            assert {reuse for _a, _m, reuse, _f in listens.values()} == {True}
        ss = shutil.which("ss")
        assert ss, "ss(8) is needed to read a listening socket's backlog"
        out = subprocess.run(
            [ss, "-ltnH", f"sport = :{port}"], capture_output=True, text=True, timeout=10
        ).stdout
        backlogs = {line.split()[2] for line in out.splitlines() if line.strip()}
        assert backlogs == {"7"}, out


@pytest.mark.parametrize("starter", STARTERS)
@pytest.mark.parametrize("policy", POLICIES)
def test_bind_error_is_oserror_with_errno(policy, starter):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        result = run_script(
            "listen.py",
            starter=starter,
            env={
                "FORM": "tuple",
                "WORKERS": "1",
                "PORT": str(port),
                "FORKSERVE_SCHED_POLICY": policy,
            },
        )
    finally:
        busy.close()
    assert result.returncode == 0, result
    (_worker_id, code, message) = result.one("w-listen-error")
    assert code == errno.EADDRINUSE
    assert f"127.0.0.1:{port}" in message
    assert result.one("exit") == [1, 0, None]


@pytest.mark.parametrize("value, expected", [("rr", 2), ("none", 1)])
def test_policy_from_env_and_attribute(value, expected):
    run, _, policy_value, listens = start_form("tuple", "fork", value, PORT=0)
    with run:
        assert policy_value == expected
    run, _, policy_value, listens = start_form(
        "tuple", "fork", "", workers=1, PORT=0, SET_POLICY=value
    )
    with run:
        assert policy_value == expected
        assert {m for _a, m, _r, _f in listens.values()} == {"rr" if value == "rr" else "shared"}


def test_unknown_policy_is_an_error_at_fork():
    result = run_script("policy.py", env={"FORKSERVE_SCHED_POLICY": "fastest"})
    assert result.one("policy-before") == 2
    assert "fastest" in result.one("fork-error")
    assert result.one("setup-error") is not None


def test_policy_frozen_after_fork():
    result = run_script("policy.py", env={"FORKSERVE_SCHED_POLICY": "none"})
    assert result.one("policy-before") == 1
    assert result.one("frozen-error") is not None
    assert result.one("policy-after") == 1


@pytest.mark.parametrize("starter", STARTERS)
@pytest.mark.parametrize("policy", POLICIES)
def test_socket_closes_when_last_worker_lets_go(policy, starter, tmp_path):
    result = run_script("close_last.py", starter=starter, env={"FORKSERVE_SCHED_POLICY": policy})
    assert result.returncode == 0, result
    assert result.one("after-first-close") == "connected"
    assert result.one("after-last-close") == "refused"
    assert result.one("handles-left") == 0


def test_listen_in_primary_gets_its_own_socket():
    result = run_script("policy.py", env={"FORKSERVE_SCHED_POLICY": "rr"})
    assert result.one("primary-listener") == ["own", 4, True]
    assert os.environ.get("FORKSERVE_WORKER_ID") is None


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("policy", POLICIES)
def test_idle_worker_does_not_spin(policy):
    """After serving, a worker waiting on its loop uses (almost) no CPU."""
    run, addresses, _, _ = start_form("tuple", "fork", policy, workers=1, PORT=0)
    with run:
        pid = run.wait_tag("w-pid")[0][1]
        port = addresses[1]["port"]
        assert ask(("127.0.0.1", port), 3) == ["worker 1"] * 3
        before = cpu_seconds(pid)
        time.sleep(1.0)  # measuring CPU use over a fixed window, not synchronising
        used = cpu_seconds(pid) - before
        assert used < 0.2, f"idle worker used {used:.2f} s of CPU in 1 s"
