"""The WSGI body objects: ``wsgi.input`` and ``wsgi.file_wrapper``.

``InputStream`` streams a request body from its connection (anything with a
``_read_body()`` returning the next bytes, b"" at the end) and never reads
past it. Imports nothing from forkserve.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol


class BodySource(Protocol):
    def _read_body(self) -> bytes: ...


class FileWrapper:
    """``wsgi.file_wrapper``: iterable over a file; sent with sendfile when
    the file has a descriptor and the body is not chunked."""

    def __init__(self, filelike: Any, blksize: int = 8192) -> None:
        self.filelike = filelike
        self.blksize = blksize
        if hasattr(filelike, "close"):
            self.close = filelike.close

    def __iter__(self) -> Iterator[bytes]:
        read = self.filelike.read
        while True:
            data = read(self.blksize)
            if not data:
                return
            yield data


class InputStream:
    """``wsgi.input``: the request body, streamed, never past its end."""

    def __init__(self, conn: BodySource) -> None:
        self._conn = conn
        self._buf = bytearray()
        self._eof = False

    def _next(self) -> bytes:
        if self._eof:
            return b""
        data = self._conn._read_body()
        if not data:
            self._eof = True
        return data

    def _take(self, n: int) -> bytes:
        buf = self._buf
        data = bytes(buf[:n])
        del buf[:n]
        return data

    def read(self, size: int | None = -1) -> bytes:
        buf = self._buf
        if size is None or size < 0:
            parts = [bytes(buf)]
            buf.clear()
            while data := self._next():
                parts.append(data)
            return b"".join(parts)
        if not buf and size:
            data = self._next()
            if len(data) <= size:
                return data  # the common case: no copy into the buffer
            buf += data
        while len(buf) < size and (data := self._next()):
            buf += data
        return self._take(size)

    def readline(self, limit: int | None = -1) -> bytes:
        buf = self._buf
        start = 0
        if limit is None or limit < 0:
            limit = -1
        while True:
            end = buf.find(b"\n", start)
            if end >= 0:
                end += 1
                break
            if 0 <= limit <= len(buf):
                end = limit
                break
            start = len(buf)
            data = self._next()
            if not data:
                end = len(buf)
                break
            buf += data
        if 0 <= limit < end:
            end = limit
        return self._take(end)

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        lines: list[bytes] = []
        total = 0
        while line := self.readline():
            lines.append(line)
            total += len(line)
            if hint is not None and 0 < hint <= total:
                break
        return lines

    def __iter__(self) -> Iterator[bytes]:
        while line := self.readline():
            yield line
