"""WSGI applications for the HTTP process tests (tests/process/test_http.py
and tests/process/test_hostile.py).

Both apps keep their side effects in the directory named by the
``HTTP_APPS_STATE`` environment variable: ``requests.log`` gets one JSON line
per event (``enter`` when the app is called, ``done`` once it has read the
whole body), ``closed-<token>`` files record that the server called
``close()`` on a response iterable, and the test creates ``go-<token>``
files to release a generator waiting for it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

StartResponse = Callable[..., Any]
Environ = dict[str, Any]

_WAIT_LIMIT = 10.0  # a gated generator gives up after this long


def _state() -> Path:
    return Path(os.environ["HTTP_APPS_STATE"])


def record(event: str, environ: Environ, **extra: Any) -> None:
    """Append one JSON line to requests.log; O_APPEND keeps lines whole."""
    line = {
        "event": event,
        "method": environ["REQUEST_METHOD"],
        "raw_uri": environ.get("RAW_URI", ""),
        "path": environ["PATH_INFO"],
        "pid": os.getpid(),
        **extra,
    }
    data = (json.dumps(line) + "\n").encode()
    fd = os.open(_state() / "requests.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _query(environ: Environ) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(environ["QUERY_STRING"], keep_blank_values=True).items()}


def _read_all(environ: Environ, size: int = 65536) -> tuple[bytes, int]:
    """The whole body, read in pieces of at most ``size``; and the read count."""
    stream = environ["wsgi.input"]
    parts = []
    reads = 0
    while True:
        data = stream.read(size)
        reads += 1
        if not data:
            return b"".join(parts), reads
        assert len(data) <= size
        parts.append(data)


def _reply(
    start_response: StartResponse, body: bytes, status: str = "200 OK", ctype: str = "text/plain"
) -> list[bytes]:
    start_response(status, [("Content-Type", ctype), ("Content-Length", str(len(body)))])
    return [body]


def _json(start_response: StartResponse, value: Any) -> list[bytes]:
    return _reply(start_response, json.dumps(value).encode(), ctype="application/json")


def _wait_for_file(path: Path) -> bool:
    deadline = time.monotonic() + _WAIT_LIMIT
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


class ClosingBody:
    """A response iterable whose ``close()`` leaves a file behind."""

    def __init__(self, token: str, chunks: list[bytes], fail_after: int | None = None) -> None:
        self.token = token
        self.chunks = chunks
        self.fail_after = fail_after

    def __iter__(self) -> Iterator[bytes]:
        for i, chunk in enumerate(self.chunks):
            if self.fail_after is not None and i == self.fail_after:
                raise RuntimeError(f"failing mid-iteration ({self.token})")
            yield chunk

    def close(self) -> None:
        path = _state() / f"closed-{self.token}"
        with open(path, "a") as fh:
            fh.write("closed\n")


def _describe(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, tuple):
        return list(value)
    return {"type": type(value).__name__}


def _environ_report(environ: Environ) -> dict[str, Any]:
    report = {key: _describe(value) for key, value in environ.items()}
    report["_types"] = {
        key: type(key).__name__ + "/" + type(v).__name__ for key, v in environ.items()
    }
    stream = environ["wsgi.input"]
    report["_input_methods"] = [
        name for name in ("read", "readline", "readlines", "__iter__") if hasattr(stream, name)
    ]
    errors = environ["wsgi.errors"]
    report["_errors_methods"] = [
        name for name in ("write", "writelines", "flush") if hasattr(errors, name)
    ]
    body, _ = _read_all(environ)
    report["_body"] = body.decode("latin-1")
    return report


# -- the feature router ------------------------------------------------------


def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """Small behaviours, one per path, for tests/process/test_http.py."""
    path = environ["PATH_INFO"]
    query = _query(environ)
    # ?report=env answers the environ whatever the path (PATH_INFO may be "").
    handler = _env if query.get("report") == "env" else _ROUTES.get(path)
    if handler is not None:
        return handler(environ, start_response, query)
    return _reply(start_response, b"hello")


def _who(environ: Environ, start_response: StartResponse, query: dict[str, str]) -> Any:
    body, _ = _read_all(environ)
    text = f"{environ['REQUEST_METHOD']} {environ['RAW_URI']} {body.decode('latin-1')}"
    return _reply(start_response, text.encode("latin-1"))


def _echo(environ: Environ, start_response: StartResponse, query: dict[str, str]) -> Any:
    body, _ = _read_all(environ)
    return _reply(start_response, body, ctype="application/octet-stream")


def _digest(environ: Environ, start_response: StartResponse, query: dict[str, str]) -> Any:
    # The test waits for this file before sending most of the body: it proves
    # the app runs while the body is still arriving.
    token = query.get("token")
    if token:
        (_state() / f"entered-{token}").write_text("entered")
    stream = environ["wsgi.input"]
    digest = hashlib.sha256()
    length = reads = biggest = 0
    while True:
        data = stream.read(65536)
        reads += 1
        if not data:
            break
        biggest = max(biggest, len(data))
        length += len(data)
        digest.update(data)
    return _json(
        start_response,
        {"length": length, "sha256": digest.hexdigest(), "reads": reads, "biggest": biggest},
    )


def _stream(environ: Environ, start_response: StartResponse, query: dict[str, str]) -> Any:
    count = int(query.get("n", "3"))
    start_response("200 OK", [("Content-Type", "text/plain"), ("X-Stream", "yes")])
    return (f"part{i};".encode() for i in range(count))


def _gated(environ: Environ, start_response: StartResponse, query: dict[str, str]) -> Any:
    flag = _state() / f"go-{query['token']}"
    start_response("200 OK", [("Content-Type", "text/plain")])

    def body() -> Iterator[bytes]:
        yield b"first;"
        yield b"released;" if _wait_for_file(flag) else b"gave-up;"

    return body()


def _file(environ: Environ, start_response: StartResponse, query: dict[str, str]) -> Any:
    fh = open(_state() / query["name"], "rb")  # the server closes it via the wrapper
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return environ["wsgi.file_wrapper"](fh, 8192)


def _file_like(environ: Environ, start_response: StartResponse, query: dict[str, str]) -> Any:
    data = query.get("data", "in-memory").encode()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return environ["wsgi.file_wrapper"](io.BytesIO(data), 4)


def _env(environ: Environ, start_response: StartResponse, query: dict[str, str]) -> Any:
    return _json(start_response, _environ_report(environ))


def _errors(environ: Environ, start_response: StartResponse, query: dict[str, str]) -> Any:
    errors = environ["wsgi.errors"]
    errors.write(f"wsgi.errors says {query['marker']}\n")
    errors.flush()
    return _reply(start_response, b"written")


def _lines(environ: Environ, start_response: StartResponse, query: dict[str, str]) -> Any:
    stream = environ["wsgi.input"]
    first = stream.readline()
    limited = stream.readline(3)
    piece = stream.read(4)
    rest = list(stream)
    after = stream.read()
    result = [x.decode("latin-1") for x in (first, limited, piece, *rest, after)]
    return _json(start_response, result)


def _double_start(environ: Environ, start_response: StartResponse, query: dict[str, str]) -> Any:
    start_response("200 OK", [("Content-Type", "text/plain")])
    start_response("201 Created", [("Content-Type", "text/plain")])
    return [b"should not be sent"]


def _exc_before(environ: Environ, start_response: StartResponse, query: dict[str, str]) -> Any:
    start_response("200 OK", [("Content-Type", "text/plain"), ("X-First", "1")])
    try:
        raise ValueError("changed my mind")
    except ValueError:
        body = b"replaced"
        start_response(
            "503 Service Unavailable",
            [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))],
            sys.exc_info(),
        )
    return [body]


def _exc_after(environ: Environ, start_response: StartResponse, query: dict[str, str]) -> Any:
    start_response("200 OK", [("Content-Type", "text/plain")])

    def body() -> Iterator[bytes]:
        yield b"partial;"
        try:
            raise ValueError(f"too late {query.get('marker', '')}")
        except ValueError:
            # PEP 3333: with the head already sent, this re-raises.
            start_response("500 Internal Server Error", [], sys.exc_info())
        yield b"must-not-appear"

    return body()


def _write(environ: Environ, start_response: StartResponse, query: dict[str, str]) -> Any:
    headers = [("Content-Type", "text/plain")]
    if "length" in query:
        headers.append(("Content-Length", query["length"]))
    write = start_response("200 OK", headers)
    write(b"one;")
    write(b"two;")
    return [b"three;"]


def _close(environ: Environ, start_response: StartResponse, query: dict[str, str]) -> Any:
    mode = query.get("mode", "ok")
    start_response("200 OK", [("Content-Type", "text/plain")])
    return ClosingBody(
        query["token"], [b"a;", b"b;", b"c;"], fail_after=1 if mode == "raise" else None
    )


def _bad_header(environ: Environ, start_response: StartResponse, query: dict[str, str]) -> Any:
    value = query["value"]
    if query.get("where") == "name":
        headers = [(value, "x")]
    elif query.get("where") == "status":
        start_response("200 OK" + value, [("Content-Length", "0")])
        return [b""]
    else:
        headers = [("X-Bad", value)]
    start_response("200 OK", [("Content-Length", "2"), *headers])
    return [b"ok"]


def _length(environ: Environ, start_response: StartResponse, query: dict[str, str]) -> Any:
    # A Content-Length that does not match the body the app yields.
    body = b"0123456789abcdef"[: int(query["actual"])]
    start_response("200 OK", [("Content-Length", query["declared"])])
    return iter([body[:1], body[1:]])


def _status(environ: Environ, start_response: StartResponse, query: dict[str, str]) -> Any:
    body = query.get("body", "").encode()
    start_response(query["code"], [("Content-Length", str(len(body)))])
    return [body]


def _cookies(environ: Environ, start_response: StartResponse, query: dict[str, str]) -> Any:
    start_response(
        "200 OK",
        [
            ("Set-Cookie", "a=1"),
            ("set-cookie", "b=2"),
            ("X-MiXeD-Case", "kept"),
            ("Content-Length", "0"),
        ],
    )
    return [b""]


def _raise(environ: Environ, start_response: StartResponse, query: dict[str, str]) -> Any:
    raise RuntimeError(f"boom-{query['marker']}")


_ROUTES: dict[str, Callable[[Environ, StartResponse, dict[str, str]], Any]] = {
    "/who": _who,
    "/echo": _echo,
    "/digest": _digest,
    "/stream": _stream,
    "/gated": _gated,
    "/file": _file,
    "/file-like": _file_like,
    "/env": _env,
    "/errors": _errors,
    "/lines": _lines,
    "/double-start": _double_start,
    "/exc-before": _exc_before,
    "/exc-after": _exc_after,
    "/write": _write,
    "/close": _close,
    "/bad-header": _bad_header,
    "/length": _length,
    "/status": _status,
    "/cookies": _cookies,
    "/raise": _raise,
}


# -- the recorder for hostile input ------------------------------------------


def recorder(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """Logs every request it sees (``enter``), and its whole body once read
    (``done``). ``/split?v=...`` puts the decoded ``v`` into a response
    header, which the server must refuse."""
    record("enter", environ)
    body, _ = _read_all(environ)
    record("done", environ, body=body.decode("latin-1"))
    if environ["PATH_INFO"] == "/split":
        value = unquote(environ["QUERY_STRING"].partition("v=")[2])
        start_response("200 OK", [("Content-Length", "2"), ("X-Echo", value)])
        return [b"ok"]
    reply = json.dumps({"path": environ["PATH_INFO"], "length": len(body)}).encode()
    start_response(
        "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(reply)))]
    )
    return [reply]
