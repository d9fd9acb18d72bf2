"""The import arrows of docs/architecture.md, checked by walking forkserve/ with ast.

Files that do not exist yet are skipped by the walk; every rule applies to
whatever is there.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "forkserve"

THIRD_PARTY_SERVER = {"click", "uvicorn", "h11", "httptools"}
IO_MODULES = {"socket", "threading", "asyncio", "selectors", "signal"}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, relative imports resolved to absolute names."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level > 1:
                    base = base[: -(node.level - 1)]
                prefix = ".".join(base)
                target = f"{prefix}.{node.module}" if node.module else prefix
            else:
                target = node.module or ""
            found.add(target)
            # ``from forkserve import cluster`` imports forkserve.cluster.
            for alias in node.names:
                found.add(f"{target}.{alias.name}")
    return found


def top(name: str) -> str:
    return name.split(".")[0]


def internal(names: set[str]) -> set[str]:
    return {name for name in names if top(name) == "forkserve"}


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def real_modules(names: set[str]) -> set[str]:
    """Drop ``from X import attr`` entries that are attributes, not modules."""
    out = set()
    for name in names:
        parts = name.split(".")
        candidate = PACKAGE.parent.joinpath(*parts)
        is_module = candidate.with_suffix(".py").exists() or (candidate / "__init__.py").exists()
        if is_module or name == "forkserve" or parts[0] != "forkserve":
            out.add(name)
    return out


def files(pattern: str) -> list[Path]:
    return sorted(PACKAGE.glob(pattern))


ALL_FILES = files("**/*.py")


def ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(PACKAGE.parent)) for p in paths]


def test_walk_finds_the_package():
    assert (PACKAGE / "cluster" / "__init__.py") in ALL_FILES


@pytest.mark.parametrize("path", files("cluster/*.py"), ids=ids(files("cluster/*.py")))
def test_cluster_imports_only_itself(path):
    names = real_modules(imports_of(path))
    wrong = {n for n in internal(names) if n != "forkserve" and not within(n, "forkserve.cluster")}
    assert not wrong, f"{path.name} imports {sorted(wrong)}"
    third = {n for n in names if top(n) in THIRD_PARTY_SERVER}
    assert not third, f"{path.name} imports {sorted(third)}"


@pytest.mark.parametrize("path", files("http/*.py"), ids=ids(files("http/*.py")))
def test_http_imports_only_errors(path):
    names = real_modules(imports_of(path))
    wrong = {
        n
        for n in internal(names)
        if n not in ("forkserve", "forkserve.errors") and not within(n, "forkserve.http")
    }
    assert not wrong, f"{path.name} imports {sorted(wrong)}"
    banned = {n for n in names if top(n) in IO_MODULES | {"click", "uvicorn"}}
    assert not banned, f"{path.name} imports {sorted(banned)}"


@pytest.mark.parametrize("path", ALL_FILES, ids=ids(ALL_FILES))
def test_click_only_in_cli(path):
    if path == PACKAGE / "cli.py":
        return
    names = imports_of(path)
    assert not {n for n in names if top(n) == "click"}, f"{path.name} imports click"


@pytest.mark.parametrize("path", ALL_FILES, ids=ids(ALL_FILES))
def test_uvicorn_only_in_asgi_worker(path):
    if path == PACKAGE / "workers" / "asgi.py":
        return
    names = imports_of(path)
    assert not {n for n in names if top(n) == "uvicorn"}, f"{path.name} imports uvicorn"


def test_errors_is_a_leaf():
    path = PACKAGE / "errors.py"
    if not path.exists():
        return
    assert not internal(imports_of(path)), "errors.py imports from forkserve"


def test_log_imports_no_half():
    path = PACKAGE / "log.py"
    if not path.exists():
        return
    names = real_modules(imports_of(path))
    bad = {
        n
        for n in internal(names)
        if any(within(n, f"forkserve.{part}") for part in ("cluster", "http", "workers"))
    }
    assert not bad, f"log.py imports {sorted(bad)}"


def test_import_resolution():
    """The resolver itself: relative imports and ``from pkg import module``."""
    probe = PACKAGE / "cluster" / "primary.py"
    names = imports_of(probe)
    assert "forkserve.cluster.address" in names
    assert "forkserve.cluster.events" in names


LEAVES = (
    "control.py",
    "ctl.py",
    "metrics.py",
    "statsd.py",
    "sideband.py",
    "scoreboard.py",
    "supervision.py",
    "process.py",
)


@pytest.mark.parametrize("name", LEAVES)
def test_seeing_inside_modules_import_no_half(name: str) -> None:
    """The control socket, its client, metrics and statsd know no cluster, HTTP,
    worker or arbiter: the arbiter's ``monitor.py`` wires them."""
    path = PACKAGE / name
    names = real_modules(imports_of(path))
    bad = {
        n
        for n in internal(names)
        if any(
            within(n, f"forkserve.{part}")
            for part in ("cluster", "http", "workers", "arbiter", "monitor", "sockets")
        )
    }
    assert not bad, f"{name} imports {sorted(bad)}"
