"""The frozen scenario: PostgreSQL backends stop answering (SIGSTOP) under a running app.

    python -m kit.frozen [--only green psycopg3] [--json FILE]   (or ./run_all.sh --scenario frozen)

A frozen VM or a stuck disk looks like this: the connection stays open, the kernel still
acknowledges, nothing answers, and statement_timeout cannot fire. On a throwaway PostgreSQL of
its own, with POOL_SIZE=3, POOL_WARM=3, STATEMENT_TIMEOUT=2 (so QUERY_TIMEOUT=4), it freezes
(1) the pool's idle connections, (2) two connections in the middle of a query, then thaws them;
for the green app, psycopg 3 and the Flask-SQLAlchemy example under gevent (whose bound
harden() derives: STATEMENT_TIMEOUT + 2 = 4 s), and the blocking workers sync and gthread.
The green app on both drivers (as kit/frozen_app.py, which freezes its own backend at exact
points) is also frozen (3) during a COMMIT and (4) during the teardown's ROLLBACK.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kit.checks import check
from kit.checks import main as checks_main
from kit.checks import write as write_checks
from kit.outage import fetch
from kit.run import seeded, serve

ENV = {"POOL_SIZE": "3", "MAX_OVERFLOW": "0", "POOL_WARM": "3", "POOL_TIMEOUT": "20",
       "SLEEP_MAX": "1", "STATEMENT_TIMEOUT": "2"}  # QUERY_TIMEOUT: 2 + 2 = 4 s
QUERY_TIMEOUT = 4
CLIENT = 10  # seconds the client waits: past it, the app did not bound the wait
SCENARIOS = ["green", "psycopg3", "flask-sqlalchemy", "sync", "gthread"]
BOUNDED = ("green", "psycopg3", "flask-sqlalchemy")  # under gevent, with harden.py
APPS = ("flask-blocking-kit", "flask-sqlalchemy-example")  # their application_name
KIT_APPS = ("green", "psycopg3")  # run as kit.frozen_app: also frozen in COMMIT and teardown


def backends(psql, state: str | None = None) -> list[int]:
    """The app's backend pids (in that state, if given)."""
    sql = "SELECT pid FROM pg_stat_activity WHERE application_name IN %s"
    return [pid for (pid,) in psql(sql + (" AND state = %s" if state else ""),
                                   APPS, *([state] if state else []))]


def signal_all(pids: list[int], sig: int) -> None:
    """Send SIG to every pid; one that has already exited is skipped, not a reason to leave
    the rest stopped."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def run_one(name: str, url: str, psql, tmp: Path, checks: list) -> None:
    bounded = name in BOUNDED
    wrapper = "kit.frozen_app:app" if name in KIT_APPS else None
    with serve(name, tmp / f"{name}.log", requests=3, env=ENV, app=wrapper) as app:
        pid = app.health()["pid"]
        idle = backends(psql)
        signal_all(idle, signal.SIGSTOP)
        try:
            with ThreadPoolExecutor(3) as pool:
                answers = list(pool.map(lambda _: fetch(f"{app.url}/todos/", CLIENT), range(3)))
        finally:
            signal_all(idle, signal.SIGCONT)
        slowest = max(t for _, t, _ in answers)
        statuses = sorted(s for s, _, _ in answers)
        expected = (f"every answer within QUERY_TIMEOUT + 2 s ({QUERY_TIMEOUT + 2} s)"
                    if bounded else f"no bound: the client gives up at {CLIENT} s")
        check(checks, f"{name}: idle pool frozen", expected + ("; 200 or 503, never 500"
                                                               if bounded else ""),
              f"{statuses}, slowest {slowest:.2f} s",
              slowest < QUERY_TIMEOUT + 2 and set(statuses) <= {200, 503} if bounded
              else slowest >= CLIENT - 0.5)
        if not bounded:
            return
        with ThreadPoolExecutor(4) as pool:
            flying = [pool.submit(fetch, f"{app.url}/sleep/postgres/?seconds=1", CLIENT)
                      for _ in range(2)]
            time.sleep(0.4)
            hung = backends(psql, "active")
            signal_all(hung, signal.SIGSTOP)
            try:
                healthy = fetch(f"{app.url}/todos/", CLIENT)
                caught = [f.result() for f in flying]
            finally:
                signal_all(hung, signal.SIGCONT)
        check(checks, f"{name}: 2 queries frozen mid-flight",
              f"503 within {QUERY_TIMEOUT + 2} s; meanwhile /todos/ 200 on the healthy slot",
              f"{[s for s, _, _ in caught]} after {max(t for _, t, _ in caught):.2f} s; "
              f"/todos/ {healthy[0]} in {healthy[1]:.2f} s; {len(hung)} frozen",
              all(s == 503 and t < QUERY_TIMEOUT + 2 for s, t, _ in caught)
              and healthy[0] == 200 and healthy[1] < 1)
        after = [fetch(f"{app.url}/todos/", CLIENT) for _ in range(5)]
        check(checks, f"{name}: thawed", f"5 x 200, same pid {pid}",
              f"{[s for s, _, _ in after]}, pid {app.health()['pid']}",
              all(s == 200 for s, _, _ in after) and app.health()["pid"] == pid)
        if name in KIT_APPS:
            frozen_at_the_end(name, app, psql, checks)


def frozen_at_the_end(name: str, app, psql, checks: list) -> None:
    """The backend stopped during COMMIT (the commit is lost: 503), then after the answer is
    made, during the teardown's ROLLBACK (the answer stands: 200). Never a 500."""
    for what, path, want in (("COMMIT frozen", "/kit/freeze-commit/", 503),
                             ("teardown frozen", "/todos/?freeze=teardown", 200)):
        try:
            status, took, _ = fetch(f"{app.url}{path}", CLIENT)
        finally:
            signal_all(backends(psql), signal.SIGCONT)
        check(checks, f"{name}: {what}", f"{want} within {QUERY_TIMEOUT + 2} s, never 500",
              f"{status} after {took:.2f} s", status == want and took < QUERY_TIMEOUT + 2)
    after = [fetch(f"{app.url}/todos/", CLIENT)[0] for _ in range(3)]
    check(checks, f"{name}: after both", "3 x 200", str(after), after == [200] * 3)


def run_parts(parts: Path, requests: int = 0, seconds: float = 0,
              scenarios: list[str] = SCENARIOS) -> list[dict]:
    """Each scenario in turn; writes PARTS/frozen.json (N and S do not apply)."""
    import psycopg2

    checks: list[dict] = []
    with seeded(own=True) as (url, _), tempfile.TemporaryDirectory() as tmp:
        def psql(sql, *params):
            with psycopg2.connect(url, application_name="kit.frozen") as conn, \
                    conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchall()
        for name in scenarios:
            print(f"frozen: {name}", file=sys.stderr, flush=True)
            run_one(name, url, psql, Path(tmp), checks)
    return write_checks(parts, "frozen", checks)


def main(argv: list[str] | None = None) -> int:
    return checks_main("frozen", __doc__, lambda parts, args: run_parts(
        parts, scenarios=args.only), argv, lambda parser: parser.add_argument(
            "--only", nargs="+", choices=SCENARIOS, default=SCENARIOS))


if __name__ == "__main__":
    sys.exit(main())
