"""The sync worker: one request at a time, blocking I/O, the lightest class.

The serve loop selects on the listeners (which also wake for cluster
messages) and the signal wakeup pipe, takes one connection, and serves the
requests the client has already sent (pipelining) before closing it: an idle
keep-alive client never holds the worker. The request-head deadline keeps a
slow client from holding it either.

Works unchanged under both scheduling policies: under round robin,
``Listener.accept()`` takes a connection the primary handed over and
acknowledges it, which tells the primary this worker is free again.
"""

from __future__ import annotations

import errno
import select
import selectors
import socket
import ssl
from typing import Any

from forkserve.http.wsgi import WSGIConnection

from .base import HEARTBEAT_INTERVAL, LOG, WorkerBase, queued_ms


class SyncWorker(WorkerBase):
    name = "sync"
    multithread = False

    def run(self) -> int:
        self.init_signals()
        options = self.http_options()
        extra = self.extra_environ()
        selector = selectors.DefaultSelector()
        for listener in self.listeners:
            listener.setblocking(False)
            selector.register(listener.fileno(), selectors.EVENT_READ, listener)
        selector.register(self.wakeup_fd, selectors.EVENT_READ, None)
        beat = HEARTBEAT_INTERVAL if self.slot is not None else None
        try:
            while self.alive:
                open_listeners = [item for item in self.listeners if not item.closed]
                if not open_listeners:
                    break
                self.beat()
                for key, _ in selector.select(beat):
                    listener = key.data
                    if listener is None:
                        self.drain_wakeup()
                        continue
                    if not self.alive:
                        break
                    try:
                        conn, addr = listener.accept()
                    except BlockingIOError:
                        continue
                    except OSError as exc:
                        if listener.closed:
                            _unregister(selector, key.fd)
                            continue
                        if exc.errno in (errno.ECONNABORTED, errno.EMFILE, errno.ENFILE):
                            continue
                        raise
                    self.serve_connection(conn, addr, listener, options, extra)
                    self.beat()
        finally:
            selector.close()
        if not self.fast_exit:
            self.leave()
        return 0

    def serve_connection(
        self,
        conn: socket.socket,
        addr: Any,
        listener: Any,
        options: Any,
        extra: dict[str, Any],
    ) -> None:
        transport: socket.socket | None = None
        try:
            conn.setblocking(True)
            transport = self.prepare_connection(conn)
            try:
                server = listener.getsockname()
            except OSError:
                server = None
            connection = WSGIConnection(
                transport,
                self.app,
                options,
                addr,
                server,
                extra,
                initial_data=listener.take_initial_data(conn),
                queued_ms=queued_ms(listener, conn),
            )

            def pipelined() -> bool:
                # Keep the connection only for requests the client already sent.
                if not self.alive or self.draining:
                    return False
                if connection.has_pending_data:
                    return True
                if isinstance(transport, ssl.SSLSocket) and transport.pending():
                    return True
                ready, _, _ = select.select([transport], [], [], 0)
                return bool(ready)

            connection.keep_alive_check = pipelined
            while True:
                served = connection.requests_served
                keep = connection.handle_request()
                if connection.requests_served != served:
                    self.count_request()
                if not keep or not self.alive:
                    break
        except OSError as exc:
            LOG.debug("connection from %s ended: %s", addr, exc)
        finally:
            for sock in (transport, conn) if transport is not None else (conn,):
                try:
                    sock.close()
                except OSError:
                    pass


def _unregister(selector: selectors.BaseSelector, fd: int) -> None:
    try:
        selector.unregister(fd)
    except (KeyError, ValueError):
        pass
