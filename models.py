"""The shared part of the apps: settings, the Todo model, the engines and their sessions.

    from models import Session, Todo, settings            # app_sync.py, app_green.py
    engine = make_async_engine(settings)                  # app_async.py (asyncio)

Every setting comes from an environment variable, read here and nowhere else:

    DATABASE_URL       (required) e.g. postgresql://user:pass@127.0.0.1:5432/db; libpq's
                                  ?sslmode= and the like reach asyncpg too (make_async_engine)
    DB_DRIVER          psycopg2   driver for a plain postgresql:// URL: psycopg2 | psycopg
                                  | asyncpg (a URL that names its driver wins). app_async.py
                                  runs asyncpg, or psycopg 3's async connection for psycopg
    POOL_SIZE          5          connections the pool keeps open
    MAX_OVERFLOW       10         extra connections opened under load, closed afterwards
    POOL_TIMEOUT       30         seconds a request waits for a connection, then 503
    SLEEP_SECONDS      1.0        default ?seconds= of the /sleep/ routes
    SLEEP_MAX          10         largest ?seconds= accepted (a larger one is a 400)
    STATEMENT_TIMEOUT  SLEEP_MAX+5  server-side limit on any one statement, in seconds
    QUERY_TIMEOUT      STATEMENT_TIMEOUT+2  client-side limit on any wait for the database
                                  (under gevent; app_async.py: statements, pre-ping, teardown),
                                  then 503: a hung server cannot hold us
    CONNECT_TIMEOUT    5          seconds to wait for a new database connection
    POOL_WARM          0          connections opened when the app starts (at most POOL_SIZE)
    HARDEN             1          0: build the engine without harden.py, to see what it
                                  prevents (the preload trap, unbounded waits under gevent);
                                  app_async.py's engine does without it (make_async_engine)
    PGAPPNAME          flask-blocking-kit  the connections' application_name (libpq's own
                                  variable), which pg_stat_activity shows: leaks can be counted
"""

from __future__ import annotations

import asyncio
import inspect
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlencode

from sqlalchemy import create_engine, make_url, text
from sqlalchemy.engine import URL, Engine
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.types import String

from harden import harden

APPLICATION_NAME = "flask-blocking-kit"  # PGAPPNAME's default: pg_stat_activity shows it
DRIVERS = ("psycopg2", "psycopg", "asyncpg")  # asyncpg: app_async.py only (asyncio)
MAX_TIMEOUT = 2_147_483  # s: PostgreSQL's time settings are whole ms in a 32-bit int


class ConfigError(ValueError):
    """A setting is missing or out of range; the message says which and why."""


def _number(env: Mapping[str, str], name: str, default: float, kind=float,
            low: float = 0) -> float:
    raw = env.get(name, "")
    try:
        value = kind(raw) if raw.strip() else kind(default)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a {kind.__name__}") from None
    if not math.isfinite(value) or value < low:
        raise ConfigError(f"{name}={raw!r} must be a finite number >= {low}")
    return value


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip()
    if raw not in ("", "0", "1"):
        raise ConfigError(f"{name}={raw!r}: give 0 or 1")
    return default if not raw else raw == "1"


@dataclass(frozen=True)
class Settings:
    database_url: URL
    driver: str
    pool_size: int
    max_overflow: int
    pool_timeout: float
    sleep_seconds: float
    sleep_max: float
    statement_timeout: float
    connect_timeout: int
    pool_warm: int
    query_timeout: float
    harden: bool = True
    application_name: str = APPLICATION_NAME

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "Settings":
        """The one reading of the environment (or any mapping); ConfigError when invalid."""
        raw_url = env.get("DATABASE_URL", "").strip()
        if not raw_url:
            raise ConfigError("DATABASE_URL is not set (run_all.sh and the tests set it "
                              "for their own throwaway PostgreSQL)")
        asked = env.get("DB_DRIVER", "").strip()
        if asked and asked not in DRIVERS:
            raise ConfigError(f"DB_DRIVER={asked!r}: use one of {', '.join(DRIVERS)}")
        url = database_url(raw_url, asked or "psycopg2")
        driver = url.get_driver_name()
        if driver not in DRIVERS:
            raise ConfigError(f"DATABASE_URL names the driver {driver!r}: use one of "
                              f"{', '.join(DRIVERS)}")
        if asked and asked != driver:
            raise ConfigError(f"DB_DRIVER={asked} but DATABASE_URL names {driver}: "
                              f"drop one of them")
        sleep_max = _number(env, "SLEEP_MAX", 10)
        statement_timeout = _number(env, "STATEMENT_TIMEOUT", sleep_max + 5)
        settings = cls(
            database_url=url,
            driver=driver,
            pool_size=_number(env, "POOL_SIZE", 5, int, low=1),
            max_overflow=_number(env, "MAX_OVERFLOW", 10, int),
            pool_timeout=_number(env, "POOL_TIMEOUT", 30),
            sleep_seconds=_number(env, "SLEEP_SECONDS", 1.0),
            sleep_max=sleep_max,
            statement_timeout=statement_timeout,
            connect_timeout=_number(env, "CONNECT_TIMEOUT", 5, int, low=1),
            pool_warm=_number(env, "POOL_WARM", 0, int),
            query_timeout=_number(env, "QUERY_TIMEOUT", statement_timeout + 2),
            harden=_flag(env, "HARDEN", True),
            application_name=env.get("PGAPPNAME", "").strip() or APPLICATION_NAME,
        )
        if not 0.001 <= settings.statement_timeout <= MAX_TIMEOUT:
            raise ConfigError(f"STATEMENT_TIMEOUT ({settings.statement_timeout:g} s) must be "
                              f"from 0.001 to {MAX_TIMEOUT} s: PostgreSQL counts whole "
                              f"milliseconds (0 would mean no limit) in a 32-bit integer"
                              + (" (its default is SLEEP_MAX + 5)" if "STATEMENT_TIMEOUT"
                                 not in env else ""))
        if settings.query_timeout <= settings.statement_timeout:
            raise ConfigError(f"QUERY_TIMEOUT ({settings.query_timeout:g} s) must be longer "
                              f"than STATEMENT_TIMEOUT ({settings.statement_timeout:g} s): "
                              f"the server cancels first, the client gives up after")
        if settings.statement_timeout <= settings.sleep_max:
            raise ConfigError(f"STATEMENT_TIMEOUT ({settings.statement_timeout:g} s) must be "
                              f"longer than SLEEP_MAX ({settings.sleep_max:g} s), or every "
                              f"long /sleep/postgres/ would be cancelled")
        if settings.pool_warm > settings.pool_size:
            raise ConfigError(f"POOL_WARM ({settings.pool_warm}) is above POOL_SIZE "
                              f"({settings.pool_size}): the pool would close the extra ones")
        if settings.sleep_seconds > settings.sleep_max:
            raise ConfigError(f"SLEEP_SECONDS ({settings.sleep_seconds:g}) is above "
                              f"SLEEP_MAX ({settings.sleep_max:g})")
        return settings

    @property
    def pool_limit(self) -> int:
        """Most connections one process's pool opens: pool_size + max_overflow."""
        return self.pool_size + self.max_overflow


def database_url(raw: str, driver: str = "psycopg2") -> URL:
    """Parse DATABASE_URL; a plain postgresql:// URL gets DB_DRIVER's driver (SQLAlchemy 2.1
    would otherwise pick psycopg 3)."""
    try:
        url = make_url("postgresql://" + raw[len("postgres://"):]
                       if raw.startswith("postgres://") else raw)
    except Exception:
        raise ConfigError("DATABASE_URL is not a valid URL") from None
    if url.get_backend_name() != "postgresql":
        raise ConfigError(f"DATABASE_URL must be a PostgreSQL URL, not {url.drivername}://")
    if "+" not in url.drivername:
        url = url.set(drivername=f"postgresql+{driver}")
    return url


def masked(url: URL | str) -> str:
    """A URL safe to print or write to JSON: any password replaced by ***."""
    if isinstance(url, str):
        try:
            url = make_url(url)
        except Exception:
            return "(unparseable URL)"
    return url.render_as_string(hide_password=True)


def make_engine(settings: Settings) -> Engine:
    """The engine both apps use: a bounded QueuePool that checks connections before use,
    hardened by harden.py (fork-safe; under gevent, every wait on the database bounded)."""
    if settings.driver == "asyncpg":
        raise ConfigError("asyncpg is an asyncio driver: serve app_async.py, or give "
                          "DB_DRIVER=psycopg2 or psycopg to the other apps and tools")
    engine = create_engine(
        settings.database_url,
        pool_size=settings.pool_size,        # kept open between requests
        max_overflow=settings.max_overflow,  # opened under load, closed when returned
        pool_timeout=settings.pool_timeout,  # then sqlalchemy.exc.TimeoutError -> 503
        pool_pre_ping=True,                  # a connection the database dropped is replaced
        connect_args={
            "application_name": settings.application_name,
            "connect_timeout": settings.connect_timeout,
            # a runaway statement cannot hold a connection (and a pool slot) forever
            "options": f"-c statement_timeout={int(settings.statement_timeout * 1000)}",
        },
    )
    if not settings.harden:
        return engine
    return harden(engine, connect_timeout=settings.connect_timeout,
                  query_timeout=settings.query_timeout)


def make_async_engine(settings: Settings) -> AsyncEngine:
    """app_async.py's engine: SQLAlchemy's asyncio extension on asyncpg (psycopg 3's async
    connection when DB_DRIVER=psycopg; psycopg2 has no asyncio mode). The same pool settings
    as make_engine; harden()'s bounds come from the driver instead, and from app_async.py's
    asyncio.timeout (docs/results.md): psycopg 3's pre-ping gets one here.

    No connection is opened here: the pool fills inside the worker's event loop, so nothing
    crosses a fork (gunicorn --preload) and the engine needs no fork hook."""
    statement_ms = str(int(settings.statement_timeout * 1000))
    if settings.driver == "psycopg":
        connect_args = {"application_name": settings.application_name,
                        "connect_timeout": settings.connect_timeout,  # psycopg's own, in Python
                        "options": f"-c statement_timeout={statement_ms}"}
    else:
        connect_args = {"server_settings": {"application_name": settings.application_name,
                                            "statement_timeout": statement_ms},
                        "timeout": settings.connect_timeout,  # asyncpg's connect bound
                        # every statement the driver sends (the pre-ping too): on expiry
                        # asyncpg asks the server to cancel and raises TimeoutError
                        "command_timeout": settings.query_timeout}
    driver = "psycopg" if settings.driver == "psycopg" else "asyncpg"
    url = settings.database_url.set(drivername=f"postgresql+{driver}")
    if driver == "asyncpg":
        url, connect_args = _for_asyncpg(url, connect_args)
    engine = create_async_engine(
        url,
        pool_size=settings.pool_size,        # the same bounded pool as make_engine's
        max_overflow=settings.max_overflow,
        pool_timeout=settings.pool_timeout,  # then sqlalchemy.exc.TimeoutError -> 503
        pool_pre_ping=True,
        connect_args=connect_args,
    )
    if driver == "psycopg":
        _bound_psycopg_ping(engine, settings.query_timeout)
    return engine


# libpq's parameters that asyncpg reads from a DSN (not as keywords of its connect())
ASYNCPG_DSN = ("sslmode", "sslcert", "sslkey", "sslrootcert", "sslcrl", "sslpassword",
               "ssl_min_protocol_version", "ssl_max_protocol_version", "sslnegotiation",
               "target_session_attrs", "krbsrvname", "gsslib", "service", "passfile")
SETTINGS_WIN = ("connect_timeout", "application_name", "options")  # as in make_engine


def _for_asyncpg(url: URL, connect_args: dict) -> tuple[URL, dict]:
    """DATABASE_URL's query for asyncpg, which SQLAlchemy passes as keywords of its connect():
    libpq's sslmode=, sslrootcert=... go in a DSN that asyncpg reads as libpq does; the
    settings' own (CONNECT_TIMEOUT, PGAPPNAME, STATEMENT_TIMEOUT) replace connect_timeout=,
    application_name= and options=, as they do for psycopg2; asyncpg's keywords stay; any
    other parameter is a ConfigError naming it, not a TypeError on every request."""
    import asyncpg

    takes = set(inspect.signature(asyncpg.connect).parameters) | {
        "prepared_statement_cache_size", "prepared_statement_name_func"}  # SQLAlchemy's
    dsn, keep = {}, {}
    for key, value in url.query.items():
        if key in ASYNCPG_DSN:
            dsn[key] = value
        elif key in takes:
            keep[key] = value
        elif key not in SETTINGS_WIN:
            raise ConfigError(f"DATABASE_URL's {key}= has no asyncpg equivalent: drop it, "
                              f"or serve app_async.py with DB_DRIVER=psycopg")
    if dsn:
        connect_args = {**connect_args, "dsn": "postgresql://?" + urlencode(dsn, doseq=True)}
    return url.set(query=keep), connect_args


def _bound_psycopg_ping(engine: AsyncEngine, seconds: float) -> None:
    """The pool's pre-ping on psycopg 3 within SECONDS, as asyncpg's command_timeout bounds
    its own: SQLAlchemy's ping has no timeout there, and a backend that froze while its
    connection sat in the pool held the request until the thaw. On expiry psycopg asks the
    server to cancel, waits up to 5 s for it, and closes the connection; the TimeoutError
    fails the checkout, which discards the connection (the app answers 503)."""

    async def ping(raw) -> None:  # psycopg's AsyncConnection, pinged as SQLAlchemy does
        async with asyncio.timeout(seconds):
            was = raw.autocommit
            if not was:
                await raw.set_autocommit(True)  # no transaction begun by the ping
            try:
                await raw.execute("SELECT 1")
            finally:
                if not was and not raw.closed:
                    await raw.set_autocommit(False)

    def do_ping(connection) -> bool:  # SQLAlchemy's adapted connection, in its greenlet
        connection.run_async(ping)
        return True
    engine.sync_engine.dialect.do_ping = do_ping


async def warm_async(engine: AsyncEngine, connections: int) -> None:
    """warm() for the async engine, run in the worker's loop (Quart's before_serving)."""
    opened = [await engine.connect() for _ in range(connections)]
    for conn in opened:
        await conn.close()


def warm(engine: Engine, connections: int) -> None:
    """Open `connections` now, so the first requests do not pay for connecting. Under gunicorn
    --preload this runs in the master; harden() starts each worker on a pool of its own."""
    opened = [engine.connect() for _ in range(connections)]
    for conn in opened:
        conn.close()  # back to the pool, still open


class Base(DeclarativeBase):
    pass


class Todo(Base):
    __tablename__ = "todos"

    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(60))
    done: Mapped[bool] = mapped_column(default=False)
    priority: Mapped[int] = mapped_column(default=0)

    def as_dict(self) -> dict:
        return {"id": self.id, "title": self.title, "done": self.done,
                "priority": self.priority}


@dataclass(frozen=True)
class Budget:
    """Connections a deployment opens against what the server (and a pooler) accept.

    Without a pooler every pooled connection is a server connection:
        hosts x workers x (pool_size + max_overflow) <= max_connections - reserved.
    Behind PgBouncer the app's connections end at PgBouncer, which opens only its own pool:
        hosts x workers x (pool_size + max_overflow) <= max_client_conn, and
        poolers x pooler_pool <= max_connections - reserved.
    """

    hosts: int
    workers: int
    per_worker: int
    max_connections: int
    reserved: int
    pooler_pool: int | None = None  # PgBouncer's default_pool_size, per pooler
    pooler_max_clients: int | None = None  # its max_client_conn
    poolers: int = 1  # PgBouncer instances (one central, or one per host)

    @property
    def needed(self) -> int:
        """Client connections the apps may open."""
        return self.hosts * self.workers * self.per_worker

    @property
    def server_needed(self) -> int:
        """Connections the server must accept."""
        return self.needed if self.pooler_pool is None else self.poolers * self.pooler_pool

    @property
    def available(self) -> int:
        return self.max_connections - self.reserved

    @property
    def ok(self) -> bool:
        clients_ok = self.pooler_max_clients is None or (
            self.needed <= self.poolers * self.pooler_max_clients)
        return self.server_needed <= self.available and clients_ok

    def __str__(self) -> str:
        hosts = f"{self.hosts} hosts x " if self.hosts != 1 else ""
        verdict = "fits" if self.ok else "OVER BUDGET"
        apps = (f"{hosts}{self.workers} workers x {self.per_worker} (pool_size + "
                f"max_overflow) = {self.needed} connections")
        server = (f"the server accepts {self.available} (max_connections "
                  f"{self.max_connections} - {self.reserved} reserved)")
        if self.pooler_pool is None:
            return f"{apps}; {server}: {verdict}"
        each = f"{self.poolers} x " if self.poolers != 1 else ""
        total = f" = {self.server_needed}" if self.poolers != 1 else ""
        return (f"{apps} to PgBouncer (max_client_conn {each}{self.pooler_max_clients}), "
                f"which opens {each}{self.pooler_pool}{total}; {server}: {verdict}")


LIMITS = text("SELECT name, setting::int FROM pg_settings WHERE name IN "
              "('max_connections', 'superuser_reserved_connections', 'reserved_connections')")


def connection_budget(engine: Engine, workers: int, per_worker: int, hosts: int = 1,
                      pooler_pool: int | None = None,
                      pooler_max_clients: int | None = None) -> Budget:
    """Ask the server for its limits and compare them with hosts x workers x per_worker.

    e.g. `print(connection_budget(engine, workers=4, per_worker=settings.pool_limit))`; behind
    PgBouncer, give its default_pool_size and max_client_conn."""
    with engine.connect() as conn:
        limits = dict(conn.execute(LIMITS).all())
    return _budget(limits, hosts, workers, per_worker, pooler_pool, pooler_max_clients)


async def async_connection_budget(engine: AsyncEngine, workers: int, per_worker: int,
                                  hosts: int = 1, pooler_pool: int | None = None,
                                  pooler_max_clients: int | None = None) -> Budget:
    """connection_budget() for app_async.py's engine (await it). Its pool is bounded by the
    same pool_size + max_overflow per worker, shared by all the requests of its event loop."""
    async with engine.connect() as conn:
        limits = dict((await conn.execute(LIMITS)).all())
    return _budget(limits, hosts, workers, per_worker, pooler_pool, pooler_max_clients)


def _budget(limits: dict, hosts: int, workers: int, per_worker: int,
            pooler_pool: int | None, pooler_max_clients: int | None) -> Budget:
    reserved = limits.get("superuser_reserved_connections", 0) + limits.get(
        "reserved_connections", 0)
    return Budget(hosts, workers, per_worker, limits["max_connections"], reserved,
                  pooler_pool, pooler_max_clients)


def __getattr__(name: str):
    """settings, engine and Session are built on first use (`from models import Session` is
    one), so `import models` alone reads no variable and opens nothing. Each gunicorn worker
    imports the app after it forks and so builds its own engine and pool."""
    if name not in ("settings", "engine", "Session"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    global settings, engine, Session
    if "settings" not in globals():
        settings = Settings.from_env()
    if name != "settings":  # app_async.py asks for settings alone, and builds its own engine
        engine = make_engine(settings)
        Session = sessionmaker(engine, expire_on_commit=False)
    return globals()[name]
