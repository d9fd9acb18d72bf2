"""The IPC channel between the primary and one worker.

Theory of operation
-------------------
A channel is one end of a Unix stream socketpair. Messages travel as frames::

    +----------------+--------+--------+-----------------+
    | payload length | kind   | n fds  | payload         |
    | 4 bytes, BE    | 1 byte | 1 byte | length bytes    |
    +----------------+--------+--------+-----------------+

``kind`` tells internal cluster messages apart from user messages (JSON or
pickle, by the ``serialization`` setting), so internal traffic never reaches
``'message'`` handlers. Internal messages are JSON, but for the round-robin
hand-off, which happens once per connection: a ``CONN`` frame has a fixed
binary layout (``pack_handoff``/``pack_taken``), no JSON to encode or parse.
File descriptors ride as SCM_RIGHTS ancillary data on the ``sendmsg`` that
carries the first byte of their frame; the kernel delivers them no later than
that byte, so the reader keeps a FIFO of received descriptors and gives each completed frame the
number its header announces.

The channel itself never blocks the caller unless asked to: ``send`` queues a
frame and writes what the socket takes now; the role that owns the channel
arranges to flush the rest (on its event loop, or by ``flush(timeout)``).

Imports nothing from forkserve outside this package.
"""

from __future__ import annotations

import array
import errno
import json
import os
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, NamedTuple

HEADER = struct.Struct("!IBB")
MAX_FDS = 253  # SCM_MAX_FD on Linux
MAX_PAYLOAD = 1 << 31
# Under the allocator's mmap threshold (128 KiB): a larger read buffer would
# be mapped and unmapped on every read, and reads are mostly a few dozen bytes.
READ_SIZE = 64 * 1024
_FD_SIZE = array.array("i").itemsize
_ANC_SIZE = socket.CMSG_SPACE(MAX_FDS * _FD_SIZE)


class Kind(IntEnum):
    INTERNAL = 0
    JSON = 1
    PICKLE = 2
    CONN = 3  # the round-robin hand-off: binary, see pack_handoff/pack_taken


_KINDS = tuple(Kind)


SERIALIZATIONS = {"json": Kind.JSON, "advanced": Kind.PICKLE}


class Frame(NamedTuple):
    """A decoded message: its kind, the object, and the descriptors it carried."""

    kind: Kind
    body: Any
    fds: tuple[int, ...]


def encode(kind: Kind, body: Any, nfds: int = 0) -> bytes:
    """Serialize one frame. Raises TypeError for an object the kind cannot carry."""
    if kind is Kind.CONN:
        payload = bytes(body)
    elif kind is Kind.PICKLE:
        try:
            import pickle  # 'advanced' serialization only

            payload = pickle.dumps(body, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise TypeError(f"message cannot be serialized with pickle: {exc}") from exc
    else:
        try:
            payload = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise TypeError(f"message cannot be serialized as JSON: {exc}") from exc
    if len(payload) >= MAX_PAYLOAD:
        raise TypeError(f"message too large: {len(payload)} bytes")
    if nfds > MAX_FDS:
        raise TypeError(f"too many handles in one message: {nfds} > {MAX_FDS}")
    return HEADER.pack(len(payload), kind, nfds) + payload


def decode_body(kind: Kind, payload: bytes) -> Any:
    if kind is Kind.CONN:
        return payload
    if kind is Kind.PICKLE:
        import pickle

        return pickle.loads(payload)
    return json.loads(payload)


# -- the round-robin hand-off (Kind.CONN) -----------------------------------
#
# Primary -> worker, one connection (its descriptor rides with the frame):
#     token u64 | accepted-at f64 (time.monotonic()) | flags u8 | family u8
#     | key length u16 | peer length u16 | key | peer | data
# where ``data`` is what the primary already read from the connection.
# Worker -> primary, one or more records:
#     token u64 | state u8 | flags u8 | family u8 | key length u16
#     | peer length u16 | key | peer
# state: REFUSED or TAKEN (the connection ``token``), or PARKED: an idle
# connection given back, its descriptor riding with the frame (one per
# PARKED record, in order; ``token`` unused).
#
# ``family`` and ``peer`` (``encode_peer``) spare the receiver the system
# calls that would find them out (``getsockname`` and ``getsockopt`` to wrap
# the descriptor, ``getpeername``); family 0 and an empty peer mean unknown.
# ``flags``: NONBLOCKING, the descriptor may be in non-blocking mode (a
# worker set a timeout on it), so the receiver makes it blocking.
REFUSED, TAKEN, PARKED = 0, 1, 2
NONBLOCKING = 1

_HANDOFF = struct.Struct("!QdBBHH")
_TAKEN = struct.Struct("!QBBBHH")


class Handoff(NamedTuple):
    """One round-robin connection handed to a worker (without its descriptor)."""

    key: str
    token: int
    accepted_at: float = 0.0  # time.monotonic() at accept (0: unknown)
    data: bytes = b""  # bytes the primary already read from it
    family: int = 0
    peer: Any = None
    flags: int = 0


class Record(NamedTuple):
    """What a worker did with a round-robin connection (``state``)."""

    key: str
    token: int
    state: int
    flags: int = 0
    family: int = 0
    peer: Any = None


def encode_peer(addr: Any) -> bytes:
    """A peer address as ``accept()`` returns it, as bytes (b"" if unknown)."""
    if isinstance(addr, tuple):
        return b"t" + "\n".join(map(str, addr)).encode()
    if isinstance(addr, str):
        return b"s" + addr.encode(errors="surrogateescape")
    if isinstance(addr, bytes):
        return b"b" + addr
    return b""


def decode_peer(raw: bytes) -> Any:
    """The inverse of ``encode_peer``; None when unknown. ValueError if malformed."""
    if not raw:
        return None
    tag, rest = raw[:1], raw[1:]
    if tag == b"t":
        host, *numbers = rest.decode().split("\n")
        return (host, *map(int, numbers))
    if tag == b"s":
        return rest.decode(errors="surrogateescape")
    if tag == b"b":
        return bytes(rest)
    raise ValueError("malformed peer address")


def pack_handoff(item: Handoff) -> bytes:
    raw = item.key.encode()
    peer = encode_peer(item.peer)
    head = _HANDOFF.pack(item.token, item.accepted_at, item.flags, item.family, len(raw), len(peer))
    return b"".join((head, raw, peer, item.data))


def unpack_handoff(payload: bytes) -> Handoff:
    """The hand-off a frame carries; ValueError if malformed."""
    try:
        token, accepted_at, flags, family, size, peer_size = _HANDOFF.unpack_from(payload)
        start = _HANDOFF.size
        end = start + size + peer_size
        if len(payload) < end:
            raise ValueError("truncated")
        key = payload[start : start + size].decode()
        peer = decode_peer(payload[start + size : end])
    except (struct.error, ValueError) as exc:
        raise ValueError(f"malformed hand-off frame: {exc}") from None
    return Handoff(key, token, accepted_at, payload[end:], family, peer, flags)


def pack_taken(records: list[Record]) -> bytes:
    out = bytearray()
    for record in records:
        raw = record.key.encode()
        peer = encode_peer(record.peer)
        out += _TAKEN.pack(
            record.token, record.state, record.flags, record.family, len(raw), len(peer)
        )
        out += raw
        out += peer
    return bytes(out)


def unpack_taken(payload: bytes) -> list[Record]:
    """The records a frame carries; ValueError if malformed."""
    out = []
    pos = 0
    try:
        while pos < len(payload):
            token, state, flags, family, size, peer_size = _TAKEN.unpack_from(payload, pos)
            pos += _TAKEN.size
            end = pos + size + peer_size
            if len(payload) < end or state > PARKED:
                raise ValueError("bad record")
            key = payload[pos : pos + size].decode()
            peer = decode_peer(payload[pos + size : end])
            out.append(Record(key, token, state, flags, family, peer))
            pos = end
    except (struct.error, ValueError) as exc:
        raise ValueError(f"malformed taken frame: {exc}") from None
    return out


class FrameDecoder:
    """Bytes and descriptors in, frames out. No I/O."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._fds: deque[int] = deque()

    def feed(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        self._buffer += data
        self._fds.extend(fds)

    def frames(self) -> list[Frame]:
        out: list[Frame] = []
        buf = self._buffer
        pos = 0
        while len(buf) - pos >= HEADER.size:
            length, kind, nfds = HEADER.unpack_from(buf, pos)
            end = pos + HEADER.size + length
            if len(buf) < end:
                break
            if len(self._fds) < nfds:
                raise ValueError("frame announces more descriptors than were received")
            fds = tuple(self._fds.popleft() for _ in range(nfds))
            payload = bytes(buf[pos + HEADER.size : end])
            if kind >= len(_KINDS):
                raise ValueError(f"unknown frame kind {kind}")
            kind = _KINDS[kind]
            out.append(Frame(kind, decode_body(kind, payload), fds))
            pos = end
        if pos:
            del buf[:pos]
        return out

    def close(self) -> None:
        """Close descriptors that arrived without a complete frame."""
        while self._fds:
            _close_fd(self._fds.popleft())


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


@dataclass(slots=True)
class _Outgoing:
    data: memoryview
    fds: tuple[int, ...]
    callback: Callable[[BaseException | None], None] | None
    close_after: tuple[Any, ...]


class ChannelClosed(ConnectionError):
    """The channel is disconnected; nothing can be sent."""

    def __init__(self) -> None:
        super().__init__(errno.EPIPE, "IPC channel is disconnected")


class Channel:
    """One end of the primary-worker socketpair.

    ``send`` is safe to call from any thread. Reading is done by the owner
    (the role) through ``receive``.
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._fd = sock.fileno()
        self._decoder = FrameDecoder()
        self._queue: deque[_Outgoing] = deque()
        self._lock = threading.RLock()
        self.connected = True
        self.eof = False
        self.on_write_pending: Callable[[], None] | None = None

    def fileno(self) -> int:
        return self._fd

    @property
    def write_pending(self) -> bool:
        return bool(self._queue)

    # -- sending -----------------------------------------------------------

    def send(
        self,
        kind: Kind,
        body: Any,
        handles: tuple[Any, ...] = (),
        callback: Callable[[BaseException | None], None] | None = None,
        close_after: tuple[Any, ...] = (),
    ) -> bool:
        """Queue a frame. Raises TypeError (nothing sent) for a bad message.

        Returns False, and gives the callback a ChannelClosed, when
        disconnected. ``close_after`` objects are closed once written.
        """
        fds = tuple(h if isinstance(h, int) else h.fileno() for h in handles)
        data = encode(kind, body, len(fds))
        with self._lock:
            if not self.connected:
                if callback is not None:
                    callback(ChannelClosed())
                return False
            self._queue.append(_Outgoing(memoryview(data), fds, callback, close_after))
            if len(self._queue) == 1:
                self._write_some()
            if self._queue and self.on_write_pending is not None:
                self.on_write_pending()
        return True

    def handle_writable(self) -> None:
        """Write what the socket takes now (called when it is writable)."""
        with self._lock:
            self._write_some()

    def flush(self, timeout: float | None = None) -> bool:
        """Block until every queued frame is written; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                self._write_some()
                if not self._queue or not self.connected:
                    return True
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            select.select([], [self._fd], [], remaining)

    def _write_some(self) -> None:
        while self._queue and self.connected:
            item = self._queue[0]
            try:
                if item.fds:
                    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", item.fds))]
                    sent = self.sock.sendmsg([item.data], anc)
                    item.fds = ()
                else:
                    sent = self.sock.send(item.data)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._fail_pending(exc)
                return
            item.data = item.data[sent:]
            if len(item.data):
                continue
            self._queue.popleft()
            for obj in item.close_after:
                try:
                    obj.close()
                except OSError:
                    pass
            if item.callback is not None:
                item.callback(None)

    def _fail_pending(self, exc: BaseException) -> None:
        self.connected = False
        pending, self._queue = self._queue, deque()
        for item in pending:
            if item.callback is not None:
                item.callback(exc)

    # -- receiving ---------------------------------------------------------

    def receive(self) -> list[Frame]:
        """Read everything available now and return the complete frames.

        Sets ``eof`` when the peer has closed its end.
        """
        if self.eof or not self.connected:
            return []
        for _ in range(64):
            try:
                data, ancdata, _flags, _addr = self.sock.recvmsg(READ_SIZE, _ANC_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                data, ancdata = b"", []
            fds: list[int] = []
            for level, ctype, cdata in ancdata:
                if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
                    usable = len(cdata) - (len(cdata) % _FD_SIZE)
                    fds.extend(array.array("i", cdata[:usable]))
            if not data:
                for fd in fds:
                    _close_fd(fd)
                self.eof = True
                break
            self._decoder.feed(data, fds)
            if len(data) < READ_SIZE:
                break
        return self._decoder.frames()

    def close(self) -> None:
        """Close this end; queued frames that were not written fail."""
        with self._lock:
            if not self.connected and self.sock.fileno() < 0:
                return
            self._fail_pending(ChannelClosed())
            self.connected = False
        self._decoder.close()
        try:
            self.sock.close()
        except OSError:
            pass


def send_user(
    channel: Channel | None,
    kind: Kind,
    message: Any,
    handle: Any,
    callback: Callable[[BaseException | None], None] | None,
    keep_open: bool,
    on_error: Callable[[BaseException], None],
) -> bool:
    """``worker.send()`` for either role: a user message and an optional handle.

    A connected socket is closed after sending unless ``keep_open``. The
    outcome goes to ``callback(exc)``; without a callback an error goes to
    ``on_error`` (the role emits ``'error'``). False when disconnected.
    """
    handles = (handle,) if handle is not None else ()
    close_after = (
        (handle,) if handle is not None and not keep_open and is_connection(handle) else ()
    )

    def done(exc: BaseException | None) -> None:
        if callback is not None:
            callback(exc)
        elif exc is not None:
            on_error(exc)

    if channel is None or not channel.connected or channel.eof:
        done(ChannelClosed())
        return False
    return channel.send(kind, message, handles, done, close_after)


def socketpair() -> tuple[socket.socket, socket.socket]:
    """A connected pair for a new worker: (primary end, child end)."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    parent.set_inheritable(False)
    return parent, child


def is_connection(handle: Any) -> bool:
    """True for a connected stream socket (closed after sending unless keep_open)."""
    if not isinstance(handle, socket.socket) or handle.type != socket.SOCK_STREAM:
        return False
    try:
        return not handle.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError:
        return False


def socket_from_fd(fd: int, family: int = 0) -> socket.socket:
    """Wrap a received descriptor as a socket object.

    With ``family`` known (a stream socket of that family) no system call
    is made; else the family, type and protocol are asked of the kernel.
    """
    if family:
        return socket.socket(family, socket.SOCK_STREAM, 0, fd)
    return socket.socket(fileno=fd)
