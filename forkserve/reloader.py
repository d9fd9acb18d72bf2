"""``--reload``: watch the application's source files and report changes.

Theory of operation
-------------------
The watched set is every ``*.py`` file under the roots (the working
directory after ``--chdir``, and the ``--pythonpath`` entries) plus every
``--reload-extra-file``: a file itself, or every file under a directory.
Hidden files and directories, ``__pycache__``, ``node_modules``,
``site-packages``, ``dist-packages`` and virtualenvs (any directory holding a
``pyvenv.cfg``) are skipped, so installing a package does not restart the
server.

Two engines, both on one daemon thread of the primary:

* ``watchfiles`` (when importable): filesystem notifications, filtered by
  the rules above;
* ``poll`` otherwise: a scan of (mtime, size, inode) of every watched file
  about once a second.

A change is reported once per burst: after the first change the watcher
waits until a scan (or watchfiles' debounce) finds nothing new, so an
editor saving several files (or a file in several writes) gives one
report. The report is ``on_change(paths)``, called on ``loop`` through
``call_soon_threadsafe`` when a loop is given (the arbiter's), else on the
watcher thread. ``FORKSERVE_RELOAD_ENGINE=poll`` (or ``watchfiles``) picks
an engine; ``auto`` (the default) prefers watchfiles.

Imports nothing from forkserve; the arbiter decides what a change means.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from typing import Any

ENGINE_ENV = "FORKSERVE_RELOAD_ENGINE"
ENGINES = ("auto", "watchfiles", "poll")
POLL_INTERVAL = 1.0
# A burst is over once this long passes without a further change.
SETTLE = 0.3
# ... or, for a tree that never stops changing, after this long.
SETTLE_MAX = 3.0
SKIPPED_DIRS = frozenset({"__pycache__", "node_modules", "site-packages", "dist-packages"})

Signature = tuple[int, int, int]  # mtime_ns, size, inode


def reload_roots(cwd: str, pythonpath: Iterable[str] = ()) -> list[str]:
    """The directories to watch: ``cwd`` and ``pythonpath`` (relative to ``cwd``),
    absolute, without duplicates or directories inside another root."""
    roots: list[str] = []
    for entry in [cwd, *pythonpath]:
        path = os.path.realpath(os.path.join(cwd, os.path.expanduser(entry)))
        if not os.path.isdir(path):
            continue
        if any(_inside(path, root) for root in roots):
            continue
        roots = [root for root in roots if not _inside(root, path)]
        roots.append(path)
    return roots


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def skipped_dir(path: str, name: str) -> bool:
    """True for a directory the watcher never enters (see the module docs)."""
    return (
        name.startswith(".")
        or name in SKIPPED_DIRS
        or os.path.exists(os.path.join(path, "pyvenv.cfg"))
    )


def scan(roots: Iterable[str], extra: Iterable[str] = ()) -> dict[str, Signature]:
    """Every watched file now, with its signature."""
    found: dict[str, Signature] = {}
    for root in roots:
        _walk(root, found, every_file=False)
    for path in extra:
        if os.path.isdir(path):
            _walk(path, found, every_file=True)
            continue
        try:
            st = os.stat(path)
        except OSError:
            continue  # not there (yet): its appearance is a change
        found[path] = (st.st_mtime_ns, st.st_size, st.st_ino)
    return found


def _walk(top: str, found: dict[str, Signature], every_file: bool) -> None:
    stack = [top]
    while stack:
        directory = stack.pop()
        try:
            with os.scandir(directory) as entries:
                listed = list(entries)
        except OSError:
            continue
        for entry in listed:
            name = entry.name
            try:
                if entry.is_dir(follow_symlinks=False):
                    if not skipped_dir(entry.path, name):
                        stack.append(entry.path)
                elif (
                    not name.startswith(".")
                    and (every_file or name.endswith(".py"))
                    and entry.is_file()
                ):
                    st = entry.stat()
                    found[entry.path] = (st.st_mtime_ns, st.st_size, st.st_ino)
            except OSError:
                continue  # removed while listing: seen as a removal next scan


def changed_paths(before: dict[str, Signature], after: dict[str, Signature]) -> list[str]:
    """Paths modified, added or removed between two scans, sorted."""
    changed = {path for path, sig in after.items() if before.get(path) != sig}
    changed.update(path for path in before if path not in after)
    return sorted(changed)


def choose_engine(wanted: str | None = None) -> str:
    """``watchfiles`` or ``poll``: ``wanted``, else ``$FORKSERVE_RELOAD_ENGINE``, else auto.

    Raises ValueError for an unknown name or watchfiles asked for but missing.
    """
    name = (wanted or os.environ.get(ENGINE_ENV) or "auto").strip().lower()
    if name not in ENGINES:
        raise ValueError(f"{ENGINE_ENV}={name!r}: expected one of {', '.join(ENGINES)}")
    if name == "poll":
        return name
    try:
        importlib.import_module("watchfiles")
    except ImportError:
        if name == "watchfiles":
            raise ValueError(
                f"{ENGINE_ENV}=watchfiles: the watchfiles package is not installed; "
                "pip install watchfiles, or use poll"
            ) from None
        return "poll"
    return "watchfiles"


class Reloader:
    """Watches ``roots`` and ``extra`` on a daemon thread; see the module docs.

    ``on_change`` gets the changed paths once per burst of changes, never
    while a previous report is being made; nothing is reported after
    ``stop()``.
    """

    def __init__(
        self,
        roots: Sequence[str],
        extra: Sequence[str],
        on_change: Callable[[list[str]], Any],
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        engine: str | None = None,
        interval: float = POLL_INTERVAL,
        settle: float = SETTLE,
    ) -> None:
        self.roots = list(roots)
        self.extra = [os.path.abspath(path) for path in extra]
        self.on_change = on_change
        self.loop = loop
        self.engine = choose_engine(engine)
        self.interval = interval
        self.settle = settle
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._snapshot: dict[str, Signature] = {}

    def start(self) -> None:
        """Start watching; with polling, a change made after this returns is seen."""
        if self.engine == "watchfiles":
            target = self._watch_notified
        else:
            self._snapshot = scan(self.roots, self.extra)
            target = self._poll
        self._thread = threading.Thread(target=target, name="forkserve-reloader", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _report(self, paths: list[str]) -> None:
        if self._stop.is_set() or not paths:
            return
        loop = self.loop
        if loop is None:
            self.on_change(paths)
            return
        try:
            loop.call_soon_threadsafe(self._report_on_loop, paths)
        except RuntimeError:
            self._stop.set()  # the loop is closed: the server is gone

    def _report_on_loop(self, paths: list[str]) -> None:
        if not self._stop.is_set():
            self.on_change(paths)

    # -- poll --------------------------------------------------------------------

    def _poll(self) -> None:
        snapshot = self._snapshot
        while not self._stop.wait(self.interval):
            current = scan(self.roots, self.extra)
            changed = changed_paths(snapshot, current)
            snapshot = current
            if not changed:
                continue
            found = dict.fromkeys(changed)
            deadline = time.monotonic() + SETTLE_MAX
            while time.monotonic() < deadline and not self._stop.wait(self.settle):
                current = scan(self.roots, self.extra)
                more = changed_paths(snapshot, current)
                snapshot = current
                if not more:
                    break
                found.update(dict.fromkeys(more))
            self._report(list(found))

    # -- watchfiles ------------------------------------------------------------

    def _watch_notified(self) -> None:
        import watchfiles

        extra_files = {path for path in self.extra if not os.path.isdir(path)}
        extra_dirs = [path for path in self.extra if os.path.isdir(path)]
        # watchfiles watches existing paths: a missing extra file is watched
        # through its directory.
        watched = {*self.roots, *extra_dirs}
        watched.update(os.path.dirname(path) for path in extra_files)
        watched = {path for path in watched if os.path.isdir(path)}
        wanted = _NotifiedFilter(self.roots, extra_files, extra_dirs)
        for batch in watchfiles.watch(
            *sorted(watched),
            watch_filter=wanted,
            debounce=int(SETTLE_MAX * 1000),
            step=int(self.settle * 1000),
            stop_event=self._stop,
            yield_on_timeout=False,
            raise_interrupt=False,
        ):
            self._report(sorted({path for _change, path in batch}))


class _NotifiedFilter:
    """Which watchfiles events count: the polling engine's rules, per path."""

    def __init__(self, roots: list[str], files: set[str], dirs: list[str]) -> None:
        self.roots = roots
        self.files = files
        self.dirs = dirs

    def __call__(self, change: Any, path: str) -> bool:
        if path in self.files:
            return True
        for top in self.dirs:
            if _inside(path, top):
                return not _hidden_or_skipped(top, path)
        if not path.endswith(".py"):
            return False
        return any(
            _inside(path, root) and not _hidden_or_skipped(root, path) for root in self.roots
        )


def _hidden_or_skipped(top: str, path: str) -> bool:
    """True when ``path`` (under ``top``) is a hidden file or lies in a skipped directory."""
    relative = os.path.relpath(path, top).split(os.sep)
    if relative[-1].startswith("."):
        return True
    directory = top
    for name in relative[:-1]:
        directory = os.path.join(directory, name)
        if _skipped_cached(directory, name):
            return True
    return False


@lru_cache(maxsize=4096)
def _skipped_cached(path: str, name: str) -> bool:
    return skipped_dir(path, name)
