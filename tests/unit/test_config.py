"""The settings table: every setting from every source, precedence, and error messages."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from forkserve.config import (
    SETTINGS,
    SETTINGS_BY_NAME,
    Config,
    effective_threads,
    load_config,
    parse_args,
)
from forkserve.converters import byte_size, optional_host_port
from forkserve.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
HOOKS = {s.name for s in SETTINGS if s.section == "hooks"}
# "config" names the file itself; it is tested on its own below.
FILE_SETTINGS = [s.name for s in SETTINGS if s.name not in HOOKS and s.name != "config"]
FLAG_SETTINGS = [s.name for s in SETTINGS if s.flags and s.name != "config"]
ACTIONS = ["version", "print_config", "check_config"]
FILE_SETTINGS = [name for name in FILE_SETTINGS if name not in ACTIONS]
ENV_SETTINGS = [name for name in FLAG_SETTINGS if name not in ACTIONS]


@dataclass
class Sample:
    """A non-default value for one setting, in each form a user would write it."""

    text: str  # flag / environment form
    native: Any  # Python / TOML form
    expected: Any  # the converted value
    cli: Any = None  # click hands multiple options over as a tuple

    def cli_value(self) -> Any:
        return self.text if self.cli is None else self.cli


def samples(tmp: Path) -> dict[str, Sample]:
    for name in ("cert.pem", "key.pem", "ca.pem"):
        (tmp / name).write_text("x")
    (tmp / "log.json").write_text('{"version": 1}')
    (tmp / "app").mkdir(exist_ok=True)
    uid = os.getuid()
    gid = os.getgid()
    return {
        "bind": Sample(
            "[::1]:9000,unix:/tmp/s.sock",
            ["[::1]:9000", "unix:/tmp/s.sock"],
            ("[::1]:9000", "unix:/tmp/s.sock"),
            cli=("[::1]:9000", "unix:/tmp/s.sock"),
        ),
        "backlog": Sample("64", 64, 64),
        "sched": Sample("rr", "rr", "rr"),
        "buffer_request_head": Sample("yes", True, True, cli=True),
        "daemon": Sample("yes", True, True, cli=True),
        "unix_socket_mode": Sample("0o600", 0o600, 0o600),
        "forwarded_allow_ips": Sample("10.0.0.0/8,*", "10.0.0.0/8,*", ("10.0.0.0/8", "*")),
        "root_path": Sample("/api", "/api", "/api"),
        "certfile": Sample("cert.pem", "cert.pem", str(tmp / "cert.pem")),
        "keyfile": Sample("key.pem", "key.pem", str(tmp / "key.pem")),
        "ca_certs": Sample("ca.pem", "ca.pem", str(tmp / "ca.pem")),
        "workers": Sample("5", 5, 5),
        "worker_class": Sample("threaded", "threaded", "threaded"),
        "threads": Sample("8", 8, 8),
        "worker_connections": Sample("50", 50, 50),
        "timeout": Sample("2.5", 2.5, 2.5),
        "graceful_timeout": Sample("7", 7, 7.0),
        "keepalive": Sample("0", 0, 0.0),
        "max_requests": Sample("100", 100, 100),
        "max_requests_jitter": Sample("10", 10, 10),
        "preload_app": Sample("true", True, True, cli=True),
        "request_timeout": Sample("12.5", 12.5, 12.5),
        "max_worker_memory": Sample("512M", "512M", 512 * 1024**2),
        "max_worker_lifetime": Sample("3600", 3600, 3600.0),
        "drain_delay": Sample("5", 5, 5.0),
        "reload": Sample("yes", True, True, cli=True),
        "reload_extra_files": Sample(
            "a.txt,b.txt", ["a.txt", "b.txt"], ("a.txt", "b.txt"), cli=("a.txt", "b.txt")
        ),
        "control_socket": Sample("off", "off", "off"),
        "metrics_bind": Sample("127.0.0.1:9100", "127.0.0.1:9100", "127.0.0.1:9100"),
        "statsd_host": Sample("localhost:8125", "localhost:8125", "localhost:8125"),
        "statsd_prefix": Sample("web", "web", "web"),
        "interface": Sample("asgi", "asgi", "asgi"),
        "factory": Sample("1", True, True, cli=True),
        "chdir": Sample("app", "app", str(tmp / "app")),
        "pythonpath": Sample("lib,src", ["lib", "src"], ("lib", "src")),
        "raw_env": Sample(
            "A=1 'B=two words'",
            ["A=1", "B=two words"],
            ("A=1", "B=two words"),
            cli=("A=1", "B=two words"),
        ),
        "lifespan": Sample("off", "off", "off"),
        "pidfile": Sample("run.pid", "run.pid", str(tmp / "run.pid")),
        "user": Sample(str(uid), uid, uid),
        "group": Sample(str(gid), gid, gid),
        "umask": Sample("022", 0o22, 0o22),
        "proc_name": Sample("web", "web", "web"),
        "loglevel": Sample("DEBUG", "debug", "debug"),
        "error_logfile": Sample("err.log", "err.log", str(tmp / "err.log")),
        "access_logfile": Sample("-", "-", "-"),
        "access_log_format": Sample("%(h)s %(r)s", "%(h)s %(r)s", "%(h)s %(r)s"),
        "logconfig": Sample("log.json", "log.json", str(tmp / "log.json")),
        "http": Sample("h11", "h11", "h11"),
        "limit_request_line": Sample("8190", 8190, 8190),
        "limit_request_fields": Sample("32768", 32768, 32768),
        "limit_request_field_size": Sample("0", 0, 0),
        "limit_request_body": Sample("1048576", 1048576, 1048576),
        "header_timeout": Sample("3", 3, 3.0),
        "h11_max_incomplete_event_size": Sample("1024", 1024, 1024),
        "loop": Sample("asyncio", "asyncio", "asyncio"),
        "ws": Sample("none", "none", "none"),
        "ws_max_size": Sample("1024", 1024, 1024),
        "ws_ping_interval": Sample("0.5", 0.5, 0.5),
        "ws_ping_timeout": Sample("1", 1, 1.0),
        "asgi_guard": Sample("off", "off", "off"),
        "check_config": Sample("yes", True, True, cli=True),
        "print_config": Sample("on", True, True, cli=True),
        "version": Sample("true", True, True, cli=True),
    }


def toml_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    return "[" + ", ".join(toml_literal(v) for v in value) + "]"


def load(
    tmp_path: Path,
    cli: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    config_path: str | None = None,
) -> Config:
    return load_config(
        cli or {}, env or {}, app="m:app", config_path=config_path, cwd=str(tmp_path)
    )


def test_samples_cover_every_setting(tmp_path: Path) -> None:
    assert set(samples(tmp_path)) == set(FILE_SETTINGS) | set(ACTIONS)
    for name, sample in samples(tmp_path).items():
        assert sample.expected != SETTINGS_BY_NAME[name].default, name


def test_defaults(tmp_path: Path) -> None:
    config = load(tmp_path)
    for setting in SETTINGS:
        assert getattr(config, setting.name) == setting.default
        assert config.sources[setting.name] == "default"
    assert config.workers == 1
    assert config.bind == ("127.0.0.1:8000",)
    assert config.app == "m:app"


@pytest.mark.parametrize("name", FLAG_SETTINGS)
def test_from_command_line(tmp_path: Path, name: str) -> None:
    sample = samples(tmp_path)[name]
    config = load(tmp_path, cli={name: sample.cli_value()})
    assert getattr(config, name) == sample.expected
    assert config.sources[name] == "command line"


@pytest.mark.parametrize("name", ENV_SETTINGS)
def test_from_environment(tmp_path: Path, name: str) -> None:
    sample = samples(tmp_path)[name]
    var = "FORKSERVE_" + name.upper()
    config = load(tmp_path, env={var: sample.text})
    assert getattr(config, name) == sample.expected
    assert config.sources[name] == f"environment {var}"


@pytest.mark.parametrize("name", FLAG_SETTINGS)
def test_from_cmd_args(tmp_path: Path, name: str) -> None:
    setting = SETTINGS_BY_NAME[name]
    sample = samples(tmp_path)[name]
    flag = setting.flags[-1]
    if setting.is_flag:
        args = flag
    elif setting.multiple:
        args = " ".join(f"{flag} '{item}'" for item in sample.cli)
    else:
        args = f"{flag} '{sample.text}'"
    config = load(tmp_path, env={"FORKSERVE_CMD_ARGS": args})
    assert getattr(config, name) == sample.expected
    assert config.sources[name] == "FORKSERVE_CMD_ARGS"


@pytest.mark.parametrize("name", FILE_SETTINGS)
def test_from_python_file(tmp_path: Path, name: str) -> None:
    sample = samples(tmp_path)[name]
    (tmp_path / "conf.py").write_text(f"{name} = {sample.native!r}\n")
    config = load(tmp_path, config_path="conf.py")
    assert getattr(config, name) == sample.expected
    assert config.sources[name] == "config file conf.py"


@pytest.mark.parametrize("name", FILE_SETTINGS)
def test_from_toml_file(tmp_path: Path, name: str) -> None:
    sample = samples(tmp_path)[name]
    (tmp_path / "conf.toml").write_text(f"{name} = {toml_literal(sample.native)}\n")
    config = load(tmp_path, config_path="conf.toml")
    assert getattr(config, name) == sample.expected
    assert config.sources[name] == "config file conf.toml"


@pytest.mark.parametrize("name", FILE_SETTINGS)
def test_from_pyproject(tmp_path: Path, name: str) -> None:
    sample = samples(tmp_path)[name]
    key = name.replace("_", "-")  # TOML files may spell keys with dashes
    (tmp_path / "pyproject.toml").write_text(
        f"[project]\nname = 'x'\n\n[tool.forkserve]\n{key} = {toml_literal(sample.native)}\n"
    )
    config = load(tmp_path)  # found without -c
    assert getattr(config, name) == sample.expected
    assert config.sources[name] == f"config file {tmp_path / 'pyproject.toml'}"


@pytest.mark.parametrize("name", FLAG_SETTINGS)
def test_command_line_beats_file(tmp_path: Path, name: str) -> None:
    sample = samples(tmp_path)[name]
    default = SETTINGS_BY_NAME[name].default
    (tmp_path / "conf.py").write_text(f"{name} = {sample.native!r}\n")
    if isinstance(default, bool) or default is None or default == () or name == "sched":
        # flags cannot be switched off from the command line; set another value instead
        return
    text = ",".join(default) if isinstance(default, tuple) else str(default)
    config = load(tmp_path, cli={name: text}, config_path="conf.py")
    assert getattr(config, name) == default
    assert config.sources[name] == "command line"


def test_precedence_ladder(tmp_path: Path) -> None:
    (tmp_path / "forkserve.toml").write_text("workers = 2\n")
    env = {"FORKSERVE_WORKERS": "3", "FORKSERVE_CMD_ARGS": "-w 4", "WEB_CONCURRENCY": "9"}
    assert load(tmp_path, {"workers": "5"}, env, "forkserve.toml").workers == 5
    assert load(tmp_path, {}, env, "forkserve.toml").workers == 4
    del env["FORKSERVE_CMD_ARGS"]
    assert load(tmp_path, {}, env, "forkserve.toml").workers == 3
    del env["FORKSERVE_WORKERS"]
    config = load(tmp_path, {}, env, "forkserve.toml")
    assert (config.workers, config.sources["workers"]) == (2, "config file forkserve.toml")
    config = load(tmp_path, {}, env)
    assert (config.workers, config.sources["workers"]) == (9, "environment WEB_CONCURRENCY")


def test_overridden_bad_values_are_still_errors(tmp_path: Path) -> None:
    (tmp_path / "forkserve.toml").write_text('workers = "eight"\n')
    with pytest.raises(ConfigError, match=r"^forkserve\.toml: workers"):
        load(tmp_path, {"workers": "2"}, config_path="forkserve.toml")


def test_web_concurrency_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, env={"WEB_CONCURRENCY": "lots"})
    assert str(info.value) == ('environment WEB_CONCURRENCY="lots": expected a positive integer')


def test_port_sets_default_bind(tmp_path: Path) -> None:
    config = load(tmp_path, env={"PORT": "5000"})
    assert config.bind == ("0.0.0.0:5000",)
    assert config.sources["bind"] == "environment PORT"
    assert load(tmp_path, {"bind": ("127.0.0.1:1",)}, {"PORT": "5000"}).bind == ("127.0.0.1:1",)


def test_cmd_args_forms(tmp_path: Path) -> None:
    config = load(tmp_path, env={"FORKSERVE_CMD_ARGS": "-w4 --timeout=9 -b a:1 --bind b:2"})
    assert (config.workers, config.timeout, config.bind) == (4, 9.0, ("a:1", "b:2"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("--wokers 3", "FORKSERVE_CMD_ARGS: no such option --wokers; did you mean '--workers'?"),
        (
            "myapp:app",
            "FORKSERVE_CMD_ARGS: unexpected argument 'myapp:app'; only options are allowed",
        ),
        ("--preload=yes", "FORKSERVE_CMD_ARGS: option --preload takes no value"),
        ("--workers", "FORKSERVE_CMD_ARGS: option --workers needs a value"),
        ("-w x", 'FORKSERVE_CMD_ARGS -w="x": expected a positive integer'),
        ("-e 'unterminated", "FORKSERVE_CMD_ARGS: No closing quotation"),
    ],
)
def test_cmd_args_errors(tmp_path: Path, args: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, env={"FORKSERVE_CMD_ARGS": args})
    assert str(info.value) == message


def test_parse_args_matches_the_table() -> None:
    raw = parse_args(["-k", "asgi", "--preload"])
    assert {name: r.value for name, r in raw.items()} == {
        "worker_class": "asgi",
        "preload_app": True,
    }


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("toml", 'forkserve.toml: workers = "eight": expected a positive integer'),
        ("py", 'forkserve.conf.py: workers = "eight": expected a positive integer'),
        ("env", 'environment FORKSERVE_WORKERS="eight": expected a positive integer'),
        ("cli", 'command line --workers="eight": expected a positive integer'),
    ],
)
def test_bad_value_names_key_source_and_form(tmp_path: Path, source: str, message: str) -> None:
    (tmp_path / "forkserve.toml").write_text('workers = "eight"\n')
    (tmp_path / "forkserve.conf.py").write_text('workers = "eight"\n')
    (tmp_path / "none.toml").write_text("")
    with pytest.raises(ConfigError) as info:
        if source == "toml":
            load(tmp_path, config_path="forkserve.toml")
        elif source == "py":
            load(tmp_path, config_path="forkserve.conf.py")
        elif source == "env":
            load(tmp_path, env={"FORKSERVE_WORKERS": "eight"}, config_path="none.toml")
        else:
            load(tmp_path, {"workers": "eight"}, config_path="none.toml")
    assert str(info.value) == message
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("timeout", "x", "expected a number of seconds"),
        ("timeout", "-1", "expected a number of seconds"),
        ("timeout", "nan", "expected a number of seconds"),
        ("workers", "0", "expected a positive integer"),
        ("workers", "2.5", "expected a positive integer"),
        ("max_requests", "-1", "expected an integer >= 0"),
        ("limit_request_line", "8191", "expected an integer from 0 to 8190"),
        ("limit_request_fields", "32769", "expected an integer from 0 to 32768"),
        ("worker_class", "gevent", "expected one of auto, sync, threaded, asgi"),
        ("loglevel", "loud", "expected one of debug, info, warning, error, critical"),
        ("preload_app", "maybe", "expected true or false"),
        ("umask", "0o1000", "expected an octal mode such as 0o22 or 022"),
        ("umask", "09", "expected an octal mode such as 0o22 or 022"),
        ("raw_env", "NOEQUALS", "expected KEY=VALUE"),
        ("raw_env", "=x", "expected KEY=VALUE"),
        ("forwarded_allow_ips", "10.0.0.300", "expected '*' or comma-separated IP addresses"),
        ("certfile", "missing.pem", "expected an existing file"),
        ("chdir", "nowhere", "expected an existing directory"),
        ("logconfig", "log.yaml", "expected an existing file"),
        ("user", "no-such-user-here", "expected a user name or uid known to this system"),
        ("group", "no-such-group-here", "expected a group name or gid known to this system"),
    ],
)
def test_bad_values(tmp_path: Path, name: str, value: str, expected: str) -> None:
    var = "FORKSERVE_" + name.upper()
    with pytest.raises(ConfigError) as info:
        load(tmp_path, env={var: value})
    assert str(info.value).startswith(f"environment {var}={json.dumps(value)}: {expected}")


def test_logconfig_suffix(tmp_path: Path) -> None:
    (tmp_path / "log.yaml").write_text("x")
    with pytest.raises(ConfigError, match=r"expected a \.json, \.toml, \.ini or \.conf file"):
        load(tmp_path, {"logconfig": "log.yaml"})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8000", ("127.0.0.1:8000",)),
        ("0.0.0.0", ("0.0.0.0:8000",)),
        ("localhost:80", ("localhost:80",)),
        ("[::1]:8080", ("[::1]:8080",)),
        ("[::]", ("[::]:8000",)),
        ("unix:/run/app.sock", ("unix:/run/app.sock",)),
        ("fd://3", ("fd://3",)),
        ("a:1, b:2", ("a:1", "b:2")),
    ],
)
def test_bind_forms(tmp_path: Path, text: str, expected: tuple[str, ...]) -> None:
    assert load(tmp_path, env={"FORKSERVE_BIND": text}).bind == expected


@pytest.mark.parametrize(
    "text",
    [
        "::1:8000",
        "[::1",
        "[nothost]:80",
        "host:port",
        "host:70000",
        "unix:",
        "fd://",
        "fd://a b",
        ":8000",
        "",
    ],
)
def test_bad_bind_forms(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, {"bind": (text,)})
    assert "expected host:port, [ipv6]:port, unix:/path, fd://N or fd://NAME" in str(info.value)


@pytest.mark.parametrize(
    ("text", "mode"), [("0", 0), ("0o22", 0o22), ("022", 0o22), ("18", 18), ("0o777", 0o777)]
)
def test_umask_forms(tmp_path: Path, text: str, mode: int) -> None:
    assert load(tmp_path, {"umask": text}).umask == mode


def test_unknown_python_key_suggests(tmp_path: Path) -> None:
    (tmp_path / "conf.py").write_text("wokers = 3\n")
    with pytest.raises(ConfigError) as info:
        load(tmp_path, config_path="conf.py")
    assert str(info.value) == "conf.py: unknown setting 'wokers'; did you mean 'workers'?"


def test_gunicorn_names_get_a_suggestion(tmp_path: Path) -> None:
    (tmp_path / "conf.py").write_text("accesslog = '-'\n")
    with pytest.raises(ConfigError, match="did you mean 'access_logfile'"):
        load(tmp_path, config_path="conf.py")


def test_unknown_toml_key_suggests(tmp_path: Path) -> None:
    (tmp_path / "conf.toml").write_text("[forkserve]\ntimeuot = 3\n")
    with pytest.raises(ConfigError) as info:
        load(tmp_path, config_path="conf.toml")
    assert str(info.value) == "conf.toml: unknown setting 'timeuot'; did you mean 'timeout'?"


def test_python_config_ignores_private_names_and_imports(tmp_path: Path) -> None:
    (tmp_path / "conf.py").write_text(
        "import os\nfrom os.path import join\nfrom collections import OrderedDict\n"
        "_base = 2\nworkers = _base * 3\n"
    )
    assert load(tmp_path, config_path="conf.py").workers == 6


def test_python_config_other_names_rejected(tmp_path: Path) -> None:
    (tmp_path / "conf.py").write_text("def helper():\n    pass\n")
    with pytest.raises(ConfigError, match="unknown setting 'helper'"):
        load(tmp_path, config_path="conf.py")


def test_python_config_errors(tmp_path: Path) -> None:
    (tmp_path / "syntax.py").write_text("workers = (\n")
    with pytest.raises(ConfigError, match=r"^syntax\.py line 1: syntax error: "):
        load(tmp_path, config_path="syntax.py")
    (tmp_path / "boom.py").write_text("workers = 2\nraise RuntimeError('nope')\n")
    with pytest.raises(ConfigError) as info:
        load(tmp_path, config_path="boom.py")
    assert str(info.value) == ("boom.py line 2: RuntimeError while running the config file: nope")


def test_toml_errors(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text("workers = \n")
    with pytest.raises(ConfigError, match=r"^bad\.toml: invalid TOML: "):
        load(tmp_path, config_path="bad.toml")
    (tmp_path / "mixed.toml").write_text("workers = 1\n[forkserve]\ntimeout = 2\n")
    with pytest.raises(ConfigError, match="outside the \\[forkserve\\] table"):
        load(tmp_path, config_path="mixed.toml")
    (tmp_path / "conf.ini").write_text("")
    with pytest.raises(ConfigError, match=r"expected a \.py file, a \.toml file or pyproject"):
        load(tmp_path, config_path="conf.ini")


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, config_path="nope.toml")
    assert str(info.value) == f"config file nope.toml: no such file (cwd {tmp_path})"


def test_config_path_from_cli_env_and_cmd_args(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text("workers = 2\n")
    (tmp_path / "b.toml").write_text("workers = 3\n")
    assert load(tmp_path, {"config": "a.toml"}).workers == 2
    assert load(tmp_path, env={"FORKSERVE_CONFIG": "b.toml"}).workers == 3
    assert (
        load(
            tmp_path, env={"FORKSERVE_CMD_ARGS": "-c a.toml", "FORKSERVE_CONFIG": "b.toml"}
        ).workers
        == 2
    )


@pytest.mark.parametrize("name", ACTIONS)
def test_actions_only_from_options(tmp_path: Path, name: str) -> None:
    config = load(tmp_path, env={"FORKSERVE_" + name.upper(): "0.1.0"})
    assert getattr(config, name) is False
    (tmp_path / "a.py").write_text(f"{name} = True\n")
    with pytest.raises(ConfigError, match=f"'{name}' can only be given on the command line"):
        load(tmp_path, config_path="a.py")


def test_config_key_not_allowed_in_files(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text('config = "b.toml"\n')
    with pytest.raises(ConfigError, match="'config' can only be given on the command line"):
        load(tmp_path, config_path="a.toml")


def test_default_files_found_in_cwd_and_chdir(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.forkserve]\nworkers = 2\ntimeout = 5\n")
    (tmp_path / "forkserve.conf.py").write_text("workers = 3\n")
    config = load(tmp_path)
    # forkserve.conf.py is more specific than pyproject.toml
    assert (config.workers, config.timeout) == (3, 5.0)
    sub = tmp_path / "srv"
    sub.mkdir()
    (sub / "pyproject.toml").write_text("[tool.forkserve]\nworkers = 7\n")
    assert load(tmp_path, {"chdir": "srv"}).workers == 7
    # with -c, the default files are not read
    (tmp_path / "x.toml").write_text("")
    assert load(tmp_path, config_path="x.toml").workers == 1


def test_pyproject_without_table_is_fine(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    assert load(tmp_path).workers == 1


def test_pyproject_with_dash_c(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.forkserve]\nworkers = 'x'\n")
    with pytest.raises(ConfigError) as info:
        load(tmp_path, config_path="pyproject.toml")
    assert str(info.value) == (
        'pyproject.toml [tool.forkserve]: workers = "x": expected a positive integer'
    )


def test_hooks_from_python(tmp_path: Path) -> None:
    (tmp_path / "conf.py").write_text(
        "def on_starting(arbiter): pass\n"
        "def when_ready(arbiter): pass\n"
        "def post_fork(arbiter, worker): pass\n"
        "def worker_exit(arbiter, worker, *rest): pass\n"
        "on_exit = lambda arbiter: None\n"
    )
    config = load(tmp_path, config_path="conf.py")
    for name in HOOKS:
        assert callable(getattr(config, name))
        assert config.sources[name] == "config file conf.py"


def test_hook_arity_checked(tmp_path: Path) -> None:
    (tmp_path / "conf.py").write_text("def post_fork(arbiter): pass\n")
    with pytest.raises(ConfigError, match=r"expected a callable taking \(arbiter, worker\)"):
        load(tmp_path, config_path="conf.py")


def test_hooks_not_from_toml_or_env(tmp_path: Path) -> None:
    (tmp_path / "conf.toml").write_text('on_starting = "mod:fn"\n')
    with pytest.raises(ConfigError, match="expected a callable defined in a Python config"):
        load(tmp_path, config_path="conf.toml")
    with pytest.raises(ConfigError, match=r"^environment FORKSERVE_ON_EXIT="):
        load(tmp_path, env={"FORKSERVE_ON_EXIT": "x"})


def test_config_is_immutable_and_picklable(tmp_path: Path) -> None:
    config = load(tmp_path, {"workers": "3"})
    with pytest.raises(AttributeError):
        config.workers = 4
    with pytest.raises(AttributeError, match="did you mean 'workers'"):
        _ = config.wokers
    copy = pickle.loads(pickle.dumps(config))
    assert copy.workers == 3
    assert copy.sources["workers"] == "command line"
    assert "workers" in dir(config)


def test_format_table(tmp_path: Path) -> None:
    config = load(tmp_path, {"workers": "3", "umask": "022"})
    table = config.format_table()
    assert table == load(tmp_path, {"workers": "3", "umask": "022"}).format_table()
    lines = table.splitlines()
    assert lines[0].split() == ["app", "=", "'m:app'"]
    names = [line.split()[0] for line in lines[1:]]
    assert names == sorted(s.name for s in SETTINGS)
    assert "workers                       = 3  # command line" in lines
    assert any(line.startswith("umask ") and "= 0o22  # command line" in line for line in lines)
    assert any(
        line.startswith("bind ") and "['127.0.0.1:8000']  # default" in line for line in lines
    )


def test_effective_threads(tmp_path: Path) -> None:
    assert effective_threads(load(tmp_path)) == 1
    assert effective_threads(load(tmp_path, {"worker_class": "threaded"})) == 4
    assert effective_threads(load(tmp_path), "threaded") == 4
    assert effective_threads(load(tmp_path, {"worker_class": "threaded", "threads": "2"})) == 2
    assert effective_threads(load(tmp_path, {"threads": "1", "worker_class": "threaded"})) == 1


@pytest.mark.parametrize("name", ["forkserve.conf.py", "forkserve.toml"])
def test_example_configs_parse(tmp_path: Path, name: str) -> None:
    config = load_config(
        {}, {}, app="examples.hello_wsgi:app", config_path=str(ROOT / "conf" / name), cwd=str(ROOT)
    )
    touched = [key for key, source in config.sources.items() if source != "default"]
    assert "workers" in touched
    assert "bind" in touched


def test_docs_mention_every_setting() -> None:
    docs = (ROOT / "docs" / "configuration.md").read_text()
    for setting in SETTINGS:
        assert f"`{setting.name}`" in docs, setting.name
        if setting.flags and setting.name not in ACTIONS:
            assert setting.env_var in docs, setting.name
        for flag in setting.flags:
            assert f"`{flag}`" in docs, flag


def test_configuration_docs_are_generated_from_the_table() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "config_docs.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("0", 0),
        ("1048576", 1048576),
        ("512M", 512 * 1024**2),
        ("1.5g", 1536 * 1024**2),
        ("64KiB", 65536),
        (300, 300),
    ],
)
def test_byte_size_accepts_units(raw: Any, expected: int) -> None:
    assert byte_size(raw) == expected


@pytest.mark.parametrize("raw", ["", "-1", "12T", "lots", True, -5])
def test_byte_size_refuses_other_forms(raw: Any) -> None:
    with pytest.raises(ValueError, match="512M"):
        byte_size(raw)


@pytest.mark.parametrize("raw", ["localhost", "unix:/x", "fd://3", "1.2.3.4:99999", ":"])
def test_host_port_needs_a_host_and_port(raw: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        optional_host_port(raw)
