"""What a reload (SIGHUP) may change: the configuration a running server switches to.

A HUP re-reads the configuration as the server started it (same command
line, same environment, config file re-read from disk). Most settings apply
to the workers started from then on. Some are held by the primary itself
(its sockets, its identity, its files, where it listens for control or
metrics): those keep their running value until a restart or an upgrade
(USR2), and the reload names them.

This module must not import click, ``forkserve.arbiter``, ``forkserve.workers``,
``forkserve.cluster`` or ``forkserve.http``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from forkserve.config import Config

# Settings the primary applied once at startup.
RESTART_ONLY = frozenset(
    {
        "bind",
        "backlog",
        "sched",
        "buffer_request_head",
        "unix_socket_mode",
        "certfile",
        "keyfile",
        "ca_certs",
        "preload_app",
        "chdir",
        "user",
        "group",
        "daemon",
        "pidfile",
        "control_socket",
        "metrics_bind",
        "statsd_host",
        "statsd_prefix",
        "reload",
        "reload_extra_files",
        "config",
    }
)
# Held by the primary's round-robin handles with --sched rr.
RESTART_ONLY_WITH_RR = frozenset({"header_timeout"})
# What decided that the primary may read request heads (--buffer-request-head).
RESTART_ONLY_WITH_HEAD_BUFFERING = frozenset({"worker_class", "interface"})


@dataclass(frozen=True, slots=True)
class Reconfigured:
    """The configuration to run with, and what a restart would still change."""

    config: Config
    kept: tuple[str, ...]  # restart-only settings whose new value was not applied
    changed: tuple[str, ...]  # settings whose value the reload changes


def fixed_settings(running: Config, *, round_robin: bool, head_buffering: bool) -> frozenset[str]:
    """The settings of ``running`` that a reload cannot change."""
    fixed = set(RESTART_ONLY)
    if round_robin:
        fixed |= RESTART_ONLY_WITH_RR
    if head_buffering:
        fixed |= RESTART_ONLY_WITH_HEAD_BUFFERING
    return frozenset(fixed)


def reconfigure(running: Config, loaded: Config, fixed: Iterable[str]) -> Reconfigured:
    """``loaded`` with every ``fixed`` setting kept at its ``running`` value."""
    fixed = frozenset(fixed)
    values = dict(loaded.values)
    sources = dict(loaded.sources)
    kept = []
    for name in sorted(fixed):
        if name not in values:
            continue
        if values[name] != running.values[name]:
            kept.append(name)
        values[name] = running.values[name]
        sources[name] = running.sources[name]
    changed = tuple(
        name
        for name in sorted(values)
        if name not in fixed and _differs(values[name], running.values[name])
    )
    return Reconfigured(Config(values, sources, running.app), tuple(kept), changed)


def _differs(new: object, old: object) -> bool:
    """Hooks are functions a config file defines anew on every read: compare their code."""
    if callable(new) and callable(old):
        return getattr(new, "__code__", new) != getattr(old, "__code__", old)
    return new != old
