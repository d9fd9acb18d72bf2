"""Proxy headers: X-Forwarded-For, X-Forwarded-Proto and RFC 7239 Forwarded.

They are honoured only when the direct peer is a trusted proxy, since any
client can send them. This module must not import sockets, threads, signals,
selectors, asyncio or anything from forkserve except ``forkserve.errors``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, MutableMapping
from typing import Any

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_FORWARDED_PAIR = re.compile(r'\s*([!#$%&\'*+\-.^_`|~0-9A-Za-z]+)=("(?:[^"\\]|\\.)*"|[^;,\s]*)\s*')


class TrustedProxies:
    """A set of trusted peers: exact addresses, CIDR networks, or "*"."""

    __slots__ = ("_addresses", "_all", "_networks")

    def __init__(self, entries: Iterable[str]) -> None:
        self._all = False
        self._addresses: set[str] = set()
        self._networks: list[_Network] = []
        for raw in entries:
            entry = raw.strip()
            if entry == "*":
                self._all = True
            elif "/" in entry:
                self._networks.append(ipaddress.ip_network(entry, strict=False))
            elif entry:
                self._addresses.add(_normalise(entry))

    @property
    def trusts_all(self) -> bool:
        return self._all

    def __contains__(self, peer: object) -> bool:
        if self._all:
            return True
        if not isinstance(peer, str) or not peer:
            return False
        ip = _normalise(peer)
        if ip in self._addresses:
            return True
        if not self._networks:
            return False
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in net for net in self._networks)


def _normalise(ip: str) -> str:
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        return ip


def _forwarded_elements(value: str) -> list[dict[str, str]]:
    """Parse a Forwarded header (RFC 7239 §4) into its elements' pairs."""
    elements = []
    for element in value.split(","):
        pairs: dict[str, str] = {}
        for part in element.split(";"):
            if not part.strip():
                continue
            m = _FORWARDED_PAIR.fullmatch(part)
            if m is None:
                continue
            key, val = m.group(1).lower(), m.group(2)
            if val.startswith('"'):
                val = re.sub(r"\\(.)", r"\1", val[1:-1])
            pairs[key] = val
        elements.append(pairs)
    return elements


def _node_ip(node: str) -> str:
    """The address of an RFC 7239 node ("[v6]:port", "v4:port", "v4")."""
    if node.startswith("["):
        return node[1 : node.find("]")] if "]" in node else node
    if node.count(":") == 1:
        return node.split(":", 1)[0]
    return node


def apply_forwarded(
    environ: MutableMapping[str, Any], peer_ip: str | None, trusted: TrustedProxies
) -> None:
    """Rewrite REMOTE_ADDR and wsgi.url_scheme from proxy headers in
    ``environ`` when ``peer_ip`` is trusted; untrusted peers change nothing.

    The client is the rightmost address that is not itself a trusted proxy,
    so a client cannot pick its own address by prepending to the list.
    """
    if peer_ip is None:
        # A Unix-socket peer has no address; only "*" trusts it.
        if not trusted.trusts_all:
            return
    elif peer_ip not in trusted:
        return
    forwarded = environ.get("HTTP_FORWARDED")
    chain: list[str] = []
    proto: str | None = None
    if forwarded:
        elements = _forwarded_elements(forwarded)
        chain = [_node_ip(e["for"]) for e in elements if "for" in e]
        protos = [e["proto"] for e in elements if "proto" in e]
        proto = protos[-1] if protos else None
    else:
        xff = environ.get("HTTP_X_FORWARDED_FOR")
        if xff:
            chain = [part.strip() for part in xff.split(",") if part.strip()]
        xfp = environ.get("HTTP_X_FORWARDED_PROTO")
        if xfp:
            proto = xfp.split(",")[-1].strip()
    if chain:
        client = chain[0]
        for hop in reversed(chain):
            client = hop
            if hop not in trusted:
                break
        environ["REMOTE_ADDR"] = client
        environ["REMOTE_PORT"] = ""
    if proto:
        proto = proto.lower()
        if proto in ("http", "https"):
            environ["wsgi.url_scheme"] = proto
