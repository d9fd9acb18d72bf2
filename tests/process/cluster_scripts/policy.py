"""Scheduling policy from the environment; errors at fork; frozen after; listen in primary."""

from _common import out

from forkserve import cluster

if cluster.is_worker:
    raise SystemExit(0)

out("policy-before", cluster.scheduling_policy)
try:
    cluster.setup_primary()
except ValueError as exc:
    out("setup-error", str(exc))
try:
    worker = cluster.fork()
except ValueError as exc:
    out("fork-error", str(exc))
else:
    try:
        other = (
            cluster.SCHED_RR
            if cluster.scheduling_policy == cluster.SCHED_NONE
            else cluster.SCHED_NONE
        )
        cluster.scheduling_policy = other
    except RuntimeError as exc:
        out("frozen-error", str(exc))
    out("policy-after", cluster.scheduling_policy)
    listener = cluster.listen(("127.0.0.1", 0))
    out(
        "primary-listener",
        listener.mode,
        listener.address["address_type"],
        listener.raw_socket is not None,
    )
    listener.close()
    cluster.run()
