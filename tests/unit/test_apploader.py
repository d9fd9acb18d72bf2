"""Loading APP strings: forms, every error message, WSGI/ASGI detection."""

from __future__ import annotations

import functools
import os
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from forkserve.apploader import (
    asgi2_to_asgi3,
    detect_interface,
    is_asgi2,
    load_app,
    parse_spec,
    pick_worker_class,
)
from forkserve.config import load_config
from forkserve.errors import AppImportError, ConfigError

WSGI = "def app(environ, start_response):\n    return [b'ok']\n"


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, import_state: None) -> Iterator[None]:
    """Run in tmp_path; undo sys.path and sys.modules changes afterwards."""
    monkeypatch.chdir(tmp_path)
    yield


def write(directory: Path, name: str, source: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    return path


def error(spec: str | None, **kwargs: Any) -> str:
    with pytest.raises(AppImportError) as info:
        load_app(spec, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- forms -------------------------------------------------------------------


def test_module_colon_attr(tmp_path: Path) -> None:
    write(tmp_path, "web1.py", WSGI)
    app = load_app("web1:app")
    assert app([], None) == [b"ok"]  # type: ignore[operator]


def test_module_alone_prefers_application(tmp_path: Path) -> None:
    write(tmp_path, "web2.py", WSGI + "application = app\ndef other(e, s): return []\n")
    assert load_app("web2").__name__ == "app"  # type: ignore[attr-defined]
    write(tmp_path, "web3.py", WSGI)
    assert load_app("web3").__name__ == "app"  # type: ignore[attr-defined]


def test_dotted_attribute(tmp_path: Path) -> None:
    write(
        tmp_path,
        "web4.py",
        "class Holder:\n    pass\nholder = Holder()\n" + WSGI + "holder.app = app\n",
    )
    assert load_app("web4:holder.app").__name__ == "app"  # type: ignore[attr-defined]


def test_package_module(tmp_path: Path) -> None:
    write(tmp_path, "pkg5/__init__.py", "")
    write(tmp_path, "pkg5/wsgi.py", WSGI)
    assert callable(load_app("pkg5.wsgi:app"))


def test_factory_call_with_literal_arguments(tmp_path: Path) -> None:
    write(
        tmp_path,
        "web6.py",
        """
        def create(name='x', *, size=0):
            def app(environ, start_response):
                return [f'{name}{size}'.encode()]
            return app
        """,
    )
    assert load_app("web6:create()")({}, None) == [b"x0"]  # type: ignore[operator]
    assert load_app("web6:create('a', size=1)")({}, None) == [b"a1"]  # type: ignore[operator]
    assert load_app("web6:create", factory=True)({}, None) == [b"x0"]  # type: ignore[operator]
    # --factory with an explicit call does not call twice
    assert load_app("web6:create('b')", factory=True)({}, None) == [b"b0"]  # type: ignore[operator]


def test_chdir_and_pythonpath(tmp_path: Path) -> None:
    write(tmp_path, "srv/web7.py", WSGI)
    write(tmp_path, "lib/helper7.py", "VALUE = 7\n")
    write(tmp_path, "srv/web8.py", "import helper7\n" + WSGI)
    assert callable(load_app("web7:app", chdir=str(tmp_path / "srv")))
    assert os.getcwd() == str(tmp_path / "srv")
    assert callable(load_app("web8:app", pythonpath=[str(tmp_path / "lib")]))


@pytest.mark.parametrize(
    ("spec", "module", "attrs", "call", "args", "kwargs"),
    [
        ("m", "m", (), False, (), {}),
        ("a.b:c", "a.b", ("c",), False, (), {}),
        ("m:x.y.z", "m", ("x", "y", "z"), False, (), {}),
        ("m:f()", "m", ("f",), True, (), {}),
        ("m:f(1, 'a', k=[2])", "m", ("f",), True, (1, "a"), {"k": [2]}),
    ],
)
def test_parse_spec(
    spec: str,
    module: str,
    attrs: tuple[str, ...],
    call: bool,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    parsed = parse_spec(spec)
    assert (parsed.module, parsed.attrs, parsed.call, parsed.args, parsed.kwargs) == (
        module,
        attrs,
        call,
        args,
        kwargs,
    )


@pytest.mark.parametrize(
    "spec", ["", ":app", "my-app:app", "m:1", "m:f(x)", "m:a[0]", "m:f(**k)", "m:a b"]
)
def test_invalid_specs(spec: str) -> None:
    with pytest.raises(AppImportError, match=r"^invalid APP"):
        parse_spec(spec)


def test_empty_attribute_means_default() -> None:
    assert parse_spec("m:").attrs == ()


# --- errors ------------------------------------------------------------------


def test_module_not_found(tmp_path: Path) -> None:
    assert error("nosuchmodule9:app") == (
        f"cannot import 'nosuchmodule9' (cwd {tmp_path}): no module named "
        "'nosuchmodule9'; check --chdir or --pythonpath"
    )


def test_submodule_not_found(tmp_path: Path) -> None:
    write(tmp_path, "pkg10/__init__.py", "")
    assert error("pkg10.missing:app").startswith("cannot import 'pkg10.missing' (cwd ")


def test_missing_dependency_names_the_dependency(tmp_path: Path) -> None:
    path = write(tmp_path, "web11.py", "import os\nimport notinstalled11\n" + WSGI)
    message = error("web11:app")
    assert "it imports 'notinstalled11', which is not installed" in message
    assert f"{path}:2" in message
    assert "cannot import 'web11'" not in message


def test_missing_attribute_suggests(tmp_path: Path) -> None:
    write(tmp_path, "web12.py", WSGI)
    assert error("web12:ap") == "module 'web12' has no attribute 'ap'; did you mean 'app'?"
    assert error("web12:zzz") == "module 'web12' has no attribute 'zzz'; check 'web12:zzz'"
    assert error("web12:app.sub") == ("'web12:app' has no attribute 'sub'; check 'web12:app.sub'")


def test_module_without_default_attribute(tmp_path: Path) -> None:
    write(tmp_path, "web13.py", "x = 1\n")
    assert error("web13") == (
        "module 'web13' has no attribute 'application' or 'app'; name the app as 'web13:NAME'"
    )


def test_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, "web14.py", "x = 1\n\ndef app(:\n    pass\n")
    message = error("web14:app")
    assert message.startswith(f"syntax error in {path} line 3: ")


def test_exception_while_importing(tmp_path: Path) -> None:
    path = write(tmp_path, "web15.py", "import json\n\nconfig = {}\nport = config['PORT']\n")
    assert error("web15:app") == (f"error importing 'web15': KeyError: 'PORT' (at {path}:4)")


def test_exception_in_library_names_the_app_frame(tmp_path: Path) -> None:
    path = write(tmp_path, "web16.py", "import json\n\njson.loads('{')\n")
    message = error("web16:app")
    assert message.startswith("error importing 'web16': JSONDecodeError: ")
    assert message.endswith(f"(at {path}:3)")


def test_sys_exit_while_importing(tmp_path: Path) -> None:
    write(tmp_path, "web17.py", "raise SystemExit(3)\n")
    assert error("web17:app").startswith("error importing 'web17': SystemExit: 3")


def test_factory_errors(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "web18.py",
        "def boom():\n    raise ValueError('no db')\ndef nothing():\n    return None\nvalue = 3\n",
    )
    assert error("web18:boom()") == (
        f"factory 'web18:boom()' raised ValueError: no db (at {path}:2)"
    )
    assert error("web18:nothing", factory=True) == (
        "factory 'web18:nothing' returned None; it must return the app"
    )
    assert error("web18:value", factory=True) == "factory 'web18:value' is a int, not callable"
    assert "raised TypeError" in error("web18:boom(1, 2)")


def test_not_an_application(tmp_path: Path) -> None:
    write(tmp_path, "web19.py", "app = 'hello'\n")
    assert error("web19:app") == (
        "'web19:app' is a str, not a WSGI or ASGI application (it must be callable)"
    )


def test_no_app_given() -> None:
    assert error(None) == "no APP given; name the application as module:attr"


def test_bad_chdir_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="check --chdir"):
        load_app("x:app", chdir=str(tmp_path / "nope"))


# --- interface detection -----------------------------------------------------


def wsgi_app(environ: Any, start_response: Any) -> list[bytes]:
    return []


async def asgi_app(scope: Any, receive: Any, send: Any) -> None:
    return None


class AsgiInstance:
    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        return None


class WsgiInstance:
    def __call__(self, environ: Any, start_response: Any) -> list[bytes]:
        return []


class Asgi2:
    def __init__(self, scope: Any) -> None:
        self.scope = scope

    async def __call__(self, receive: Any, send: Any) -> None:
        await send({"type": "seen", "scope": self.scope})


class WsgiClass:
    def __init__(self, environ: Any, start_response: Any) -> None:
        self.environ = environ

    def __iter__(self) -> Iterator[bytes]:
        return iter([])


@pytest.mark.parametrize(
    ("app", "expected"),
    [
        (wsgi_app, "wsgi"),
        (asgi_app, "asgi"),
        (AsgiInstance(), "asgi"),
        (WsgiInstance(), "wsgi"),
        (functools.partial(asgi_app, {}), "asgi"),
        (functools.partial(functools.partial(wsgi_app)), "wsgi"),
        (Asgi2, "asgi"),
        (WsgiClass, "wsgi"),
        (asgi2_to_asgi3(Asgi2), "asgi"),
    ],
)
def test_detect_interface(app: Any, expected: str) -> None:
    assert detect_interface(app, "auto") == expected


def test_interface_override() -> None:
    assert detect_interface(wsgi_app, "asgi") == "asgi"
    assert detect_interface(asgi_app, "wsgi") == "wsgi"


def test_detect_rejects_non_callables() -> None:
    with pytest.raises(AppImportError, match="not a WSGI or ASGI application"):
        detect_interface(42, "auto")


def test_asgi2_is_wrapped(tmp_path: Path) -> None:
    import asyncio

    write(
        tmp_path,
        "web20.py",
        """
        class App:
            def __init__(self, scope):
                self.scope = scope
            async def __call__(self, receive, send):
                await send(self.scope["type"])
        """,
    )
    assert is_asgi2(Asgi2)
    assert not is_asgi2(WsgiClass)
    assert not is_asgi2(AsgiInstance())
    app = load_app("web20:App")
    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def receive() -> Any:
        return {}

    asyncio.run(app({"type": "http"}, receive, send))  # type: ignore[operator]
    assert sent == ["http"]
    assert detect_interface(app, "auto") == "asgi"


# --- worker class ------------------------------------------------------------


def config(**cli: str) -> Any:
    return load_config(cli, {}, app="m:app", cwd=os.getcwd())


def test_pick_worker_class() -> None:
    assert pick_worker_class(config(), "wsgi") == "sync"
    assert pick_worker_class(config(), "asgi") == "asgi"
    assert pick_worker_class(config(threads="4"), "wsgi") == "threaded"
    assert pick_worker_class(config(worker_class="threaded"), "wsgi") == "threaded"
    assert pick_worker_class(config(worker_class="asgi"), "asgi") == "asgi"


def test_pick_worker_class_rejects_mismatch() -> None:
    with pytest.raises(
        ConfigError,
        match="worker class 'sync' cannot serve an ASGI application; use -k auto or -k asgi",
    ):
        pick_worker_class(config(worker_class="sync"), "asgi")
    with pytest.raises(ConfigError, match="worker class 'asgi' cannot serve a WSGI"):
        pick_worker_class(config(worker_class="asgi"), "wsgi")


def test_examples_load(monkeypatch: pytest.MonkeyPatch) -> None:
    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)
    assert detect_interface(load_app("examples.hello_wsgi:app"), "auto") == "wsgi"
    assert detect_interface(load_app("examples.hello_asgi:app"), "auto") == "asgi"
