"""The asgi worker: one event loop per process, uvicorn's protocols on our sockets.

Theory of operation
-------------------
The worker builds its event loop (uvloop when installed, ``--loop``) and moves
the cluster onto it, so the IPC channel, round-robin hand-overs and the
server share one loop. Before the listeners are opened (which makes the
worker ready) it runs the application's lifespan startup; a failure ends the
boot with ``APP_LOAD_ERROR`` and one line in the arbiter's log.

HTTP/1.1 and WebSockets are uvicorn's protocol classes (``--http``,
``--ws``), configured from forkserve's settings through a ``uvicorn.Config``
and sharing one ``ServerState``. They are fed the sockets forkserve gives the
worker: under ``--sched none`` an asyncio server on (a duplicate of) the
shared listening socket; under ``--sched rr`` one task per listener takes the
connections the primary hands over (``accept_async`` acknowledges them) and
attaches each to a protocol. Every connection first goes through
forkserve's strict HTTP/1.1 front end (``asgi_guard``), which forwards to
uvicorn's protocol only the bytes it has accepted. uvicorn's own access log
is off: requests are logged through ``format_access`` like every other
worker class, and counted for ``--max-requests``.

What the application sends passes ``ResponseGuard`` before uvicorn: a
response head with an invalid header is answered 500 instead (uvicorn would
drop the connection unanswered), and while the primary drains
(``--drain-delay``) every response carries ``Connection: close``.

Stopping: SIGTERM, the cluster's ``'disconnect'`` or recycling start a
graceful stop (stop accepting, close idle keep-alive connections, close open
WebSockets with 1001, wait up to ``--graceful-timeout`` for requests in
flight, lifespan shutdown, leave); SIGINT and SIGQUIT a fast one.

This is the only module of forkserve that imports uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import signal
import socket
import time
import traceback
from collections.abc import Awaitable, Callable, MutableMapping
from email.utils import formatdate
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.server import ServerState

from forkserve import cluster, log
from forkserve.config import Config
from forkserve.errors import AppImportError, ResponseError
from forkserve.http.accesslog import AccessRecord
from forkserve.http.response import check_header
from forkserve.scoreboard import FLAG_CANCELS_OWN, Slot

from .asgi_guard import GuardedConnection, GuardOptions
from .base import LOG, WorkerBase, queued_ms

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# name -> (module, class); "auto" takes the first whose package is installed.
HTTP_PROTOCOLS: dict[str, tuple[str, str]] = {
    "httptools": ("uvicorn.protocols.http.httptools_impl", "HttpToolsProtocol"),
    "h11": ("uvicorn.protocols.http.h11_impl", "H11Protocol"),
}
# uvicorn's implementation over the websockets package's sans-I/O core; its
# older one (websockets.legacy) is deprecated upstream.
WS_PROTOCOLS: dict[str, tuple[str, str]] = {
    "websockets": (
        "uvicorn.protocols.websockets.websockets_sansio_impl",
        "WebSocketsSansIOProtocol",
    ),
    "wsproto": ("uvicorn.protocols.websockets.wsproto_impl", "WSProtocol"),
}
LOOPS = ("uvloop", "asyncio")
GOING_AWAY = 1001  # RFC 6455 §7.4.1: the server is going down
DRAIN_POLL = 0.05  # seconds between checks for in-flight work while stopping
LIFESPAN_SHUTDOWN_MIN = 5.0


def _installed(package: str) -> bool:
    if package == "asyncio":
        return True
    try:
        importlib.import_module(package)
    except ImportError:
        return False
    return True


def choose_backend(option: str, wanted: str, names: tuple[str, ...], none: str = "") -> str:
    """The backend for ``--option wanted``: ``auto`` picks the first installed of
    ``names`` (else ``none``); a named one must be installed (ValueError says how)."""
    if wanted == "auto":
        for name in names:
            if _installed(name):
                return name
        if none:
            return none
        raise ValueError(f"--{option} auto: none of {', '.join(names)} is installed")
    if wanted == none or _installed(wanted):
        return wanted
    raise ValueError(
        f"--{option} {wanted} needs the {wanted} package, which is not installed; "
        f"pip install {wanted}, or use --{option} auto"
    )


def new_event_loop(name: str) -> asyncio.AbstractEventLoop:
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.SelectorEventLoop()


def _protocol_class(table: dict[str, tuple[str, str]], name: str) -> type[asyncio.Protocol]:
    module, attr = table[name]
    cls: type[asyncio.Protocol] = getattr(importlib.import_module(module), attr)
    return cls


# -- lifespan -------------------------------------------------------------------


class Lifespan:
    """The ASGI lifespan protocol for one application.

    ``startup()`` returns once the app answered ``lifespan.startup.complete``,
    or raises ``AppImportError`` with a one-line reason. Under ``auto`` an app
    that raises or returns before answering is taken not to support lifespan
    and is served without it; under ``on`` that is a failure; ``off`` skips it.
    ``state`` is the scope's ``state`` dict, copied into every request scope.
    """

    def __init__(self, app: ASGIApp, mode: str, where: str) -> None:
        self.app = app
        self.mode = mode
        self.where = where
        self.state: dict[str, Any] = {}
        self.running = False
        self._task: asyncio.Task[None] | None = None
        self._to_app: asyncio.Queue[Message] | None = None
        self._from_app: asyncio.Queue[Message] | None = None

    async def startup(self) -> None:
        if self.mode == "off":
            return
        self._to_app = asyncio.Queue()
        self._from_app = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run_app())
        answer = await self._ask("lifespan.startup")
        kind = answer["type"]
        if kind == "lifespan.startup.complete":
            self.running = True
            return
        if kind == "lifespan.startup.failed":
            reason = str(answer.get("message") or "the application sent no message")
            raise AppImportError(f"lifespan startup of {self.where} failed: {reason}")
        error = answer.get("error")
        if self.mode == "auto":
            how = f"raised {_describe(error)}" if error is not None else "returned"
            LOG.info(
                "lifespan: %s %s on lifespan.startup; serving it without lifespan events",
                self.where,
                how,
            )
            return
        if error is not None:
            LOG.debug("lifespan startup of %s", self.where, exc_info=error)
            raise AppImportError(
                f"lifespan startup of {self.where} raised {_describe(error)}; "
                "fix the application, or use --lifespan auto if it does not support lifespan"
            )
        raise AppImportError(
            f"lifespan startup of {self.where}: the application returned without answering; "
            "--lifespan on needs lifespan support (use --lifespan auto)"
        )

    async def shutdown(self, timeout: float) -> None:
        """Send ``lifespan.shutdown`` and wait up to ``timeout`` for the answer; logs failures."""
        task = self._task
        if not self.running or task is None or task.done():
            return
        self.running = False
        try:
            answer = await asyncio.wait_for(self._ask("lifespan.shutdown"), timeout)
        except asyncio.TimeoutError:
            LOG.warning(
                "lifespan shutdown of %s did not finish within %.1fs; cancelling it",
                self.where,
                timeout,
            )
            task.cancel()
            return
        if answer["type"] == "lifespan.shutdown.failed":
            reason = answer.get("message") or "the application sent no message"
            LOG.error("lifespan shutdown of %s failed: %s", self.where, reason)
        elif answer.get("error") is not None:
            LOG.error("lifespan shutdown of %s raised %s", self.where, _describe(answer["error"]))

    async def _ask(self, kind: str) -> Message:
        assert self._to_app is not None and self._from_app is not None
        self._to_app.put_nowait({"type": kind})
        return await self._from_app.get()

    async def _run_app(self) -> None:
        assert self._to_app is not None and self._from_app is not None
        scope = {
            "type": "lifespan",
            "asgi": {"version": "3.0", "spec_version": "2.0"},
            "state": self.state,
        }
        error: BaseException | None = None
        try:
            await self.app(scope, self._to_app.get, self._answer)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            error = exc
        self._from_app.put_nowait({"type": "returned", "error": error})

    async def _answer(self, message: Message) -> None:
        assert self._from_app is not None
        if not str(message.get("type", "")).startswith("lifespan."):
            raise RuntimeError(f"unexpected ASGI message {message.get('type')!r} in lifespan")
        self._from_app.put_nowait(message)


def _describe(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# -- requests: access log and counting ------------------------------------------


def request_hooks(
    app: ASGIApp,
    access_log: Callable[[AccessRecord], None] | None,
    on_done: Callable[[], None] | None,
    root_path: str,
    pid: int,
    worker_id: int,
    observer: Slot | None = None,
    request_timeout: float = 0.0,
) -> ASGIApp:
    """``app`` wrapped to account for each HTTP request: the scoreboard, the
    access log, ``on_done`` after it, and the --request-timeout deadline
    (past it the request's task is logged with its stack and cancelled, and
    the client gets a 503 if no response had started)."""
    prefix = root_path.encode("latin-1")

    def target_of(scope: Scope) -> str:
        raw = scope.get("raw_path") or scope.get("path", "").encode("utf-8")
        if prefix and raw.startswith(prefix):
            raw = raw[len(prefix) :]
        query = scope.get("query_string") or b""
        return (raw + b"?" + query if query else raw).decode("latin-1")

    async def hooked(scope: Scope, receive: Receive, send: Send) -> None:
        waited = take_queued(scope)
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        started = time.time()
        clock = time.perf_counter()
        status = 0
        headers: list[tuple[bytes, bytes]] = []
        sent = 0
        method = scope["method"]
        client = scope.get("client")
        peer = str(client[0]) if client else ""
        target = target_of(scope)
        token = observer.begin(method, target, peer) if observer is not None else None

        async def send_and_note(message: Message) -> None:
            nonlocal status, headers, sent
            kind = message["type"]
            if kind == "http.response.start":
                status = int(message["status"])
                headers = list(message.get("headers") or ())
            elif kind == "http.response.body":
                sent += len(message.get("body") or b"")
            await send(message)

        try:
            if request_timeout <= 0:
                await app(scope, receive, send_and_note)
            elif not await run_with_deadline(
                app(scope, receive, send_and_note),
                request_timeout,
                f"{method} {target}",
                peer,
            ):
                if observer is not None:
                    observer.count_timeout()
                if not status:
                    status = 503
                    await send(TIMEOUT_START)
                    await send(TIMEOUT_BODY)
        finally:
            # uvicorn answers 500 for an app that failed before starting a response.
            if token is not None:
                assert observer is not None
                observer.end(token, method, status or 500)
            if access_log is not None:
                record = AccessRecord(
                    method=method,
                    target=target,
                    http_version=scope.get("http_version", "1.1"),
                    status=status or 500,
                    bytes_sent=0 if method == "HEAD" else sent,
                    request_headers=[
                        (n.decode("latin-1"), v.decode("latin-1")) for n, v in scope["headers"]
                    ],
                    response_headers=[
                        (n.decode("latin-1"), v.decode("latin-1")) for n, v in headers
                    ],
                    start_time=started,
                    duration=time.perf_counter() - clock,
                    client=peer,
                    pid=pid,
                    worker_id=worker_id,
                    queued_ms=waited,
                )
                try:
                    access_log(record)
                except Exception:
                    LOG.exception("cannot write the access log")
            if on_done is not None:
                on_done()

    return hooked


# How long a connection waited in the primary (round robin), for the access
# log's Q: the worker puts ``[milliseconds]`` in the app state of the
# connection's protocol, which uvicorn copies into each scope's "state";
# ``take_queued`` takes it out before the application sees the scope.
QUEUED_KEY = "forkserve.queued_ms"


def take_queued(scope: Scope) -> float | None:
    """The connection's wait for its first request, 0.0 for later ones, None
    when it did not pass through the primary; removed from ``scope``."""
    state = scope.get("state")
    if not state or QUEUED_KEY not in state:
        return None
    holder = state.pop(QUEUED_KEY)
    waited, holder[0] = holder[0], 0.0
    return float(waited)


TIMEOUT_START: Message = {
    "type": "http.response.start",
    "status": 503,
    "headers": [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", b"18"),
        (b"connection", b"close"),
    ],
}
TIMEOUT_BODY: Message = {"type": "http.response.body", "body": b"request timed out\n"}


def awaiting(task: asyncio.Future[Any]) -> list[tuple[FrameType, int]]:
    """The frames of a suspended task's await chain, outermost first.

    ``Task.get_stack()`` gives only the outermost frame of a suspended
    coroutine; following ``cr_await`` finds where it actually waits.
    """
    frames: list[tuple[FrameType, int]] = []
    current: Any = task.get_coro() if isinstance(task, asyncio.Task) else None
    while current is not None and len(frames) < 100:
        frame = getattr(current, "cr_frame", None) or getattr(current, "gi_frame", None)
        if frame is None:
            break
        frames.append((frame, frame.f_lineno))
        current = getattr(current, "cr_await", None) or getattr(current, "gi_yieldfrom", None)
    return frames


async def run_with_deadline(call: Awaitable[None], limit: float, line: str, client: str) -> bool:
    """Await ``call`` in a task of its own for at most ``limit`` seconds.

    Past the deadline the task is logged with where it waits, cancelled, and
    False returned; the app's own exceptions propagate as without a deadline.
    """
    inner = asyncio.ensure_future(call)
    try:
        done, _ = await asyncio.wait({inner}, timeout=limit)
    except asyncio.CancelledError:
        inner.cancel()
        raise
    if done:
        inner.result()
        return True
    stack = "".join(traceback.format_list(traceback.StackSummary.extract(awaiting(inner))))
    LOG.error(
        "request exceeded --request-timeout (%.1fs); cancelling it: %s from %s\n%s",
        limit,
        line.encode("unicode_escape").decode("ascii"),
        client or "-",
        stack.rstrip() or "  (no Python stack)",
    )
    inner.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await inner
    return False


# -- responses: header checks and draining -----------------------------------------


CLOSE_HEADER = (b"connection", b"close")
ERROR_BODY = b"Internal Server Error\n"


# Header pairs already found valid: most responses repeat the same few, and a
# set lookup costs less than the two regular expressions (bounded).
_VALID_HEADERS: set[tuple[Any, Any]] = set()
_VALID_HEADERS_MAX = 1024


class ResponseGuard:
    """What the application sends for HTTP is checked before uvicorn sees it.

    ``wrap(app)`` is the application uvicorn calls. A response head with a
    header name that is not a token, or a value holding CR, LF or NUL, never
    reaches uvicorn (which would drop the connection unanswered): the client
    gets a 500 that closes the connection, the error is logged once with the
    request line, and the application's ``send`` raises ``ResponseError``;
    what it sends after that is dropped. While ``closing`` (the primary's
    --drain-delay) every response head carries ``Connection: close``, so
    uvicorn closes each connection after its response. WebSocket and
    lifespan scopes pass through untouched.
    """

    __slots__ = ("closing",)

    def __init__(self) -> None:
        self.closing = False

    def wrap(self, app: ASGIApp) -> ASGIApp:
        guard = self

        async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            refused: ResponseError | None = None

            async def checked_send(message: Message) -> None:
                nonlocal refused
                if refused is not None:
                    return
                if message["type"] == "http.response.start":
                    headers = message.get("headers") or ()
                    if type(headers) is not list and type(headers) is not tuple:
                        headers = list(headers)  # an iterator: read once, here
                        message = {**message, "headers": headers}
                    try:
                        check_headers(headers)
                    except (ResponseError, TypeError, ValueError) as exc:
                        refused = (
                            exc
                            if isinstance(exc, ResponseError)
                            else ResponseError(f"invalid headers: {exc}")
                        )
                        LOG.error("invalid response to %s: %s", request_line(scope), refused)
                        await send_error(send)
                        raise refused from None
                    if guard.closing:
                        message = {**message, "headers": closing_headers(headers)}
                await send(message)

            try:
                await app(scope, receive, checked_send)
            except ResponseError as exc:
                if exc is not refused:
                    raise  # the application's own: uvicorn logs it and answers 500

        return guarded


def check_headers(headers: Any) -> None:
    """``check_header`` on every (name, value) pair; pairs seen valid are remembered."""
    valid = _VALID_HEADERS
    for item in headers:
        if type(item) is tuple and item in valid:
            continue
        name, value = item
        check_header(name, value)
        if type(item) is tuple and len(valid) < _VALID_HEADERS_MAX:
            valid.add(item)


async def send_error(send: Send) -> None:
    """A 500 that closes the connection, sent in place of a refused response."""
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", b"%d" % len(ERROR_BODY)),
        CLOSE_HEADER,
    ]
    await send({"type": "http.response.start", "status": 500, "headers": headers})
    await send({"type": "http.response.body", "body": ERROR_BODY})


def closing_headers(headers: Any) -> list[Any]:
    """``headers`` with any Connection header replaced by ``Connection: close``."""
    kept = [
        item
        for item in headers
        if not (isinstance(item[0], bytes) and item[0].lower() == b"connection")
    ]
    kept.append(CLOSE_HEADER)
    return kept


def request_line(scope: Scope) -> str:
    """The request line of an HTTP scope, escaped for a log line."""
    raw = scope.get("raw_path") or scope.get("path", "").encode("utf-8")
    query = scope.get("query_string") or b""
    target = (raw + b"?" + query if query else raw).decode("latin-1")
    line = f"{scope.get('method', '-')} {target} HTTP/{scope.get('http_version', '1.1')}"
    return line.encode("unicode_escape").decode("ascii")


# -- the worker -------------------------------------------------------------------


class ASGIWorker(WorkerBase):
    name = "asgi"
    multithread = False

    def __init__(
        self,
        config: Config,
        app: Any,
        listeners: list[cluster.Listener],
        slot: Slot | None = None,
    ) -> None:
        super().__init__(config, app, listeners, slot)
        loop_name = choose_backend("loop", config.loop, LOOPS)
        http_name = choose_backend("http", config.http, tuple(HTTP_PROTOCOLS))
        ws_name = choose_backend("ws", config.ws, tuple(WS_PROTOCOLS), none="none")
        self.http_class = _protocol_class(HTTP_PROTOCOLS, http_name)
        self.ws_class = None if ws_name == "none" else _protocol_class(WS_PROTOCOLS, ws_name)
        self.loop = new_event_loop(loop_name)
        child = cluster.child
        if child is not None:
            child.attach_loop(self.loop)
        else:
            asyncio.set_event_loop(self.loop)
        self.lifespan = Lifespan(app, config.lifespan, repr(config.app or "the application"))
        self.state = ServerState()
        self.responses = ResponseGuard()
        self.uvicorn_config = self._uvicorn_config()
        self.guard = GuardOptions(
            # The front end validates and frames; uvicorn decodes what it
            # accepted, so no second parse is needed here.
            backend="framing",
            limits=self.http_options().limits,
            header_timeout=config.header_timeout,
            websockets=self.ws_class is not None,
            busy=_busy,
            responding=_responding,
            hold=_hold,
        )
        self._stop = asyncio.Event()
        self._servers: list[asyncio.AbstractServer] = []
        self._accepting: set[asyncio.Task[None]] = set()
        self._attaching: set[asyncio.Task[None]] = set()
        LOG.debug(
            "worker %s (pid %s): loop %s, http %s, ws %s",
            self.worker_id,
            self.pid,
            loop_name,
            http_name,
            ws_name,
        )

    def _uvicorn_config(self) -> uvicorn.Config:
        config = self.config
        access_log = self.access_logger()
        # Only the access log (Q) needs a connection's wait in the primary.
        self.notes_queued = access_log is not None
        app: ASGIApp = self.responses.wrap(self.app)
        if access_log is not None or self.max_requests or self.slot or config.request_timeout:
            app = request_hooks(
                app,
                access_log,
                self._request_done if self.max_requests else None,
                config.root_path,
                self.pid,
                self.worker_id,
                self.slot,
                config.request_timeout,
            )
        if self.slot is not None:
            self.slot.set_flags(FLAG_CANCELS_OWN)
        level = config.loglevel if config.loglevel != "info" else "warning"
        _route_uvicorn_logs()
        uv = uvicorn.Config(
            app,
            http=self.http_class,
            ws=self.ws_class or "none",
            lifespan="off",  # run by Lifespan above, before the worker is ready
            interface="asgi3",
            log_config=None,
            log_level=level,
            access_log=False,
            proxy_headers=True,
            forwarded_allow_ips=list(config.forwarded_allow_ips),
            root_path=config.root_path,
            # uvicorn counts the connection asking too: N + 1 lets N be served,
            # and answers 503 to a request on the connection past them.
            limit_concurrency=config.worker_connections + 1,
            timeout_keep_alive=config.keepalive,  # a float is fine: it goes to call_later
            ws_max_size=config.ws_max_size,
            ws_ping_interval=config.ws_ping_interval or None,
            ws_ping_timeout=config.ws_ping_timeout or None,
            h11_max_incomplete_event_size=config.h11_max_incomplete_event_size,
            headers=[("server", "forkserve")],
        )
        uv.load()
        return uv

    # -- boot -------------------------------------------------------------------

    def before_listen(self) -> None:
        """Signals, then the lifespan startup, on the worker's loop."""
        self._init_signals()
        self.loop.run_until_complete(self.lifespan.startup())

    def _init_signals(self) -> None:
        loop = self.loop
        loop.add_signal_handler(signal.SIGTERM, self.begin_stop, False)
        loop.add_signal_handler(signal.SIGINT, self.begin_stop, True)
        loop.add_signal_handler(signal.SIGQUIT, self.begin_stop, True)
        loop.add_signal_handler(signal.SIGUSR1, log.reopen_log_files)
        # SIGUSR2 is faulthandler's (stack dumps for the primary): see base.boot.
        for name in ("SIGHUP", "SIGTTIN", "SIGTTOU", "SIGWINCH"):
            signal.signal(getattr(signal, name), signal.SIG_IGN)

    # -- serving ------------------------------------------------------------------

    def run(self) -> int:
        if self.worker is not None:
            self.worker.on("disconnect", self._on_disconnect)
        # Signals that arrive from here on stay queued on the loop: ignored.
        self.loop.run_until_complete(self._serve())
        if not self.fast_exit:
            self.leave()
        self.loop.close()
        return 0

    async def _serve(self) -> None:
        ticker = self.loop.create_task(self._tick())
        for listener in self.listeners:
            if listener.closed:
                continue
            sock = listener.raw_socket
            if sock is not None:
                # A duplicate: Listener.close() (on a cluster disconnect) closes its
                # socket under the loop's feet, so the loop owns a descriptor of its own.
                own = sock.dup()
                own.setblocking(False)
                server = await self.loop.create_server(
                    self._make_protocol, sock=own, ssl=self.ssl_context, backlog=self.config.backlog
                )
                self._servers.append(server)
            else:
                task = self.loop.create_task(self._accept_handed_over(listener))
                self._accepting.add(task)
                task.add_done_callback(self._accepting.discard)
        if not self.alive:
            self._stop.set()
        await self._stop.wait()
        await self._shutdown()
        ticker.cancel()

    def _make_protocol(self, waited: float | None = None) -> asyncio.Protocol:
        """uvicorn's protocol behind forkserve's strict front end (asgi_guard);
        ``waited``: milliseconds the connection waited in the primary."""
        cls: Any = self.uvicorn_config.http_protocol_class
        state = self.lifespan.state
        if waited is not None:
            state = {**state, QUEUED_KEY: [waited]}
        protocol: asyncio.Protocol = cls(
            config=self.uvicorn_config,
            server_state=self.state,
            app_state=state,
            _loop=self.loop,
        )
        if self.config.asgi_guard == "off":
            return protocol
        return GuardedConnection(protocol, self.guard, self.loop)

    async def _accept_handed_over(self, listener: cluster.Listener) -> None:
        """Round robin: attach each connection the primary hands this worker."""
        while not listener.closed and self.alive:
            try:
                conn, _ = await listener.accept_async()
            except OSError:
                return
            waited = queued_ms(listener, conn)
            # Not awaited: the connections already handed over are taken (and
            # acknowledged) at once, and a TLS handshake holds up no other.
            task = self.loop.create_task(self._attach(conn, waited if self.notes_queued else None))
            self._attaching.add(task)
            task.add_done_callback(self._attaching.discard)

    async def _attach(self, conn: socket.socket, waited: float | None = None) -> None:
        try:
            await self.loop.connect_accepted_socket(
                lambda: self._make_protocol(waited), sock=conn, ssl=self.ssl_context
            )
        except (OSError, ConnectionError) as exc:
            LOG.debug("connection dropped before it was served: %s", exc)
            conn.close()

    async def _tick(self) -> None:
        """The Date header, refreshed every second (RFC 9110 §6.6.1)."""
        fixed = self.uvicorn_config.encoded_headers
        while True:
            self.beat()
            now = time.time()
            date = formatdate(now, usegmt=True).encode("ascii")
            self.state.default_headers = [(b"date", date), *fixed]
            await asyncio.sleep(1.0 - now % 1.0)

    def _request_done(self) -> None:
        self.count_request()
        if not self.alive:
            self.begin_stop(False)

    # -- stopping -----------------------------------------------------------------

    def begin_drain(self) -> None:
        super().begin_drain()
        self.responses.closing = True

    def begin_stop(self, fast: bool) -> None:
        """Stop serving: gracefully, or (``fast``) at once."""
        self.alive = False
        if fast:
            self.fast_exit = True
        self._stop.set()

    def _on_disconnect(self) -> None:
        # The cluster has closed the listeners: stop the servers on our duplicates now.
        self._stop_accepting()
        if self.loop.is_running():
            self.begin_stop(False)

    def _stop_accepting(self) -> None:
        for server in self._servers:
            server.close()
        for listener in self.listeners:
            if listener.mode == "rr":
                listener.close()
        for task in list(self._accepting):
            task.cancel()

    async def _shutdown(self) -> None:
        self._stop_accepting()
        for protocol in list(self.state.connections):
            self._close_connection(protocol)
        if self.fast_exit:
            self._abort_all()
            return
        loop = self.loop
        deadline = loop.time() + self.config.graceful_timeout
        while (self.state.connections or self.state.tasks) and loop.time() < deadline:
            await asyncio.sleep(DRAIN_POLL)
        if self.state.connections or self.state.tasks:
            LOG.warning(
                "worker %s (pid %s): %s connection(s) still busy after --graceful-timeout "
                "%.1fs; closing them",
                self.worker_id,
                self.pid,
                len(self.state.connections),
                self.config.graceful_timeout,
            )
            self._abort_all()
        remaining = max(deadline - loop.time(), LIFESPAN_SHUTDOWN_MIN)
        await self.lifespan.shutdown(remaining)

    def _close_connection(self, protocol: Any) -> None:
        """Idle HTTP connections close now, busy ones after their response;
        open WebSockets get a close frame with 1001 (going away)."""
        ws = self.ws_class
        websocket: Any = protocol
        if (
            ws is not None
            and isinstance(protocol, ws)
            and websocket.handshake_complete
            and not websocket.close_sent
        ):
            message = {"type": "websocket.close", "code": GOING_AWAY, "reason": "server stopping"}
            task = self.loop.create_task(_quietly(websocket.send(message)))
            self._attaching.add(task)  # a strong reference until it is done
            task.add_done_callback(self._attaching.discard)
            return
        protocol.shutdown()

    def _abort_all(self) -> None:
        # Tasks are left to the process's exit: cancelling them only makes
        # uvicorn log each one as an application error.
        for protocol in list(self.state.connections):
            transport = getattr(protocol, "transport", None)
            if transport is not None:
                transport.abort()


def _busy(protocol: Any) -> bool:
    """uvicorn's HTTP protocol has a response in progress or queued."""
    cycle = protocol.cycle
    return (cycle is not None and not cycle.response_complete) or bool(
        getattr(protocol, "pipeline", None)
    )


def _responding(protocol: Any) -> bool:
    """uvicorn's HTTP protocol began the response of its current request."""
    cycle = protocol.cycle
    return cycle is not None and cycle.response_started and not cycle.response_complete


def _hold(protocol: Any) -> None:
    """Cancel uvicorn's keep-alive timer: a request head is arriving."""
    task = protocol.timeout_keep_alive_task
    if task is not None:
        task.cancel()
        protocol.timeout_keep_alive_task = None


async def _quietly(awaitable: Awaitable[None]) -> None:
    try:
        await awaitable
    except Exception as exc:  # the peer went away meanwhile
        LOG.debug("closing a WebSocket: %s", exc)


def _route_uvicorn_logs() -> None:
    """uvicorn's error messages go to forkserve's error log unless --log-config
    already placed them."""
    target = logging.getLogger("uvicorn")
    if target.handlers:
        return
    for handler in logging.getLogger(log.ROOT).handlers:
        target.addHandler(handler)
    target.propagate = False
