"""The scenarios of run_all.sh: one table that the run, the summary and the tests all read.

    python -m kit.scenarios names [NAME ...]                 # check names, default set if none
    python -m kit.scenarios command NAME --port P [--requests N] [--workers W]
    python -m kit.scenarios expect NAME ENDPOINT [--requests N] [--workers W]
    python -m kit.scenarios budget NAME [--requests N] [--workers W]   # exit 1 when over
    python -m kit.scenarios runner NAME          # the module that runs it, if not run_all.sh

`command` prints the scenario's command line, one word a line (`env K=V ... gunicorn ...`), for
the shell to run as it is. POOL_SIZE, MAX_OVERFLOW and POOL_TIMEOUT from the environment apply
to every scenario that does not set its own.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, field

# gevent's monitor thread reports any greenlet that keeps the event loop for longer than this:
# the proof of cooperation (a blocking call shows up as "appears to be blocked" in the log).
MONITOR_ENV = {"GEVENT_MONITOR_THREAD_ENABLE": "true", "GEVENT_MAX_BLOCKING_TIME": "0.1"}
BLOCKED_MARK = "appears to be blocked"
SERVER_MAX_CONNECTIONS = 50  # the pgbouncer scenarios' own small server
BOUNCER_POOL = 20  # PgBouncer's server connections (default_pool_size) in those scenarios
BOUNCER_MAX_CLIENTS = 1000  # and the client connections it accepts (max_client_conn)


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

    def environment(self, requests: int) -> dict[str, str]:
        """The variables this scenario sets on top of the caller's environment."""
        env = dict(self.env)
        if self.pool_sized:
            env.update(POOL_SIZE=str(requests), MAX_OVERFLOW="0")
        if self.worker == "gevent":
            env.update(MONITOR_ENV)
        return env

    def pool_limit(self, requests: int) -> int:
        env = {**os.environ, **self.environment(requests)}
        return int(env.get("POOL_SIZE") or 5) + int(env.get("MAX_OVERFLOW") or 10)

    def per_worker(self, endpoint: str, requests: int) -> int:
        """Requests one worker overlaps on ENDPOINT (PgBouncer's pool: all workers')."""
        rule = {"python": self.python, "postgres": self.postgres}.get(endpoint, "all")
        return {"one": 1, "all": requests, "threads": requests,
                "pool": self.pool_limit(requests),
                "threads+pool": min(requests, self.pool_limit(requests)),
                "bouncer": BOUNCER_POOL}[rule]

    def expected_concurrency(self, endpoint: str, requests: int, workers: int = 1) -> int:
        """Requests the server should overlap on ENDPOINT: at most N, W workers' worth."""
        one = self.per_worker(endpoint, requests)
        if self.postgres == "bouncer" and endpoint == "postgres":
            return min(requests, one)  # one queue, in PgBouncer, for every worker
        return min(requests, (self.workers or workers) * one)

    def uneven_floor(self, endpoint: str, requests: int, workers: int = 1) -> int:
        """The overlap if one worker takes the whole burst.

        Several gevent (or gthread) workers share a listening socket, and whichever is awake
        accepts: a burst is not spread evenly (measured: 20 requests over 4 green workers
        with pools of 15 came back 16 + 4 in one run, 20 in another). W x the per-worker
        limit is the best case; one worker's limit is the worst. A sync worker accepts only
        when idle, so its share is even."""
        best = self.expected_concurrency(endpoint, requests, workers)
        if (self.workers or workers) == 1 or self.worker == "sync":
            return best
        return min(best, self.per_worker(endpoint, requests))

    def command(self, port: int, requests: int, workers: int = 1,
                seconds: float = 1.0) -> list[str]:
        """`env K=V ... gunicorn ...` for this scenario, bound to 127.0.0.1:port.

        gunicorn kills a worker that has not checked in for --timeout seconds. A gevent
        worker whose driver blocks checks in only when the loop is free: N blocking sleeps
        of S seconds hold it for N x S, so the timeout here covers that, to show the
        blocking itself rather than the kill (README: "Blocked long enough, killed").
        """
        timeout = max(60, math.ceil(requests * seconds) + 30)
        argv = ["env", *(f"{k}={v}" for k, v in self.environment(requests).items()),
                "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers",
                str(self.workers or workers),
                "--worker-class", self.worker,
                "--timeout", str(timeout),    # seconds without a check-in before a kill
                "--graceful-timeout", "5",    # seconds to finish requests on shutdown
                "--no-control-socket"]        # gunicorn >= 25 would leave a socket in ~
        if self.worker == "gevent":
            # each connection is a greenlet; past this many the worker stops accepting
            argv += ["--worker-connections", str(max(1000, requests + 100))]
        if self.worker == "gthread":
            argv += ["--threads", str(requests)]
        return argv + [self.app]


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


def budget(scenario: Scenario, requests: int, workers: int = 1):
    """The scenario's connection budget against the server in DATABASE_URL."""
    os.environ.update(scenario.environment(requests))
    from models import connection_budget, engine  # reads the environment just set

    behind = scenario.postgres == "bouncer"
    try:
        return connection_budget(engine, scenario.workers or workers,
                                 scenario.pool_limit(requests),
                                 pooler_pool=BOUNCER_POOL if behind else None,
                                 pooler_max_clients=BOUNCER_MAX_CLIENTS if behind else None)
    finally:
        engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["names", "command", "expect", "budget", "runner"])
    parser.add_argument("args", nargs="*")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=1.0)
    opts = parser.parse_args(argv)
    if opts.action == "names":
        print("\n".join(s.name for s in pick(opts.args)))
        return 0
    if not opts.args:
        parser.error(f"{opts.action} needs a scenario name")
    scenario = pick(opts.args[:1])[0]
    if opts.action == "runner":
        print(scenario.runner or "")
    elif opts.action == "command":
        print("\n".join(scenario.command(opts.port, opts.requests, opts.workers,
                                         opts.seconds)))
    elif opts.action == "expect":
        print(scenario.expected_concurrency(opts.args[1], opts.requests, opts.workers))
    else:
        result = budget(scenario, opts.requests, opts.workers)
        print(f"{scenario.name}: connection budget: {result}",
              file=sys.stdout if result.ok else sys.stderr)
        return 0 if result.ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
