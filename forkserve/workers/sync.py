"""The sync worker: one request at a time, blocking I/O, the lightest class.

The serve loop selects on the listeners (which also wake for cluster
messages) and the signal wakeup pipe, takes one connection, and serves the
requests the client has already sent (pipelining). An idle keep-alive client
never holds the worker: under ``--sched none`` the last response says
``Connection: close``; under ``--sched rr`` the connection stays open and
is *parked*: given back to the primary, which watches it and hands it to the
next free worker when the client sends again (or closes it after
``--keep-alive`` seconds idle). The request-head deadline keeps a slow client
from holding the worker either.

Under round robin, ``Listener.accept()`` takes a connection the primary
handed over and acknowledges it, which tells the primary this worker is free
again.
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

# Connections taken from one listener in a row before the loop selects again
# (and so looks at the other listeners and the signal pipe).
ACCEPT_RUN = 16


class SyncWorker(WorkerBase):
    name = "sync"
    multithread = False

    def run(self) -> int:
        self.init_signals()
        options = self.http_options()
        extra = self.extra_environ()
        self._server_names: dict[int, Any] = {}
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
                    # Under load the next connection is usually there already:
                    # take up to ACCEPT_RUN in a row before selecting again
                    # (from a listening socket; under round robin a failed
                    # try would cost a read of the cluster channel).
                    run = ACCEPT_RUN if listener.raw_socket is not None else 1
                    for _ in range(run):
                        if not self.alive:
                            break
                        try:
                            conn, addr = listener.accept()
                        except BlockingIOError:
                            break
                        except OSError as exc:
                            if listener.closed:
                                _unregister(selector, key.fd)
                                break
                            if exc.errno in (errno.ECONNABORTED, errno.EMFILE, errno.ENFILE):
                                break
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
            # Accepted sockets are blocking already (their listener's flag is
            # not inherited): no call to make them so.
            transport = self.prepare_connection(conn)
            server = self._server_name(listener)
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

            # Round robin, plain TCP: an idle connection can go back to the primary.
            parking = (
                self.config.keepalive > 0
                and transport is conn
                and getattr(listener, "mode", None) == "rr"
            )

            def pipelined() -> bool:
                # Without parking, keep the connection only for requests the
                # client already sent.
                if connection.has_pending_data:
                    return True
                if isinstance(transport, ssl.SSLSocket) and transport.pending():
                    return True
                ready, _, _ = select.select([transport], [], [], 0)
                return bool(ready)

            def keep_alive() -> bool:
                if not self.alive or self.draining:
                    return False
                return parking or pipelined()

            connection.keep_alive_check = keep_alive
            while True:
                served = connection.requests_served
                keep = connection.handle_request()
                if connection.requests_served != served:
                    self.count_request()
                if not keep or not self.alive:
                    break
                if parking and not connection.has_pending_data:
                    # The client's next request may be on the way already:
                    # serve it here only while no other connection waits for
                    # this worker; else back to the primary, where it waits
                    # its turn behind those queued before it, and one eager
                    # client cannot keep the worker.
                    if not listener.waiting() and pipelined():
                        continue
                    listener.park(conn, addr)
                    break
        except OSError as exc:
            LOG.debug("connection from %s ended: %s", addr, exc)
        finally:
            for sock in (transport, conn) if transport is not None else (conn,):
                try:
                    sock.close()
                except OSError:
                    pass

    def _server_name(self, listener: Any) -> Any:
        """The listener's address (the environ's SERVER_NAME/PORT), looked up once."""
        names = self._server_names
        key = id(listener)
        if key not in names:
            try:
                names[key] = listener.getsockname()
            except OSError:
                names[key] = None
        return names[key]


def _unregister(selector: selectors.BaseSelector, fd: int) -> None:
    try:
        selector.unregister(fd)
    except (KeyError, ValueError):
        pass
