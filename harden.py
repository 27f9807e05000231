"""harden(engine): a SQLAlchemy engine safe to fork that, under gevent, never waits unbounded.

Copy this one file into your project (it needs only SQLAlchemy), then wrap your engine:

    from harden import harden

    engine = harden(create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=0,
                                  connect_args={"options": "-c statement_timeout=15000"}))

With Flask-SQLAlchemy, in the app factory after `db.init_app(app)`, every bind at once:

    with app.app_context():
        for engine in db.engines.values():  # db.engine alone is the default bind only
            harden(engine)

Keep the cooperative preamble at the very top of the app file (gevent's monkey.patch_all(),
then psycogreen's patch_psycopg() for psycopg2); harden() does not replace it. Calling harden()
again on the same engine does nothing more. It returns the engine it was given.

Any engine (an AsyncEngine through its sync_engine), on any worker:
  - Fork safety. In a forked child (gunicorn --preload, multiprocessing) the engine starts a
    new pool, and each connection the parent had checked out becomes a closed stand-in in the
    child: a rollback or close of it does nothing, any other use raises a disconnect error. So
    the child sends nothing on the parent's sockets (psycopg2 and psycopg 3 do not finalise a
    connection in a forked child), and the parent's transactions stay its own.
PostgreSQL over psycopg2 or psycopg 3 (not async) also gets the bounds below. Any other
engine (SQLite, pg8000, asyncpg, psycopg's async) keeps working with fork safety only, and
harden() logs a warning that says so; covered(engine) says what an engine gets.
  - libpq's connect_timeout, when the engine sets none of its own (in the URL, connect_args,
    a dsn= or conninfo= string, or PGCONNECT_TIMEOUT; 0 counts as none): a blocking connect
    gives up. A service file's (service=, PGSERVICE) is not read: harden's replaces it, so
    pass the same to harden(connect_timeout=). With creator=, pass it to your own connect.
  Under gevent only, with a driver that yields to it (socket patched, and psycogreen's
  patch_psycopg() for psycopg2; decided at each call, so an engine made in a --preload master
  is covered once the worker patched), each wait below gives up with the driver's
  OperationalError (map it to a 503) and closes the connection it waited on, which the pool
  then throws away:
  - a new connection: the engine's own connect_timeout (as above) if it sets one, else
    harden's; with creator=, harden's, over the whole creator. psycogreen drops libpq's.
    A process's first connection then runs the dialect's set-up queries: connect_timeout too.
  - every statement (execute, executemany), pre-ping, commit and rollback, and every read from
    a server-side cursor (stream_results, yield_per): query_timeout. On expiry psycopg 3 asks
    the server to cancel, only where psycopg.capabilities.has_cancel_safe() (libpq 17 or
    later, as in the binary wheel): an older libpq's cancel blocks the whole worker.
  - query_timeout=None: the server's statement_timeout + 2 s, so the server cancels a slow
    query first and only a server that answers nothing hits this bound. It is asked once per
    process (SHOW statement_timeout) on the first connection used under gevent, whoever made
    it (creator=, or before harden()). A statement_timeout of 0: no query bound unless you
    pass query_timeout. A statement_timeout raised later (SET or SET LOCAL on a connection,
    ALTER ROLE or ALTER DATABASE after that first connection) is not seen: a statement that
    runs longer than the first value + 2 s is given up. Pass query_timeout above your
    longest statement.
Not bounded, even under gevent:
  - queries in pool "connect" listeners: your own (a SET on each new connection) and, on a
    process's first connection, psycopg2's hstore lookup; they follow a connect that succeeded.
  - calls you make on the driver's connection yourself (engine.raw_connection()).
  - the server's side: a query the client gave up on runs on without a cancel (psycopg2, or
    psycopg 3 on libpq < 17) until statement_timeout; the server's
    client_connection_check_interval ends it sooner.
  - on sync and gthread workers, any query to a server that stopped answering: statement_timeout
    cannot fire there; gunicorn's --timeout kills a sync worker, and nothing stops a gthread
    one. libpq's keepalives_* and tcp_user_timeout catch a dropped path, not a frozen server.
  - a driver that blocks the worker in C, where gevent's timer cannot fire: psycopg2 without
    psycogreen's patch_psycopg(), and psycopg 3 imported before gevent patched. harden() logs
    a warning once, and covered(engine) says "no query bound"; only libpq's connect_timeout
    applies. Also psycopg2 given a host name: libpq resolves it in C, holding the worker (use
    hostaddr=).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import weakref
from urllib.parse import parse_qs, urlsplit

from sqlalchemy import event
from sqlalchemy.engine import Engine

__all__ = ["harden", "covered"]
MARGIN = 2.0  # seconds past statement_timeout before the client gives up on its own
DRIVERS = ("psycopg2", "psycopg")  # libpq drivers whose waits harden() bounds
BOUNDED = "fork safety; under gevent, connect and query bounds"
IDLE, IN_TRANSACTION = 0, 2  # libpq's PQtransactionStatus (psycopg2 and psycopg: .info)
log = logging.getLogger("harden")


def harden(engine, *, connect_timeout: float = 5, query_timeout: float | None = None):
    """Make ENGINE fork-safe and, under gevent, bounded; returns ENGINE (see the module doc)."""
    core = getattr(engine, "sync_engine", engine)  # an AsyncEngine's sync core
    if not isinstance(core, Engine):
        raise TypeError(f"harden() takes a SQLAlchemy Engine or AsyncEngine, not {engine!r}")
    dialect = core.dialect
    if getattr(dialect, "_hardened", ""):
        return engine
    name = f"{dialect.name}+{dialect.driver}"
    _fork_safe(core)
    if dialect.name == "postgresql" and dialect.driver in DRIVERS and not dialect.is_async:
        _bound(core, connect_timeout, query_timeout)
        dialect._hardened = BOUNDED
        if _cooperative(dialect) or not _green():  # else it has just said why not (a warning)
            log.info("harden: %s: %s", name, dialect._hardened)
    else:
        dialect._hardened = "fork safety only"
        log.warning("harden: %s: fork safety only: harden() bounds waits only for psycopg2 "
                    "and psycopg 3 (not async) on PostgreSQL", name)
    return engine


def covered(engine) -> str:
    """What harden() gives ENGINE in this process now: '' if it was not hardened. Under gevent
    with a driver that blocks the worker, no query bound, and the reason."""
    dialect = getattr(engine, "sync_engine", engine).dialect
    given = getattr(dialect, "_hardened", "")
    blocking = _blocking(dialect) if given == BOUNDED else None
    if blocking is None:
        return given
    return f"fork safety; libpq's connect_timeout; no query bound under gevent: {blocking[0]}"


def _bound(engine: Engine, connect_timeout: float, query_timeout: float | None) -> None:
    """Under gevent, every driver call and every connect of ENGINE within a timeout."""
    error = engine.dialect.loaded_dbapi.OperationalError
    _bound_calls(engine.dialect, error, connect_timeout, query_timeout)
    _bound_connects(engine, error, connect_timeout)


def _bound_calls(dialect, error: type, connect_timeout: float,
                 query_timeout: float | None) -> None:
    """Statements, pre-ping, commit, rollback and server-side cursor reads: query_timeout."""
    limit = {"seconds": query_timeout, "known": query_timeout is not None}

    def within(seconds: float, what: str, raw, call, *args, **kw):
        """call(*args, **kw), given up after SECONDS: cancel if safe, close RAW, raise."""
        from gevent import Timeout

        timer = Timeout.start_new(seconds)
        try:
            return call(*args, **kw)
        except BaseException:
            if timer.pending:  # not our timer's doing: the driver's own error, or an outer bound
                raise
            # ours, or what the driver raised while unwinding from it (psycopg 3's ping
            # restores autocommit in a `finally`): the connection is hung mid-protocol.
            _cancel(raw, min(0.5, connect_timeout))
            raw.close()  # the driver's connection: SQLAlchemy sees a disconnect, invalidates
            raise error(f"no answer from the database within {what} ({seconds:g} s)") from None
        finally:
            timer.close()

    def query_bound(raw) -> float | None:
        """query_timeout, or statement_timeout + MARGIN asked on RAW the first time."""
        if limit["known"]:
            return limit["seconds"]
        status = raw.info.transaction_status
        if status not in (IDLE, IN_TRANSACTION):  # aborted or busy: cannot ask now
            return connect_timeout
        seconds = within(connect_timeout, "connect_timeout", raw, _statement_timeout, raw,
                         status == IDLE)
        limit.update(seconds=seconds, known=True)
        return seconds

    def bounded(call, connection_of):
        def run(*args, **kw):
            if not _cooperative(dialect):
                return call(*args, **kw)
            raw = connection_of(*args)
            raw = getattr(raw, "dbapi_connection", raw)  # the pool's proxy: the driver's
            if getattr(raw, "closed", False):  # nothing to wait on: the driver says so
                return call(*args, **kw)
            seconds = query_bound(raw)
            if seconds is None:
                return call(*args, **kw)
            return within(seconds, "query_timeout", raw, call, *args, **kw)
        return run

    cursor_of = lambda cursor, *_, **__: cursor.connection  # noqa: E731
    itself = lambda conn, *_, **__: conn  # noqa: E731
    for name, connection_of in (("do_execute", cursor_of), ("do_execute_no_params", cursor_of),
                                ("do_executemany", cursor_of), ("do_ping", itself),
                                ("do_rollback", itself), ("do_commit", itself)):
        setattr(dialect, name, bounded(getattr(dialect, name), connection_of))

    class Context(dialect.execution_ctx_cls):
        def create_server_side_cursor(self):  # its rows come in fetch*(), not in execute()
            return _ServerCursor(super().create_server_side_cursor(), bounded)
    dialect.execution_ctx_cls = Context


def _bound_connects(engine: Engine, error: type, connect_timeout: float) -> None:
    """A new connection (creator, do_connect listeners, the driver's connect) and the first
    one's dialect set-up: connect_timeout, or the engine's own for the driver's connect."""
    dialect = engine.dialect
    connecting: dict = {}  # greenlet -> the creator's timer, which the engine's own replaces

    def timer(seconds: float):
        from gevent import Timeout

        return Timeout(seconds, error(f"no answer from the database within connect_timeout "
                                      f"({seconds:g} s)"))

    connect = dialect.connect  # what SQLAlchemy's own creator calls, after do_connect

    def bounded_connect(*cargs, **cparams):
        own = _own_connect_timeout(cargs, cparams)
        if own is None:
            cparams["connect_timeout"] = max(1, round(connect_timeout))  # libpq: whole seconds
        if not _cooperative(dialect):  # libpq's connect_timeout bounds a blocking connect
            return connect(*cargs, **cparams)
        from gevent import getcurrent

        outer = connecting.get(getcurrent())
        if outer is not None:  # the engine's own setting wins over harden's
            outer.close()
        with timer(own or connect_timeout):
            return connect(*cargs, **cparams)
    dialect.connect = bounded_connect

    # SQLAlchemy fires do_connect only from its own creator, so the one place that sees a
    # creator= connect too is the pool's creator: private (SQLAlchemy 2.x, pinned), and kept
    # by pool.recreate(), so dispose() and the fork's new pool keep the bound.
    pool = engine.pool
    invoke = pool._invoke_creator  # the default creator, or creator=, taking the record

    def creator(connection_record=None):
        if not _cooperative(dialect):
            return invoke(connection_record)
        from gevent import getcurrent

        me, bound = getcurrent(), timer(connect_timeout)
        previous = connecting.get(me)
        connecting[me] = bound
        bound.start()
        try:
            return invoke(connection_record)
        finally:
            bound.close()
            if previous is None:
                connecting.pop(me, None)
            else:
                connecting[me] = previous
    pool._creator = creator

    initialize = dialect.initialize  # the first connection's set-up queries

    def bounded_initialize(connection):
        if not _cooperative(dialect):
            return initialize(connection)
        with timer(connect_timeout):
            return initialize(connection)
    dialect.initialize = bounded_initialize


class _ServerCursor:
    """A server-side cursor whose reads are bounded like its execute()."""

    def __init__(self, cursor, bounded):
        connection_of = lambda *_, **__: cursor.connection  # noqa: E731
        reads = {name: bounded(getattr(cursor, name), connection_of)
                 for name in ("fetchone", "fetchmany", "fetchall", "scroll", "close")
                 if hasattr(cursor, name)}
        self.__dict__.update(reads, _cursor=cursor)

    def __getattr__(self, name):
        return getattr(self._cursor, name)

    def __setattr__(self, name, value):
        setattr(self._cursor, name, value)

    def __iter__(self):
        return iter(self.fetchone, None)


def _statement_timeout(raw, was_idle: bool) -> float | None:
    """statement_timeout + MARGIN seconds, asked on RAW, in its transaction if it is in one
    (SHOW changes nothing); a transaction that SHOW began is rolled back. None if 0."""
    cursor = raw.cursor()
    try:
        cursor.execute("SHOW statement_timeout")
        setting = cursor.fetchone()[0]
    finally:
        cursor.close()
    if was_idle and raw.info.transaction_status != IDLE:
        raw.rollback()
    seconds = parse_interval(setting)
    return None if not seconds else seconds + MARGIN


def _own_connect_timeout(cargs: tuple, cparams: dict) -> float | None:
    """The connect_timeout libpq will use without harden's, in seconds, in libpq's order:
    the connect's own argument, then a connection string's (dsn=, conninfo=, or the first
    positional), then PGCONNECT_TIMEOUT. None if unset or 0 (libpq: wait forever)."""
    if "connect_timeout" in cparams:
        return _positive(cparams["connect_timeout"])
    for dsn in (cparams.get("dsn"), cparams.get("conninfo"), *cargs[:1]):
        if isinstance(dsn, str) and (value := _in_conninfo(dsn, "connect_timeout")):
            return _positive(value)
    return _positive(os.environ.get("PGCONNECT_TIMEOUT"))


def _in_conninfo(dsn: str, key: str) -> str | None:
    """KEY's value in a libpq connection string: 'host=h connect_timeout=2' or a URI."""
    if dsn.startswith(("postgresql://", "postgres://")):
        values = parse_qs(urlsplit(dsn).query).get(key)
        return values[-1] if values else None
    found = None
    for match in re.finditer(r"(\w+)\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", dsn):
        if match[1] == key:  # the last one wins, as in libpq
            found = match[2].strip("'")
    return found


def _positive(value) -> float | None:
    """A connect_timeout the engine set, in seconds; None if unset, 0 or negative (libpq:
    wait forever)."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if seconds > 0 else None


# a driver that blocks the worker in C under gevent: why, and the fix
PSYCOPG2_UNPATCHED = ("psycopg2 is not patched by psycogreen's patch_psycopg()",
                      "call psycogreen.gevent.patch_psycopg() after gevent.monkey.patch_all()")
PSYCOPG_EARLY = ("psycopg 3 was imported before gevent patched",
                 "call gevent.monkey.patch_all() before anything imports psycopg")


def _blocking(dialect) -> tuple[str, str] | None:
    """Under gevent, why DIALECT's driver blocks the whole worker in C, where gevent's timer
    cannot fire, and the fix; None when it waits cooperatively, or when gevent is not in
    play."""
    if not _green():
        return None
    if dialect.driver == "psycopg2":
        extensions = sys.modules.get("psycopg2.extensions")
        if extensions is not None and extensions.get_wait_callback() is None:
            return PSYCOPG2_UNPATCHED
    elif dialect.driver == "psycopg":  # it picks its wait function when imported
        waiting = sys.modules.get("psycopg.waiting")
        if waiting is not None and waiting.wait.__name__ == "wait_c":
            return PSYCOPG_EARLY
    return None


def _cooperative(dialect) -> bool:
    """Under gevent, with a driver that yields to the hub: the bounds apply. Decided at each
    call (the patches may come after harden()); a driver that blocks is said once."""
    if not _green():
        return False
    blocking = _blocking(dialect)
    if blocking is None:
        return True
    if blocking not in _warned:
        _warned.add(blocking)
        log.warning("harden: under gevent, %s: it blocks this worker in C, so no query is "
                    "bounded, only libpq's connect_timeout applies. Fix: %s, at the top of the "
                    "app module (under gunicorn --preload too)", *blocking)
    return False


_warned: set = set()


def _cancel(raw, seconds: float) -> None:
    """Ask the server to stop what the hung connection runs, where that cannot block the hub:
    psycopg 3's cancel_safe() on libpq 17 or later (non-blocking, bounded). On an older libpq
    it falls back to the blocking cancel() and ignores its timeout, holding the whole worker
    while the server does not answer. psycopg2's cancel() blocks too. Without a cancel the
    query runs on until statement_timeout, or the server's client_connection_check_interval."""
    cancel_safe = getattr(raw, "cancel_safe", None)
    capabilities = getattr(sys.modules.get("psycopg"), "capabilities", None)
    if cancel_safe is None or capabilities is None or not capabilities.has_cancel_safe():
        return
    try:
        cancel_safe(timeout=seconds)
    except Exception:  # a server we cannot reach either: closing is all that is left
        pass


def _green() -> bool:
    """Is this process under gevent, with its socket module patched?"""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and monkey.is_module_patched("socket")


class _Forked:
    """In a forked child, what stands in for a connection the parent had checked out: the
    transaction and the socket are the parent's, so rolling back or closing does nothing
    here, and anything else raises the driver's InterfaceError, which SQLAlchemy takes for a
    disconnect (`closed`; pg8000 and asyncpg read "connection is closed")."""

    closed = True

    def __init__(self, error: type) -> None:
        self._error = error

    def rollback(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise self._error("connection is closed in this process: it was checked out in the "
                          "parent when the process forked (harden)")


def _fork_safe(engine: Engine) -> None:
    """In a forked child, start a new pool before anything can check out the parent's
    connections (SQLAlchemy's pid check on checkout comes after pool_pre_ping has already
    pinged over the parent's socket), and make what was checked out a _Forked stand-in, so
    that no rollback (on close, or by the garbage collector) reaches the parent's socket. The
    old pool is dropped, not closed: closing would end the parent's connections too."""
    if not hasattr(os, "register_at_fork"):
        return  # no fork on this platform
    ref, checked_out = weakref.ref(engine), weakref.WeakSet()

    @event.listens_for(engine, "checkout")
    def remember(_dbapi_connection, _record, proxy):
        checked_out.add(proxy)

    def after_in_child() -> None:
        engine = ref()
        if engine is None:
            return
        error = getattr(engine.dialect.loaded_dbapi, "InterfaceError", Exception)
        for proxy in list(checked_out):
            stand_in, record = _Forked(error), proxy._connection_record
            if proxy.dbapi_connection is not None:
                proxy.dbapi_connection = stand_in
            if record is not None and record.dbapi_connection is not None:
                record.dbapi_connection = stand_in  # what the garbage collector's reset uses
        checked_out.clear()
        engine.dispose(close=False)
    os.register_at_fork(after_in_child=after_in_child)


def parse_interval(setting: str) -> float:
    """PostgreSQL's display of a time setting, in seconds: '0', '500ms', '15s', '2min'."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(us|ms|s|min|h|d)?\s*", setting)
    if not match:
        raise ValueError(f"not a PostgreSQL time setting: {setting!r}")
    unit = {"us": 1e-6, "ms": 1e-3, "s": 1, "min": 60, "h": 3600, "d": 86400}
    return float(match[1]) * unit[match[2] or "ms"]
