"""The ``forkserve`` command: options generated from ``config.SETTINGS``.

This is the only module that imports click and the only one that exits the
process. It loads the configuration, answers ``--version``, ``--print-config``
and ``--check-config`` itself, and otherwise hands the configuration to the
arbiter. Errors are printed as one line, ``forkserve: error: <message>``, and
exit with the error's ``exit_code`` (2 for configuration errors, 1 for app
import errors); tracebacks are shown only with ``--log-level debug``.

It must not import ``forkserve.workers``, ``forkserve.cluster`` or
``forkserve.http``; the arbiter is imported only when the server starts.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import click
from click.core import ParameterSource

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


def _option(setting: Setting) -> click.Option:
    """One click option from one setting; click only collects strings, config.py converts."""
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


class _Command(click.Command):
    """A command whose --help groups the options by setting section."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        params = {param.name: param for param in self.get_params(ctx)}
        for section in SECTIONS:
            names = [s.name for s in SETTINGS if s.section == section]
            found = [params.get(name) for name in names]
            if section == "meta":
                found.append(self.get_help_option(ctx))
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
        traceback.print_exception(error)
    click.echo(f"forkserve: error: {error}", err=True)
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


def _serve(app: str | None, values: Mapping[str, Any]) -> None:
    ctx = click.get_current_context()
    given = {
        name: value
        for name, value in values.items()
        if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE
    }
    if given.get("version"):
        click.echo(f"forkserve {__version__}")
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
        click.echo(f"forkserve {__version__}")
        return
    if config.print_config:
        config.print_table()
        return
    if not app:
        raise click.UsageError("Missing argument 'APP'.", ctx)
    try:
        if config.check_config:
            click.echo(_check(config, app))
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
    params: list[click.Parameter] = [click.Argument(["app"], required=False, metavar="APP")]
    params += [_option(setting) for setting in SETTINGS if setting.flags]
    return _Command(
        "forkserve",
        params=params,
        callback=lambda app, **values: _serve(app, values),
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


command = _build()


def _ctl(
    socket_path: str | None,
    pidfile: str | None,
    as_json: bool,
    name: str,
    args: tuple[str, ...],
) -> None:
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


ctl_command = click.Command(
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


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command line with ``argv`` (``sys.argv[1:]`` by default); exits.

    ``forkserve ctl ...`` is the control client; anything else serves an app
    (an app module named ``ctl`` is served as ``ctl:app``).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["ctl"]:
        ctl_command.main(args=args[1:], prog_name="forkserve ctl")
        return
    command.main(args=args, prog_name="forkserve")


if __name__ == "__main__":
    main()
