"""A bounded load loop for zero-downtime tests.

``Load(host, port)`` starts ``clients`` threads on loopback; half of them
reuse one keep-alive connection (reconnecting after the server closes it
between requests, which HTTP allows), half open a new connection per
request. Each runs until ``stop()`` or ``duration`` seconds, whichever comes
first. A request fails when the client gets no complete ``200`` reply: a
refused or reset connection, a timeout, a short read or another status. The
only tolerated event is a keep-alive connection found closed *before* the
request was sent (the server closed an idle connection; the client retries
on a new one, as every HTTP client does).

    with Load("127.0.0.1", port) as load:
        ...  # signal the server
    assert load.failures == [], load.summary()
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from types import TracebackType

REQUEST = b"GET / HTTP/1.1\r\nHost: load\r\n\r\n"
REQUEST_CLOSE = b"GET / HTTP/1.1\r\nHost: load\r\nConnection: close\r\n\r\n"


class _Closed(Exception):
    """The server had closed a kept connection before this request: retry."""


def _read_reply(sock: socket.socket, buffer: bytearray) -> tuple[int, bool]:
    """Read one response (Content-Length framed); return (status, server closes)."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed before a response head")
        buffer += chunk
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = 0
    closes = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip())
        elif name == b"connection" and value.strip().lower() == b"close":
            closes = True
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed in the middle of a body")
        rest += chunk
    buffer[:] = rest[length:]
    return status, closes


class Load:
    def __init__(
        self,
        host: str,
        port: int,
        clients: int = 20,
        duration: float = 5.0,
        timeout: float = 10.0,
    ) -> None:
        self.address = (host, port)
        self.clients = clients
        self.duration = duration
        self.timeout = timeout
        self.ok = 0
        self.failures: list[str] = []
        self.retries = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.started = 0.0

    # -- control --------------------------------------------------------------

    def start(self) -> Load:
        self.started = time.monotonic()
        for index in range(self.clients):
            target = self._keep_alive if index % 2 == 0 else self._new_connections
            thread = threading.Thread(target=target, name=f"load-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 5.0)

    def wait(self) -> None:
        """Let the load run its whole duration, then stop it."""
        remaining = self.started + self.duration - time.monotonic()
        if remaining > 0:
            self._stop.wait(remaining)
        self.stop()

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.wait()

    def summary(self) -> str:
        reasons = Counter(self.failures)
        return (
            f"{self.ok} ok, {len(self.failures)} failed, {self.retries} idle-closed retries; "
            + ", ".join(f"{reason} x{count}" for reason, count in reasons.most_common(5))
        )

    # -- clients -------------------------------------------------------------

    def _running(self) -> bool:
        return not self._stop.is_set() and time.monotonic() - self.started < self.duration

    def _record(self, failure: str | None) -> None:
        with self._lock:
            if failure is None:
                self.ok += 1
            else:
                self.failures.append(failure)

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(self.address, timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _new_connections(self) -> None:
        while self._running():
            try:
                with self._connect() as sock:
                    sock.sendall(REQUEST_CLOSE)
                    status, _ = _read_reply(sock, bytearray())
                self._record(None if status == 200 else f"status {status}")
            except (OSError, ValueError, IndexError) as exc:
                self._record(f"new connection: {type(exc).__name__}: {exc}")

    def _keep_alive(self) -> None:
        sock: socket.socket | None = None
        buffer = bytearray()
        while self._running():
            try:
                if sock is None:
                    sock = self._connect()
                    buffer.clear()
                    fresh = True
                else:
                    fresh = False
                    if _peer_closed(sock):
                        raise _Closed
                sock.sendall(REQUEST)
                status, closes = _read_reply(sock, buffer)
                self._record(None if status == 200 else f"status {status}")
                if closes:
                    sock.close()
                    sock = None
            except _Closed:
                with self._lock:
                    self.retries += 1
                if sock is not None:
                    sock.close()
                sock = None
            except (OSError, ValueError, IndexError) as exc:
                if not fresh and isinstance(exc, ConnectionError) and not buffer:
                    # Closed between requests, seen only on the read: the server
                    # closed an idle connection as the request was on its way.
                    # An HTTP client retries an idempotent request here.
                    with self._lock:
                        self.retries += 1
                else:
                    self._record(f"keep-alive: {type(exc).__name__}: {exc}")
                if sock is not None:
                    sock.close()
                sock = None
        if sock is not None:
            sock.close()


def _peer_closed(sock: socket.socket) -> bool:
    """True if the server has closed (or reset) an idle kept connection."""
    timeout = sock.gettimeout()
    try:
        sock.setblocking(False)
        try:
            data = sock.recv(1, socket.MSG_PEEK)
        finally:
            sock.settimeout(timeout)
    except BlockingIOError:
        return False
    except OSError:
        return True
    return data == b""
