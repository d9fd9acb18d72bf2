"""``--reload``: an edited application module is served by new workers, the server stays up.

The app lives in the test's own directory (the server's working directory),
so the watcher sees it; the polling engine is forced
(``FORKSERVE_RELOAD_ENGINE=poll``) so the test does not depend on watchfiles.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Server
from tests.helpers import wait_for

POLL = {"FORKSERVE_RELOAD_ENGINE": "poll"}

APP = """\
VERSION = {version!r}
# {comment}


def app(environ, start_response):
    start_response("200 OK", [("Content-Length", str(len(VERSION)))])
    return [VERSION]


async def asgi(scope, receive, send):
    if scope["type"] != "http":
        return
    headers = [(b"content-length", b"%d" % len(VERSION))]
    await send({{"type": "http.response.start", "status": 200, "headers": headers}})
    await send({{"type": "http.response.body", "body": VERSION}})
"""


def write_app(path: Path, version: bytes, comment: str = "") -> None:
    # The comment changes the file's size too: a .pyc is reused when neither
    # the size nor the mtime second of its source changed.
    path.write_text(APP.format(version=version, comment=comment))


def body(server: Server) -> bytes:
    try:
        return server.get("/", timeout=3).partition(b"\r\n\r\n")[2]
    except OSError:
        return b""


@pytest.mark.parametrize(
    ("spec", "args"),
    [("devapp:app", ("-k", "sync", "-w", "1")), ("devapp:asgi", ("-k", "asgi", "-w", "2"))],
    ids=["sync-1-worker", "asgi-2-workers"],
)
def test_an_edited_module_is_served_after_the_reload(
    serve: Callable[..., Server], tmp_path: Path, spec: str, args: tuple[str, ...]
) -> None:
    module = tmp_path / "devapp.py"
    write_app(module, b"v1")
    server = serve(spec, "--reload", *args, cwd=tmp_path, env=POLL)
    assert body(server) == b"v1"
    assert "--reload: watching" in server.output and "(poll)" in server.output
    write_app(module, b"v2", comment="edited")
    # Every worker serves the new code: nothing answers v1 any more.
    wait_for(lambda: {body(server) for _ in range(8)} == {b"v2"}, 20)
    assert server.proc.poll() is None, "the server is still up"
    assert f"reloading: {module.resolve()} changed" in server.output


def test_changes_in_skipped_directories_do_not_reload(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    write_app(tmp_path / "devapp.py", b"v1")
    ignored = tmp_path / "__pycache__" / "junk.py"
    server = serve("devapp:app", "--reload", cwd=tmp_path, env=POLL)
    ignored.parent.mkdir(exist_ok=True)
    ignored.write_text("x = 1\n")
    extra = tmp_path / "settings.toml"
    extra.write_text("a = 1\n")
    # A watched change after the ignored one: its reload is the only one.
    write_app(tmp_path / "devapp.py", b"v2", comment="edited")
    wait_for(lambda: body(server) == b"v2", 20)
    assert server.output.count("reloading:") == 1, server.output
    assert "junk.py" not in server.output and "settings.toml" not in server.output
