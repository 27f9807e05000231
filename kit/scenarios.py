"""The scenarios: one table that the runs, the summary and the tests all read.

Each row says how to start the app under gunicorn and how many requests it should overlap on
each route. Expectations take the caller's environment as a mapping (POOL_SIZE and the rest,
read by models.Settings), so they are pure functions of it.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from models import Settings

# gevent's monitor thread reports any greenlet that keeps the event loop for longer than this:
# the proof of cooperation (a blocking call shows up as "appears to be blocked" in the log).
MONITOR_ENV = {"GEVENT_MONITOR_THREAD_ENABLE": "true", "GEVENT_MAX_BLOCKING_TIME": "0.1"}
BLOCKED_MARK = "appears to be blocked"
SERVER_MAX_CONNECTIONS = 50  # the pgbouncer scenarios' own small server
BOUNCER_POOL = 20  # PgBouncer's server connections (default_pool_size) in those scenarios
BOUNCER_MAX_CLIENTS = 1000  # and the client connections it accepts (max_client_conn)
ASYNC_WORKER = "uvicorn_worker.UvicornWorker"  # uvicorn's worker class for gunicorn (ASGI)


@dataclass(frozen=True)
class Scenario:
    """One way to serve the app.

    python / postgres: how many requests one worker overlaps on that route:
      "one" (blocks: one at a time), "all" (every request), "threads" (one per thread),
      "pool" (as many as the pool has connections), "threads+pool" (the smaller),
      "bouncer" (PgBouncer's server connections, shared by all workers).
    hub_blocked: what gevent's monitor must report on /sleep/postgres/ ("some", "none"), or
      None where the worker is not gevent's.
    runner: a module that runs the scenario itself (python -m RUNNER), for the scenarios
      that need more than one server: outage, pgbouncer.
    """

    name: str
    app: str
    worker: str
    shows: str
    python: str
    postgres: str
    env: dict = field(default_factory=dict)
    pool_sized: bool = False  # POOL_SIZE=N, MAX_OVERFLOW=0: a connection for every request
    hub_blocked: str | None = None
    default: bool = True  # part of a plain ./run_all.sh
    workers: int | None = None  # fixed by the scenario, else --workers
    refusals: bool = False  # expected to answer some requests 503 (forced past the budget)
    runner: str | None = None
    options: tuple[str, ...] = ()  # gunicorn options before the app: --preload, -c FILE

    def environment(self, requests: int) -> dict[str, str]:
        """The variables this scenario sets on top of the caller's environment."""
        env = dict(self.env)
        if self.pool_sized:
            env.update(POOL_SIZE=str(requests), MAX_OVERFLOW="0")
        if self.worker == "gevent":
            env.update(MONITOR_ENV)
        return env

    def settings(self, requests: int, env: Mapping[str, str] = os.environ) -> Settings:
        """The app's settings under this scenario: env plus what the scenario sets."""
        return Settings.from_env({**env, **self.environment(requests)})

    def per_worker(self, endpoint: str, requests: int,
                   env: Mapping[str, str] = os.environ, seconds: float | None = None) -> int:
        """Requests one worker overlaps on ENDPOINT (PgBouncer's pool: all workers'). At
        seconds=0 /sleep/python/ sleeps not at all: its todos query is all it waits on."""
        if endpoint == "python" and seconds == 0:
            endpoint = "postgres"
        rule = {"python": self.python, "postgres": self.postgres}.get(endpoint, "all")
        if rule in ("pool", "threads+pool"):
            return min(requests, self.settings(requests, env).pool_limit)
        return {"one": 1, "all": requests, "threads": requests, "bouncer": BOUNCER_POOL}[rule]

    def expected_concurrency(self, endpoint: str, requests: int, workers: int = 1,
                             env: Mapping[str, str] = os.environ,
                             seconds: float | None = None) -> int:
        """Requests the server should overlap on ENDPOINT: at most N, W workers' worth."""
        one = self.per_worker(endpoint, requests, env, seconds)
        if self.postgres == "bouncer" and endpoint == "postgres":
            return min(requests, one)  # one queue, in PgBouncer, for every worker
        return min(requests, (self.workers or workers) * one)

    def uneven_floor(self, endpoint: str, requests: int, workers: int = 1,
                     env: Mapping[str, str] = os.environ, seconds: float | None = None) -> int:
        """The overlap if one worker takes the whole burst: gevent and gthread workers do not
        share a burst evenly (docs/budget.md, "Several workers"); sync workers do."""
        best = self.expected_concurrency(endpoint, requests, workers, env, seconds)
        if (self.workers or workers) == 1 or self.worker == "sync":
            return best
        return min(best, self.per_worker(endpoint, requests, env, seconds))

    def command(self, port: int, requests: int, workers: int = 1,
                seconds: float = 1.0, host: str = "127.0.0.1") -> list[str]:
        """`env K=V ... gunicorn ...` for this scenario, bound to host:port. --timeout
        covers N x S, so a blocked loop shows as blocking, not as a killed worker (docs/results.md)."""
        timeout = max(60, math.ceil(requests * seconds) + 30)
        argv = ["env", *(f"{k}={v}" for k, v in self.environment(requests).items()),
                "gunicorn", "--bind", f"{host}:{port}", "--workers",
                str(self.workers or workers),
                "--worker-class", self.worker,
                "--timeout", str(timeout),    # seconds without a check-in before a kill
                "--graceful-timeout", "5",    # seconds to finish requests on shutdown
                "--no-control-socket"]        # gunicorn >= 25 would leave a socket in ~
        if self.worker in ("gevent", "gthread"):
            # a greenlet, or a kept connection, each; past this many a worker stops accepting
            argv += ["--worker-connections", str(max(1000, requests + 100))]
        if self.worker == "gthread":
            argv += ["--threads", str(requests)]
        return argv + list(self.options) + [self.app]


SCENARIOS = [
    Scenario("sync", "app_sync:app", "sync", "sync worker: one request at a time",
             python="one", postgres="one"),
    Scenario("gevent", "app_sync:app", "gevent",
             "gevent worker, psycopg2 unpatched: pg_sleep blocks the event loop",
             python="all", postgres="one", hub_blocked="some"),
    Scenario("green", "app_green:app", "gevent",
             "gevent + psycogreen: both overlap, up to the pool's connections",
             python="all", postgres="pool", hub_blocked="none"),
    Scenario("green-pool", "app_green:app", "gevent",
             "green with the pool sized to N (POOL_SIZE=N, MAX_OVERFLOW=0)",
             python="all", postgres="pool", pool_sized=True, hub_blocked="none"),
    Scenario("gthread", "app_sync:app", "gthread",
             "gthread worker with N threads: threads overlap, up to the pool",
             python="threads", postgres="threads+pool"),
    Scenario("psycopg3", "app_green:app", "gevent",
             "green app on psycopg 3 (DB_DRIVER=psycopg): cooperative without psycogreen",
             python="all", postgres="pool", env={"DB_DRIVER": "psycopg"}, hub_blocked="none"),
    Scenario("flask-sqlalchemy", "examples.flask_sqlalchemy_app:app", "gevent",
             "a Flask-SQLAlchemy app with the preamble and harden() on db.engines: as green",
             python="all", postgres="pool", hub_blocked="none"),
    Scenario("async", "app_async:app", ASYNC_WORKER,
             "the asyncio alternative: Quart + SQLAlchemy's asyncio extension on asyncpg, in "
             "uvicorn's worker: both overlap, up to the pool",
             python="all", postgres="pool"),
    Scenario("async-psycopg", "app_async:app", ASYNC_WORKER,
             "the async app on psycopg 3's async connection (DB_DRIVER=psycopg) instead of "
             "asyncpg: as async", python="all", postgres="pool", env={"DB_DRIVER": "psycopg"},
             default=False),
    Scenario("psycopg3-preload", "app_sync:app", "gevent",
             "psycopg 3 imported before gevent patches (--preload, no preamble): it keeps its "
             "blocking wait, so pg_sleep holds the loop",
             python="all", postgres="one", env={"DB_DRIVER": "psycopg"}, hub_blocked="some",
             default=False, options=("--preload",)),
    Scenario("pgbouncer-direct", "app_green:app", "gevent",
             f"4 workers x pools of 50 straight at max_connections {SERVER_MAX_CONNECTIONS}, "
             "forced past the budget check: PostgreSQL refuses, the app answers 503",
             python="all", postgres="pool", env={"POOL_SIZE": "50", "MAX_OVERFLOW": "0"},
             hub_blocked="none", default=False, workers=4, refusals=True,
             runner="kit.bouncer"),
    Scenario("pgbouncer", "app_green:app", "gevent",
             f"the same through PgBouncer ({BOUNCER_POOL} server connections, transaction "
             "pooling): all answered, in waves of its pool",
             python="all", postgres="bouncer", env={"POOL_SIZE": "50", "MAX_OVERFLOW": "0"},
             hub_blocked="none", default=False, workers=4, runner="kit.bouncer"),
    Scenario("preload", "app_green:app", "gevent",
             "--preload, 2 workers, POOL_WARM=2, HARDEN=0: both workers inherit the master's "
             "connections",
             python="all", postgres="pool", env={"POOL_WARM": "2", "HARDEN": "0"},
             hub_blocked="none", default=False, workers=2, options=("--preload",),
             runner="kit.preload"),
    Scenario("preload-fixed", "app_green:app", "gevent",
             "the same with harden() (a new pool in each forked worker) and no gunicorn hook",
             python="all", postgres="pool", env={"POOL_WARM": "2"}, hub_blocked="none",
             default=False, workers=2, options=("--preload",), runner="kit.preload"),
    Scenario("frozen", "app_green:app", "gevent",
             "PostgreSQL backends frozen (SIGSTOP): QUERY_TIMEOUT bounds the green apps",
             python="all", postgres="all", default=False, runner="kit.frozen"),
    Scenario("partition", "app_green:app", "gevent",
             "every packet between the app host and the database dropped (nftables; root)",
             python="all", postgres="all", default=False, runner="kit.partition"),
    Scenario("traps", "app_green:app", "gevent",
             "traps users reported (COPY, a shared session, idle drops, GC on the hub)",
             python="all", postgres="all", default=False, runner="kit.traps"),
    Scenario("outage", "app_green:app", "gevent",
             "PostgreSQL stopped under the green app, then started again",
             python="all", postgres="all", default=False, runner="kit.outage"),
]
BY_NAME = {s.name: s for s in SCENARIOS}


def pick(names: list[str]) -> list[Scenario]:
    """The named scenarios in table order, or the default set; unknown names raise."""
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise SystemExit(f"unknown scenario {', '.join(unknown)}: choose from "
                         f"{', '.join(BY_NAME)}")
    return [s for s in SCENARIOS if s.name in names] if names else [
        s for s in SCENARIOS if s.default]


def budget(scenario: Scenario, requests: int, workers: int = 1,
           env: Mapping[str, str] = os.environ):
    """The scenario's connection budget against the server in env's DATABASE_URL."""
    from models import connection_budget, make_engine

    settings = scenario.settings(requests, env)
    engine = make_engine(settings)
    behind = scenario.postgres == "bouncer"
    try:
        return connection_budget(engine, scenario.workers or workers, settings.pool_limit,
                                 pooler_pool=BOUNCER_POOL if behind else None,
                                 pooler_max_clients=BOUNCER_MAX_CLIENTS if behind else None)
    finally:
        engine.dispose()


def whole_number(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number >= 1")
    return n


def non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r}: give a number >= 0")
    return value


def positive(text: str) -> float:
    value = non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number > 0")
    return value


def add_size_arguments(parser: argparse.ArgumentParser, requests: int = 5) -> None:
    """--requests, --seconds, --workers, --rtt, --rate, --duration: the one definition of a
    run's size and defaults."""
    parser.add_argument("--requests", type=whole_number, default=requests, metavar="N",
                        help="requests released at once per endpoint (a whole number >= 1)")
    parser.add_argument("--seconds", type=non_negative, default=1.0, metavar="S",
                        help="sleep per request (a number >= 0)")
    parser.add_argument("--workers", type=whole_number, default=1, metavar="W",
                        help="gunicorn workers per scenario (a whole number >= 1)")
    parser.add_argument("--rtt", type=non_negative, default=None, metavar="MS",
                        help="put the app and PostgreSQL on hosts MS milliseconds apart (root)")
    parser.add_argument("--rate", type=positive, default=None, metavar="R",
                        help="a stream instead of a burst: R requests/s on a schedule "
                             "(kit/stream.py)")
    parser.add_argument("--duration", type=positive, default=None, metavar="D",
                        help="with --rate: seconds each stream lasts (default 10)")
