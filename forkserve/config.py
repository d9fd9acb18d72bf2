"""Settings: declared once, as data, and read from flags, environment and files.

``SETTINGS`` is the one table of settings. The command line (``cli.py``), the
environment (``FORKSERVE_<NAME>`` and ``FORKSERVE_CMD_ARGS``), the config files
(Python, TOML, ``pyproject.toml``) and ``docs/configuration.md`` are all derived
from it. ``load_config`` layers them, highest first: command line,
``FORKSERVE_CMD_ARGS``, single ``FORKSERVE_*`` variables, config file, defaults.

Every converter takes a string (flag, environment) or a Python/TOML value and
raises ``ValueError`` whose text is the form expected; ``load_config`` turns it
into a one-line ``ConfigError`` naming the key and where it came from.

This module must not import click, ``forkserve.arbiter``, ``forkserve.workers``,
``forkserve.cluster`` or ``forkserve.http``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple, TextIO

from forkserve.config_files import read_python, read_toml
from forkserve.converters import (
    arity,
    bind_list,
    boolean,
    byte_size,
    env_list,
    group_id,
    hook,
    int_range,
    logconfig_suffix,
    non_negative_int,
    octal_mode,
    optional_host_port,
    optional_text,
    path_list,
    positive_int,
    seconds,
    text,
    trusted_ips,
    user_id,
)
from forkserve.errors import ConfigError

if sys.version_info >= (3, 11):
    pass
else:  # pragma: no cover - exercised on 3.10 only
    pass

ENV_PREFIX = "FORKSERVE_"
CMD_ARGS_VAR = "FORKSERVE_CMD_ARGS"
DEFAULT_ACCESS_LOG_FORMAT = '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s"'
DEFAULT_CONFIG_FILE = "forkserve.conf.py"
THREADED_DEFAULT_THREADS = 4

# Names a gunicorn config file uses for settings that forkserve spells differently;
# only used to suggest the right name.
_GUNICORN_NAMES = {
    "accesslog": "access_logfile",
    "errorlog": "error_logfile",
    "preload": "preload_app",
    "keep_alive": "keepalive",
    "log_level": "loglevel",
}


# --- the table ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting: its name is the config key and ``FORKSERVE_<NAME>``.

    ``path`` marks a file system path, made absolute against the working
    directory: ``"file"`` and ``"dir"`` must exist, ``"new"`` need not;
    ``"-"`` (stdout/stderr) is kept as is.
    """

    name: str
    type: Callable[[Any], Any]
    default: Any
    flags: tuple[str, ...] = ()
    section: str = "server"
    help: str = ""
    validate: Callable[[Any], None] | None = None
    multiple: bool = False
    choices: tuple[str, ...] | None = None
    is_flag: bool = False
    metavar: str | None = None
    path: str | None = None

    @property
    def env_var(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def long_flag(self) -> str | None:
        longs = [flag for flag in self.flags if flag.startswith("--")]
        return longs[0] if longs else None


_S = Setting

# fmt: off
SETTINGS: tuple[Setting, ...] = (
    # server
    _S("bind", bind_list, ("127.0.0.1:8000",), ("-b", "--bind"), multiple=True,
       metavar="ADDRESS",
       help="Address to listen on: host:port, [ipv6]:port, unix:/path, fd://N, or "
       "fd://NAME (a systemd socket). Repeat for several. Defaults to 0.0.0.0:$PORT "
       "when PORT is set."),
    _S("backlog", positive_int, 2048, ("--backlog",), metavar="INT",
       help="Maximum number of pending connections per listening socket."),
    _S("sched", text, "auto", ("--sched",), choices=("auto", "rr", "none"),
       help="How connections reach workers: rr (the primary accepts and hands them "
       "round robin to free workers), none (workers accept on a shared socket), or "
       "auto (the server picks per worker class)."),
    _S("buffer_request_head", boolean, False, ("--buffer-request-head",), is_flag=True,
       help="With --sched rr, the primary reads each request head (within "
       "--header-timeout) before a worker gets the connection, so a slow client never "
       "holds a worker. sync and threaded workers, without TLS."),
    _S("unix_socket_mode", octal_mode, 0o660, ("--unix-socket-mode",), metavar="MODE",
       help="Permissions of a unix: socket, further masked by --umask. Use 0o666 if "
       "the proxy runs as another user outside the socket's group."),
    _S("forwarded_allow_ips", trusted_ips, ("127.0.0.1", "::1"),
       ("--forwarded-allow-ips",), metavar="IPS",
       help="Peers trusted to set X-Forwarded-* and Forwarded headers: comma-separated "
       "addresses or networks, or '*' for any."),
    _S("root_path", text, "", ("--root-path",), metavar="PATH",
       help="Mount prefix of the application (SCRIPT_NAME / ASGI root_path)."),
    _S("certfile", optional_text, None, ("--certfile",), section="tls", path="file",
       metavar="FILE", help="TLS certificate file (PEM); enables HTTPS."),
    _S("keyfile", optional_text, None, ("--keyfile",), section="tls", path="file",
       metavar="FILE", help="TLS private key file (PEM)."),
    _S("ca_certs", optional_text, None, ("--ca-certs",), section="tls", path="file",
       metavar="FILE", help="CA certificates file to verify clients against."),
    # workers
    _S("workers", positive_int, 1, ("-w", "--workers"), section="workers", metavar="INT",
       help="Number of worker processes. Defaults to $WEB_CONCURRENCY when set, else 1."),
    _S("worker_class", text, "auto", ("-k", "--worker-class"), section="workers",
       choices=("auto", "sync", "threaded", "asgi"),
       help="Worker type. auto picks asgi for ASGI apps, threaded when --threads > 1, "
       "else sync."),
    _S("threads", positive_int, 1, ("--threads",), section="workers", metavar="INT",
       help="Threads per threaded worker (4 when -k threaded and left at 1 by default)."),
    _S("worker_connections", positive_int, 1000, ("--worker-connections",),
       section="workers", metavar="INT",
       help="Maximum simultaneous connections per asgi or threaded worker."),
    _S("timeout", seconds, 30.0, ("-t", "--timeout"), section="workers", metavar="SECONDS",
       help="A worker silent for this long is killed and replaced; 0 disables."),
    _S("graceful_timeout", seconds, 30.0, ("--graceful-timeout",), section="workers",
       metavar="SECONDS",
       help="Time workers get to finish requests after a stop or restart signal."),
    _S("keepalive", seconds, 2.0, ("--keep-alive",), section="workers", metavar="SECONDS",
       help="How long an idle keep-alive connection is held open."),
    _S("max_requests", non_negative_int, 0, ("--max-requests",), section="workers",
       metavar="INT", help="Restart a worker after this many requests; 0 disables."),
    _S("max_requests_jitter", non_negative_int, 0, ("--max-requests-jitter",),
       section="workers", metavar="INT",
       help="Add a random 0..N to --max-requests per worker so they do not restart "
       "together."),
    _S("preload_app", boolean, False, ("--preload",), section="workers", is_flag=True,
       help="Import the application in the primary before forking workers."),
    _S("request_timeout", seconds, 0.0, ("--request-timeout",), section="workers",
       metavar="SECONDS",
       help="A request running longer is logged with its stack; a sync or threaded "
       "worker is then recycled, an asgi request cancelled; 0 disables."),
    _S("max_worker_memory", byte_size, 0, ("--max-worker-memory",), section="workers",
       metavar="SIZE",
       help="Recycle a worker whose RSS stays above this (e.g. 512M) for several "
       "samples; 0 disables."),
    _S("max_worker_lifetime", seconds, 0.0, ("--max-worker-lifetime",), section="workers",
       metavar="SECONDS", help="Recycle a worker after it has run this long; 0 disables."),
    _S("drain_delay", seconds, 0.0, ("--drain-delay",), section="workers", metavar="SECONDS",
       help="On SIGTERM, keep serving this long with Connection: close before stopping "
       "to accept, so load balancers notice."),
    _S("reload", boolean, False, ("--reload",), section="workers", is_flag=True,
       help="Development: replace the workers when a file of the app changes "
       "(watchfiles when installed, else polling)."),
    _S("reload_extra_files", path_list, (), ("--reload-extra-file",), section="workers",
       multiple=True, metavar="FILE",
       help="With --reload, also watch these files or directories. Repeatable."),
    # application
    _S("interface", text, "auto", ("--interface",), section="application",
       choices=("auto", "wsgi", "asgi"),
       help="Application interface; auto detects ASGI from coroutine callables."),
    _S("factory", boolean, False, ("--factory",), section="application", is_flag=True,
       help="APP names a callable that returns the application; call it with no "
       "arguments."),
    _S("chdir", optional_text, None, ("--chdir",), section="application", path="dir",
       metavar="DIR", help="Change to this directory before loading the application."),
    _S("pythonpath", path_list, (), ("--pythonpath",), section="application",
       metavar="DIRS",
       help="Comma-separated directories added to the front of sys.path."),
    _S("raw_env", env_list, (), ("-e", "--env"), section="application", multiple=True,
       metavar="KEY=VALUE", help="Set an environment variable in workers. Repeatable."),
    _S("lifespan", text, "auto", ("--lifespan",), section="application",
       choices=("auto", "on", "off"),
       help="ASGI lifespan events: on requires them, auto tolerates apps without them."),
    # process
    _S("pidfile", optional_text, None, ("-p", "--pid"), section="process", path="new",
       metavar="FILE", help="Write the primary's pid to this file."),
    _S("user", user_id, None, ("-u", "--user"), section="process", metavar="USER",
       help="Run workers as this user (name or uid)."),
    _S("group", group_id, None, ("-g", "--group"), section="process", metavar="GROUP",
       help="Run workers as this group (name or gid)."),
    _S("umask", octal_mode, 0, ("-m", "--umask"), section="process", metavar="MODE",
       help="Umask of the server processes, e.g. 0o22 or 022."),
    _S("daemon", boolean, False, ("-D", "--daemon"), section="process", is_flag=True,
       help="Detach from the terminal and run in the background (use with --pid)."),
    _S("proc_name", optional_text, None, ("-n", "--name"), section="process", metavar="NAME",
       help="Process title prefix: `forkserve: primary [NAME]`, `forkserve: worker N [NAME]`; "
       "defaults to the APP string."),
    _S("control_socket", text, "auto", ("--control-socket",), section="process",
       metavar="PATH",
       help="Unix socket (mode 0600) for forkserve ctl; auto puts it beside --pid or "
       "in the runtime directory; off disables it."),
    # logging
    _S("loglevel", text, "info", ("--log-level",), section="logging",
       choices=("debug", "info", "warning", "error", "critical"),
       help="Error log level; debug also shows tracebacks of startup errors."),
    _S("error_logfile", text, "-", ("--error-logfile", "--log-file"), section="logging",
       path="new", metavar="FILE", help="Error log file; '-' is stderr."),
    _S("access_logfile", optional_text, None, ("--access-logfile",), section="logging",
       path="new", metavar="FILE", help="Access log file; '-' is stdout; unset disables it."),
    _S("access_log_format", text, DEFAULT_ACCESS_LOG_FORMAT, ("--access-logformat",),
       section="logging", metavar="FORMAT",
       help="Access log line, with gunicorn's %(x)s atoms, plus %(W)s (worker id) and "
       "%(Q)s (ms the connection waited in the primary, --sched rr; '-' otherwise)."),
    _S("logconfig", optional_text, None, ("--log-config",), section="logging", path="file",
       validate=logconfig_suffix, metavar="FILE",
       help="logging configuration: dictConfig as .json or .toml, or fileConfig as "
       ".ini/.conf."),
    _S("metrics_bind", optional_host_port, None, ("--metrics-bind",), section="logging",
       metavar="ADDRESS",
       help="Serve Prometheus metrics, aggregated over all workers, on host:port "
       "(path /metrics)."),
    _S("statsd_host", optional_host_port, None, ("--statsd-host",), section="logging",
       metavar="ADDRESS", help="Send metrics to this statsd server (host:port, UDP)."),
    _S("statsd_prefix", text, "forkserve", ("--statsd-prefix",), section="logging",
       metavar="PREFIX", help="Prefix of every statsd metric name."),
    # http
    _S("http", text, "auto", ("--http",), section="http",
       choices=("auto", "httptools", "h11"),
       help="HTTP parser; auto prefers httptools when installed."),
    _S("limit_request_line", int_range(0, 8190), 4094, ("--limit-request-line",),
       section="http", metavar="BYTES",
       help="Maximum request line size in bytes (0..8190; 0 means 8190)."),
    _S("limit_request_fields", int_range(0, 32768), 100, ("--limit-request-fields",),
       section="http", metavar="INT",
       help="Maximum number of request header fields (0..32768; 0 means 32768)."),
    _S("limit_request_field_size", non_negative_int, 8190,
       ("--limit-request-field_size", "--limit-request-field-size"), section="http",
       metavar="BYTES", help="Maximum size of one header field; 0 means unlimited."),
    _S("limit_request_body", non_negative_int, 0, ("--limit-request-body",),
       section="http", metavar="BYTES",
       help="Maximum request body size in bytes (413 above it); 0 means unlimited."),
    _S("header_timeout", seconds, 10.0, ("--header-timeout",), section="http",
       metavar="SECONDS",
       help="Deadline for receiving a whole request head (408 after it); 0 disables."),
    _S("h11_max_incomplete_event_size", positive_int, 16384,
       ("--h11-max-incomplete-event-size",), section="http", metavar="BYTES",
       help="h11 parser: maximum buffered bytes of an incomplete request head."),
    # asgi
    _S("loop", text, "auto", ("--loop",), section="asgi",
       choices=("auto", "asyncio", "uvloop"),
       help="Event loop for asgi workers; auto uses uvloop when installed."),
    _S("ws", text, "auto", ("--ws",), section="asgi",
       choices=("auto", "websockets", "wsproto", "none"),
       help="WebSocket implementation for asgi workers; none disables WebSockets."),
    _S("ws_max_size", positive_int, 16777216, ("--ws-max-size",), section="asgi",
       metavar="BYTES", help="Maximum WebSocket message size in bytes."),
    _S("ws_ping_interval", seconds, 20.0, ("--ws-ping-interval",), section="asgi",
       metavar="SECONDS", help="Interval between WebSocket pings; 0 disables."),
    _S("ws_ping_timeout", seconds, 20.0, ("--ws-ping-timeout",), section="asgi",
       metavar="SECONDS", help="Close a WebSocket whose ping is unanswered this long."),
    _S("asgi_guard", text, "on", ("--asgi-guard",), section="asgi", choices=("on", "off"),
       help="on: every ASGI request passes forkserve's strict HTTP/1.1 front end (the "
       "smuggling checks and --limit-request-* / --header-timeout) before uvicorn's "
       "parser sees it; off: uvicorn's parser alone, faster and more lenient."),
    # hooks
    _S("on_starting", hook, None, section="hooks", validate=arity("arbiter"),
       help="on_starting(arbiter): called in the primary before anything starts."),
    _S("when_ready", hook, None, section="hooks", validate=arity("arbiter"),
       help="when_ready(arbiter): called once the listeners are open."),
    _S("post_fork", hook, None, section="hooks", validate=arity("arbiter", "worker"),
       help="post_fork(arbiter, worker): called in a worker just after it starts."),
    _S("worker_exit", hook, None, section="hooks", validate=arity("arbiter", "worker"),
       help="worker_exit(arbiter, worker): called in the primary when a worker exits."),
    _S("on_exit", hook, None, section="hooks", validate=arity("arbiter"),
       help="on_exit(arbiter): called in the primary just before it exits."),
    # meta
    _S("config", optional_text, None, ("-c", "--config"), section="meta", metavar="FILE",
       help="Config file: a .py file, a .toml file, or a pyproject.toml "
       "([tool.forkserve]). Without it ./pyproject.toml and ./forkserve.conf.py are read."),
    _S("check_config", boolean, False, ("--check-config",), section="meta", is_flag=True,
       help="Load the configuration and import the app, report, and exit."),
    _S("print_config", boolean, False, ("--print-config",), section="meta", is_flag=True,
       help="Print every setting with its value and source, and exit."),
    _S("version", boolean, False, ("-v", "--version"), section="meta", is_flag=True,
       help="Print the version and exit."),
)
# fmt: on

SETTINGS_BY_NAME: Mapping[str, Setting] = MappingProxyType({s.name: s for s in SETTINGS})
# How --help and docs/configuration.md title each section.
SECTION_TITLES: Mapping[str, str] = MappingProxyType(
    {
        "server": "Server",
        "tls": "TLS",
        "workers": "Workers",
        "application": "Application",
        "process": "Process",
        "logging": "Logging",
        "http": "HTTP",
        "asgi": "ASGI",
        "hooks": "Server hooks",
        "meta": "Other",
    }
)
SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(s.section for s in SETTINGS))
# One-shot actions: a stray FORKSERVE_VERSION (a deploy tool's version number, say)
# must not turn a server start into an action, so they come only from options.
ACTIONS = frozenset({"version", "print_config", "check_config"})
# Settings that cannot sensibly appear in a config file.
_NOT_IN_FILES = ACTIONS | {"config"}


# --- the result --------------------------------------------------------------


class Config:
    """Immutable settings: one attribute per setting, ``sources`` and ``app``.

    ``sources[name]`` says where a value came from: ``"default"``,
    ``"config file <path>"``, ``"environment <VAR>"``, ``"FORKSERVE_CMD_ARGS"``
    or ``"command line"``.
    """

    __slots__ = ("_values", "app", "sources")
    _values: Mapping[str, Any]
    sources: Mapping[str, str]
    app: str | None

    def __init__(
        self, values: Mapping[str, Any], sources: Mapping[str, str], app: str | None
    ) -> None:
        missing = set(SETTINGS_BY_NAME) - set(values)
        if missing:
            raise ValueError(f"missing settings: {', '.join(sorted(missing))}")
        object.__setattr__(self, "_values", MappingProxyType(dict(values)))
        object.__setattr__(self, "sources", MappingProxyType(dict(sources)))
        object.__setattr__(self, "app", app)

    def __getattr__(self, name: str) -> Any:
        values = object.__getattribute__(self, "_values")
        try:
            return values[name]
        except KeyError:
            raise AttributeError(f"no setting {name!r}{_suggest(name, values)}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Config is immutable; build a new one with load_config")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("Config is immutable")

    def __reduce__(self) -> tuple[Any, ...]:
        return (Config, (dict(self._values), dict(self.sources), self.app))

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self._values))

    def __repr__(self) -> str:
        changed = {k: v for k, v in self._values.items() if self.sources[k] != "default"}
        return f"Config(app={self.app!r}, {changed!r})"

    @property
    def values(self) -> Mapping[str, Any]:
        """Every setting's value by name (read-only)."""
        return self._values

    def format_table(self) -> str:
        """Every setting, its value and its source, one per line, sorted by name."""
        width = max(len(name) for name in self._values)
        lines = [f"{'app':<{width}} = {self.app!r}"]
        for name in sorted(self._values):
            value = self._values[name]
            octal = SETTINGS_BY_NAME[name].type is octal_mode
            shown = oct(value) if octal else format_value(value)
            lines.append(f"{name:<{width}} = {shown}  # {self.sources[name]}")
        return "\n".join(lines) + "\n"

    def print_table(self, file: TextIO | None = None) -> None:
        """Write ``format_table()`` to ``file`` (stdout by default)."""
        (file or sys.stdout).write(self.format_table())


def format_value(value: Any) -> str:
    """A stable, readable rendering of a setting value (octal modes are not guessed)."""
    if isinstance(value, tuple):
        return repr(list(value))
    if callable(value):
        module = getattr(value, "__module__", None) or "?"
        name = getattr(value, "__qualname__", None) or type(value).__name__
        return f"<callable {module}.{name}>"
    return repr(value)


def effective_threads(config: Config, worker_class: str | None = None) -> int:
    """Threads per worker: ``threads``, or 4 for a threaded worker when left at its default."""
    worker_class = worker_class or config.worker_class
    if worker_class == "threaded" and config.sources["threads"] == "default":
        return THREADED_DEFAULT_THREADS
    return int(config.threads)


# --- loading -----------------------------------------------------------------


def _suggest(name: str, candidates: Iterator[str] | Mapping[str, Any] | Sequence[str]) -> str:
    if name in _GUNICORN_NAMES:
        return f"; did you mean {_GUNICORN_NAMES[name]!r}?"
    import difflib  # only for a mistyped name: not in the primary, so not in every worker

    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _show(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value)) if all(isinstance(v, str) for v in value) else repr(value)
    return format_value(value)


class _Raw(NamedTuple):
    """A value before conversion, and how to name it in an error.

    A named tuple: its class costs about a seventh of a frozen dataclass's to
    create at import (0.15 ms against 1 ms).
    """

    value: Any
    where: str  # e.g. 'forkserve.toml: workers = ', 'environment FORKSERVE_WORKERS='


def _convert(setting: Setting, raw: _Raw, cwd: str) -> Any:
    try:
        value = setting.type(raw.value)
        if setting.choices is not None:
            value = value.strip().lower()
            if value not in setting.choices:
                raise ValueError(f"expected one of {', '.join(setting.choices)}")
        if setting.path is not None and value is not None and value != "-":
            value = os.path.normpath(os.path.join(cwd, os.path.expanduser(value)))
            if setting.path == "file" and not os.path.isfile(value):
                raise ValueError("expected an existing file")
            if setting.path == "dir" and not os.path.isdir(value):
                raise ValueError("expected an existing directory")
        if setting.validate is not None:
            setting.validate(value)
    except ValueError as exc:
        raise ConfigError(f"{raw.where}{_show(raw.value)}: {exc}") from None
    return value


def parse_args(args: Sequence[str], origin: str = CMD_ARGS_VAR) -> dict[str, _Raw]:
    """Parse options (no APP) with the same flags as the command line."""
    by_flag = {flag: s for s in SETTINGS for flag in s.flags}
    found: dict[str, _Raw] = {}
    multi: dict[str, list[str]] = {}
    index = 0
    while index < len(args):
        arg = args[index]
        if not arg.startswith("-") or arg in ("-", "--"):
            raise ConfigError(f"{origin}: unexpected argument {arg!r}; only options are allowed")
        if arg.startswith("--"):
            flag, has_inline, inline = arg.partition("=")
        else:
            flag, inline = arg[:2], arg[2:]
            has_inline = "=" if inline else ""
        setting = by_flag.get(flag)
        if setting is None:
            raise ConfigError(f"{origin}: no such option {flag}{_suggest(flag, by_flag)}")
        if setting.is_flag:
            if has_inline:
                raise ConfigError(f"{origin}: option {flag} takes no value")
            found[setting.name] = _Raw(True, f"{origin} {flag}=")
        else:
            if not has_inline:
                index += 1
                if index >= len(args):
                    raise ConfigError(f"{origin}: option {flag} needs a value")
                inline = args[index]
            if setting.multiple:
                multi.setdefault(setting.name, []).append(inline)
                found[setting.name] = _Raw(multi[setting.name], f"{origin} {flag}=")
            else:
                found[setting.name] = _Raw(inline, f"{origin} {flag}=")
        index += 1
    return found


def _from_cli(cli_values: Mapping[str, Any]) -> dict[str, _Raw]:
    found = {}
    for name, value in cli_values.items():
        setting = SETTINGS_BY_NAME.get(name)
        if setting is None:
            raise ConfigError(f"command line: no such setting {name!r}")
        flag = setting.long_flag or name
        found[name] = _Raw(value, f"command line {flag}=")
    return found


def _from_env(env: Mapping[str, str]) -> dict[str, _Raw]:
    return {
        s.name: _Raw(env[s.env_var], f"environment {s.env_var}=")
        for s in SETTINGS
        if s.env_var in env and s.name not in ACTIONS
    }


def _from_file(path: str, display: str) -> dict[str, _Raw]:
    base = os.path.basename(path)
    if base == "pyproject.toml":
        entries = read_toml(path, display, "tool.forkserve")
        display = f"{display} [tool.forkserve]"
    elif path.endswith(".toml"):
        entries = read_toml(path, display, None)
    elif path.endswith(".py"):
        entries = read_python(path, display)
    else:
        raise ConfigError(
            f"config file {display}: expected a .py file, a .toml file or pyproject.toml"
        )
    found = {}
    for key, value in entries.items():
        if key not in SETTINGS_BY_NAME:
            raise ConfigError(
                f"{display}: unknown setting {key!r}{_suggest(key, SETTINGS_BY_NAME)}"
            )
        if key in _NOT_IN_FILES:
            raise ConfigError(
                f"{display}: {key!r} can only be given on the command line or in {CMD_ARGS_VAR}"
            )
        found[key] = _Raw(value, f"{display}: {key} = ")
    return found


def _env_defaults(env: Mapping[str, str]) -> tuple[dict[str, _Raw], dict[str, str]]:
    """gunicorn's environment-derived defaults: $WEB_CONCURRENCY and $PORT."""
    found: dict[str, _Raw] = {}
    sources: dict[str, str] = {}
    if env.get("WEB_CONCURRENCY"):
        found["workers"] = _Raw(env["WEB_CONCURRENCY"], "environment WEB_CONCURRENCY=")
        sources["workers"] = "environment WEB_CONCURRENCY"
    if env.get("PORT"):
        found["bind"] = _Raw(f"0.0.0.0:{env['PORT']}", "environment PORT=")
        sources["bind"] = "environment PORT"
    return found, sources


def load_config(
    cli_values: Mapping[str, Any],
    env: Mapping[str, str],
    *,
    app: str | None,
    config_path: str | None = None,
    cwd: str | None = None,
) -> Config:
    """Build the configuration; raise ``ConfigError`` with a one-line message.

    ``cli_values`` holds only settings given on the command line, by name, as
    strings (or converted values); ``env`` is usually ``os.environ``.
    """
    cwd = os.path.abspath(cwd or os.getcwd())
    from_cli = _from_cli(cli_values)
    cmd_args: dict[str, _Raw] = {}
    if env.get(CMD_ARGS_VAR):
        import shlex  # only with FORKSERVE_CMD_ARGS: not in the primary, so not in every worker

        try:
            cmd_args = parse_args(shlex.split(env[CMD_ARGS_VAR]))
        except ValueError as exc:
            raise ConfigError(f"{CMD_ARGS_VAR}: {exc}") from None
    from_env = _from_env(env)

    def highest(name: str) -> _Raw | None:
        for layer in (from_cli, cmd_args, from_env):
            if name in layer:
                return layer[name]
        return None

    file_layers: list[tuple[dict[str, _Raw], str]] = []
    raw_path = config_path or highest("config")
    if isinstance(raw_path, _Raw):
        raw_path = _convert(SETTINGS_BY_NAME["config"], raw_path, cwd)
    if raw_path:
        path = os.path.join(cwd, os.path.expanduser(raw_path))
        if not os.path.isfile(path):
            raise ConfigError(f"config file {raw_path}: no such file (cwd {cwd})")
        file_layers.append((_from_file(path, raw_path), f"config file {raw_path}"))
    else:
        chdir = highest("chdir")
        base = _convert(SETTINGS_BY_NAME["chdir"], chdir, cwd) if chdir else None
        base = base or cwd
        for name in ("pyproject.toml", DEFAULT_CONFIG_FILE):
            path = os.path.join(base, name)
            if os.path.isfile(path):
                entries = _from_file(path, path)
                file_layers.append((entries, f"config file {path}"))

    values: dict[str, Any] = {s.name: s.default for s in SETTINGS}
    sources: dict[str, str] = {s.name: "default" for s in SETTINGS}
    defaults, default_sources = _env_defaults(env)
    layers: list[tuple[dict[str, _Raw], str | None]] = [(defaults, None), *file_layers]
    layers += [(from_env, None), (cmd_args, CMD_ARGS_VAR), (from_cli, "command line")]
    for layer, label in layers:
        for name, raw in layer.items():
            values[name] = _convert(SETTINGS_BY_NAME[name], raw, cwd)
            if layer is defaults:
                sources[name] = default_sources[name]
            elif layer is from_env:
                sources[name] = f"environment {SETTINGS_BY_NAME[name].env_var}"
            else:
                sources[name] = label or "default"
    if raw_path:
        values["config"] = os.path.join(cwd, raw_path)
    return Config(values, sources, app)
