"""The ``forkserve`` command: options generated from ``config.SETTINGS``.

This is the only module that imports click and the only one that exits the
process. It loads the configuration, answers ``--version``, ``--print-config``
and ``--check-config`` itself, and otherwise hands the configuration to the
arbiter. Errors are printed as one line, ``forkserve: error: <message>``, and
exit with the error's ``exit_code`` (2 for configuration errors, 1 for app
import errors); tracebacks are shown only with ``--log-level debug``.

It must not import ``forkserve.workers``, ``forkserve.cluster`` or
``forkserve.http``; the arbiter is imported only when the server starts.

click is imported only when it has something to do: ``--help``, a command line
with a mistake in it, ``ctl``, or an action (``--version``, ``--print-config``,
``--check-config``). A plain command line that starts a server (APP and known
options with their values) is read straight from the settings table: the
primary forks its workers with everything it has imported, so leaving click
out saves its import time at every start and its memory in every worker.
``command`` and ``ctl_command`` are built on first use.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from forkserve import __version__
from forkserve.apploader import detect_interface, find_app, load_app, pick_worker_class
from forkserve.config import (
    ACTIONS,
    SECTION_TITLES,
    SECTIONS,
    SETTINGS,
    Config,
    Setting,
    effective_threads,
    format_value,
    load_config,
    octal_mode,
)
from forkserve.errors import ForkserveError

if TYPE_CHECKING:
    import click


def _option(setting: Setting) -> click.Option:
    """One click option from one setting; click only collects strings, config.py converts."""
    import click

    help_text = setting.help
    if not setting.is_flag:
        help_text += f"  [default: {_show_default(setting)}]"
    if setting.name not in ACTIONS:
        help_text += f"  [env {setting.env_var}]"
    decls = [*setting.flags, setting.name]
    if setting.is_flag:
        return click.Option(decls, is_flag=True, default=False, help=help_text)
    kind: click.ParamType = click.STRING
    if setting.choices is not None:
        kind = click.Choice(setting.choices, case_sensitive=False)
    return click.Option(
        decls,
        type=kind,
        multiple=setting.multiple,
        default=None,
        metavar=None if setting.choices else setting.metavar,
        help=help_text,
    )


def _show_default(setting: Setting) -> str:
    default = setting.default
    if default is None:
        return "unset"
    if isinstance(default, tuple):
        return ",".join(default) or "none"
    if setting.type is octal_mode:
        return oct(default)
    if isinstance(default, float) and default.is_integer():
        return str(int(default))
    if isinstance(default, str):
        return repr(default) if default == "" else default
    return format_value(default)


def _format_options(
    command: click.Command, ctx: click.Context, formatter: click.HelpFormatter
) -> None:
    """--help with the options grouped by setting section."""
    params = {param.name: param for param in command.get_params(ctx)}
    for section in SECTIONS:
        names = [s.name for s in SETTINGS if s.section == section]
        found = [params.get(name) for name in names]
        if section == "meta":
            found.append(command.get_help_option(ctx))
        rows = []
        for param in found:
            record = param.get_help_record(ctx) if param is not None else None
            if record is not None:
                rows.append(record)
        if rows:
            with formatter.section(f"{SECTION_TITLES.get(section, section)} options"):
                formatter.write_dl(rows)


def _fail(error: ForkserveError, debug: bool) -> NoReturn:
    if debug:
        import traceback

        traceback.print_exception(error)
    print(f"forkserve: error: {error}", file=sys.stderr, flush=True)
    sys.exit(error.exit_code)


def _check(config: Config, app_spec: str) -> str:
    """Import the app as a worker would; return a one-line summary."""
    app = load_app(
        app_spec, factory=config.factory, chdir=config.chdir, pythonpath=config.pythonpath
    )
    interface = detect_interface(app, config.interface)
    worker_class = pick_worker_class(config, interface)
    threads = effective_threads(config, worker_class)
    per_worker = f", {threads} threads each" if worker_class == "threaded" else ""
    return (
        f"config ok: {app_spec} is {interface.upper()}; {config.workers} {worker_class} "
        f"worker(s){per_worker} on {', '.join(config.bind)}"
    )


def _given(values: Mapping[str, Any]) -> dict[str, Any]:
    """The options of the current click invocation that were on the command line."""
    import click
    from click.core import ParameterSource

    ctx = click.get_current_context()
    return {
        name: value
        for name, value in values.items()
        if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE
    }


def _serve(app: str | None, given: Mapping[str, Any]) -> None:
    """Run the command with the options ``given`` on the command line, by setting name."""
    if given.get("version"):
        print(f"forkserve {__version__}")
        return
    level = given.get("loglevel") or os.environ.get("FORKSERVE_LOGLEVEL", "")
    debug = str(level).lower() == "debug"
    # A HUP reads the configuration again from the same command line and
    # environment, relative to the same directory; the config file is re-read.
    environ = dict(os.environ)
    cwd = os.getcwd()

    def reload_config() -> Config:
        return load_config(given, environ, app=app, cwd=cwd)

    try:
        config = reload_config()
    except ForkserveError as error:
        _fail(error, debug)
        return
    if config.version:
        print(f"forkserve {__version__}")
        return
    if config.print_config:
        config.print_table()
        return
    if not app:
        import click  # only through click: a plain command line always names APP

        raise click.UsageError("Missing argument 'APP'.", click.get_current_context())
    try:
        if config.check_config:
            print(_check(config, app))
            return
        # Fail fast on a wrong APP; the app itself is imported by the workers
        # (or by the template process they fork from, with --preload).
        find_app(app, chdir=config.chdir, pythonpath=config.pythonpath)
        from forkserve.arbiter import Arbiter

        code = Arbiter(config, reload_config).run()
    except ForkserveError as error:
        _fail(error, config.loglevel == "debug")
        return
    sys.exit(code)


def _build() -> click.Command:
    import click

    class _Command(click.Command):
        def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
            _format_options(self, ctx, formatter)

    params: list[click.Parameter] = [click.Argument(["app"], required=False, metavar="APP")]
    params += [_option(setting) for setting in SETTINGS if setting.flags]
    return _Command(
        "forkserve",
        params=params,
        callback=lambda app, **values: _serve(app, _given(values)),
        help=(
            "Serve APP, a WSGI or ASGI application named as module:attr "
            "(also module, module:attr.sub, or module:factory(...)), with pre-forked "
            "worker processes.\n\n"
            "Every option can also be set in a config file (-c), as FORKSERVE_<NAME> in the "
            "environment, or in FORKSERVE_CMD_ARGS. The command line wins over "
            "FORKSERVE_CMD_ARGS, which wins over single variables, then the config file.\n\n"
            "To ask a running server (status, stats, scale, reload, stop, dump-stacks): "
            "forkserve ctl --help."
        ),
        context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    )


def _ctl(
    socket_path: str | None,
    pidfile: str | None,
    as_json: bool,
    name: str,
    args: tuple[str, ...],
) -> None:
    import click

    from forkserve import ctl

    if socket_path and pidfile:
        raise click.UsageError("use --socket or --pid, not both")
    try:
        text, code = ctl.run(name, args, socket_path=socket_path, pidfile=pidfile, as_json=as_json)
    except ForkserveError as error:
        click.echo(f"forkserve ctl: error: {error}", err=True)
        sys.exit(error.exit_code)
    click.echo(text)
    sys.exit(code)


def _build_ctl() -> click.Command:
    import click

    return click.Command(
        "ctl",
        params=[
            click.Option(
                ["--socket", "socket_path"],
                metavar="PATH",
                help="The server's control socket (--control-socket).",
            ),
            click.Option(
                ["--pid", "pidfile"],
                metavar="PIDFILE",
                help="The server's --pid file: its control socket is beside it.",
            ),
            click.Option(["--json", "as_json"], is_flag=True, help="Print the raw JSON answer."),
            click.Argument(["name"], metavar="COMMAND"),
            click.Argument(["args"], nargs=-1, metavar="[ARGS]..."),
        ],
        callback=_ctl,
        help=(
            "Ask a running forkserve through its control socket. Without --socket or --pid, "
            "the only server with a socket in the runtime directory "
            "($XDG_RUNTIME_DIR/forkserve, /run/forkserve or /tmp/forkserve-UID).\n\n"
            "\b\nCommands:\n"
            "  status       workers, their state, requests in flight, memory\n"
            "  stats        request counts by method and status, latency, restarts\n"
            "  scale N      run N workers (N >= 1)\n"
            "  reload       replace every worker (as SIGHUP)\n"
            "  stop         graceful stop (as SIGTERM)\n"
            "  dump-stacks  every worker's Python stack (also logged)"
        ),
        context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    )


_BUILDERS = {"command": _build, "ctl_command": _build_ctl}
_BUILT: dict[str, Any] = {}


def __getattr__(name: str) -> Any:
    """``command`` and ``ctl_command`` (click commands), built on first use."""
    if name not in _BUILDERS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _BUILT:
        _BUILT[name] = _BUILDERS[name]()
    return _BUILT[name]


def _plain_command_line(args: Sequence[str]) -> tuple[str, dict[str, Any]] | None:
    """APP and the options given, by setting name, if ``args`` just start a server.

    That is: APP once, and only known options, each with a value that does not
    look like an option and, for a choice, is one of them; no action
    (``--version``, ``--print-config``, ``--check-config``). The values are
    what click would pass on (flags ``True``, repeatable options a tuple).
    Anything else is None: click reads it and owns the messages.
    """
    by_flag = {flag: s for s in SETTINGS for flag in s.flags}
    app: str | None = None
    given: dict[str, Any] = {}
    index = 0
    while index < len(args):
        arg = args[index]
        index += 1
        if not arg.startswith("-") or arg == "-":
            if app is not None:
                return None
            app = arg
            continue
        if arg.startswith("--"):
            flag, equals, value = arg.partition("=")
            inline = bool(equals)
        else:  # -w4 is -w 4, as in click
            flag, value = arg[:2], arg[2:]
            inline = bool(value)
        setting = by_flag.get(flag)
        if setting is None or setting.name in ACTIONS:
            return None
        if setting.is_flag:
            if inline:
                return None
            given[setting.name] = True
            continue
        if not inline:
            if index == len(args) or (args[index].startswith("-") and args[index] != "-"):
                return None
            value = args[index]
            index += 1
        if setting.choices is not None:
            # As click's case-insensitive Choice: the value as the table spells it.
            spelled = [choice for choice in setting.choices if choice.lower() == value.lower()]
            if not spelled:
                return None
            value = spelled[0]
        if setting.multiple:
            given[setting.name] = (*given.get(setting.name, ()), value)
        else:
            given[setting.name] = value
    return (app, given) if app else None


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command line with ``argv`` (``sys.argv[1:]`` by default); exits.

    ``forkserve ctl ...`` is the control client; anything else serves an app
    (an app module named ``ctl`` is served as ``ctl:app``).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["ctl"]:
        _build_ctl().main(args=args[1:], prog_name="forkserve ctl")
        return
    plain = _plain_command_line(args)
    if plain is None:
        _build().main(args=args, prog_name="forkserve")
        return
    try:
        _serve(*plain)
    except KeyboardInterrupt:  # as click does, before the arbiter handles SIGINT itself
        print("\nAborted!", file=sys.stderr)
        sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":
    main()
