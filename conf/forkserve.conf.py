"""Example forkserve Python config: ``forkserve -c conf/forkserve.conf.py examples.hello_wsgi:app``.

Module-level names are settings (see docs/configuration.md). Names starting with
an underscore and imported modules are ignored; any other name must be a setting.
"""

import multiprocessing
import os

# Listen on loopback and, if you like, a Unix socket for the reverse proxy.
bind = ["127.0.0.1:8000"]
# bind = ["127.0.0.1:8000", "unix:/run/forkserve/app.sock"]

# gunicorn's rule of thumb: two workers per core, plus one.
workers = int(os.environ.get("WEB_CONCURRENCY", multiprocessing.cpu_count() * 2 + 1))
worker_class = "auto"  # sync, threaded or asgi; auto detects ASGI apps
threads = 1

timeout = 30  # seconds of silence before a worker is killed; 0 disables
graceful_timeout = 30
keepalive = 2

# Recycle workers now and then to bound slow memory growth.
max_requests = 10000
max_requests_jitter = 500

loglevel = "info"
error_logfile = "-"  # stderr
access_logfile = "-"  # stdout; None disables the access log
# access_log_format = '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s"'

forwarded_allow_ips = "127.0.0.1,::1"
limit_request_body = 10 * 1024 * 1024  # 10 MiB; 0 means unlimited

# raw_env = ["APP_ENV=production"]
# pidfile = "/run/forkserve/forkserve.pid"


# Server hooks exist only in Python config files.
def when_ready(arbiter):
    print("forkserve is ready")


def worker_exit(arbiter, worker):
    pass
