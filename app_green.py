"""The Todo app, cooperative under gevent: the same app as app_sync.py plus a preamble.

    gunicorn -k gevent app_green:app                        # psycopg2 + psycogreen
    DB_DRIVER=psycopg gunicorn -k gevent app_green:app      # psycopg 3, no psycogreen needed

Settings: environment variables, read in models.py (DATABASE_URL, POOL_SIZE, ...).
The only difference from app_sync.py is this preamble: `diff app_sync.py app_green.py`.
"""

# 1. gevent first, before anything imports socket, ssl, threading or time. gunicorn's gevent
#    worker already calls monkey.patch_all() before it imports the app, so under it this is a
#    no-op; it keeps the file correct under any other gevent server, or a plain import.
from gevent import monkey

monkey.patch_all()

# 2. psycopg2 is a C extension: libpq reads and writes its socket in C, where gevent's patched
#    socket module never sees it, and gunicorn's worker does not patch it. psycogreen installs
#    a wait callback: psycopg2 then drives libpq asynchronously and waits with gevent's
#    wait_read/wait_write, so a query parks its greenlet instead of the whole process.
#    psycopg 3 (DB_DRIVER=psycopg) cooperates with gevent by itself since 3.1.14, provided
#    it is imported after step 1 (it picks its wait function at import); there this call is
#    harmless. One thing psycogreen loses: libpq's connect_timeout, which only bounds a
#    blocking connect; harden.py (called in models.py) bounds the green connect, and
#    every later wait on the database too (QUERY_TIMEOUT).
from psycogreen.gevent import patch_psycopg  # noqa: E402

patch_psycopg()

# ---- app_sync.py and app_green.py are identical from this line down (a test checks) ----
import math
import os
import sys
import time

from flask import Flask, g, jsonify, request
from sqlalchemy import exc, func, select
from werkzeug.exceptions import HTTPException

from models import Session, Todo, engine, settings, warm

app = Flask(__name__)
warm(engine, settings.pool_warm)  # POOL_WARM: connect now rather than on the first requests


class BadSeconds(ValueError):
    """A ?seconds= value the routes refuse: answered as a 400."""


def db():
    """This request's session, opened on first use and closed in teardown."""
    if "db" not in g:
        g.db = Session()
    return g.db


@app.teardown_appcontext
def close_session(_error=None):
    """Return the request's connection to the pool, whatever happened. The answer is already
    made: a rollback that fails here (the database went away, or stopped answering) is logged
    and its connection thrown away, never turned into a 500."""
    session = g.pop("db", None)
    if session is None:
        return
    try:
        session.close()
    except exc.DBAPIError as error:
        app.logger.warning("closing the session failed, connection discarded: %s: %s",
                           type(error.orig).__name__, str(error.orig).strip()[:120])
        session.invalidate()


def sleep_seconds() -> float:
    """?seconds=S, checked: one finite number from 0 to SLEEP_MAX; else a 400."""
    values = request.args.getlist("seconds")
    if not values:
        return settings.sleep_seconds
    if len(values) > 1:
        raise BadSeconds("give seconds once")
    try:
        seconds = float(values[0])
    except ValueError:
        raise BadSeconds("seconds must be a number") from None
    if not math.isfinite(seconds) or not 0 <= seconds <= settings.sleep_max:
        raise BadSeconds(f"seconds must be from 0 to {settings.sleep_max:g}")
    return seconds


def todos_response():
    todos = db().scalars(select(Todo).order_by(Todo.id)).all()
    return jsonify(todos=[todo.as_dict() for todo in todos])


@app.get("/sleep/python/")
def sleep_python():
    """time.sleep(S): blocks the process unless the worker is green (gevent)."""
    time.sleep(sleep_seconds())
    return todos_response()


@app.get("/sleep/postgres/")
def sleep_postgres():
    """SELECT pg_sleep(S): blocks the process unless psycopg2 waits cooperatively."""
    db().execute(select(func.pg_sleep(sleep_seconds())))
    return todos_response()


@app.get("/todos/")
def todos():
    """The todos, no sleep: the fast path, for throughput."""
    return todos_response()


@app.get("/health")
def health():
    """Liveness without the database, and what this process is running."""
    psycopg2_green = psycopg_wait = None
    if settings.driver == "psycopg2":
        from psycopg2 import extensions
        psycopg2_green = extensions.get_wait_callback() is not None
    elif "psycopg.waiting" in sys.modules:  # psycopg 3 picked it at import; under gevent,
        psycopg_wait = sys.modules["psycopg.waiting"].wait.__name__  # wait_c blocks the loop
    gevent_patched = False
    if "gevent.monkey" in sys.modules:
        from gevent import monkey
        gevent_patched = monkey.is_module_patched("socket")
    return jsonify(status="ok", pid=os.getpid(), app=__name__, driver=settings.driver,
                   gevent_patched=gevent_patched, psycopg2_green=psycopg2_green,
                   psycopg_wait=psycopg_wait,
                   psycopg_green=None if psycopg_wait is None else psycopg_wait != "wait_c",
                   pool_size=settings.pool_size, max_overflow=settings.max_overflow,
                   pool_timeout=settings.pool_timeout, sleep_max=settings.sleep_max)


@app.errorhandler(BadSeconds)
def bad_seconds(error):
    return jsonify(error=str(error), parameter="seconds"), 400


@app.errorhandler(exc.TimeoutError)
def pool_exhausted(_error):
    """No connection within POOL_TIMEOUT: overload, so 503 and a hint when to retry."""
    limit = settings.pool_size + settings.max_overflow
    return jsonify(error=f"all {limit} database connections of this worker are busy "
                         f"(pool_size {settings.pool_size} + max_overflow "
                         f"{settings.max_overflow}); waited {settings.pool_timeout:g} s",
                   pool_limit=limit), 503, {"Retry-After": "1"}


@app.errorhandler(exc.OperationalError)
@app.errorhandler(exc.InterfaceError)
def database_unavailable(error):
    """The database is down, refused us or cancelled the statement: 503, no SQL shown.

    Other database errors (a bad query, a constraint) are bugs, not overload: they take the
    500 path below, with their traceback in the log."""
    code = getattr(error.orig, "pgcode", None) or getattr(error.orig, "sqlstate", None)
    if code == "57014":  # query_canceled: STATEMENT_TIMEOUT ran out
        message = f"statement cancelled after {settings.statement_timeout:g} s"
    else:
        message = "database unavailable"
    # the driver's first line, for the operator's log only: e.g. "FATAL: sorry, too many
    # clients already" or "connection refused"; never the SQL, never sent to the client
    reason = str(error.orig).strip().splitlines()[0] if str(error.orig).strip() else ""
    app.logger.warning("%s: %s: %s", message, type(error.orig).__name__, reason)
    return jsonify(error=message), 503, {"Retry-After": "1"}


@app.errorhandler(HTTPException)
def http_error(error):
    """404, 405 and friends as JSON, with their headers (a 405's Allow)."""
    headers = [(k, v) for k, v in error.get_headers() if k.lower() != "content-type"]
    return jsonify(error=error.description, status=error.code), error.code, headers


@app.errorhandler(Exception)
def internal_error(error):
    """Anything else: logged with its traceback, answered without one."""
    app.logger.exception("unhandled error")
    return jsonify(error="internal error"), 500
