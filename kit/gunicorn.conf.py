"""gunicorn settings for the green app, to copy: each says why, and tests/test_traps.py shows it.

    gunicorn -c kit/gunicorn.conf.py app_green:app
    POOL_WARM=2 gunicorn -c kit/gunicorn.conf.py --preload -w 2 app_green:app

Kept out of the top level on purpose: gunicorn reads ./gunicorn.conf.py by itself and would
change every scenario of this kit. Each value below can be set from the environment
(GUNICORN_BIND, GUNICORN_WORKERS, ...); flags on the command line win over this file.
"""

import os

# ---- where, and how many ----------------------------------------------------------------
# Loopback: put a proxy (or a load balancer) in front; 0.0.0.0 only on purpose.
bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:8000")
# One event loop per worker; about one worker per core. A burst is not shared evenly between
# gevent workers (docs/budget.md, "Several workers"): size each worker's pool for most of a burst.
workers = int(os.environ.get("GUNICORN_WORKERS", "2"))
# Greenlets: one per request. The app file's preamble makes psycopg2 cooperative.
worker_class = "gevent"
# Requests one worker holds at once; past it the worker stops accepting and the rest wait in
# the listen backlog. Generally 100-10000: at least the burst a worker must absorb.
worker_connections = int(os.environ.get("GUNICORN_WORKER_CONNECTIONS", "1000"))

# ---- time limits ------------------------------------------------------------------------
# A gevent worker checks in with the master from its event loop: only a loop blocked this
# long (an unpatched driver, a CPU-bound request) misses it, and the worker is killed.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "30"))
# On SIGTERM (a deploy), requests in flight get this long to finish before the kill.
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "30"))
# gunicorn >= 25 opens a control socket in ~/.gunicorn/ unless told not to.
control_socket_disable = True

# ---- the gevent monitor, opt-in -----------------------------------------------------------
# GEVENT_MONITOR=1: a thread in each worker logs "appears to be blocked", with the stack, when
# one greenlet keeps the loop over 0.1 s. Cheap, but it is a thread and a log line per event.
if os.environ.get("GEVENT_MONITOR") == "1":
    os.environ.setdefault("GEVENT_MONITOR_THREAD_ENABLE", "true")
    os.environ.setdefault("GEVENT_MAX_BLOCKING_TIME", "0.1")


# ---- fork safety: nothing here ------------------------------------------------------------
# With --preload the app, and any connection it opened at import (POOL_WARM, a start-up
# check), is made in the master. harden.py gives every forked worker a pool of its own,
# so this file needs no post_fork or post_worker_init hook for it (measured: docs/traps.md).


# ---- the alternative: patch psycopg2 here instead of in the app file ------------------------
# GUNICORN_PATCH_PSYCOPG=1 makes an unpatched app (app_sync.py) cooperative under this file.
# post_fork was measured to work (docs/traps.md); the app file's preamble stays the better
# place, because it also holds under any other server and in a plain import.
if os.environ.get("GUNICORN_PATCH_PSYCOPG") == "1":
    def post_fork(server, worker):
        from psycogreen.gevent import patch_psycopg

        patch_psycopg()
