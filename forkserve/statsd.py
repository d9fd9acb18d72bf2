"""statsd: the primary sends what changed every few seconds, over UDP.

Every ``INTERVAL`` seconds (and once more when the server stops) the
arbiter hands a ``Snapshot`` to ``StatsdSender.flush``, which sends the
differences from the previous one:

- counters (``|c``): ``<prefix>.requests``, ``<prefix>.request.status.<2xx...>``,
  ``<prefix>.request.timeouts``, ``<prefix>.worker.restarts.<cause>`` (only
  those that moved);
- gauges (``|g``): ``<prefix>.workers`` (running workers),
  ``<prefix>.requests.in_flight``, and ``<prefix>.rr.queue_length`` under
  round robin;
- timers (``|ms``): ``<prefix>.request.duration`` is the mean latency of the
  interval's requests (the workers keep a histogram, not every value), one
  value per interval with requests; ``<prefix>.rr.queue_wait`` likewise.

Lines are batched into datagrams of at most ``PACKET_MAX`` bytes. statsd is
fire and forget: a send that fails is ignored. Only resolving the address
at startup can fail, with one clear error.

Imports nothing from forkserve but ``errors`` and ``metrics``.
"""

from __future__ import annotations

import contextlib
import re
import socket

from forkserve.errors import ForkserveError
from forkserve.metrics import Histogram, Snapshot

INTERVAL = 5.0  # seconds between flushes
PACKET_MAX = 1400  # bytes: fits an Ethernet MTU with room for headers

_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")


def clean_name(name: str) -> str:
    """A metric name statsd cannot misread (no ``:``, ``|``, ``@``, spaces or newlines)."""
    return _UNSAFE.sub("_", name).strip(".")


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[ipv6]:port`` -> (host, port)."""
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        port = rest.lstrip(":")
    else:
        host, _, port = address.rpartition(":")
    return host, int(port)


def _timer(name: str, histogram: Histogram | None, earlier: Histogram | None) -> list[str]:
    if histogram is None:
        return []
    mean = histogram.minus(earlier).mean
    return [] if mean is None else [f"{name}:{mean * 1000.0:.3f}|ms"]


def lines(prefix: str, current: Snapshot, previous: Snapshot | None) -> list[str]:
    """The statsd lines for what changed from ``previous`` (None: since the start)."""
    p = clean_name(prefix)
    p = f"{p}." if p else ""
    out: list[str] = []

    def counter(name: str, now: int, before: int) -> None:
        if now > before:
            out.append(f"{p}{name}:{now - before}|c")

    was = previous.counts if previous is not None else None
    counter("requests", current.counts.requests, was.requests if was else 0)
    before_status = was.by_status_class() if was else {}
    for status, value in current.counts.by_status_class().items():
        counter(f"request.status.{status}", value, before_status.get(status, 0))
    counter("request.timeouts", current.counts.timeouts, was.timeouts if was else 0)
    restarted = previous.restarts if previous is not None else {}
    for cause, value in sorted(current.restarts.items()):
        counter(f"worker.restarts.{clean_name(cause)}", value, restarted.get(cause, 0))
    out += _timer(f"{p}request.duration", current.latency, previous.latency if previous else None)
    running = sum(1 for worker in current.workers if worker.state != "leaving")
    out.append(f"{p}workers:{running}|g")
    out.append(f"{p}requests.in_flight:{current.in_flight}|g")
    if current.rr_queue_length is not None:
        out.append(f"{p}rr.queue_length:{current.rr_queue_length}|g")
        out += _timer(f"{p}rr.queue_wait", current.rr_wait, previous.rr_wait if previous else None)
    return out


def packets(items: list[str], limit: int = PACKET_MAX) -> list[bytes]:
    """``items`` joined by newlines into datagrams of at most ``limit`` bytes
    (a line longer than that on its own is dropped)."""
    out: list[bytes] = []
    current = b""
    for item in items:
        line = item.encode("ascii", "replace")
        if len(line) > limit:
            continue
        if current and len(current) + 1 + len(line) > limit:
            out.append(current)
            current = b""
        current = current + b"\n" + line if current else line
    if current:
        out.append(current)
    return out


class StatsdSender:
    """A UDP socket to the statsd server and the last snapshot sent."""

    def __init__(self, address: str, prefix: str) -> None:
        host, port = split_address(address)
        try:
            found = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except (socket.gaierror, UnicodeError) as exc:
            reason = exc.strerror if isinstance(exc, socket.gaierror) else str(exc)
            raise ForkserveError(
                f"--statsd-host {address}: cannot resolve {host!r} ({reason}); "
                "check the name or use an IP address"
            ) from None
        family, kind, proto, _, target = found[0]
        self.address = address
        self.prefix = prefix
        self.sock = socket.socket(family, kind, proto)
        self.sock.setblocking(False)
        self.sock.set_inheritable(False)
        self.target = target
        self.previous: Snapshot | None = None

    def flush(self, snapshot: Snapshot) -> None:
        """Send what changed since the last flush; errors are ignored."""
        items = lines(self.prefix, snapshot, self.previous)
        self.previous = snapshot
        for packet in packets(items):
            with contextlib.suppress(OSError):
                self.sock.sendto(packet, self.target)

    def close(self) -> None:
        self.sock.close()
