"""Messages both ways, serialization, send() results and callbacks, handles.

MODE=json|advanced picks the serialization. The primary drives the steps; the
worker answers each one.
"""

import os
import socket

from _common import out, start

from forkserve import cluster

MODE = os.environ.get("MODE", "json")


def types_of(value):
    if isinstance(value, dict):
        return {k: types_of(v) for k, v in value.items()}
    return type(value).__name__


def payload():
    if MODE == "advanced":
        return {"set": {1, 2}, "bytes": b"\x00\xff", "tuple": (1, 2), "nested": [(3,)]}
    return {"list": [1, 2], "text": "caf\u00e9", "num": 1.5, "none": None}


def worker_main():
    me = cluster.worker
    me.on("error", lambda exc: out("w-error-event", type(exc).__name__))

    def on_message(msg, handle):
        step = msg["step"] if isinstance(msg, dict) else msg
        if step == "hello":
            out("w-hello", types_of(msg["payload"]), msg["payload"] == payload())
            if MODE == "json":
                try:
                    me.send({"bad": {1, 2}})
                except TypeError as exc:
                    out("w-typeerror", str(exc)[:60])
            results = []
            ret = me.send({"step": "echo", "payload": payload()}, None, results.append)
            out("w-send", ret)
        elif step == "listener":
            # A listening socket from the primary: accept one client on it.
            out("w-listener", type(handle).__name__, handle.getsockname()[1] == msg["port"])
            me.send({"step": "listener-ready"})
            handle.settimeout(5)
            conn, _ = handle.accept()
            conn.sendall(b"accepted by worker")
            conn.close()
            handle.close()
        elif step == "pconn":
            out("w-pconn", type(handle).__name__)
            handle.sendall(b"written by worker")
            handle.close()
            me.send({"step": "pconn-done"})
        elif step == "wconn":
            for keep_open in (False, True):
                a, b = socket.socketpair()
                states = []

                def after(exc, a=a, states=states):
                    states.append((exc, a.fileno() >= 0))

                me.send({"step": "wconn", "keep_open": keep_open}, a, after, keep_open=keep_open)
                b.settimeout(5)
                data = b.recv(100)
                out("w-wconn", keep_open, data.decode(), states[0][0], states[0][1])
                a.close()
                b.close()
            me.send({"step": "wconn-done"})
        elif step == "internal":
            listener = cluster.listen(("127.0.0.1", 0))
            listener.close()
            me.send({"step": "internal-done"})
        elif step == "finish":
            me.disconnect()

    def on_disconnect():
        results = []
        out(
            "w-closed-send",
            me.send("late", None, results.append),
            [type(e).__name__ for e in results],
        )
        out("w-closed-send-nocb", me.send("late"))

    me.on("message", on_message)
    me.on("disconnect", on_disconnect)


def primary_main():
    cluster.setup_primary(serialization=MODE)
    messages = []
    listener_sock = socket.socket()
    listener_sock.bind(("127.0.0.1", 0))
    listener_sock.listen()
    port = listener_sock.getsockname()[1]
    p_end, q_end = socket.socketpair()

    def on_online(worker):
        if MODE == "json":
            try:
                worker.send({"bad": b"bytes"})
            except TypeError as exc:
                out("p-typeerror", str(exc)[:60])
        results = []
        ret = worker.send({"step": "hello", "payload": payload()}, None, results.append)
        out("p-send", ret, results)

    def on_message(worker, msg, handle):
        messages.append(msg)
        step = msg["step"] if isinstance(msg, dict) else msg
        if step == "echo":
            out("p-echo", types_of(msg["payload"]), msg["payload"] == payload())
            worker.send({"step": "listener", "port": port}, listener_sock)
        elif step == "listener-ready":
            client = socket.create_connection(("127.0.0.1", port), timeout=5)
            data = b""
            while chunk := client.recv(100):
                data += chunk
            client.close()
            out("p-listener", data.decode())
            states = []
            worker.send(
                {"step": "pconn"}, p_end, lambda exc: states.append((exc, p_end.fileno() >= 0))
            )
            out("p-pconn-sent", states)
        elif step == "pconn-done":
            q_end.settimeout(5)
            out("p-pconn", q_end.recv(100).decode())
            worker.send({"step": "wconn"})
        elif step == "wconn":
            out("p-wconn", type(handle).__name__, msg["keep_open"])
            handle.sendall(b"written by primary")
            handle.close()
        elif step == "wconn-done":
            worker.send({"step": "internal"})
        elif step == "internal-done":
            worker.send({"step": "finish"})

    def on_exit(worker, code, signal):
        out("p-exit", code, signal, worker.exited_after_disconnect)
        results = []
        out(
            "p-closed-send",
            worker.send("late", None, results.append),
            [type(e).__name__ for e in results],
        )
        worker.on("error", lambda exc: out("p-error-event", type(exc).__name__))
        out("p-closed-send-nocb", worker.send("late"))
        out("p-messages", [m["step"] if isinstance(m, dict) else m for m in messages])

    cluster.on("online", on_online)
    cluster.on("message", on_message)
    cluster.on("exit", on_exit)
    cluster.fork()
    cluster.run()
    out("p-done")


start(worker_main, primary_main)
