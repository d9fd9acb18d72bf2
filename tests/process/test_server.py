"""The server as a user runs it: command line, binds, lifecycle, restarts, signals."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.helpers import ROOT, answers_200, free_port, make_certificate, pid_alive, wait_for

POLICIES = ["rr", "none"]
PARSERS = ["httptools", "h11"]


def body_of(reply: bytes) -> bytes:
    return reply.partition(b"\r\n\r\n")[2]


@pytest.mark.parametrize("sched", POLICIES)
@pytest.mark.parametrize("http", PARSERS)
def test_serves_hello_with_date_and_server_headers(serve, sched: str, http: str) -> None:
    server = serve("wsgi_apps:hello", "-w", "2", "--sched", sched, "--http", http)
    reply = server.get("/")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"\r\nServer: forkserve" in head
    assert b"\r\nDate: " in head
    assert body == b"Hello, world!"


@pytest.mark.parametrize("sched", POLICIES)
def test_every_bind_is_served_by_every_worker(serve, tmp_path: Path, sched: str) -> None:
    port2 = free_port()
    path = str(tmp_path / "s.sock")
    server = serve(
        "wsgi_apps:app",
        "-w",
        "2",
        "--sched",
        sched,
        "-b",
        f"127.0.0.1:{port2}",
        "-b",
        f"unix:{path}",
    )
    raw = b"GET /slowpid HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"

    def fetch(where: str | tuple[str, int]) -> bytes:
        family = socket.AF_UNIX if isinstance(where, str) else socket.AF_INET
        with socket.socket(family) as sock:
            sock.settimeout(10)
            sock.connect(where)
            sock.sendall(raw)
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
            return body_of(data)

    # Four concurrent slow requests per bind: one busy worker cannot take them
    # all, so each bind must be served by both workers.
    for where in [("127.0.0.1", server.port), ("127.0.0.1", port2), path]:
        with ThreadPoolExecutor(4) as pool:
            pids = set(pool.map(fetch, [where] * 4))
        assert len(pids) == 2, f"both workers serve {where}"
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o660)


def test_ipv6_bind(serve) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        port = free_port("::1")
    except OSError:
        pytest.skip("no ::1")
    server = serve("wsgi_apps:hello", bind=f"[::1]:{port}", ready=False)
    server.host = "::1"
    wait_for(lambda: answers_200("::1", port), 15)


def test_fd_bind_uses_an_inherited_socket(serve) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.set_inheritable(True)
    port = sock.getsockname()[1]
    server = serve(
        "wsgi_apps:hello", bind=f"fd://{sock.fileno()}", ready=False, pass_fds=(sock.fileno(),)
    )
    sock.close()
    server.port = port
    server.ready()


def test_stale_unix_socket_is_replaced_and_live_one_refused(serve, tmp_path: Path) -> None:
    path = tmp_path / "app.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    first = serve("wsgi_apps:hello", bind=f"unix:{path}")
    assert first.get("/").startswith(b"HTTP/1.1 200")
    second = serve("wsgi_apps:hello", bind=f"unix:{path}", ready=False)
    assert second.wait(15) == 1
    assert "address already in use" in second.output
    assert "Traceback" not in second.output
    assert first.get("/").startswith(b"HTTP/1.1 200"), "the live server is untouched"


def test_address_in_use_is_one_clear_line_and_no_workers(serve) -> None:
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        server = serve("wsgi_apps:hello", bind=f"127.0.0.1:{port}", ready=False)
        assert server.wait(15) == 1
        out = server.output
        assert f"bind 127.0.0.1:{port}: address already in use; is another server running?" in out
        assert "Traceback" not in out
        assert "worker" not in out.lower()
    finally:
        holder.close()


def test_unimportable_module_exits_1_with_one_line(serve) -> None:
    server = serve("no_such_module:app", ready=False)
    assert server.wait(15) == 1
    out = server.output.strip()
    assert "no_such_module" in out
    assert "Traceback" not in out
    assert len(out.splitlines()) == 1


def test_app_failing_at_import_stops_the_primary_with_the_error_once(serve) -> None:
    server = serve("broken_app:app", "-w", "3", ready=False)
    assert server.wait(20) == 1
    out = server.output
    assert out.count("this app cannot start") == 1, out
    assert "Traceback" not in out


def test_not_a_wsgi_app_is_refused(serve) -> None:
    server = serve("wsgi_apps:LOADED_IN", ready=False)
    assert server.wait(20) == 1
    assert "not a WSGI or ASGI application" in server.output


@pytest.mark.parametrize(
    ("spec", "extra", "expected"),
    [("wsgi_apps:factory('yo')", (), b"yo"), ("wsgi_apps:factory", ("--factory",), b"hi")],
)
def test_factories(serve, spec: str, extra: tuple[str, ...], expected: bytes) -> None:
    server = serve(spec, *extra)
    assert body_of(server.get("/")) == expected


def test_preload_imports_the_app_once_in_the_template(serve) -> None:
    server = serve("wsgi_apps:loaded_in", "-w", "2", "--preload", workers=2)
    loaded, worker = body_of(server.get("/")).split()
    assert server.templates() == [int(loaded)], "imported by the template, not the primary"
    assert int(worker) in server.workers()


def test_preload_imports_the_worker_class_and_parser_once_in_the_template(serve) -> None:
    """What each worker would import after its fork is in the template already:
    shared, and not on the way from a fork (a respawn) to serving."""
    server = serve("wsgi_apps:hello", "-w", "1", "--preload", "--http", "httptools", workers=1)
    (template,) = server.templates()
    with open(f"/proc/{template}/maps") as fh:
        maps = fh.read()
    assert "httptools" in maps, "the parser's extension is loaded in the template"


def test_without_preload_each_worker_imports_the_app(serve) -> None:
    server = serve("wsgi_apps:loaded_in", "-w", "2")
    loaded, worker = body_of(server.get("/")).split()
    assert loaded == worker


def test_web_concurrency_sets_the_worker_count(serve) -> None:
    server = serve("wsgi_apps:hello", env={"WEB_CONCURRENCY": "3"}, ready=False)
    server.ready(workers=3)


@pytest.mark.parametrize("sched", POLICIES)
def test_a_crashed_worker_is_replaced(serve, sched: str) -> None:
    server = serve("wsgi_apps:app", "-w", "1", "--sched", sched, workers=1)
    (old,) = server.workers()
    server.get("/crash")
    wait_for(lambda: server.workers() and server.workers() != [old], 10)
    assert server.get("/").startswith(b"HTTP/1.1 200")
    assert "restarting" in server.output


def test_sigkill_of_a_worker_is_replaced_quickly(serve) -> None:
    server = serve("wsgi_apps:app", "-w", "2", "--preload", workers=2)
    victim = server.workers()[0]
    os.kill(victim, signal.SIGKILL)
    started = time.monotonic()
    wait_for(lambda: victim not in server.workers() and len(server.workers()) == 2, 10)
    assert time.monotonic() - started < 5
    for _ in range(5):
        assert server.get("/").startswith(b"HTTP/1.1 200")


def test_max_requests_recycles_the_worker(serve) -> None:
    server = serve("wsgi_apps:app", "-w", "1", "--max-requests", "3", workers=1)
    first = {body_of(server.get("/pid")) for _ in range(2)}
    wait_for(lambda: body_of(server.get("/pid")) not in first, 10)
    assert "recycling" in server.output


@pytest.mark.parametrize("sched", POLICIES)
def test_sigterm_finishes_in_flight_requests_and_exits_0(serve, sched: str) -> None:
    server = serve("wsgi_apps:app", "-w", "1", "--sched", sched, workers=1)
    sock = server.connect(10)
    sock.sendall(b"GET /sleep?1.0 HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.3)  # let the worker start the request before the signal
    server.signal(signal.SIGTERM)
    reply = b""
    while b"slept" not in reply:
        chunk = sock.recv(1000)
        if not chunk:
            break
        reply += chunk
    sock.close()
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"slept")
    assert server.wait(15) == 0


def test_graceful_timeout_kills_a_stuck_worker(serve) -> None:
    server = serve("wsgi_apps:app", "-w", "1", "--graceful-timeout", "1", workers=1)
    sock = server.connect(10)
    sock.sendall(b"GET /sleep?30 HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.3)
    started = time.monotonic()
    server.signal(signal.SIGTERM)
    assert server.wait(15) == 0
    assert time.monotonic() - started < 8
    sock.close()


def test_ctrl_c_leaves_no_process_behind(serve) -> None:
    server = serve("wsgi_apps:app", "-w", "3", workers=3)
    workers = server.workers()
    os.killpg(server.pid, signal.SIGINT)  # what a terminal sends to the foreground group
    server.wait(10)
    wait_for(lambda: not any(pid_alive(pid) for pid in workers), 5)


def test_workers_exit_when_the_primary_is_killed(serve) -> None:
    server = serve("wsgi_apps:app", "-w", "2", workers=2)
    workers = server.workers()
    os.kill(server.pid, signal.SIGKILL)
    server.wait(5)
    wait_for(lambda: not any(pid_alive(pid) for pid in workers), 2.5)


def test_ttin_and_ttou_change_the_worker_count(serve) -> None:
    server = serve("wsgi_apps:app", "-w", "2", workers=2)
    server.signal(signal.SIGTTIN)
    wait_for(lambda: len(server.workers()) == 3, 10)
    server.signal(signal.SIGTTOU)
    wait_for(lambda: len(server.workers()) == 2, 10)
    assert server.get("/").startswith(b"HTTP/1.1 200")


def test_pidfile_is_written_and_removed(serve, tmp_path: Path) -> None:
    pidfile = tmp_path / "fs.pid"
    server = serve("wsgi_apps:hello", "--pid", str(pidfile))
    assert int(pidfile.read_text()) == server.pid
    server.signal(signal.SIGTERM)
    assert server.wait(15) == 0
    assert not pidfile.exists()


def test_access_log_format(serve) -> None:
    server = serve(
        "wsgi_apps:app",
        "--access-logfile",
        "-",
        "--access-logformat",
        "%(m)s %(U)s %(q)s %(s)s %(b)s %({x-test}i)s",
    )
    server.get("/env?a=1", headers="X-Test: yes\r\n")
    wait_for(lambda: "GET /env a=1 200" in server.output, 5)
    assert "yes" in server.output.split("GET /env a=1 200", 1)[1].splitlines()[0]


def test_check_config_imports_the_app(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'tests' / 'apps'}{os.pathsep}{ROOT}")
    ok = subprocess.run(
        [sys.executable, "-m", "forkserve", "wsgi_apps:hello", "--check-config"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "forkserve", "broken_app:app", "--check-config"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert bad.returncode == 1
    assert "this app cannot start" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_hup_replaces_every_worker_without_failing_requests(serve) -> None:
    server = serve("wsgi_apps:app", "-w", "2", workers=2)
    old = set(server.workers())
    server.signal(signal.SIGHUP)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        reply = server.get("/pid")
        assert reply.startswith(b"HTTP/1.1 200"), reply
        current = set(server.workers())
        if current and not current & old and len(current) == 2:
            break
    else:
        raise AssertionError("old workers were not replaced")


def test_user_and_group_are_dropped_in_workers(serve) -> None:
    import pwd

    if os.getuid() != 0:
        pytest.skip("needs root to change user")
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody'")
    server = serve("wsgi_apps:app", "-u", "nobody", "-g", str(nobody.pw_gid))
    uid, gid, _ = body_of(server.get("/ids")).split()
    assert (int(uid), int(gid)) == (nobody.pw_uid, nobody.pw_gid)
    assert os.stat(f"/proc/{server.pid}").st_uid == 0, "the primary keeps its identity"


def test_tls_with_certfile_and_keyfile(serve, tmp_path: Path) -> None:
    import ssl

    cert, key = make_certificate(tmp_path)
    server = serve("wsgi_apps:app", "--certfile", str(cert), "--keyfile", str(key), ready=False)
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False

    def fetch() -> bytes:
        try:
            with (
                socket.create_connection(("127.0.0.1", server.port), timeout=3) as raw,
                context.wrap_socket(raw, server_hostname="localhost") as tls,
            ):
                tls.sendall(b"GET /ids HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := tls.recv(4096):
                    data += chunk
                return data
        except (OSError, ssl.SSLError):
            return b""

    reply = wait_for(fetch, 15)
    assert reply.startswith(b"HTTP/1.1 200")
    assert body_of(reply).endswith(b"https")


def test_env_flag_sets_worker_environment(serve) -> None:
    server = serve("wsgi_apps:app", "-e", "GREETING=hello there", "-e", "EMPTY=")
    assert body_of(server.get("/osenv?GREETING")) == b"hello there"
    assert body_of(server.get("/osenv?EMPTY")) == b""


def test_chdir_and_pythonpath_find_the_app(serve, tmp_path: Path) -> None:
    elsewhere = ROOT / "tests" / "apps" / "elsewhere"
    by_chdir = serve("hidden_app:app", "--chdir", str(elsewhere), cwd=tmp_path)
    assert body_of(by_chdir.get("/")) == b"hidden"
    by_path = serve("hidden_app:app", "--pythonpath", str(elsewhere), cwd=tmp_path)
    assert body_of(by_path.get("/")) == b"hidden"
    missing = serve("hidden_app:app", cwd=tmp_path, ready=False)
    assert missing.wait(15) == 1
    assert "check --chdir or --pythonpath" in missing.output


def test_stale_pidfile_is_replaced_and_a_live_one_refused(serve, tmp_path: Path) -> None:
    pidfile = tmp_path / "fs.pid"
    dead = subprocess.Popen(["true"])
    dead.wait()
    pidfile.write_text(f"{dead.pid}\n")
    first = serve("wsgi_apps:hello", "--pid", str(pidfile))
    assert int(pidfile.read_text()) == first.pid
    second = serve("wsgi_apps:hello", "--pid", str(pidfile), ready=False)
    assert second.wait(15) != 0
    assert f"process {first.pid} is running" in second.output
    assert int(pidfile.read_text()) == first.pid


def test_process_titles(serve) -> None:
    server = serve("wsgi_apps:hello", "-w", "2", "-n", "shop", workers=2)

    def title(pid: int) -> str:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode().strip()

    assert title(server.pid) == "forkserve: primary [shop]"
    assert sorted(title(pid) for pid in server.workers()) == [
        "forkserve: worker 1 [shop]",
        "forkserve: worker 2 [shop]",
    ]


def test_usr1_reopens_log_files(serve, tmp_path: Path) -> None:
    access = tmp_path / "access.log"
    server = serve("wsgi_apps:app", "--access-logfile", str(access), workers=1)
    server.get("/first")
    wait_for(lambda: access.exists() and "/first" in access.read_text(), 5)
    access.rename(tmp_path / "access.log.1")  # what logrotate does
    server.signal(signal.SIGUSR1)
    wait_for(lambda: access.exists(), 5)
    (worker,) = server.workers()

    def worker_reopened() -> bool:
        # The worker has the new file open (the old one now reads access.log.1).
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{worker}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{worker}/fd/{fd}") == str(access):
                        return True
        return False

    wait_for(worker_reopened, 5)
    server.get("/second")
    wait_for(lambda: "/second" in access.read_text(), 5)
    assert "/second" not in (tmp_path / "access.log.1").read_text()


def test_winch_retires_all_workers_and_ttin_brings_one_back(serve) -> None:
    server = serve("wsgi_apps:app", "-w", "2", workers=2)
    server.signal(signal.SIGWINCH)
    wait_for(lambda: server.workers() == [], 10)
    assert server.proc.poll() is None, "the primary stays"
    server.signal(signal.SIGTTIN)
    wait_for(lambda: len(server.workers()) == 1, 10)
    server.ready()


def test_daemon_detaches_and_serves(tmp_path: Path) -> None:
    pidfile = tmp_path / "d.pid"
    port = free_port()
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'tests' / 'apps'}{os.pathsep}{ROOT}")
    done = subprocess.run(
        [sys.executable, "-m", "forkserve", "wsgi_apps:hello", "--daemon", "--pid", str(pidfile),
         "-b", f"127.0.0.1:{port}"],
        env=env, capture_output=True, timeout=30, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0
    pid = wait_for(lambda: pidfile.exists() and int(pidfile.read_text() or 0), 10)
    try:
        assert os.getsid(pid) != os.getsid(0), "the daemon left our session"
        wait_for(lambda: answers_200("127.0.0.1", port), 15)
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not pid_alive(pid), 15)
        assert not pidfile.exists()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
