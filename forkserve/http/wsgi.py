"""PEP 3333 over one connection: read a request, call the application, send
the response, and say whether the connection can serve another.

The only I/O goes through the ``Transport`` passed in (a socket satisfies
it); the worker owns the socket, the accept loop and the process. This
module must not import sockets, threads, signals, selectors, asyncio, click,
uvicorn or anything from forkserve except ``forkserve.errors``.

Header names containing an underscore are dropped from the environ: both
``X-Foo`` and ``X_Foo`` would map to ``HTTP_X_FOO``, and a proxy that vets
one spelling would let a client spoof it with the other.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, Protocol
from urllib.parse import unquote_to_bytes

from forkserve.errors import HTTPError, ResponseError
from forkserve.http.accesslog import AccessRecord
from forkserve.http.body import FileWrapper, InputStream
from forkserve.http.parser import (
    NEED_DATA,
    Data,
    EndOfMessage,
    ParserLimits,
    Request,
    make_parser,
)
from forkserve.http.proxy import TrustedProxies, apply_forwarded
from forkserve.http.response import (
    CONTINUE_100,
    DATE,
    BodyFramer,
    ResponseHead,
    build_head,
    error_response,
)

WSGIApp = Callable[[dict[str, Any], Callable[..., Callable[[bytes], None]]], Iterable[bytes]]

_RECV_SIZE = 65536
_JOIN_LIMIT = 65536  # head and first body chunk go in one sendall below this
_DRAIN_LIMIT = 1 << 20  # unread body discarded to keep a connection alive
_LOG = logging.getLogger("forkserve.worker")


class Transport(Protocol):
    def recv(self, n: int, flags: int = 0) -> bytes: ...
    def send(self, data: bytes | memoryview, flags: int = 0) -> int: ...
    def sendall(self, data: bytes | memoryview) -> None: ...
    def sendfile(self, file: Any, offset: int = 0, count: int | None = None) -> int: ...
    def settimeout(self, value: float | None) -> None: ...


class HTTPOptions(NamedTuple):
    backend: str = "auto"
    limits: ParserLimits = ParserLimits()
    root_path: str = ""
    url_scheme: str = "http"
    forwarded_allow_ips: frozenset[str] | tuple[str, ...] = ("127.0.0.1", "::1")
    header_timeout: float = 10.0
    keepalive_timeout: float = 2.0
    body_timeout: float = 30.0
    multithread: bool = False
    multiprocess: bool = True
    server_software: str = "forkserve"
    access_log: Callable[[AccessRecord], None] | None = None
    error_logger: logging.Logger | None = None
    observer: RequestObserver | None = None
    # A flag that makes one recv/send return at once instead of waiting
    # (MSG_DONTWAIT), for transports whose recv and send take flags (a plain
    # socket, not TLS). Each read or write first tries once with it and sets
    # the phase's timeout only when it would have to wait: a timeout on a
    # socket costs a poll() before every call and a syscall to set. 0: the
    # timeout of each phase is set up front.
    dontwait: int = 0


class RequestObserver(Protocol):
    """Told when each request starts and ends (the worker's scoreboard)."""

    def begin(self, method: str, target: str, client: str) -> Any: ...

    def end(self, token: Any, method: str, status: int) -> None: ...


class _ClientGone(Exception):
    """The peer stopped accepting bytes; not the application's fault."""


# Header name -> environ key; "" for a name that is dropped (an underscore).
_ENV_KEYS: dict[bytes, str] = {}


def _environ_key(name: bytes) -> str:
    key = _ENV_KEYS.get(name)
    if key is None:
        text = name.decode("latin-1")
        if "_" in text:
            key = ""
        else:
            key = text.upper().replace("-", "_")
            if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                key = "HTTP_" + key
        if len(_ENV_KEYS) < 2048:
            _ENV_KEYS[name] = key
    return key


# The common methods as str, so most requests do not decode theirs.
_METHOD_TEXT = {
    m.encode("ascii"): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")
}


_TRUSTED: dict[tuple[str, ...], TrustedProxies] = {}


def _trusted(entries: Iterable[str]) -> TrustedProxies:
    key = tuple(sorted(entries))
    found = _TRUSTED.get(key)
    if found is None:
        found = _TRUSTED[key] = TrustedProxies(key)
    return found


class _Template:
    """What every connection built from one (options, extra environ) pair shares."""

    __slots__ = ("environ", "extra", "options", "server_bytes", "trusted")

    def __init__(self, options: HTTPOptions, extra: dict[str, Any] | None) -> None:
        self.options = options
        self.extra = extra
        self.server_bytes = options.server_software.encode("latin-1")
        self.trusted = _trusted(options.forwarded_allow_ips)
        environ: dict[str, Any] = dict(extra or {})
        environ.update(
            {
                "SERVER_NAME": "",
                "SERVER_PORT": "",
                "REMOTE_ADDR": "",
                "REMOTE_PORT": "",
                "SERVER_SOFTWARE": options.server_software,
                "SCRIPT_NAME": options.root_path,
                "wsgi.version": (1, 0),
                "wsgi.url_scheme": options.url_scheme,
                "wsgi.errors": sys.stderr,
                "wsgi.multithread": options.multithread,
                "wsgi.multiprocess": options.multiprocess,
                "wsgi.run_once": False,
                "wsgi.file_wrapper": FileWrapper,
                "wsgi.input_terminated": True,
            }
        )
        self.environ = environ


# By id of the options, checked by identity: a worker passes the same options
# and extra environ to every connection. Holding them keeps the ids unique.
_TEMPLATES: dict[tuple[int, int], _Template] = {}


def _template(options: HTTPOptions, extra: dict[str, Any] | None) -> _Template:
    found = _TEMPLATES.get((id(options), id(extra)))
    if found is None or found.options is not options or found.extra is not extra:
        found = _Template(options, extra)
        if len(_TEMPLATES) >= 32:
            _TEMPLATES.clear()
        _TEMPLATES[(id(options), id(extra))] = found
    return found


class WSGIConnection:
    """Serves the requests of one connection, one ``handle_request`` each."""

    def __init__(
        self,
        transport: Transport,
        app: WSGIApp,
        options: HTTPOptions,
        client: tuple[Any, ...] | str | None,
        server: tuple[Any, ...] | str | None,
        extra_environ: dict[str, Any] | None = None,
        initial_data: bytes = b"",
        queued_ms: float | None = None,
    ) -> None:
        self.transport = transport
        self.app = app
        self.options = options
        self.requests_served = 0
        self.close_after_response = False
        # Asked when the response head is built: may this connection stay open?
        # The sync worker keeps it only for requests the client already sent.
        self.keep_alive_check: Callable[[], bool] | None = None
        self._parser = make_parser(options.backend, options.limits)
        if initial_data:
            self._parser.feed(initial_data)
        self._date = DATE
        template = _template(options, extra_environ)
        self._server_bytes = template.server_bytes
        self._logger = options.error_logger or _LOG
        self._trusted = template.trusted
        # The transport's timeout as last set here (None: never set, so a
        # socket is blocking) and the one the current phase wants.
        self._timeout: float | None = None
        self._want_timeout: float | None = None
        self._dontwait = options.dontwait
        base = template.environ.copy()
        if isinstance(client, tuple):
            self._peer_ip: str | None = str(client[0])
            base["REMOTE_ADDR"] = self._peer_ip
            base["REMOTE_PORT"] = str(client[1]) if len(client) > 1 else ""
        else:
            self._peer_ip = None
        if isinstance(server, tuple):
            base["SERVER_NAME"] = str(server[0])
            base["SERVER_PORT"] = str(server[1])
        if queued_ms is not None:
            # How long the connection waited before a worker took it
            # (``forkserve.queued_ms``, the access log's Q): the first
            # request's wait; later requests on the connection waited nowhere.
            base["forkserve.queued_ms"] = queued_ms
        self._queued = queued_ms is not None
        self._base_environ = base
        self._reset_request()

    @property
    def has_pending_data(self) -> bool:
        return self._parser.has_buffered_data

    # -- reading -------------------------------------------------------------
    def _reset_request(self) -> None:
        self._request: Request | None = None
        self._body_done = False
        self._body_error: BaseException | None = None
        self._continue_pending = False
        self._status: object = None
        self._headers: list[tuple[str, str]] | None = None
        self._head: ResponseHead | None = None
        self._framer: BodyFramer | None = None
        self._headers_sent = False
        self._body_length: int | None = None
        self._error_status = 0

    def _settimeout(self, value: float) -> None:
        """The timeout for what follows; with ``dontwait`` it is set on the
        transport only before a call that has to wait (``_wait_timeout``)."""
        self._want_timeout = value
        if not self._dontwait and value != self._timeout:
            self._timeout = value
            self.transport.settimeout(value)

    def _wait_timeout(self) -> None:
        want = self._want_timeout
        if want != self._timeout and want is not None:
            self._timeout = want
            self.transport.settimeout(want)

    def _recv(self) -> bytes:
        transport = self.transport
        if self._dontwait and self._timeout is None:
            # Usually the bytes are there already (the worker waited for
            # them): one recvfrom, no poll() first.
            try:
                return transport.recv(_RECV_SIZE, self._dontwait)
            except BlockingIOError:
                pass
            self._wait_timeout()
        elif self._dontwait:
            self._wait_timeout()
        try:
            return transport.recv(_RECV_SIZE)
        except InterruptedError:
            return transport.recv(_RECV_SIZE)

    def _read_head(self) -> Request | None:
        """The next request head, or None when the connection is done."""
        parser = self._parser
        options = self.options
        if parser.has_buffered_data:
            return self._read_rest_of_head(time.monotonic() + options.header_timeout)
        self._settimeout(
            options.keepalive_timeout if self.requests_served else options.header_timeout
        )
        try:
            data = self._recv()
        except (TimeoutError, OSError):
            return None
        parser.feed(data)
        # The deadline counts from the first bytes (a few microseconds ago).
        return self._read_rest_of_head(time.monotonic() + options.header_timeout)

    def _read_rest_of_head(self, deadline: float) -> Request | None:
        """Read until the head begun in the buffer is complete, by ``deadline``."""
        parser = self._parser
        while True:
            event = parser.next_event()
            if event is not NEED_DATA:
                assert isinstance(event, Request)
                return event
            if parser.peer_closed:
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("request head deadline")
            self._settimeout(remaining)
            parser.feed(self._recv())

    def _read_body(self) -> bytes:
        """The next piece of the body, b"" at its end; raises HTTPError."""
        if self._body_done:
            return b""
        if self._body_error is not None:
            raise self._body_error
        parser = self._parser
        try:
            while True:
                event = parser.next_event()
                if type(event) is Data:
                    return event.data
                if type(event) is EndOfMessage:
                    self._body_done = True
                    return b""
                if self._continue_pending:
                    # RFC 9110 §10.1.1: the client waits for this before sending.
                    self._continue_pending = False
                    self._sendall(CONTINUE_100)
                self._settimeout(self.options.body_timeout)
                try:
                    data = self._recv()
                except (TimeoutError, OSError) as exc:
                    raise HTTPError("timed out reading the request body", status=408) from exc
                parser.feed(data)
        except HTTPError as exc:
            self._body_error = exc
            raise

    def _drain(self) -> bool:
        """Discard an unread body so the next request can be read."""
        if self._body_done:
            return True
        if self._continue_pending:
            return False  # the client still waits to send it; closing is cheaper
        drained = 0
        try:
            while drained <= _DRAIN_LIMIT:
                data = self._read_body()
                if not data:
                    return True
                drained += len(data)
        except HTTPError:
            return False
        return False

    # -- writing -------------------------------------------------------------
    def _sendall(self, data: bytes | memoryview) -> None:
        transport = self.transport
        try:
            if self._dontwait:
                if self._timeout is None:
                    # Most responses fit the socket buffer: one send, no poll().
                    try:
                        sent = transport.send(data, self._dontwait)
                    except BlockingIOError:
                        sent = 0
                    if sent == len(data):
                        return
                    data = memoryview(data)[sent:]
                self._wait_timeout()
            transport.sendall(data)
        except OSError as exc:
            raise _ClientGone(str(exc)) from exc

    def _start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], None]:
        if exc_info:
            try:
                if self._headers_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self._status is not None:
            raise AssertionError("start_response called a second time without exc_info")
        if not isinstance(headers, list):
            raise ResponseError(f"headers must be a list, got {type(headers).__name__}")
        self._status = status
        self._headers = headers
        return self._write

    def _make_head(self) -> BodyFramer:
        request = self._request
        assert request is not None
        if self._status is None or self._headers is None:
            raise ResponseError("the application did not call start_response")
        keep_alive = request.keep_alive and not self.close_after_response
        if keep_alive and self.keep_alive_check is not None:
            keep_alive = self.keep_alive_check()
        if self._continue_pending and not self._body_done:
            keep_alive = False
        head = build_head(
            self._status,
            self._headers,
            method=request.method,
            http_version=request.http_version,
            keep_alive=keep_alive,
            date=self._date,
            server=self._server_bytes,
            body_length=self._body_length,
        )
        self._head = head
        self._framer = BodyFramer(head)
        return self._framer

    def _write(self, data: bytes) -> None:
        if type(data) is not bytes:
            if not isinstance(data, (bytearray, memoryview)):
                raise ResponseError(f"body chunks must be bytes, got {type(data).__name__}")
            data = bytes(data)
        framer = self._framer
        if framer is None:
            if not data:
                return
            framer = self._make_head()
            assert self._head is not None
            out = framer.frame(data)
            self._headers_sent = True
            if len(out) <= _JOIN_LIMIT:
                self._sendall(self._head.head + out)
            else:
                self._sendall(self._head.head)
                self._sendall(out)
            return
        out = framer.frame(data)
        if out:
            self._sendall(out)

    def _send_whole(self, body: bytes) -> None:
        """Send a response whose body is ``body``, all of it, with its head."""
        framer = self._make_head()
        head = self._head
        assert head is not None
        self._headers_sent = True
        out = framer.frame(body) + framer.finish() if body else framer.finish()
        if len(out) <= _JOIN_LIMIT:
            self._sendall(head.head + out if out else head.head)
        else:
            self._sendall(head.head)
            self._sendall(out)

    def _finish(self) -> None:
        framer = self._framer
        if framer is None:
            framer = self._make_head()
            assert self._head is not None
            self._headers_sent = True
            self._sendall(self._head.head + framer.finish())
            return
        tail = framer.finish()
        if tail:
            self._sendall(tail)

    def _send_file(self, wrapper: FileWrapper) -> bool:
        """Send a file with the transport's sendfile; False to fall back."""
        filelike = wrapper.filelike
        try:
            filelike.fileno()
            offset = filelike.tell()
            size = filelike.seek(0, 2) - offset
            filelike.seek(offset)
        except (AttributeError, OSError, ValueError):
            return False
        if self._body_length is None and self._framer is None:
            self._body_length = size
        framer = self._framer or self._make_head()
        head = self._head
        assert head is not None
        if head.chunked:
            return False
        if not self._headers_sent:
            self._headers_sent = True
            self._sendall(head.head)
        count = framer.allow(size)
        if count:
            if self._dontwait:
                self._wait_timeout()
            try:
                sent = self.transport.sendfile(filelike, offset, count)
            except (AttributeError, OSError, RuntimeError):
                # No sendfile on this transport (RuntimeError covers transports
                # that declare it unsupported): fall back to plain reads.
                sent = 0
            if sent < count:
                # Nothing or part went out; finish with plain reads.
                filelike.seek(offset + sent)
                remaining = count - sent
                while remaining > 0:
                    data = filelike.read(min(remaining, wrapper.blksize))
                    if not data:
                        break
                    self._sendall(data)
                    remaining -= len(data)
        return True

    # -- one request --------------------------------------------------------
    def _environ(self, request: Request) -> dict[str, Any]:
        environ = self._base_environ.copy()
        target = request.target
        method = request.method
        raw_uri = target.decode("latin-1")
        path, _sep, query = target.partition(b"?")
        if path[:1] != b"/":
            if method == b"CONNECT" or path == b"*":
                path = b"" if method == b"CONNECT" else path
            else:
                # absolute-form: drop "scheme://authority"
                rest = path.split(b"://", 1)[-1]
                slash = rest.find(b"/")
                path = rest[slash:] if slash >= 0 else b"/"
        if path is target and b"%" not in path:
            path_info = raw_uri  # the whole target is the path, nothing to decode twice
        else:
            path_info = (unquote_to_bytes(path) if b"%" in path else path).decode("latin-1")
        root = self.options.root_path
        if root and (path_info == root or path_info.startswith(root + "/")):
            path_info = path_info[len(root) :]
        environ["REQUEST_METHOD"] = _METHOD_TEXT.get(method) or method.decode("latin-1")
        environ["PATH_INFO"] = path_info
        environ["QUERY_STRING"] = query.decode("latin-1") if query else ""
        environ["RAW_URI"] = raw_uri
        environ["SERVER_PROTOCOL"] = "HTTP/1.1" if request.http_version == b"1.1" else "HTTP/1.0"
        keys = _ENV_KEYS
        for name, value in request.headers:
            key = keys.get(name)
            if key is None:
                key = _environ_key(name)
            if not key:
                continue
            text = value.decode("latin-1")
            if key in environ and key.startswith("HTTP_"):
                sep_text = "; " if key == "HTTP_COOKIE" else ", "
                environ[key] = environ[key] + sep_text + text
            else:
                environ[key] = text
        host = environ.get("HTTP_HOST") if not environ["SERVER_NAME"] else None
        if host:
            # A Unix-socket server has no address of its own; use Host.
            if host.rfind(":") > host.rfind("]"):
                host_name, _, port = host.rpartition(":")
            else:
                host_name, port = host, ""
            environ["SERVER_NAME"] = host_name
            environ["SERVER_PORT"] = port or ("443" if self.options.url_scheme == "https" else "80")
        environ["wsgi.input"] = InputStream(self)
        if (
            "HTTP_X_FORWARDED_FOR" in environ
            or "HTTP_FORWARDED" in environ
            or "HTTP_X_FORWARDED_PROTO" in environ
        ):
            apply_forwarded(environ, self._peer_ip, self._trusted)
        return environ

    def _send_error(self, status: int, message: str) -> None:
        self._error_status = status
        try:
            self._sendall(error_response(status, message, self._date, self._server_bytes))
        except _ClientGone:
            pass

    def handle_request(self) -> bool:
        """Read and serve one request; True if the connection may serve another."""
        self._reset_request()
        try:
            request = self._read_head()
        except HTTPError as exc:
            self._send_error(exc.status, str(exc))
            return False
        except (TimeoutError, OSError):
            self._send_error(408, "request head not received in time")
            return False
        if request is None:
            return False
        self._request = request
        if request.expect_continue and (request.content_length or request.chunked):
            self._continue_pending = True
        options = self.options
        access_log = options.access_log
        observer = options.observer
        if access_log is not None:
            started = time.time()
            clock = time.perf_counter()
        self.requests_served += 1
        environ = self._environ(request)
        if self._queued:
            self._queued = False
            self._base_environ["forkserve.queued_ms"] = 0.0
        if observer is not None:
            method = environ["REQUEST_METHOD"]
            token = observer.begin(method, environ["RAW_URI"], environ.get("REMOTE_ADDR", ""))
        ok = self._run_app(environ)
        if observer is not None:
            observer.end(token, method, self._answered_status())
        if access_log is not None:
            self._log_access(access_log, environ, started, time.perf_counter() - clock)
        head = self._head
        if not ok or head is None or not head.keep_alive or self.close_after_response:
            return False
        assert self._framer is not None
        if self._framer.must_close or not self._drain():
            return False
        self._parser.start_next_cycle()
        return True

    def _run_app(self, environ: dict[str, Any]) -> bool:
        """Call the app and send its response; False if the connection must close."""
        result: Any = None
        try:
            result = self.app(environ, self._start_response)
            if type(result) is list and len(result) == 1 and type(result[0]) is bytes:
                body = result[0]
                self._body_length = len(body)
                if self._framer is None:
                    # The whole body is known: head and body go out in one send.
                    self._send_whole(body)
                    return True
            if isinstance(result, FileWrapper) and self._send_file(result):
                return True
            for chunk in result:
                self._write(chunk)
            self._finish()
            return True
        except _ClientGone:
            return False
        except Exception as exc:
            return self._app_failed(exc)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    self._logger.exception(
                        "error closing the response iterable of %s", self._request_line()
                    )

    def _app_failed(self, exc: Exception) -> bool:
        if exc is self._body_error and isinstance(exc, HTTPError):
            status, message = exc.status, str(exc)
        elif isinstance(exc, ResponseError):
            self._logger.error("invalid response to %s: %s", self._request_line(), exc)
            status, message = 500, "Internal Server Error"
        else:
            self._logger.error(
                "error handling %s",
                self._request_line(),
                exc_info=(type(exc), exc, exc.__traceback__),
            )
            status, message = 500, "Internal Server Error"
        if not self._headers_sent:
            self._head = None
            self._send_error(status, message)
        return False

    def _answered_status(self) -> int:
        """The status answered to the current request (500 when none was)."""
        head = self._head
        return head.status if head is not None else (self._error_status or 500)

    def _request_line(self) -> str:
        request = self._request
        if request is None:
            return "-"
        line = f"{request.method.decode('latin-1')} {request.target.decode('latin-1')}"
        return f"{line} HTTP/{request.http_version.decode()}".encode("unicode_escape").decode(
            "ascii"
        )

    def _log_access(
        self,
        access_log: Callable[[AccessRecord], None],
        environ: dict[str, Any],
        started: float,
        duration: float,
    ) -> None:
        request = self._request
        assert request is not None
        head = self._head
        status = self._answered_status()
        response_headers = self._headers if head is not None and self._headers else []
        record = AccessRecord(
            method=request.method.decode("latin-1"),
            target=request.target.decode("latin-1"),
            http_version=request.http_version.decode("latin-1"),
            status=status,
            bytes_sent=self._framer.sent if self._framer is not None else 0,
            request_headers=[
                (n.decode("latin-1"), v.decode("latin-1")) for n, v in request.headers
            ],
            response_headers=response_headers,
            start_time=started,
            duration=duration,
            client=environ.get("REMOTE_ADDR", ""),
            pid=environ.get("forkserve.pid", 0),
            worker_id=environ.get("forkserve.worker_id"),
            queued_ms=environ.get("forkserve.queued_ms"),
            environ=environ,
        )
        try:
            access_log(record)
        except Exception:
            self._logger.exception("access log handler failed")
