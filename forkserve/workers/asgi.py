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
uvicorn's protocol only the bytes it has accepted; uvicorn writes through
``CoalescedTransport``, so a response's head and body leave in one system
call. uvicorn's own access log is off: requests are logged through
``format_access`` like every other worker class, and counted for
``--max-requests``.

Between uvicorn and the application sits one layer, ``request_hooks``: the
scoreboard, the access log, ``--request-timeout`` (one loop timer, no task),
proxy headers (uvicorn's handling, run only for a request that carries
them) and ``ResponseGuard``. The ``send`` it gives the application is a
plain function returning uvicorn's awaitable: no coroutine per message.

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
import importlib
import logging
import signal
import socket
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, MutableMapping
from email.utils import formatdate
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.server import ServerState

from forkserve import cluster, log
from forkserve.config import Config
from forkserve.errors import AppImportError, ResponseError
from forkserve.http.accesslog import AccessRecord
from forkserve.http.response import check_header
from forkserve.scoreboard import FLAG_CANCELS_OWN, Slot

from .asgi_guard import Flusher, GroupedTimers, GuardedConnection, GuardOptions, Relay
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


# -- requests: the scoreboard, the access log, the deadline, response checks --------


def request_hooks(
    app: ASGIApp,
    responses: ResponseGuard,
    access_log: Callable[[AccessRecord], None] | None = None,
    on_done: Callable[[], None] | None = None,
    root_path: str = "",
    pid: int = 0,
    worker_id: int = 0,
    observer: Slot | None = None,
    request_timeout: float = 0.0,
    forwarded: ASGIApp | None = None,
) -> ASGIApp:
    """``app`` wrapped to account for and check each HTTP request, in one layer.

    The scoreboard (``observer``), the access log, ``on_done`` after each
    request (counting for --max-requests), the --request-timeout deadline
    (past it the request's task is logged with its stack and cancelled, and
    the client gets a 503 if no response had started), and ``responses``
    (the checks of ``ResponseGuard``) on what the application sends. A
    feature that is off costs nothing per request: the ``send`` given to the
    application is a plain function that returns uvicorn's awaitable, so it
    adds no coroutine per message.

    ``forwarded`` rewrites a scope's client and scheme from proxy headers
    (``proxy_rewriter``); it runs, before anything else sees the scope, only
    for a request that carries one of ``FORWARDING_HEADERS``.
    """
    prefix = root_path.encode("latin-1")
    checked_start = responses.checked_start
    known_headers = _VALID_HEADERS.issuperset
    logging_on = access_log is not None

    def target_of(scope: Scope) -> str:
        raw = scope.get("raw_path") or scope.get("path", "").encode("utf-8")
        if prefix and raw.startswith(prefix):
            raw = raw[len(prefix) :]
        query = scope.get("query_string")
        return (raw + b"?" + query if query else raw).decode("latin-1")

    async def hooked(scope: Scope, receive: Receive, send: Send) -> None:
        if forwarded is not None:
            for name, _ in scope["headers"]:
                if name in FORWARDING_HEADERS:
                    await forwarded(scope, receive, send)
                    break
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        status = 0
        refused: ResponseError | None = None
        # What the access log needs of the response: [bytes sent, headers].
        noted: list[Any] | None = [0, ()] if logging_on else None
        method = scope["method"]
        target = target_of(scope) if observer is not None or logging_on else ""
        client = scope.get("client")
        peer = str(client[0]) if client else ""
        token = observer.begin(method, target, peer) if observer is not None else None

        def noted_send(message: Message) -> Awaitable[None]:
            nonlocal status, refused
            if refused is not None:
                return _dropped()
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = message.get("headers")
                # The usual response repeats headers already checked: one
                # C-level set test, no copy.
                try:
                    known = (
                        (type(headers) is list or type(headers) is tuple)
                        and not responses.closing
                        and known_headers(headers)
                    )
                except TypeError:  # a pair that is not a tuple: checked one by one
                    known = False
                if not known:
                    try:
                        message = checked_start(message)
                    except ResponseError as exc:
                        refused = exc
                        status = 500
                        return _refuse(scope, send, exc)
                if noted is not None:
                    noted[1] = message.get("headers") or ()
            elif noted is not None and message["type"] == "http.response.body":
                noted[0] += len(message.get("body") or b"")
            return send(message)

        if logging_on:
            waited = take_queued(scope)
            started = time.time()
            clock = time.perf_counter()
        deadline = Deadline(request_timeout, method, target, peer) if request_timeout > 0 else None
        try:
            try:
                await app(scope, receive, noted_send)
            except ResponseError as exc:
                if exc is not refused:
                    raise  # the application's own: uvicorn logs it and answers 500
            except asyncio.CancelledError:
                if deadline is None or not deadline.expired():
                    raise
            if deadline is not None and deadline.expired():
                if observer is not None:
                    observer.count_timeout()
                if not status:
                    status = 503
                    await send(TIMEOUT_START)
                    await send(TIMEOUT_BODY)
        finally:
            if deadline is not None:
                deadline.cancel()
            # uvicorn answers 500 for an app that failed before starting a response.
            if token is not None and observer is not None:
                observer.end(token, method, status or 500)
            if access_log is not None and noted is not None:
                record = AccessRecord(
                    method=method,
                    target=target,
                    http_version=scope.get("http_version", "1.1"),
                    status=status or 500,
                    bytes_sent=0 if method == "HEAD" else noted[0],
                    request_headers=[
                        (n.decode("latin-1"), v.decode("latin-1")) for n, v in scope["headers"]
                    ],
                    response_headers=[
                        (n.decode("latin-1"), v.decode("latin-1")) for n, v in noted[1]
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


# The request headers uvicorn's ProxyHeadersMiddleware reads (names as
# uvicorn gives them: lower case), and RFC 7239's: without any of them the
# middleware leaves the scope as it is, so it need not run.
FORWARDING_HEADERS = frozenset((b"x-forwarded-for", b"x-forwarded-proto", b"forwarded"))


def proxy_rewriter(trusted: list[str]) -> ASGIApp:
    """uvicorn's proxy header handling alone: it rewrites the scope of a
    request from a ``trusted`` peer in place and calls nothing else."""
    # uvicorn types ASGI messages as TypedDicts; ours are plain mappings.
    rewriter: Any = ProxyHeadersMiddleware(_unchanged, trusted_hosts=trusted)  # type: ignore[arg-type]
    return rewriter


async def _unchanged(scope: Scope, receive: Receive, send: Send) -> None:
    """The application behind ``proxy_rewriter``: the scope is all it is for."""


async def _dropped() -> None:
    """What ``send`` does after a refused response: nothing."""


async def _refuse(scope: Scope, send: Send, error: ResponseError) -> None:
    LOG.error("invalid response to %s: %s", request_line(scope), error)
    await send_error(send)
    raise error


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


class Deadline:
    """--request-timeout for the request running in the current task.

    One timer on the loop, no task of its own: when it fires, the task is
    logged with where it waits and cancelled; ``expired()`` tells the
    request's code that the ``CancelledError`` it sees came from here.
    """

    __slots__ = ("_fired", "_handle", "_limit", "_line", "_peer", "_task")

    def __init__(self, limit: float, method: str, target: str, peer: str) -> None:
        loop = asyncio.get_running_loop()
        self._task = asyncio.current_task(loop)
        self._limit = limit
        self._line = f"{method} {target}"
        self._peer = peer
        self._fired = False
        self._handle: asyncio.TimerHandle | None = loop.call_at(loop.time() + limit, self._expire)

    def expired(self) -> bool:
        return self._fired

    def cancel(self) -> None:
        """The request is over: the timer goes, and so does a cancellation it made."""
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.cancel()
        task = self._task
        if self._fired and task is not None and sys.version_info >= (3, 11):
            task.uncancel()

    def _expire(self) -> None:
        self._handle = None
        task = self._task
        if task is None or task.done():
            return
        self._fired = True
        stack = "".join(traceback.format_list(traceback.StackSummary.extract(awaiting(task))))
        LOG.error(
            "request exceeded --request-timeout (%.1fs); cancelling it: %s from %s\n%s",
            self._limit,
            self._line.encode("unicode_escape").decode("ascii"),
            self._peer or "-",
            stack.rstrip() or "  (no Python stack)",
        )
        task.cancel()


# -- responses: header checks and draining -----------------------------------------


CLOSE_HEADER = (b"connection", b"close")
ERROR_BODY = b"Internal Server Error\n"


# Header pairs already found valid: most responses repeat the same few, and a
# set lookup costs less than the two regular expressions (bounded).
_VALID_HEADERS: set[tuple[Any, Any]] = set()
_VALID_HEADERS_MAX = 1024


class ResponseGuard:
    """What the application sends for HTTP is checked before uvicorn sees it.

    ``checked_start(message)`` is applied (by ``request_hooks``) to every
    ``http.response.start``. A response head with a header name that is not
    a token, or a value holding CR, LF or NUL, never reaches uvicorn (which
    would drop the connection unanswered): the client gets a 500 that closes
    the connection, the error is logged once with the request line, and the
    application's ``send`` raises ``ResponseError``; what it sends after that
    is dropped. While ``closing`` (the primary's --drain-delay) every
    response head carries ``Connection: close``, so uvicorn closes each
    connection after its response. WebSocket and lifespan scopes pass
    through untouched.
    """

    __slots__ = ("closing",)

    def __init__(self) -> None:
        self.closing = False

    def checked_start(self, message: Message) -> Message:
        """``message`` (an ``http.response.start``) as uvicorn may send it, or
        ResponseError when its headers cannot be sent."""
        headers = message.get("headers") or ()
        if type(headers) is not list and type(headers) is not tuple:
            headers = list(headers)  # an iterator: read once, here
            message = {**message, "headers": headers}
        try:
            check_headers(headers)
        except ResponseError:
            raise
        except (TypeError, ValueError) as exc:
            raise ResponseError(f"invalid headers: {exc}") from None
        if self.closing:
            message = {**message, "headers": closing_headers(headers)}
        return message


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
        # Read once: a setting costs a lookup through Config.__getattr__.
        self._protocol_class: Any = self.uvicorn_config.http_protocol_class
        self.guard: GuardOptions | None = None
        if config.asgi_guard != "off":
            self.guard = GuardOptions(
                # The front end validates and frames; uvicorn decodes what it
                # accepted, so no second parse is needed here.
                backend="framing",
                limits=self.http_options().limits,
                websockets=self.ws_class is not None,
                busy=_busy,
                responding=_responding,
                hold=_hold,
            )
        self.head_deadlines = GroupedTimers(self.loop, config.header_timeout)
        self.flusher = Flusher(self.loop)
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
        app = request_hooks(
            self.app,
            self.responses,
            access_log,
            self._request_done if self.max_requests else None,
            config.root_path,
            self.pid,
            self.worker_id,
            self.slot,
            config.request_timeout,
            proxy_rewriter(list(config.forwarded_allow_ips)),
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
            # Applied by request_hooks, only to requests that carry proxy headers.
            proxy_headers=False,
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
        """uvicorn's protocol behind forkserve's strict front end (asgi_guard),
        or behind a plain ``Relay`` with --asgi-guard off; both coalesce its
        writes. ``waited``: milliseconds the connection waited in the primary."""
        state = self.lifespan.state
        if waited is not None:
            state = {**state, QUEUED_KEY: [waited]}
        protocol: asyncio.Protocol = self._protocol_class(
            config=self.uvicorn_config,
            server_state=self.state,
            app_state=state,
            _loop=self.loop,
        )
        guard = self.guard
        if guard is None:
            return Relay(protocol, self.flusher)
        return GuardedConnection(protocol, guard, self.head_deadlines, self.flusher)

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
