"""Worker lifecycle: events, their order and arguments, exited_after_disconnect, state.

MODE picks how the worker ends. Every event on the Worker ('w') and on the
cluster ('c') is recorded with (in cluster.workers, exited_after_disconnect,
state, is_connected, is_dead).
"""

import os
import signal
import sys

from _common import out, start

from forkserve import cluster

MODE = os.environ.get("MODE", "disconnect")


def worker_main():
    me = cluster.worker
    if MODE == "clean":
        out("w-script-done", me.id)
        return
    listener = cluster.listen(("127.0.0.1", 0))

    def on_message(msg, handle):
        if msg == "crash":
            sys.exit(3)
        if msg == "exception":
            raise RuntimeError("worker failure")
        if msg == "selfkill":
            out("w-eAD-before-kill", me.exited_after_disconnect)
            me.kill()
        if msg == "selfdisconnect":
            me.disconnect()
            out("w-eAD-after-disconnect", me.exited_after_disconnect)

    me.on("message", on_message)
    me.on("disconnect", lambda: out("w-disconnect-event", listener.closed))


ENDINGS = {
    "disconnect": lambda w: w.disconnect(),
    "kill": lambda w: w.kill(),
    "destroy": lambda w: w.destroy(),
    "killsig": lambda w: w.kill("SIGKILL"),
    "killnum": lambda w: w.kill(signal.SIGTERM),
    "pkill": lambda w: w.process.kill(),
    "pkillname": lambda w: w.process.kill("SIGKILL"),
    "pkillnum": lambda w: w.process.kill(9),
    "pkillint": lambda w: w.process.kill(signal.SIGINT),
    "oskill": lambda w: os.kill(w.process.pid, signal.SIGTERM),
    "crash": lambda w: w.send("crash"),
    "exception": lambda w: w.send("exception"),
    "selfkill": lambda w: w.send("selfkill"),
    "selfdisconnect": lambda w: w.send("selfdisconnect"),
}


def primary_main():
    log = []
    w = cluster.fork()
    out("forked", w.id, w.process.pid > 0, w.exited_after_disconnect, str(w.state))

    def record(who, ev):
        def handler(*args):
            if who == "c":
                assert args[0] is w
                args = args[1:]
            log.append(
                [
                    who,
                    ev,
                    w.id in cluster.workers,
                    w.exited_after_disconnect,
                    str(w.state),
                    w.is_connected(),
                    w.is_dead(),
                    list(args),
                ]
            )

        return handler

    for ev in ("fork", "online", "listening", "disconnect", "exit"):
        if ev != "fork":
            w.on(ev, record("w", ev))
        cluster.on(ev, record("c", ev))

    def begin(*_):
        out("eAD-before", w.exited_after_disconnect)
        ENDINGS[MODE](w)
        out("after-call", w.id in cluster.workers, w.exited_after_disconnect)

    if MODE == "clean":
        pass
    else:
        w.once("listening", begin)
    cluster.run()
    for row in log:
        out("event", *row)
    out("done", len(cluster.workers))


start(worker_main, primary_main)
