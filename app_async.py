"""The Todo app on asyncio: app_sync.py's routes and answers, moved the way a Flask user moves.

    gunicorn -k uvicorn_worker.UvicornWorker app_async:app                   # asyncpg
    DB_DRIVER=psycopg gunicorn -k uvicorn_worker.UvicornWorker app_async:app  # psycopg 3 async

Quart is Flask's API on ASGI; SQLAlchemy's asyncio extension gives the same engine, pool and
ORM with `await`. uvicorn's worker runs it under gunicorn's arbiter, so --workers, --timeout
(a worker whose event loop is blocked stops checking in and is killed, as under gevent) and
--graceful-timeout mean what they mean for the other apps. Settings: the same environment
variables, read in models.py. `diff app_sync.py app_async.py` is the cost of the move.

What moves: every function that waits becomes `async def`, and every wait an `await`:
asyncio.sleep for time.sleep, `await session.execute(...)` for `session.execute(...)`. A
blocking call left in an `async def` (time.sleep, requests, psycopg2) holds the whole loop,
as unpatched psycopg2 holds a gevent worker; nothing patches it for you.
"""

import asyncio
import math
import os
import socket
import sys

from quart import Quart, g, jsonify, request
from sqlalchemy import exc, func, select
from sqlalchemy.ext.asyncio import async_sessionmaker
from werkzeug.exceptions import HTTPException

from models import Todo, make_async_engine, settings, warm_async


class App(Quart):
    """Quart, answering a Host header that is no host name ('a' x 64, 'a..b') as Flask does.
    Werkzeug's BadHost (a 400) comes while Quart binds the request's URL adapter, before any
    error handler, where Flask keeps it for the handlers and Quart let it through: a
    plain-text 500 with a traceback in the log. Here matching the request raises it, and the
    HTTPException handler below answers it (400 JSON)."""

    def create_url_adapter(self, request):
        try:
            return super().create_url_adapter(request)
        except HTTPException as error:
            return Unbound(error)


class Unbound:
    """The URL adapter of a request that cannot be bound: matching it raises why."""

    def __init__(self, error: HTTPException) -> None:
        self.error = error

    def match(self, *_args, **_kw):
        raise self.error


app = App(__name__)
engine = make_async_engine(settings)  # no connection yet: the pool fills in the worker's loop
Session = async_sessionmaker(engine, expire_on_commit=False)


@app.before_serving
async def open_pool():
    await warm_async(engine, settings.pool_warm)  # POOL_WARM, in the worker's event loop


@app.after_serving
async def close_pool():
    await engine.dispose()


class BadSeconds(ValueError):
    """A ?seconds= value the routes refuse: answered as a 400."""


def db():
    """This request's session, opened on first use and closed in teardown."""
    if "db" not in g:
        g.db = Session()
    return g.db


async def execute(statement):
    """One statement on this request's session, QUERY_TIMEOUT bounding its wait (asyncio's
    equivalent of harden()'s query bound; asyncpg's command_timeout is a second one). The
    pool's wait (POOL_TIMEOUT) and a new connection's (CONNECT_TIMEOUT) come first, outside
    it. On expiry the task is cancelled: the driver asks the server to cancel, SQLAlchemy
    discards the connection, and TimeoutError is answered 503."""
    session = db()
    await session.connection()
    async with asyncio.timeout(settings.query_timeout):
        return await session.execute(statement)


@app.teardown_appcontext
async def close_session(_error=None):
    """Return the request's connection to the pool, whatever happened. The answer is already
    made: a rollback that fails here (the database went away, or stopped answering: given up
    after QUERY_TIMEOUT) is logged and its connection thrown away, never turned into a 500."""
    session = g.pop("db", None)
    if session is None:
        return
    try:
        async with asyncio.timeout(settings.query_timeout):
            await session.close()
    except (exc.DBAPIError, OSError) as error:  # asyncpg's, and TimeoutError, are OSErrors
        reason = str(error).strip()[:120] or f"no answer within {settings.query_timeout:g} s"
        app.logger.warning("closing the session failed, connection discarded: %s: %s",
                           type(error).__name__, reason)
        await session.invalidate()


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


async def todos_response():
    todos = (await execute(select(Todo).order_by(Todo.id))).scalars().all()
    return jsonify(todos=[todo.as_dict() for todo in todos])


@app.get("/sleep/python/")
async def sleep_python():
    """asyncio.sleep(S): waits without holding the loop (time.sleep here would hold it)."""
    await asyncio.sleep(sleep_seconds())
    return await todos_response()


@app.get("/sleep/postgres/")
async def sleep_postgres():
    """SELECT pg_sleep(S): the driver awaits the answer; the loop serves others meanwhile."""
    await execute(select(func.pg_sleep(sleep_seconds())))
    return await todos_response()


@app.get("/todos/")
async def todos():
    """The todos, no sleep: the fast path, for throughput."""
    return await todos_response()


@app.get("/health")
async def health():
    """Liveness without the database, and what this process is running."""
    return jsonify(status="ok", pid=os.getpid(), app=__name__,
                   driver=engine.dialect.driver, gevent_patched=False, psycopg2_green=None,
                   psycopg_wait=None, psycopg_green=None,
                   loop=type(asyncio.get_running_loop()).__module__.split(".")[0],
                   python=sys.version.split()[0],
                   pool_size=settings.pool_size, max_overflow=settings.max_overflow,
                   pool_timeout=settings.pool_timeout, sleep_max=settings.sleep_max)


@app.errorhandler(BadSeconds)
async def bad_seconds(error):
    return jsonify(error=str(error), parameter="seconds"), 400


@app.errorhandler(exc.TimeoutError)
async def pool_exhausted(_error):
    """No connection within POOL_TIMEOUT: overload, so 503 and a hint when to retry."""
    limit = settings.pool_size + settings.max_overflow
    return jsonify(error=f"all {limit} database connections of this worker are busy "
                         f"(pool_size {settings.pool_size} + max_overflow "
                         f"{settings.max_overflow}); waited {settings.pool_timeout:g} s",
                   pool_limit=limit), 503, {"Retry-After": "1"}


# SQLSTATE classes that psycopg2 raises as OperationalError, which app_sync answers 503:
# connection (08), authorization (28), transaction rollback (40), resources (53), operator
# intervention (57: a cancel, a shutdown)... asyncpg's errors come as plain DBAPIErrors, so
# their class decides; and 3D (no such database), which psycopg2 raises at connect.
UNAVAILABLE = ("08", "26", "27", "28", "34", "3D", "40", "53", "54", "55", "57", "58", "HV")


def unavailable(error: Exception) -> bool:
    """Is ERROR the database (or the way to it) failing, rather than a bug? asyncpg's socket
    errors (refused, no such host) and every TimeoutError (its connect and command timeouts,
    asyncio.timeout's) arrive unwrapped by SQLAlchemy."""
    if isinstance(error, (exc.OperationalError, exc.InterfaceError)):
        return True
    if isinstance(error, exc.DBAPIError):  # a disconnect SQLAlchemy saw, or the SQLSTATE
        code = getattr(error.orig, "pgcode", None) or getattr(error.orig, "sqlstate", None)
        return error.connection_invalidated or str(code or "")[:2] in UNAVAILABLE
    return isinstance(error, (ConnectionError, TimeoutError, socket.gaierror))


@app.errorhandler(exc.DBAPIError)
@app.errorhandler(OSError)
async def database_unavailable(error):
    """The database is down, refused us, did not answer in time or cancelled the statement:
    503, no SQL shown. Other database errors (a bad query, a constraint) and other OSErrors
    (a missing file) are bugs, not overload: they take the 500 path, as in app_sync."""
    if not unavailable(error):
        return await internal_error(error)
    orig = getattr(error, "orig", None) or error
    code = getattr(orig, "pgcode", None) or getattr(orig, "sqlstate", None)
    if code == "57014":  # query_canceled: STATEMENT_TIMEOUT ran out
        message = f"statement cancelled after {settings.statement_timeout:g} s"
    else:
        message = "database unavailable"
    # the driver's first line, for the operator's log only: e.g. "FATAL: sorry, too many
    # clients already" or "connection refused"; never the SQL, never sent to the client
    reason = str(orig).strip().splitlines()[0] if str(orig).strip() else ""
    app.logger.warning("%s: %s: %s", message, type(orig).__name__, reason)
    return jsonify(error=message), 503, {"Retry-After": "1"}


@app.errorhandler(HTTPException)
async def http_error(error):
    """404, 405 and friends as JSON, with their headers (a 405's Allow)."""
    headers = [(k, v) for k, v in error.get_headers() if k.lower() != "content-type"]
    return jsonify(error=error.description, status=error.code), error.code, headers


@app.errorhandler(Exception)
async def internal_error(error):
    """Anything else: logged with its traceback, answered without one."""
    app.logger.error("unhandled error", exc_info=error)
    return jsonify(error="internal error"), 500
