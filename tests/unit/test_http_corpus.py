"""Runs tests/requests/{valid,invalid}/*.http on both parser backends."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from http_helpers import BACKENDS, messages, parse_all

from forkserve.http.parser import ParserLimits

CORPUS = Path(__file__).resolve().parent.parent / "requests"
VALID = sorted((CORPUS / "valid").glob("*.http"))
INVALID = sorted((CORPUS / "invalid").glob("*.http"))


def _load(path: Path) -> tuple[bytes, dict]:
    expected = json.loads(path.with_suffix(".json").read_text())
    return path.read_bytes(), expected


def test_corpus_is_large_enough() -> None:
    assert len(INVALID) >= 40
    assert len(VALID) >= 10


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_request(path: Path, backend: str) -> None:
    data, expected = _load(path)
    limits = ParserLimits(**expected.get("limits", {}))
    for step in (None, 1):
        events = parse_all(backend, data, step=step, limits=limits)
        assert events[-1] == ("error", expected["status"]), (step, events)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_valid_request(path: Path, backend: str) -> None:
    data, expected = _load(path)
    for step in (None, 1, 7):
        events = parse_all(backend, data, step=step)
        assert not any(type(e) is tuple for e in events), events  # no ("error", status)
        got = messages(events)
        assert len(got) == len(expected["requests"])
        for (request, body), want in zip(got, expected["requests"], strict=True):
            assert request.method.decode("latin-1") == want["method"]
            assert request.target.decode("latin-1") == want["target"]
            assert request.http_version.decode() == want["version"]
            assert [[n.decode("latin-1"), v.decode("latin-1")] for n, v in request.headers] == (
                want["headers"]
            )
            assert body.decode("latin-1") == want["body"]
            assert request.keep_alive is want["keep_alive"]
