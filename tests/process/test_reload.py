"""SIGHUP: new code and configuration without dropping a request, with and without --preload.

The app is a module written into the test's directory (on ``--pythonpath``),
rewritten between HUPs. Bytecode caching is off: a rewrite within the same
second and of the same size would otherwise be served from a stale ``.pyc``.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import Server
from tests.helpers import pid_alive, wait_for
from tests.load import Load

ENV = {"PYTHONDONTWRITEBYTECODE": "1"}
APP = "reload_app:app"

SOURCE = """
import os

VERSION = {version!r}


def app(environ, start_response):
    body = f"{{VERSION}} {{os.getpid()}}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
"""


def write_app(directory: Path, version: str, broken: bool = False) -> None:
    source = SOURCE.format(version=version)
    if broken:
        source += "\ndef broken(:\n"
    path = directory / "reload_app.py"
    tmp = directory / "reload_app.py.tmp"
    tmp.write_text(source)
    os.replace(tmp, path)  # a worker importing meanwhile sees one version or the other


def answer(server: Server) -> tuple[str, int]:
    reply = server.get("/")
    assert reply.startswith(b"HTTP/1.1 200"), reply
    version, pid = reply.split(b"\r\n\r\n", 1)[1].decode().split()
    return version, int(pid)


def serving(server: Server, version: str, workers: int) -> bool:
    """Every worker is a new one answering ``version`` (a few requests agree)."""
    pids = server.workers()
    if len(pids) != workers:
        return False
    seen = [answer(server) for _ in range(2 * workers)]
    return all(v == version and pid in pids for v, pid in seen)


def start(
    serve, tmp_path: Path, *args: str, workers: int = 2, preload: bool = False, flag: bool = True
) -> Server:
    """Serve version v1 of the app with ``workers`` workers (``-w`` unless not ``flag``)."""
    write_app(tmp_path, "v1")
    extra = ["--preload"] if preload else []
    if flag:
        extra += ["-w", str(workers)]
    server = serve(APP, "--pythonpath", str(tmp_path), *extra, *args, env=ENV, workers=workers)
    wait_for(lambda: "ready: " in server.output, 10)  # every worker booted: startup is over
    return server


@pytest.mark.parametrize("preload", [False, True], ids=["fork", "preload"])
def test_hup_serves_new_code(serve, tmp_path: Path, preload: bool) -> None:
    server = start(serve, tmp_path, preload=preload)
    old = set(server.workers())
    old_templates = server.templates()
    assert len(old_templates) == (1 if preload else 0)
    assert answer(server)[0] == "v1"
    write_app(tmp_path, "v2")
    server.signal(signal.SIGHUP)
    wait_for(lambda: serving(server, "v2", 2), 15)
    wait_for(lambda: not any(pid_alive(pid) for pid in old), 10)
    if preload:
        wait_for(lambda: not pid_alive(old_templates[0]), 10)
        assert len(server.templates()) == 1 and server.templates() != old_templates
    assert "reload complete: 2 workers serving" in server.output


@pytest.mark.parametrize(
    ("sched", "preload"),
    [("none", False), ("none", True), ("rr", False)],
    ids=["none", "none-preload", "rr"],
)
def test_hup_under_load_fails_no_request(serve, tmp_path: Path, sched: str, preload: bool) -> None:
    server = start(serve, tmp_path, "--sched", sched, workers=4, preload=preload)
    old = set(server.workers())
    with Load(server.host, server.port, clients=20, duration=5.0) as load:
        time.sleep(1.0)
        write_app(tmp_path, "v2")
        server.signal(signal.SIGHUP)
        time.sleep(1.5)
        server.signal(signal.SIGHUP)
    assert load.failures == [], load.summary()
    assert load.ok > 100, load.summary()
    wait_for(lambda: serving(server, "v2", 4), 15)
    assert not set(server.workers()) & old


def test_hup_rereads_the_config_file(serve, tmp_path: Path) -> None:
    config = tmp_path / "forkserve.conf.py"
    config.write_text("workers = 2\n")
    server = start(serve, tmp_path, "-c", str(config), flag=False)
    first = set(server.workers())
    config.write_text("workers = 3\n")
    server.signal(signal.SIGHUP)
    # The reload is over once the old workers are gone (two of them and a new
    # one would already make three answering "v1").
    wait_for(lambda: serving(server, "v1", 3) and not set(server.workers()) & first, 15)

    pids = sorted(server.workers())
    config.write_text('workers = "many"\n')
    server.signal(signal.SIGHUP)
    wait_for(lambda: "keeping the running configuration" in server.output, 10)
    errors = [line for line in server.output.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1 and 'workers = "many": expected a positive integer' in errors[0]
    assert sorted(server.workers()) == pids, "an invalid configuration changes nothing"
    assert answer(server)[1] in pids

    config.write_text("workers = 3\nbacklog = 64\n")
    server.signal(signal.SIGHUP)
    wait_for(lambda: "restart or upgrade (USR2) to apply" in server.output, 10)
    warning = next(line for line in server.output.splitlines() if "USR2" in line)
    assert "[WARNING]" in warning and "backlog" in warning
    wait_for(lambda: serving(server, "v1", 3) and not set(server.workers()) & set(pids), 15)


@pytest.mark.parametrize("preload", [False, True], ids=["fork", "preload"])
def test_broken_code_on_hup_keeps_the_old_workers(serve, tmp_path: Path, preload: bool) -> None:
    server = start(serve, tmp_path, preload=preload)
    pids = sorted(server.workers())
    templates = server.templates()
    write_app(tmp_path, "v2", broken=True)
    server.signal(signal.SIGHUP)
    wait_for(lambda: "reload abandoned" in server.output, 15)
    time.sleep(0.3)  # let any other new worker finish failing
    assert server.output.count("syntax error in") == 1, server.output
    assert server.proc.poll() is None, "the server keeps running"
    assert sorted(server.workers()) == pids
    assert server.templates() == templates
    assert {answer(server) for _ in range(6)} <= {("v1", pid) for pid in pids}

    write_app(tmp_path, "v3")
    server.signal(signal.SIGHUP)
    wait_for(lambda: serving(server, "v3", 2), 15)


def test_preload_workers_are_children_of_the_primary(serve, tmp_path: Path) -> None:
    server = start(serve, tmp_path, preload=True)
    for pid in server.workers():
        with open(f"/proc/{pid}/stat") as handle:
            ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
        assert ppid == server.pid
    victim = server.workers()[0]
    os.kill(victim, signal.SIGKILL)
    started = time.monotonic()
    wait_for(lambda: victim not in server.workers() and len(server.workers()) == 2, 10)
    assert time.monotonic() - started < 5
    wait_for(lambda: serving(server, "v1", 2), 10)


def test_a_killed_template_is_replaced(serve, tmp_path: Path) -> None:
    server = start(serve, tmp_path, preload=True)
    (template,) = server.templates()
    os.kill(template, signal.SIGKILL)
    wait_for(lambda: "starting a new one" in server.output, 10)
    wait_for(lambda: len(server.templates()) == 1 and server.templates() != [template], 10)
    assert answer(server)[0] == "v1"
    victim = server.workers()[0]
    os.kill(victim, signal.SIGKILL)  # the replacement forks from the new template
    wait_for(lambda: victim not in server.workers() and len(server.workers()) == 2, 10)
    wait_for(lambda: serving(server, "v1", 2), 10)


def test_preload_of_an_unimportable_app_exits_1(serve) -> None:
    server = serve("broken_app:app", "-w", "2", "--preload", ready=False)
    assert server.wait(20) == 1
    assert server.output.count("this app cannot start") == 1, server.output
    assert "Traceback" not in server.output
