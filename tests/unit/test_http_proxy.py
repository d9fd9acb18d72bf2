"""Trusted proxy headers."""

from __future__ import annotations

from typing import Any

import pytest

from forkserve.http.proxy import TrustedProxies, apply_forwarded


def env(**headers: str) -> dict[str, Any]:
    base: dict[str, Any] = {"REMOTE_ADDR": "10.0.0.5", "wsgi.url_scheme": "http"}
    base.update(headers)
    return base


def test_trusted_sets() -> None:
    trusted = TrustedProxies(["127.0.0.1", "10.0.0.0/8", "::1", "fd00::/8"])
    assert "127.0.0.1" in trusted and "10.20.30.40" in trusted
    assert "::1" in trusted and "fd00::5" in trusted and "0:0:0:0:0:0:0:1" in trusted
    assert "11.0.0.1" not in trusted and "" not in trusted and "garbage" not in trusted
    assert "1.2.3.4" in TrustedProxies(["*"])


def test_untrusted_peer_changes_nothing() -> None:
    e = env(HTTP_X_FORWARDED_FOR="1.1.1.1", HTTP_X_FORWARDED_PROTO="https")
    apply_forwarded(e, "10.0.0.5", TrustedProxies(["127.0.0.1"]))
    assert (e["REMOTE_ADDR"], e["wsgi.url_scheme"]) == ("10.0.0.5", "http")


def test_rightmost_untrusted_is_the_client() -> None:
    e = env(HTTP_X_FORWARDED_FOR="6.6.6.6, 203.0.113.4, 10.0.0.9")
    apply_forwarded(e, "10.0.0.5", TrustedProxies(["10.0.0.0/8"]))
    assert e["REMOTE_ADDR"] == "203.0.113.4"


@pytest.mark.parametrize(
    ("value", "addr", "scheme"),
    [
        ("for=192.0.2.60;proto=https;by=203.0.113.43", "192.0.2.60", "https"),
        ('for="[2001:db8:cafe::17]:4711";proto=https', "2001:db8:cafe::17", "https"),
        ("for=198.51.100.1:80, for=192.0.2.43", "192.0.2.43", "http"),
        ("for=unknown", "unknown", "http"),
        ("proto=ftp", "10.0.0.5", "http"),
    ],
)
def test_rfc7239_forwarded(value: str, addr: str, scheme: str) -> None:
    e = env(HTTP_FORWARDED=value, HTTP_X_FORWARDED_FOR="9.9.9.9")
    apply_forwarded(e, "10.0.0.5", TrustedProxies(["10.0.0.5"]))
    assert (e["REMOTE_ADDR"], e["wsgi.url_scheme"]) == (addr, scheme)


def test_no_peer_ip_unix_socket_trusted_only_with_star() -> None:
    e = env(HTTP_X_FORWARDED_FOR="1.1.1.1")
    apply_forwarded(e, None, TrustedProxies(["127.0.0.1"]))
    assert e["REMOTE_ADDR"] == "10.0.0.5"
    apply_forwarded(e, None, TrustedProxies(["*"]))
    assert e["REMOTE_ADDR"] == "1.1.1.1"
