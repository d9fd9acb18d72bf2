"""Import the application named by APP and tell WSGI from ASGI.

``load_app("module:attr")`` imports the module and resolves the attribute
(``module:attr.sub``, ``module`` alone for ``application``/``app``, or a
factory call ``module:create_app('a', x=1)`` with literal arguments). Every
failure is an ``AppImportError`` with a one-line message naming the cause and
the file and line in the application when there is one.

This module must not import click, ``forkserve.arbiter``, ``forkserve.workers``,
``forkserve.cluster`` or ``forkserve.http``.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import inspect
import os
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from forkserve.errors import AppImportError, ConfigError

if TYPE_CHECKING:
    from forkserve.config import Config

Interface = Literal["wsgi", "asgi"]
_DEFAULT_ATTRS = ("application", "app")


_NO_KWARGS: Mapping[str, Any] = MappingProxyType({})


class AppSpec(NamedTuple):
    """A parsed APP string: ``module``, the attribute path, and an optional call."""

    module: str
    attrs: tuple[str, ...]
    call: bool = False
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = _NO_KWARGS


def parse_spec(spec: str) -> AppSpec:
    """Parse ``module[:attr[.sub][(literal args)]]``; raise ``AppImportError`` if malformed."""
    expected = (
        f"invalid APP {spec!r}: expected module:attr, module:attr.sub, module, "
        "or module:factory(...) with literal arguments"
    )
    module, _, expr = spec.strip().partition(":")
    if not module or not all(part.isidentifier() for part in module.split(".")):
        raise AppImportError(expected)
    if not expr:
        return AppSpec(module, ())
    try:
        node = ast.parse(expr.strip(), mode="eval").body
    except SyntaxError:
        raise AppImportError(expected) from None
    call = isinstance(node, ast.Call)
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = {}
    if isinstance(node, ast.Call):
        try:
            args = tuple(ast.literal_eval(arg) for arg in node.args)
            kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg}
        except ValueError:
            raise AppImportError(f"{expected}; arguments must be Python literals") from None
        if len(kwargs) != len(node.keywords):
            raise AppImportError(expected)
        node = node.func
    attrs: list[str] = []
    while isinstance(node, ast.Attribute):
        attrs.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        raise AppImportError(expected)
    attrs.append(node.id)
    return AppSpec(module, tuple(reversed(attrs)), call, args, kwargs)


def _prepare_path(chdir: str | None, pythonpath: Sequence[str]) -> None:
    if chdir:
        try:
            os.chdir(chdir)
        except OSError as exc:
            raise ConfigError(f"chdir {chdir}: {exc.strerror}; check --chdir") from None
    cwd = os.getcwd()
    # A console script has its own directory, not the cwd, in sys.path[0].
    for entry in [cwd, *reversed([os.path.abspath(p) for p in pythonpath])]:
        if entry in sys.path:
            sys.path.remove(entry)
        sys.path.insert(0, entry)


def _app_frame(exc: BaseException, root: str | None) -> str:
    """``file:line`` of the innermost frame in the app, else the innermost real frame."""
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not f.filename.startswith("<frozen") and "importlib" not in f.filename
    ]
    if root:
        in_app = [f for f in frames if os.path.abspath(f.filename).startswith(root + os.sep)]
        if in_app:
            frames = in_app
    if not frames:
        return ""
    return f"{frames[-1].filename}:{frames[-1].lineno}"


def _module_root(module: str) -> str | None:
    """The directory holding the app's top-level package, to tell app frames apart."""
    try:
        spec = importlib.util.find_spec(module.split(".")[0])
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not os.path.isabs(spec.origin):
        return None
    origin = os.path.dirname(spec.origin)
    return os.path.dirname(origin) if spec.submodule_search_locations else origin


def _import(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing == module or module.startswith(missing + "."):
            raise AppImportError(
                f"cannot import {module!r} (cwd {os.getcwd()}): no module named {missing!r}; "
                "check --chdir or --pythonpath"
            ) from None
        where = _app_frame(exc, _module_root(module))
        raise AppImportError(
            f"error importing {module!r}: it imports {missing!r}, which is not installed "
            f"(at {where}); install it or check --pythonpath"
        ) from None
    except SyntaxError as exc:
        detail = (exc.text or "").strip()
        raise AppImportError(
            f"syntax error in {exc.filename} line {exc.lineno}: {exc.msg}"
            + (f": {detail}" if detail else "")
        ) from None
    except (Exception, SystemExit) as exc:
        where = _app_frame(exc, _module_root(module))
        raise AppImportError(
            f"error importing {module!r}: {type(exc).__name__}: {exc} (at {where})"
        ) from None


def _resolve(module: Any, spec: AppSpec, display: str) -> Any:
    if not spec.attrs:
        for name in _DEFAULT_ATTRS:
            if hasattr(module, name):
                return getattr(module, name)
        raise AppImportError(
            f"module {spec.module!r} has no attribute 'application' or 'app'; "
            f"name the app as '{spec.module}:NAME'"
        )
    target: Any = module
    for index, name in enumerate(spec.attrs):
        if not hasattr(target, name):
            import difflib  # only on this error path: workers need not inherit it

            names = [n for n in dir(target) if not n.startswith("_")]
            close = difflib.get_close_matches(name, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; check {display!r}"
            if index == 0:
                owner = f"module {spec.module!r}"
            else:
                owner = f"'{spec.module}:{'.'.join(spec.attrs[:index])}'"
            raise AppImportError(f"{owner} has no attribute {name!r}{hint}")
        target = getattr(target, name)
    return target


def _call_factory(factory: Any, spec: AppSpec, display: str) -> Any:
    if not callable(factory):
        raise AppImportError(f"factory {display!r} is a {type(factory).__name__}, not callable")
    try:
        app = factory(*spec.args, **spec.kwargs)
    except Exception as exc:
        where = _app_frame(exc, _module_root(spec.module))
        raise AppImportError(
            f"factory {display!r} raised {type(exc).__name__}: {exc} (at {where})"
        ) from None
    if app is None:
        raise AppImportError(f"factory {display!r} returned None; it must return the app")
    return app


def find_app(spec: str, *, chdir: str | None = None, pythonpath: Sequence[str] = ()) -> None:
    """Check that APP's module can be found, without running it (parent packages are
    imported). Prepares the path like ``load_app``; raises ``AppImportError``."""
    parsed = parse_spec(spec)
    _prepare_path(chdir, pythonpath)
    try:
        found = importlib.util.find_spec(parsed.module)
    except ModuleNotFoundError:
        found = None
    except (Exception, SystemExit):
        _import(parsed.module)  # raises the same message an import would
        return
    if found is None:
        raise AppImportError(
            f"cannot import {parsed.module!r} (cwd {os.getcwd()}): no module named "
            f"{parsed.module!r}; check --chdir or --pythonpath"
        )


def load_app(
    spec: str | None,
    *,
    factory: bool = False,
    chdir: str | None = None,
    pythonpath: Sequence[str] = (),
) -> object:
    """Import and return the application; ASGI2 classes come back wrapped as ASGI3.

    Changes the working directory to ``chdir`` and puts it (and ``pythonpath``)
    first on ``sys.path``. Raises ``AppImportError`` with a one-line message,
    also when ``spec`` is None (no APP given).
    """
    if not spec:
        raise AppImportError("no APP given; name the application as module:attr")
    parsed = parse_spec(spec)
    _prepare_path(chdir, pythonpath)
    module = _import(parsed.module)
    target = _resolve(module, parsed, spec)
    if parsed.call or factory:
        target = _call_factory(target, parsed, spec)
    if not callable(target):
        raise AppImportError(
            f"{spec!r} is a {type(target).__name__}, not a WSGI or ASGI application "
            "(it must be callable)"
        )
    if is_asgi2(target):
        return asgi2_to_asgi3(target)
    return target


def _unwrap(app: Any) -> Any:
    while isinstance(app, functools.partial):
        app = app.func
    return app


def is_asgi2(app: Any) -> bool:
    """True for an ASGI2 application: a class built with ``scope`` whose instances
    are awaited with ``(receive, send)``."""
    app = _unwrap(app)
    if not inspect.isclass(app):
        return False
    return inspect.iscoroutinefunction(inspect.getattr_static(app, "__call__", None))


def asgi2_to_asgi3(app: Any) -> Callable[..., Any]:
    """Wrap an ASGI2 class as an ASGI3 coroutine function."""

    async def asgi3(scope: Any, receive: Any, send: Any) -> None:
        instance = app(scope)
        await instance(receive, send)

    asgi3.__qualname__ = f"asgi2_to_asgi3({getattr(app, '__qualname__', app)!r})"
    return asgi3


def detect_interface(app: object, interface: str = "auto") -> Interface:
    """``"asgi"`` if asked for or if the app (or its ``__call__``) is a coroutine
    function, or an ASGI2 class; otherwise ``"wsgi"``. Raises ``AppImportError``
    if the app is not callable."""
    if not callable(app):
        raise AppImportError(
            f"{type(app).__name__} object is not a WSGI or ASGI application (it must be callable)"
        )
    if interface == "asgi":
        return "asgi"
    if interface == "wsgi":
        return "wsgi"
    target = _unwrap(app)
    if inspect.iscoroutinefunction(target) or is_asgi2(target):
        return "asgi"
    if not inspect.isclass(target) and not inspect.isroutine(target):
        call = _unwrap(type(target).__call__)
        if inspect.iscoroutinefunction(call):
            return "asgi"
    return "wsgi"


_COMPATIBLE = {"sync": "wsgi", "threaded": "wsgi", "asgi": "asgi"}


def pick_worker_class(config: Config, interface: str) -> str:
    """The worker class for an app of ``interface``: ``config.worker_class`` unless
    ``auto`` (asgi for ASGI, threaded when ``threads`` > 1, else sync). Raises
    ``ConfigError`` when an explicit class cannot serve the interface."""
    chosen = str(config.worker_class)
    if chosen == "auto":
        if interface == "asgi":
            return "asgi"
        return "threaded" if int(config.threads) > 1 else "sync"
    if _COMPATIBLE.get(chosen) != interface:
        article = "an" if interface == "asgi" else "a"
        raise ConfigError(
            f"worker class {chosen!r} cannot serve {article} {interface.upper()} application; "
            f"use -k auto or -k {'asgi' if interface == 'asgi' else 'sync'}, "
            "or set --interface"
        )
    return chosen
