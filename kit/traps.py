"""Traps users reported with gevent, psycogreen and SQLAlchemy, reproduced and fixed, each a check.

    python -m kit.traps [--only copy shared-session idle] [--json FILE]
    (also: ./run_all.sh --scenario traps)

Runs under gevent with psycogreen (as the green app does), against DATABASE_URL or a
throwaway PostgreSQL of its own:
  copy            psycopg2's COPY with psycogreen's wait callback, psycopg 3's, and a cursor
                  that streams instead (docs/traps.md)
  shared-session  one Session used by two greenlets at once, then a session per greenlet
  idle            pooled connections the server drops after idle_session_timeout, with and
                  without pool_pre_ping, and a greenlet that holds its connection idle
  gc-reset        a checkout never closed, in a reference cycle, collected on the hub: its
                  rollback cannot wait there; then the same work closed by a `with`
"""

from gevent import monkey

monkey.patch_all()

from psycogreen.gevent import patch_psycopg  # noqa: E402

patch_psycopg()

import io  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
from sqlalchemy import create_engine, exc, text  # noqa: E402
from sqlalchemy.orm import Session, scoped_session, sessionmaker  # noqa: E402

from kit.checks import check  # noqa: E402
from kit.checks import main as checks_main  # noqa: E402
from kit.checks import write as write_checks  # noqa: E402
from models import database_url  # noqa: E402

TRAPS = ["copy", "shared-session", "idle", "gc-reset"]


def copy(url: str, checks: list) -> None:
    """COPY ... TO STDOUT: refused by psycopg2 under a wait callback; psycopg 3 copies, four at
    once, overlapping; a server-side cursor streams with psycopg2 and overlaps too."""
    engine = create_engine(database_url(url, "psycopg2"))
    with engine.connect() as conn:
        try:
            conn.connection.dbapi_connection.cursor().copy_expert(
                "COPY (SELECT 1) TO STDOUT", io.StringIO())
            said = "copied"
        except Exception as error:  # psycopg2.ProgrammingError
            said = f"{type(error).__name__}: {str(error).strip()}"
    check(checks, "copy: psycopg2's copy_expert under psycogreen",
          "refused: it cannot wait through the callback", said,
          "asynchronous callback" in said)

    def psycopg3_copy(_):
        import psycopg

        with psycopg.connect(url) as conn, conn.cursor() as cur:
            rows = 0
            with cur.copy("COPY (SELECT g FROM pg_sleep(0.5), generate_series(1, 3) g) "
                          "TO STDOUT") as copy:
                for _ in copy.rows():
                    rows += 1
            return rows

    started = time.perf_counter()
    rows = [job.value for job in gevent.joinall([gevent.spawn(psycopg3_copy, i)
                                                 for i in range(4)])]
    took = time.perf_counter() - started
    check(checks, "copy: psycopg 3's cursor.copy(), 4 at once (0.5 s each)",
          "all rows, overlapping: under 2 x 0.5 s", f"{rows} rows, {took:.2f} s",
          rows == [3] * 4 and took < 1.0)

    def streamed(_):
        with engine.connect() as conn:
            result = conn.execution_options(stream_results=True, max_row_buffer=100).execute(
                text("SELECT g FROM pg_sleep(0.5), generate_series(1, 3) g"))
            return sum(1 for _ in result)

    started = time.perf_counter()
    rows = [job.value for job in gevent.joinall([gevent.spawn(streamed, i) for i in range(4)])]
    took = time.perf_counter() - started
    check(checks, "copy: psycopg2, a server-side cursor instead (stream_results), 4 at once",
          "all rows, overlapping: under 2 x 0.5 s", f"{rows} rows, {took:.2f} s",
          rows == [3] * 4 and took < 1.0)
    engine.dispose()


def shared_session(url: str, checks: list) -> None:
    """Two greenlets on one Session (a gevent.spawn inside a request, or a thread-keyed
    scoped_session where threads are not patched); then one session per greenlet."""
    import greenlet

    engine = create_engine(database_url(url, "psycopg2"))

    def query(on):
        try:
            on.execute(text("SELECT pg_sleep(0.2)"))
            return "ok"
        except Exception as error:  # SQLAlchemy's own check, or the driver's
            orig = getattr(error, "orig", None) or error
            return f"{type(orig).__name__}: {str(orig).strip().splitlines()[0][:70]}"

    for state in ("fresh", "holding its connection"):
        session = Session(engine)
        if state != "fresh":
            session.execute(text("SELECT 1"))  # a request that already queried
        shared = [job.value for job in gevent.joinall([gevent.spawn(query, session)
                                                       for _ in range(2)])]
        session.invalidate()
        check(checks, f"shared-session: one Session ({state}), two greenlets",
              "one fails: the session or its connection is already busy", str(shared),
              shared.count("ok") == 1)
    per_greenlet = scoped_session(sessionmaker(engine), scopefunc=greenlet.getcurrent)

    def own():
        try:
            return query(per_greenlet())
        finally:
            per_greenlet.remove()

    started = time.perf_counter()
    fixed = [job.value for job in gevent.joinall([gevent.spawn(own) for _ in range(2)])]
    took = time.perf_counter() - started
    check(checks, "shared-session: scoped_session(scopefunc=greenlet.getcurrent)",
          "both ok, overlapping (under 0.4 s)", f"{fixed}, {took:.2f} s",
          fixed == ["ok", "ok"] and took < 0.4)
    engine.dispose()


def idle(url: str, checks: list) -> None:
    """The server ends sessions idle for 300 ms (idle_session_timeout; a middlebox or
    PgBouncer's client_idle_timeout does the same): with and without pool_pre_ping."""
    options = {"connect_args": {"options": "-c idle_session_timeout=300"}}
    for pre_ping in (False, True):
        engine = create_engine(database_url(url, "psycopg2"), pool_pre_ping=pre_ping, **options)
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        gevent.sleep(0.8)  # the pooled connection is ended by the server meanwhile
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            said = "ok"
        except exc.DBAPIError as error:
            said = f"{type(error.orig).__name__}: {str(error.orig).strip().splitlines()[0]}"
        expected = "ok: the dead connection is replaced" if pre_ping else "the first query fails"
        check(checks, f"idle: pooled connection dropped, pool_pre_ping={pre_ping}", expected,
              said, (said == "ok") is pre_ping)
        engine.dispose()
    engine = create_engine(database_url(url, "psycopg2"), pool_pre_ping=True, **options)

    def background():  # a greenlet that checks out once and keeps its connection
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            conn.commit()
            gevent.sleep(0.8)
            try:
                conn.execute(text("SELECT 1"))
                return "ok"
            except exc.DBAPIError as error:
                return f"{type(error.orig).__name__}"

    held = gevent.spawn(background).get()
    check(checks, "idle: a background greenlet holding one connection, pool_pre_ping=True",
          "fails: pre-ping runs at checkout only; check out per unit of work", held,
          held != "ok")
    engine.dispose()


def gc_reset(url: str, checks: list) -> None:
    """A checkout left open in a reference cycle is finalised by the garbage collector; when
    that runs on the hub, the pool's rollback must wait on the socket there, and cannot."""
    import gc
    import io
    import logging

    errors = io.StringIO()
    handler = logging.StreamHandler(errors)
    logging.getLogger("sqlalchemy.pool").addHandler(handler)
    engine = create_engine(database_url(url, "psycopg2"), pool_size=2, max_overflow=0)

    class Holder:
        pass

    def leak():
        holder = Holder()
        holder.me = holder  # a cycle: only the collector frees it
        holder.conn = engine.connect()
        holder.conn.execute(text("SELECT 1"))  # a transaction open, never closed

    def closed():
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    try:
        gc.disable()  # the collector runs where we say: on the hub, as it may at any time
        for work, name in ((leak, "leaked in a cycle"), (closed, "closed by `with`")):
            before = errors.getvalue().count("Exception during reset")
            for _ in range(3):
                gevent.spawn(work).join()
                gevent.get_hub().loop.run_callback(gc.collect)
                gevent.sleep(0.1)
            text_ = errors.getvalue()
            count = text_.count("Exception during reset") - before
            kinds = sorted({k for k in ("BlockingSwitchOutError", "InvalidSwitchError")
                            if k in text_}) if count else []
            leaked = name.startswith("leaked")
            check(checks, f"gc-reset: 3 checkouts {name}, then the collector on the hub",
                  "reset errors on the hub" if leaked else "no reset error",
                  f"{count} x 'Exception during reset' {kinds}; {engine.pool.status()}",
                  count == 3 if leaked else count == 0)
    finally:
        gc.enable()
        logging.getLogger("sqlalchemy.pool").removeHandler(handler)
        engine.dispose()


def run_parts(parts, requests: int = 0, seconds: float = 0, only: list[str] = TRAPS) -> list:
    """Each trap in turn; writes PARTS/traps.json for the summary (N and S do not apply)."""
    from kit.run import seeded

    checks: list = []
    with seeded() as (url, _):
        for name in only:
            print(f"traps: {name}", file=sys.stderr, flush=True)
            {"copy": copy, "shared-session": shared_session, "idle": idle,
             "gc-reset": gc_reset}[name](url, checks)
    return write_checks(parts, "traps", checks)


def main(argv: list[str] | None = None) -> int:
    return checks_main("traps", __doc__, lambda parts, args: run_parts(parts, only=args.only),
                       argv,
                       lambda parser: parser.add_argument("--only", nargs="+", choices=TRAPS,
                                                          default=TRAPS))


if __name__ == "__main__":
    sys.exit(main())
