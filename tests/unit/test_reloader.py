"""The --reload watcher: what it watches, what it skips, one report per burst.

The polling engine is forced, so these tests do not depend on watchfiles
being installed; the watcher thread polls every 50 ms here.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from forkserve import reloader
from forkserve.reloader import Reloader, changed_paths, choose_engine, reload_roots, scan

INTERVAL = 0.05
SETTLE = 0.15


class Reports:
    """Collects what the watcher reports, from its thread."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self._lock = threading.Lock()
        self._event = threading.Event()

    def __call__(self, paths: list[str]) -> None:
        with self._lock:
            self.calls.append(paths)
        self._event.set()

    def wait(self, timeout: float) -> bool:
        """True once a report came within ``timeout`` (bounded wait)."""
        found = self._event.wait(timeout)
        self._event.clear()
        return found


@pytest.fixture
def watch(tmp_path: Path):
    started: list[Reloader] = []

    def start(*extra: Path, roots: tuple[Path, ...] = (tmp_path,)) -> Reports:
        reports = Reports()
        watcher = Reloader(
            [str(r) for r in roots],
            [str(e) for e in extra],
            reports,
            engine="poll",
            interval=INTERVAL,
            settle=SETTLE,
        )
        watcher.start()
        started.append(watcher)
        return reports

    yield start
    for watcher in started:
        watcher.stop()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_change_to_a_py_file_is_reported_once(tmp_path: Path, watch) -> None:
    module = write(tmp_path / "app.py", "VERSION = 1\n")
    reports = watch()
    assert not reports.wait(3 * INTERVAL), "nothing changed yet"
    write(module, "VERSION = 2  # changed\n")
    assert reports.wait(5)
    assert not reports.wait(4 * SETTLE), "one report for one change"
    assert reports.calls == [[str(module)]]


def test_a_burst_of_changes_is_one_report(tmp_path: Path, watch) -> None:
    files = [write(tmp_path / "pkg" / f"m{n}.py", "x = 1\n") for n in range(4)]
    reports = watch()
    assert not reports.wait(3 * INTERVAL)
    pause = threading.Event()
    for index, path in enumerate(files):
        write(path, f"x = {index + 10}  # saved\n")
        pause.wait(SETTLE / 3)  # an editor writing files one after another
    assert reports.wait(5)
    assert not reports.wait(4 * SETTLE)
    assert len(reports.calls) == 1
    assert sorted(reports.calls[0]) == sorted(str(p) for p in files)


def test_added_and_removed_files_count(tmp_path: Path, watch) -> None:
    old = write(tmp_path / "old.py", "x = 1\n")
    reports = watch()
    assert not reports.wait(3 * INTERVAL)
    new = write(tmp_path / "new.py", "y = 1\n")
    old.unlink()
    assert reports.wait(5)
    assert sorted(reports.calls[0]) == sorted([str(new), str(old)])


SKIPPED = [
    ".hidden/mod.py",
    ".venv/lib/mod.py",
    "env/lib/mod.py",  # a virtualenv by its pyvenv.cfg
    "__pycache__/mod.py",
    "node_modules/pkg/mod.py",
    "lib/site-packages/pkg/mod.py",
    "lib/dist-packages/pkg/mod.py",
    ".#app.py",  # an editor's lock file
    "notes.txt",
    "template.html",
]


def test_ignored_directories_and_files_are_not_watched(tmp_path: Path, watch) -> None:
    write(tmp_path / "env" / "pyvenv.cfg", "home = /usr\n")
    ignored = [write(tmp_path / rel, "x = 1\n") for rel in SKIPPED]
    module = write(tmp_path / "app.py", "x = 1\n")
    reports = watch()
    assert not reports.wait(3 * INTERVAL)
    for path in ignored:
        write(path, "x = 2  # changed\n")
    assert not reports.wait(INTERVAL * 4 + SETTLE * 2), reports.calls
    write(module, "x = 2  # changed\n")
    assert reports.wait(5)
    assert reports.calls == [[str(module)]]


def test_extra_files_and_directories_are_watched_whatever_their_name(tmp_path: Path, watch) -> None:
    config = write(tmp_path / "outside" / "settings.toml", "a = 1\n")
    templates = tmp_path / "outside" / "templates"
    page = write(templates / "page.html", "<p>1</p>\n")
    reports = watch(config, templates, roots=(tmp_path / "src",))
    assert not reports.wait(3 * INTERVAL)
    write(config, "a = 2\n")
    assert reports.wait(5)
    write(page, "<p>2</p>\n")
    assert reports.wait(5)
    assert reports.calls == [[str(config)], [str(page)]]


def test_a_missing_extra_file_appearing_is_a_change(tmp_path: Path, watch) -> None:
    later = tmp_path / "later.cfg"
    reports = watch(later)
    assert not reports.wait(3 * INTERVAL)
    write(later, "now\n")
    assert reports.wait(5)
    assert reports.calls == [[str(later)]]


def test_reports_go_to_the_loop_thread_when_given(tmp_path: Path) -> None:
    module = write(tmp_path / "app.py", "x = 1\n")
    loop = asyncio.new_event_loop()
    seen: list[tuple[list[str], bool]] = []

    def on_change(paths: list[str]) -> None:
        seen.append((paths, threading.current_thread() is threading.main_thread()))
        loop.stop()

    watcher = Reloader(
        [str(tmp_path)], [], on_change, loop=loop, engine="poll", interval=INTERVAL, settle=SETTLE
    )
    watcher.start()
    try:
        write(module, "x = 2  # changed\n")
        loop.call_later(5, loop.stop)  # bounded
        loop.run_forever()
    finally:
        watcher.stop()
        loop.close()
    assert seen == [([str(module)], True)]


def test_nothing_is_reported_after_stop(tmp_path: Path) -> None:
    module = write(tmp_path / "app.py", "x = 1\n")
    reports = Reports()
    watcher = Reloader(
        [str(tmp_path)], [], reports, engine="poll", interval=INTERVAL, settle=SETTLE
    )
    watcher.start()
    watcher.stop()
    write(module, "x = 2  # changed\n")
    assert not reports.wait(INTERVAL * 4 + SETTLE * 2)


# -- pure parts -------------------------------------------------------------------------


def test_scan_and_changed_paths(tmp_path: Path) -> None:
    a = write(tmp_path / "a.py", "a\n")
    b = write(tmp_path / "sub" / "b.py", "b\n")
    before = scan([str(tmp_path)])
    assert sorted(before) == sorted([str(a), str(b)])
    write(a, "a changed\n")
    b.unlink()
    c = write(tmp_path / "c.py", "c\n")
    assert changed_paths(before, scan([str(tmp_path)])) == sorted([str(a), str(b), str(c)])


def test_roots_are_absolute_without_duplicates_or_nesting(tmp_path: Path) -> None:
    (tmp_path / "lib").mkdir()
    (tmp_path / "other").mkdir()
    cwd = str(tmp_path)
    roots = reload_roots(cwd, ["lib", str(tmp_path / "other"), "missing", cwd])
    assert roots == [str(tmp_path.resolve())]
    inner = tmp_path / "app"
    inner.mkdir()
    assert reload_roots(str(inner), [str(tmp_path / "lib")]) == [
        str(inner.resolve()),
        str((tmp_path / "lib").resolve()),
    ]


def test_engine_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(reloader.ENGINE_ENV, "poll")
    assert choose_engine() == "poll"
    assert choose_engine("poll") == "poll"
    monkeypatch.setenv(reloader.ENGINE_ENV, "inotify")
    with pytest.raises(ValueError, match="FORKSERVE_RELOAD_ENGINE='inotify'"):
        choose_engine()
    monkeypatch.delenv(reloader.ENGINE_ENV)
    try:
        import watchfiles  # noqa: F401
    except ImportError:
        assert choose_engine() == "poll"
        with pytest.raises(ValueError, match="pip install watchfiles"):
            choose_engine("watchfiles")
    else:
        assert choose_engine() == "watchfiles"


def test_skipped_dir_rules(tmp_path: Path) -> None:
    venv = tmp_path / "myenv"
    write(venv / "pyvenv.cfg", "home = /usr\n")
    assert reloader.skipped_dir(str(venv), "myenv")
    assert reloader.skipped_dir(str(tmp_path / ".git"), ".git")
    assert reloader.skipped_dir(str(tmp_path / "__pycache__"), "__pycache__")
    assert not reloader.skipped_dir(str(tmp_path / "pkg"), "pkg")
    assert os.path.isdir(venv)


def test_the_watchfiles_filter_follows_the_polling_rules(tmp_path: Path) -> None:
    root = tmp_path / "app"
    write(root / "env" / "pyvenv.cfg", "home = /usr\n")
    extra_dir = tmp_path / "templates"
    extra_file = tmp_path / "settings.toml"
    wanted = reloader._NotifiedFilter([str(root)], {str(extra_file)}, [str(extra_dir)])
    change = object()  # watchfiles' Change member; the filter does not look at it
    assert wanted(change, str(root / "app.py"))
    assert wanted(change, str(root / "pkg" / "mod.py"))
    assert wanted(change, str(extra_file))
    assert wanted(change, str(extra_dir / "page.html"))
    for rel in SKIPPED:
        assert not wanted(change, str(root / rel)), rel
    assert not wanted(change, str(tmp_path / "elsewhere.py"))
    assert not wanted(change, str(extra_dir / ".page.html.swp"))


def test_the_reloader_imports_nothing_from_forkserve() -> None:
    from test_layers import PACKAGE, imports_of, internal

    assert not internal(imports_of(PACKAGE / "reloader.py"))
