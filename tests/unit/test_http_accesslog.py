"""Access log atoms and escaping."""

from __future__ import annotations

import base64
import time
from typing import Any

import pytest

from forkserve.http.accesslog import DEFAULT_FORMAT, AccessRecord, escape, format_access


def record(**overrides: Any) -> AccessRecord:
    fields: dict[str, Any] = {
        "method": "GET",
        "target": "/path/x?a=1&b=2",
        "http_version": "1.1",
        "status": 200,
        "bytes_sent": 1234,
        "request_headers": [
            ("Host", "example.com"),
            ("User-Agent", "curl/8"),
            ("Referer", "http://ref/"),
            ("X-Multi", "a"),
            ("x-multi", "b"),
        ],
        "response_headers": [("Content-Type", "text/html")],
        "start_time": 1_700_000_000.0,
        "duration": 1.5,
        "client": "192.0.2.1",
        "pid": 4121,
        "worker_id": 3,
        "queued_ms": 0.25,
        "environ": {"SCRIPT_NAME": "/app"},
    }
    fields.update(overrides)
    return AccessRecord(**fields)


def test_default_format() -> None:
    line = format_access(DEFAULT_FORMAT, record())
    stamp = time.strftime("[%d/%b/%Y:%H:%M:%S %z]", time.localtime(1_700_000_000.0))
    assert line == (
        f'192.0.2.1 - - {stamp} "GET /path/x?a=1&b=2 HTTP/1.1" 200 1234 "http://ref/" "curl/8"'
    )


@pytest.mark.parametrize(
    ("atom", "expected"),
    [
        ("h", "192.0.2.1"),
        ("l", "-"),
        ("u", "-"),
        ("r", "GET /path/x?a=1&b=2 HTTP/1.1"),
        ("m", "GET"),
        ("U", "/path/x"),
        ("q", "a=1&b=2"),
        ("H", "HTTP/1.1"),
        ("s", "200"),
        ("B", "1234"),
        ("b", "1234"),
        ("f", "http://ref/"),
        ("a", "curl/8"),
        ("T", "1"),
        ("D", "1500000"),
        ("M", "1500"),
        ("L", "1.500000"),
        ("p", "<4121>"),
        ("W", "3"),
        ("Q", "0.250"),
        ("{host}i", "example.com"),
        ("{X-MULTI}i", "a, b"),
        ("{content-type}o", "text/html"),
        ("{missing}i", "-"),
        ("{SCRIPT_NAME}e", "/app"),
        ("{nothing}e", "-"),
        ("nope", "-"),
    ],
)
def test_atoms(atom: str, expected: str) -> None:
    assert format_access(f"%({atom})s", record()) == expected


def test_zero_bytes_and_missing_optional_fields() -> None:
    r = record(bytes_sent=0, worker_id=None, queued_ms=None, request_headers=[])
    assert format_access("%(b)s %(B)s %(W)s %(Q)s %(f)s %(a)s", r) == "- 0 - - - -"


def test_basic_auth_user() -> None:
    token = base64.b64encode(b"alice:secret").decode()
    r = record(request_headers=[("Authorization", f"Basic {token}")])
    assert format_access("%(u)s", r) == "alice"
    assert "secret" not in format_access(DEFAULT_FORMAT, r)


@pytest.mark.parametrize(
    ("value", "escaped"),
    [
        ("plain", "plain"),
        ("a\nb", "a\\x0ab"),
        ("a\r\nFAKE 200", "a\\x0d\\x0aFAKE 200"),
        ('say "hi"', "say \\x22hi\\x22"),
        ("back\\slash", "back\\x5cslash"),
        ("nul\x00del\x7f", "nul\\x00del\\x7f"),
        ("c1\x85", "c1\\x85"),
        ("caf\u00e9", "caf\u00e9"),
        ("\u2028sep", "\\u2028sep"),
    ],
)
def test_escape(value: str, escaped: str) -> None:
    assert escape(value) == escaped


def test_client_cannot_inject_a_log_line() -> None:
    r = record(
        target='/x"\n127.0.0.1 - - [x] "GET /admin HTTP/1.1" 200',
        request_headers=[("User-Agent", "evil\r\nline2"), ("Referer", '"')],
    )
    line = format_access(DEFAULT_FORMAT, r)
    assert "\n" not in line and "\r" not in line
    # exactly the six quotes of the format itself
    assert line.count('"') == 6
