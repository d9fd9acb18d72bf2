"""The hostile request corpus against live servers.

Every tests/requests/invalid/*.http vector goes to a real server for each
worker class (sync, threaded, asgi), scheduling policy and parser, alone and
with a valid request pipelined behind it in the same write. For each: the
status line the .json sidecar expects, a closed connection, and nothing
reaching the application. The app (``http_apps:recorder``; its ASGI twin
``hostile_asgi:recorder`` for asgi) appends a JSON line per request to a log
file: ``enter`` when called, ``done`` once it holds the whole body. A
head-level violation must leave no line at all; a body-level one (the head
was valid, so the app was called) must never produce ``done``; and the
pipelined ``GET /smuggled`` must never appear.

Also: response splitting, log injection into the access log, and the valid
corpus answered 200 with the body reaching the app intact. Counts per
(class, policy, parser) are printed by the last test of each group.
"""

from __future__ import annotations

import collections
import contextlib
import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from test_http import (
    PARSERS,
    SCHEDS,
    Response,
    build,
    exchange,
    launch,
    split_responses,
    stopped_at_end,
)

from tests.conftest import Server
from tests.helpers import BODY_LEVEL, INCOMPLETE, INVALID, VALID, wait_for

CLASSES = ["sync", "threaded", "asgi"]
APPS_BY_CLASS = {"asgi": "hostile_asgi:recorder"}
TARGETS = [(k, s, h) for k in CLASSES for s in SCHEDS for h in PARSERS]

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
_LIMIT_FLAGS = {
    "max_body": "--limit-request-body",
    "max_header_field_size": "--limit-request-field-size",
    "max_header_fields": "--limit-request-fields",
    "max_request_line": "--limit-request-line",
}


def _sidecar(path: Path) -> dict[str, Any]:
    return json.loads(path.with_suffix(".json").read_text())


def _limits_key(path: Path) -> tuple[tuple[str, int], ...]:
    return tuple(sorted(_sidecar(path).get("limits", {}).items()))


LIMIT_SETS = sorted({_limits_key(p) for p in INVALID})


# -- servers and bookkeeping -----------------------------------------------------

# (class, policy, parser) -> category -> [tried, passed]
RESULTS: dict[str, dict[str, list[int]]] = collections.defaultdict(
    lambda: collections.defaultdict(lambda: [0, 0])
)


@dataclass
class Target:
    label: str
    kind: str
    http: str
    servers: dict[tuple[tuple[str, int], ...], Server]
    state: Path
    seen: int = 0

    @property
    def default(self) -> Server:
        return self.servers[()]

    def new_log_entries(self) -> list[dict[str, Any]]:
        """App log lines written since the last call."""
        path = self.state / "requests.log"
        data = path.read_bytes() if path.exists() else b""
        fresh, self.seen = data[self.seen :], len(data)
        return [json.loads(line) for line in fresh.splitlines()]

    @contextlib.contextmanager
    def counted(self, category: str) -> Iterator[None]:
        tally = RESULTS[self.label][category]
        tally[0] += 1
        self.new_log_entries()  # start from a clean slate
        yield
        tally[1] += 1


@pytest.fixture(scope="module", params=TARGETS, ids=[f"{k}-{s}-{h}" for k, s, h in TARGETS])
def target(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Target]:
    kind, sched, http = request.param
    label = f"{kind}/{sched}/{http}"
    state = tmp_path_factory.mktemp(f"hostile-{kind}-{sched}-{http}")
    servers: dict[tuple[tuple[str, int], ...], Server] = {}
    for key in LIMIT_SETS:
        flags = [arg for name, value in key for arg in (_LIMIT_FLAGS[name], str(value))]
        if not key:
            flags += ["--access-logfile", "-"]
        name = "-".join(f"{n}{v}" for n, v in key) or "default"
        servers[key] = launch(
            APPS_BY_CLASS.get(kind, "http_apps:recorder"),
            "-k", kind, "-w", "1", "--sched", sched, "--http", http, *flags,
            state=state,
            log_path=state / f"server-{name}.log",
        )  # fmt: skip
    with stopped_at_end(request, list(servers.values())):
        for server in servers.values():
            try:
                server.ready()
            except RuntimeError as exc:
                if kind == "sync":
                    raise
                last = str(exc).strip().splitlines()[-1] if str(exc).strip() else "?"
                pytest.skip(f"-k {kind} does not start ({last}); its vectors are not run")
        found = Target(label, kind, http, servers, state)
        found.new_log_entries()  # the readiness probes
        yield found


# -- the invalid corpus -------------------------------------------------------------


def _send_vector(target: Target, path: Path, smuggle: bool) -> tuple[list[Response], bool, bytes]:
    data = path.read_bytes() + (SMUGGLED if smuggle else b"")
    server = target.servers[_limits_key(path)]
    raw, closed = exchange(server, data, timeout=5.0, half_close=path.stem in INCOMPLETE)
    return split_responses(raw), closed, raw


def _check_app_saw_nothing(target: Target, name: str, exempt: bool) -> None:
    entries = target.new_log_entries()
    assert not any("/smuggled" in e["raw_uri"] for e in entries), entries
    if exempt:
        return
    if name in BODY_LEVEL:
        assert not [e for e in entries if e["event"] == "done"], "the app got a whole body"
    else:
        assert entries == [], "a rejected head reached the app"


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_vector(target: Target, path: Path) -> None:
    with target.counted("invalid"):
        expected = _sidecar(path)["status"]
        responses, closed, raw = _send_vector(target, path, smuggle=False)
        assert [r.status for r in responses] == [expected], raw[:300]
        assert responses[0].get("connection") == b"close"
        assert closed, "the connection stays open after a framing error"
        _check_app_saw_nothing(target, path.stem, exempt=False)


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_vector_with_a_request_pipelined_behind(target: Target, path: Path) -> None:
    with target.counted("invalid+pipelined"):
        expected = _sidecar(path)["status"]
        responses, closed, raw = _send_vector(target, path, smuggle=True)
        completed_by_it = path.stem in INCOMPLETE  # its bytes may finish the message
        assert responses, raw[:300]
        if not completed_by_it:
            assert [r.status for r in responses] == [expected], raw[:300]
        assert responses[-1].status >= 400, "the connection ends on the error"
        assert b"/smuggled" not in raw
        assert closed
        _check_app_saw_nothing(target, path.stem, exempt=completed_by_it)


# -- response splitting and log injection ----------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "a\r\nSet-Cookie: evil=1",
        "a\nSet-Cookie: evil=1",
        "a\rSet-Cookie: evil=1",
        "a\x00Set-Cookie: evil=1",
        "a\r\n\r\n<html>evil</html>",
        "a\u2028Set-Cookie: evil=1",
    ],
    ids=["crlf", "lf", "cr", "nul", "crlfcrlf-body", "u2028"],
)
def test_response_splitting_from_a_query_param_is_refused(target: Target, value: str) -> None:
    with target.counted("response-splitting"):
        data = build("GET", f"/split?v={quote(value, safe='')}")
        raw, closed = exchange(target.default, data)
        (response,) = split_responses(raw)
        assert response.status == 500
        assert b"Set-Cookie" not in raw and b"evil" not in raw and b"X-Echo" not in raw
        assert closed
        (plain,), _ = _read_responses(target.default, build("GET", "/split?v=plain"), 1)
        assert (plain.status, plain.get("x-echo")) == (200, b"plain")
        target.new_log_entries()


def test_log_injection_does_not_forge_access_log_lines(target: Target) -> None:
    with target.counted("log-injection"):
        marker = uuid.uuid4().hex[:10]
        fake = f"FAKE{marker}"
        accepted = [
            # Percent-encoded CR, LF and ESC stay percent-encoded in the log.
            build("GET", f"/log-{marker}%0d%0a{fake}%1b[31m?q=%0a{fake}"),
            # obs-text reaches the log only escaped: NEL and CSI are C1 controls.
            f"GET /log-{marker} HTTP/1.1\r\nHost: a\r\n".encode()
            + b"User-Agent: x\x85"
            + fake.encode()
            + b"\x9b31m\r\n"
            + f'Referer: a" "{fake}\r\n\r\n'.encode(),
        ]
        refused = [
            f"GET /log-{marker}\r{fake} HTTP/1.1\r\nHost: a\r\n\r\n".encode(),
            f"GET /log-{marker}\n{fake} HTTP/1.1\r\nHost: a\r\n\r\n".encode(),
            f"GET /log-{marker}\x1b[2J HTTP/1.1\r\nHost: a\r\n\r\n".encode(),
            f"GET /log-{marker} HTTP/1.1\r\nHost: a\r\nUser-Agent: x\n{fake}\r\n\r\n".encode(),
            f"GET /log-{marker} HTTP/1.1\r\nHost: a\r\nUser-Agent: \x1b[31m{fake}\r\n\r\n".encode(),
        ]
        for data in accepted:
            (response,), raw = _read_responses(target.default, data, 1)
            assert response.status == 200, raw[:200]
        for data in refused:
            raw, _ = exchange(target.default, data)
            assert raw.startswith(b"HTTP/1.1 400 "), raw[:200]
        log_path = target.default.log_path

        def access_lines() -> list[bytes]:
            return [line for line in log_path.read_bytes().split(b"\n") if marker.encode() in line]

        lines = wait_for(lambda: (found := access_lines()) and len(found) >= 2 and found, 5)
        assert len(lines) == 2, lines  # one line per accepted request, none for refused ones
        for line in lines:
            assert re.match(rb"127\.0\.0\.1 - ", line), line
            assert b"GET /log-" + marker.encode() in line
        text = log_path.read_bytes()
        for raw_byte in (b"\x1b", b"\x85", b"\x9b", b"\r"):
            assert raw_byte not in text, f"{raw_byte!r} reached the log unescaped"
        assert not any(line.lstrip().startswith(fake.encode()) for line in text.split(b"\n")), (
            "a forged line starts with the injected text"
        )
        assert f"/log-{marker}%0d%0a{fake}%1b[31m?q=%0a{fake}".encode() in lines[0]
        assert b'"x\\x85' + fake.encode() + b'\\x9b31m"' in lines[1]
        assert b'"a\\x22 \\x22' + fake.encode() + b'"' in lines[1]
        target.new_log_entries()


# -- the valid corpus --------------------------------------------------------------------


def _read_responses(
    server: Server, data: bytes, count: int, timeout: float = 5.0
) -> tuple[list[Response], bytes]:
    """Send ``data``; read until ``count`` responses are complete or the
    server closes (a threaded worker keeps the connection open)."""
    deadline = time.monotonic() + timeout
    with server.connect(timeout) as sock:
        sock.sendall(data)
        raw = b""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {count} complete responses within {timeout}s: {raw!r}")
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            except TimeoutError:
                continue
            if not chunk:
                return split_responses(raw), raw
            raw += chunk
            with contextlib.suppress(AssertionError):  # a head still incomplete
                got = split_responses(raw, eof=False)
                if len(got) >= count and all(r.complete for r in got):
                    return got, raw


# Valid requests that uvicorn's httptools protocol (llhttp) cannot serve
# after forkserve's front end has accepted them: it refuses them with its own
# 400, or (an Upgrade it does not support) stops reading the body.
ASGI_HTTPTOOLS_UNSERVED = {
    "connect_authority": "llhttp treats CONNECT as a protocol switch: uvicorn answers 400",
    "unknown_method": "llhttp knows only registered methods: uvicorn answers 400",
    "upgrade_with_body": "llhttp stops at an Upgrade: h2c head: the body never reaches the app",
}


def _scope_target(target: str) -> str:
    """An absolute-form target as an ASGI scope keeps it under httptools: path and query."""
    if target.startswith(("http://", "https://")):
        rest = target.split("://", 1)[1]
        return "/" + rest.partition("/")[2]
    return target


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_valid_vector_reaches_the_app_intact(target: Target, path: Path) -> None:
    unserved = target.kind == "asgi" and target.http == "httptools"
    if unserved and path.stem in ASGI_HTTPTOOLS_UNSERVED:
        pytest.skip(ASGI_HTTPTOOLS_UNSERVED[path.stem])
    with target.counted("valid"):
        expected = _sidecar(path)["requests"]
        responses, raw = _read_responses(target.default, path.read_bytes(), len(expected))
        assert [r.status for r in responses] == [200] * len(expected), raw[:500]
        done = [e for e in target.new_log_entries() if e["event"] == "done"]
        seen = [(e["method"], e["raw_uri"], e["body"]) for e in done]
        wanted = [(r["method"], r["target"], r["body"]) for r in expected]
        if unserved:
            wanted = [(m, _scope_target(t), b) for m, t, b in wanted]
        assert seen == wanted


# -- the summary: last in each group --------------------------------------------------


def test_summary_of_hostile_vectors(target: Target, capsys: pytest.CaptureFixture[str]) -> None:
    results = RESULTS[target.label]
    if not results:
        pytest.skip("no vector ran for this server")
    tried = sum(t for t, _ in results.values())
    passed = sum(p for _, p in results.values())
    parts = ", ".join(f"{cat} {p}/{t}" for cat, (t, p) in sorted(results.items()))
    line = f"hostile vectors {target.label}: {passed}/{tried} passed ({parts})"
    with capsys.disabled():  # visible in the test output even when it passes
        print(f"\n{line}")
    assert passed == tried, line
