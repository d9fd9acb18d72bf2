"""cluster.listen with every address form; workers answer "worker <id>".

FORM picks the address forms (comma-separated), WORKERS how many workers;
PORT (or PORT_<FORM> per form), SOCK_PATH and LISTEN_FD (a listening fd of the
primary) come from the test. Policies come from FORKSERVE_SCHED_POLICY or
SET_POLICY (cluster.scheduling_policy).
"""

import json
import os
import socket

from _common import out, start

from forkserve import cluster

FORMS = os.environ.get("FORM", "tuple").split(",")
WORKERS = int(os.environ.get("WORKERS", "2"))


def address_and_options(form):
    options = json.loads(os.environ.get("OPTIONS", "{}"))
    port = int(os.environ.get("PORT_" + form.upper(), os.environ.get("PORT", "0")))
    if form == "port":
        return port, options
    if form == "tuple":
        return ("127.0.0.1", port), options
    if form == "port0":
        return ("127.0.0.1", 0), options
    if form == "hostport":
        return f"127.0.0.1:{port}", options
    if form == "v6":
        return f"[::1]:{port}", options
    if form == "unix":
        return "unix:" + os.environ["SOCK_PATH"], options
    if form == "fd":
        return {"fd": int(os.environ["LISTEN_FD"])}, options
    if form == "socket":
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        return sock, options
    if form == "udp":
        return ("127.0.0.1", port), {"type": "udp", **options}
    if form == "udp6":
        return ("::1", port), {"type": "udp", **options}
    raise SystemExit(f"unknown form {form!r}")


def worker_main():
    out("w-pid", cluster.worker.id, os.getpid())
    for form in FORMS:
        listen_on(form)


def listen_on(form):
    me = cluster.worker
    address, options = address_and_options(form)
    try:
        listener = cluster.listen(address, **options)
    except OSError as exc:
        out("w-listen-error", me.id, exc.errno, str(exc))
        return
    raw = listener.raw_socket
    reuse = None
    if raw is not None and raw.family != socket.AF_UNIX:
        reuse = bool(raw.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT))
    out("w-listen", me.id, listener.address, listener.mode, reuse, form)
    reply = f"worker {me.id}\n".encode()
    if options.get("type") == "udp":
        fd = listener.fileno()
        family = socket.AF_INET6 if listener.address["address_type"] == "udp6" else socket.AF_INET
        dgram = socket.socket(family, socket.SOCK_DGRAM, fileno=os.dup(fd))
        dgram.setblocking(False)
        out("w-udp-fileno-is-socket", me.id, dgram.type == socket.SOCK_DGRAM)

        def on_datagram():
            try:
                data, peer = dgram.recvfrom(100)
            except BlockingIOError:
                return
            dgram.sendto(reply + data, peer)

        cluster.loop.add_reader(dgram.fileno(), on_datagram)
        me.on("message", lambda msg, handle: None)
        return

    async def answer(reader, writer):
        writer.write(reply)
        await writer.drain()
        writer.close()

    listener.serve(answer)


def primary_main():
    if os.environ.get("SET_POLICY"):
        cluster.scheduling_policy = {"rr": cluster.SCHED_RR, "none": cluster.SCHED_NONE}[
            os.environ["SET_POLICY"]
        ]
    addresses = {}
    seen = []

    def on_listening(worker, address):
        addresses[worker.id] = address
        seen.append([worker.id, address])
        if len(seen) == WORKERS * len(FORMS):
            out("ready", addresses, cluster.scheduling_policy, seen)

    cluster.on("listening", on_listening)
    cluster.on("exit", lambda worker, code, signal: out("exit", worker.id, code, signal))
    for _ in range(WORKERS):
        cluster.fork()
    cluster.run()


start(worker_main, primary_main)
