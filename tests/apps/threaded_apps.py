"""WSGI applications for the threaded worker's process tests."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

StartResponse = Callable[..., Any]

# A directory where /slow leaves one file per request that reached the app,
# so a test can wait until its requests are in progress.
MARKS_ENV = "THREADED_TEST_MARKS"


def _answer(start_response: StartResponse, body: bytes) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def _slow(environ: dict[str, Any]) -> bytes:
    marks = os.environ.get(MARKS_ENV)
    if marks:
        with open(os.path.join(marks, uuid.uuid4().hex), "w"):
            pass
    seconds = float(environ.get("QUERY_STRING") or "0.5")
    time.sleep(seconds)
    return f"slept {seconds} in {os.getpid()}".encode()


def _echo_lines(environ: dict[str, Any]) -> Iterator[bytes]:
    """Each line of the request body, sent back as soon as it is read."""
    stream = environ["wsgi.input"]
    while True:
        line = stream.readline()
        if not line:
            return
        yield b"echo: " + line


def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    path = environ["PATH_INFO"]
    if path == "/slow":
        return _answer(start_response, _slow(environ))
    if path == "/pid":
        return _answer(start_response, str(os.getpid()).encode())
    if path == "/env":
        keep = {k: v for k, v in environ.items() if isinstance(v, (str, int, bool))}
        return _answer(start_response, json.dumps(keep).encode())
    if path == "/echo-lines":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return _echo_lines(environ)
    return _answer(start_response, b"Hello, world!")
