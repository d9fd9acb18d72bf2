"""Fixtures for unit tests that import applications in-process."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest


@pytest.fixture
def import_state() -> Iterator[None]:
    """Undo what importing an app did to ``sys.path`` and ``sys.modules``."""
    path = list(sys.path)
    modules = set(sys.modules)
    yield
    sys.path[:] = path
    for name in set(sys.modules) - modules:
        del sys.modules[name]
