"""harden(engine): a SQLAlchemy engine that is safe to fork and never waits unbounded under gevent.

Copy this one file into your project (it needs only SQLAlchemy), then wrap your engine:

    from harden import harden

    engine = harden(create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=0,
                                  connect_args={"options": "-c statement_timeout=15000"}))

With Flask-SQLAlchemy, in the app factory after `db.init_app(app)`:

    with app.app_context():
        harden(db.engine)

Keep the cooperative preamble at the very top of the app file (gevent's monkey.patch_all(),
then psycogreen's patch_psycopg() for psycopg2); harden() does not replace it.

What it does, on any worker (sync, gthread, gevent, a plain script):
  - Fork safety. In a child process (gunicorn --preload, multiprocessing) the engine starts a
    new pool at fork, so a connection opened in the parent is never used in the child, with no
    gunicorn hook (psycopg2 and psycopg 3 do not finalise a connection in a forked child, so
    dropping the parent's pool sends nothing on its sockets).
  - libpq's connect_timeout, when the engine sets none: a blocking connect gives up after
    `connect_timeout` seconds.
Under gevent only (socket patched; decided at each call, so an engine made before the patch,
in a --preload master, is covered once the worker patched):
  - Every connect waits at most `connect_timeout` (psycogreen drops libpq's connect_timeout).
  - Every driver call (execute, executemany, pre-ping, commit, rollback) waits at most
    `query_timeout`. On expiry the server is asked to cancel (psycopg 3; with psycopg2 set
    the server's client_connection_check_interval), the connection is closed, so the pool
    throws it away, and the driver's OperationalError is raised: map it to a 503.
  - query_timeout=None: the server's statement_timeout (asked once per process, `SHOW
    statement_timeout`) plus 2 s, so a slow query is cancelled by the server first and only a
    server that answers nothing (frozen, partitioned) hits this bound. A statement_timeout of
    0 means no query bound; pass query_timeout to set one anyway.
What sync and gthread workers still lack: a bound on a query to a server that stopped
answering. statement_timeout cannot fire there; gunicorn's --timeout kills a sync worker, and
nothing stops a gthread one. libpq's keepalives_* and tcp_user_timeout catch a dropped path,
not a frozen server (its kernel still acknowledges).
Two things it cannot do for you under gevent: import psycopg 3 after the patch (it picks its
wait function at import; harden() logs a warning when it finds the blocking one), and give
psycopg2 an address (hostaddr=): libpq resolves a host name in C, holding the whole worker.
Calling harden() again on the same engine does nothing more. It returns the engine.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import weakref

from sqlalchemy import event
from sqlalchemy.engine import Engine

__all__ = ["harden"]
MARGIN = 2.0  # seconds past statement_timeout before the client gives up on its own


def harden(engine: Engine, *, connect_timeout: float = 5,
           query_timeout: float | None = None) -> Engine:
    """Make ENGINE fork-safe and, under gevent, bounded; returns ENGINE (see the module doc)."""
    if getattr(engine.dialect, "_hardened", False):
        return engine
    engine.dialect._hardened = True
    _forget_parent_pool_at_fork(engine)
    bound = {"query": query_timeout, "asked": query_timeout is not None}
    dialect, error = engine.dialect, engine.dialect.loaded_dbapi.OperationalError

    @event.listens_for(engine, "do_connect")
    def connect(dialect, _record, cargs, cparams):
        if dialect.name == "postgresql":
            cparams.setdefault("connect_timeout", max(1, round(connect_timeout)))
        if not _green():
            return None  # SQLAlchemy connects as usual: libpq's connect_timeout applies
        from gevent import Timeout

        _warn_if_psycopg_blocks()
        with Timeout(connect_timeout, error(f"no answer from the database within "
                                            f"connect_timeout ({connect_timeout:g} s)")):
            conn = dialect.connect(*cargs, **cparams)
            try:
                if not bound["asked"]:  # query_timeout=None: statement_timeout + MARGIN
                    bound["query"], bound["asked"] = _from_statement_timeout(conn), True
            except BaseException:
                conn.close()
                raise
            return conn

    def bounded(call, connection_of):
        def run(*args, **kw):
            seconds = bound["query"]
            if seconds is None or not _green():
                return call(*args, **kw)
            from gevent import Timeout

            timer = Timeout.start_new(seconds)
            try:
                return call(*args, **kw)
            except BaseException:
                if timer.pending:  # not our timer's doing: the driver's own error
                    raise
                # ours, or what the driver raised while unwinding from it (psycopg 3's ping
                # restores autocommit in a `finally`): the connection is hung mid-protocol.
                # SQLAlchemy passes commit/rollback the pool's proxy: close the driver's
                # connection under it, so SQLAlchemy sees a disconnect and invalidates it.
                raw = connection_of(*args)
                raw = getattr(raw, "dbapi_connection", raw)
                _cancel(raw, min(0.5, connect_timeout))
                raw.close()
                raise error(f"no answer from the database within query_timeout "
                            f"({seconds:g} s)") from None
            finally:
                timer.close()
        return run

    cursor_of = lambda cursor, *_, **__: cursor.connection  # noqa: E731
    itself = lambda conn, *_, **__: conn  # noqa: E731
    for name, connection_of in (("do_execute", cursor_of), ("do_execute_no_params", cursor_of),
                                ("do_executemany", cursor_of), ("do_ping", itself),
                                ("do_rollback", itself), ("do_commit", itself)):
        setattr(dialect, name, bounded(getattr(dialect, name), connection_of))
    return engine


def _warn_if_psycopg_blocks() -> None:
    """psycopg 3 picks its wait function when imported: imported before gevent patched (a
    --preload master that imported the app first), it keeps the C one, which blocks the
    whole worker. Say so once; the fix is to patch first."""
    waiting = sys.modules.get("psycopg.waiting")
    if waiting is not None and waiting.wait.__name__ == "wait_c" and not _warned:
        _warned.append(True)
        logging.getLogger("harden").warning(
            "psycopg 3 was imported before gevent patched: its queries block this worker. "
            "Call gevent.monkey.patch_all() before anything imports psycopg (under "
            "gunicorn --preload: at the top of the app module)")


_warned: list = []


def _cancel(raw, seconds: float) -> None:
    """Ask the server to stop what the hung connection runs, where that cannot block the hub:
    psycopg 3's cancel_safe() (non-blocking, bounded). Closing alone leaves the query running
    until it ends or statement_timeout fires; psycopg2's cancel() blocks, so it is not used
    (set the server's client_connection_check_interval instead: docs/faults.md)."""
    cancel_safe = getattr(raw, "cancel_safe", None)
    if cancel_safe is None:
        return
    try:
        cancel_safe(timeout=seconds)
    except Exception:  # a server we cannot reach either: closing is all that is left
        pass


def _green() -> bool:
    """Is this process under gevent, with its socket module patched?"""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and monkey.is_module_patched("socket")


def _forget_parent_pool_at_fork(engine: Engine) -> None:
    """In a forked child, start a new pool before anything can check out the parent's
    connections (SQLAlchemy's pid check on checkout comes after pool_pre_ping has already
    pinged over the parent's socket). The old pool is dropped, not closed: closing would end
    the parent's connections too."""
    if not hasattr(os, "register_at_fork"):
        return  # no fork on this platform
    ref = weakref.ref(engine)

    def after_in_child() -> None:
        engine = ref()
        if engine is not None:
            engine.dispose(close=False)
    os.register_at_fork(after_in_child=after_in_child)


def _from_statement_timeout(conn) -> float | None:
    """statement_timeout + MARGIN seconds, read on a new DBAPI connection; None if 0."""
    cursor = conn.cursor()
    try:
        cursor.execute("SHOW statement_timeout")
        setting = cursor.fetchone()[0]
    finally:
        cursor.close()
        conn.rollback()
    seconds = parse_interval(setting)
    return None if not seconds else seconds + MARGIN


def parse_interval(setting: str) -> float:
    """PostgreSQL's display of a time setting, in seconds: '0', '500ms', '15s', '2min'."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(us|ms|s|min|h|d)?\s*", setting)
    if not match:
        raise ValueError(f"not a PostgreSQL time setting: {setting!r}")
    unit = {"us": 1e-6, "ms": 1e-3, "s": 1, "min": 60, "h": 3600, "d": 86400}
    return float(match[1]) * unit[match[2] or "ms"]
