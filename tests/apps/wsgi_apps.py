"""WSGI applications used by the server's process tests."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

StartResponse = Callable[..., Any]
_HOARD: list[bytearray] = []
_SERVED: list[None] = []


def hello(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    body = b"Hello, world!"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """A router over small behaviours the tests need."""
    path = environ["PATH_INFO"]
    if path == "/pid":
        body = str(os.getpid()).encode()
    elif path == "/slowpid":
        time.sleep(0.2)
        body = str(os.getpid()).encode()
    elif path == "/sleep":
        time.sleep(float(environ.get("QUERY_STRING") or "0.5"))
        body = b"slept"
    elif path == "/spin":
        # Busy in Python (holding the GIL) for QUERY_STRING seconds.
        until = time.monotonic() + float(environ.get("QUERY_STRING") or "1")
        while time.monotonic() < until:
            pass
        body = b"spun"
    elif path == "/grow":
        # Keep QUERY_STRING more MiB alive in this worker, touched so they count in RSS.
        _HOARD.append(bytearray(b"x" * (int(environ.get("QUERY_STRING") or "1") << 20)))
        body = str(os.getpid()).encode()
    elif path == "/crash":
        os._exit(1)
    elif path == "/raise":
        raise RuntimeError("boom")
    elif path == "/env":
        keep = {k: v for k, v in environ.items() if isinstance(v, (str, int, bool, tuple))}
        body = json.dumps(keep, default=str).encode()
    elif path == "/orphan":
        # Leave a grandchild behind: it is re-parented to PID 1 when it exits.
        child = os.fork()
        if child == 0:
            if os.fork() == 0:
                os.execv("/bin/sleep", ["sleep", "0.2"])
            os._exit(0)
        os.waitpid(child, 0)
        body = b"orphaned"
    elif path == "/zombies":
        count = 0
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as handle:
                        if handle.read().rsplit(")", 1)[1].split()[0] == "Z":
                            count += 1
                except (OSError, IndexError):
                    pass
        body = str(count).encode()
    elif path == "/osenv":
        body = os.environ.get(environ.get("QUERY_STRING", ""), "-").encode()
    elif path == "/cwd":
        body = os.getcwd().encode()
    elif path == "/ids":
        body = f"{os.getuid()} {os.getgid()} {environ['wsgi.url_scheme']}".encode()
    elif path == "/echo":
        body = environ["wsgi.input"].read()
    elif path == "/seq":
        # "<pid> <n>": the n-th request this worker served, from 1.
        _SERVED.append(None)
        body = f"{os.getpid()} {len(_SERVED)}".encode()
    else:
        body = b"Hello, world!"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def factory(greeting: str = "hi") -> Callable[..., Iterable[bytes]]:
    def inner(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        body = greeting.encode()
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]

    return inner


LOADED_IN = os.getpid()


def loaded_in(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """Answers the pid that imported this module (the primary under --preload)."""
    body = f"{LOADED_IN} {os.getpid()}".encode()
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]
