"""SQLAlchemy's QueuePool loses a wake-up: K checkouts on 5 + 10 come back in a straggler wave.

    python bench/pool_wakeup.py [--runs 20] [--checkouts 30] [--seconds 0.5] [--work-ms 1]
                                [--json FILE]

No HTTP: K checkouts start at once on QueuePool(pool_size=5, max_overflow=10), each holding a
real connection to a throwaway PostgreSQL for S seconds (pg_sleep) plus --work-ms of CPU (the
app renders its answer before it returns the connection), under gevent (greenlets,
psycogreen) and under OS threads, for four pools: `stock`, `old fix` (bench/pool_fix.py's
HandOverQueuePool), `new fix` (its FixedQueuePool) and `sized` (15 + 0). Every return that
finds the queue full is recorded with the number of checkouts asleep in the queue at that
instant; the connections each run opened are counted, and after each run the idle connections
and the overflow count. docs/pool.md: "The straggler wave".
"""

import sys

if __name__ == "__main__" and sys.argv[1:3] == ["--child", "gevent"]:
    from gevent import monkey  # first, before anything imports threading

    monkey.patch_all()
    from psycogreen.gevent import patch_psycopg

    patch_psycopg()

import argparse  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg2  # noqa: E402
from sqlalchemy import create_engine  # noqa: E402
from sqlalchemy.pool import QueuePool  # noqa: E402

from kit import pg  # noqa: E402
from load import find_waves  # noqa: E402
from pool_fix import FixedQueuePool, HandOverQueuePool  # noqa: E402  (bench/, beside this)

POOLS = {"stock": (5, 10), "old fix": (5, 10), "new fix": (5, 10), "sized": (15, 0)}
KINDS = {"old fix": HandOverQueuePool, "new fix": FixedQueuePool}  # else QueuePool
NAME = "pool-wakeup"  # application_name of the pool's connections, counted on the server


def count_open(cur) -> int:
    """Connections of the pool that the server sees."""
    cur.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (NAME,))
    cur.connection.rollback()
    return cur.fetchone()[0]


def one_run(pool, url: str, args, connects: list) -> dict:
    """K checkouts released together: their waves, the discards, the server's peak count, the
    connections opened."""
    go, done, finishes, discards, errors, peak = (threading.Event(), threading.Event(), [], [],
                                                  [], [0])

    def discarded():  # QueuePool lowers the overflow after closing a return the queue refused
        discards.append(len(pool._pool.not_empty._waiters))  # checkouts asleep in get()
        return type(pool)._dec_overflow(pool)

    def checkout():
        go.wait()
        try:
            conn = pool.connect()
            conn.cursor().execute("SELECT pg_sleep(%s)", (args.seconds,))
            busy = time.perf_counter() + args.work_ms / 1000
            while time.perf_counter() < busy:  # CPU with the connection held, no yield
                pass
            conn.close()  # back to the pool
            finishes.append(time.perf_counter() - t0)
        except Exception as exc:  # a lost checkout would fake a wave: fail the run instead
            errors.append(exc)

    def watch():
        with psycopg2.connect(url, application_name="watch") as mon, mon.cursor() as cur:
            while not done.wait(0.02):
                peak[0] = max(peak[0], count_open(cur))

    pool._dec_overflow = discarded
    threads = [threading.Thread(target=checkout) for _ in range(args.checkouts)]
    watcher = threading.Thread(target=watch)
    for thread in [*threads, watcher]:
        thread.start()
    t0, opened = time.perf_counter(), len(connects)
    go.set()
    for thread in threads:
        thread.join()
    done.set()
    watcher.join()
    if errors:
        raise errors[0]
    return {"waves": "+".join(str(w["size"]) for w in find_waves(finishes, [min(finishes)])),
            "discards": len(discards), "while_waiting": sum(1 for w in discards if w),
            "late": sum(1 for f in finishes if f > 2.5 * args.seconds), "max_open": peak[0],
            "connects": len(connects) - opened,
            "idle_after": pool.checkedin(), "overflow_after": pool.overflow()}


def child(concurrency: str, url: str, args) -> list[dict]:
    """Every pool under one kind of concurrency (gevent patches the process for good)."""
    rows = []
    for name, (size, overflow) in POOLS.items():
        connects = []

        def connect():
            connects.append(1)
            return psycopg2.connect(url, application_name=NAME)

        pool = create_engine(  # the apps' pool: QueuePool with pre-ping, through an engine
            "postgresql+psycopg2://", creator=connect,
            poolclass=KINDS.get(name, QueuePool), pool_size=size,
            max_overflow=overflow, pool_timeout=60, pool_pre_ping=True).pool
        runs = [one_run(pool, url, args, connects) for _ in range(args.runs)]
        pool.dispose()
        with psycopg2.connect(url) as conn, conn.cursor() as cur:
            deadline = time.monotonic() + 5  # a closed connection's backend takes a moment
            while (leaked := count_open(cur)) and time.monotonic() < deadline:
                time.sleep(0.05)
        late = [r for r in runs if r["waves"].count("+") >= math.ceil(args.checkouts / 15)]
        rows.append({
            "pool": name, "concurrency": concurrency, "runs": args.runs,
            "straggler_runs": len(late), "max_open": max(r["max_open"] for r in runs),
            "waves_seen": dict(collections.Counter(r["waves"] for r in runs).most_common()),
            "leaked": leaked, "discards": sum(r["discards"] for r in runs),
            "discards_while_waiting": sum(r["while_waiting"] for r in runs),
            "straggler_runs_with_those": sum(1 for r in late if r["while_waiting"]),
            "other_runs_with_those": sum(1 for r in runs if r not in late and r["while_waiting"]),
            "requests_waiting_two_holds": sum(r["late"] for r in runs),
            "connects": [r["connects"] for r in runs],
            "most_idle_after": max(r["idle_after"] for r in runs),
            "most_overflow_after": max(r["overflow_after"] for r in runs)})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--checkouts", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--work-ms", type=float, default=1.0,
                        help="CPU each checkout spends holding its connection after the query")
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args)))
        return 0
    rows = []
    with pg.database(own=True) as (url, _):
        for concurrency in ("gevent", "threads"):
            done = subprocess.run([sys.executable, __file__, "--child", concurrency, url,
                                   *sys.argv[1:]], capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"pool_wakeup: {concurrency}: {done.stderr[-2000:]}")
            rows += json.loads(done.stdout)
    import sqlalchemy

    print(f"{args.checkouts} checkouts at once on 15 connections, each holding one "
          f"{args.seconds:g} s + {args.work_ms:g} ms of CPU; {args.runs} runs per row; "
          f"SQLAlchemy {sqlalchemy.__version__}, psycopg2 {psycopg2.__version__.split()[0]}")
    for r in rows:
        first, rest = r["connects"][0], r["connects"][1:] or [0]  # run 1 fills the pool
        print(f"  {r['pool']:<8} {r['concurrency']:<8} straggler runs {r['straggler_runs']:>2}/"
              f"{r['runs']}; waves " + ", ".join(f"{w} x{n}" for w, n in r["waves_seen"].items())
              + f"\n{'':20}discards {r['discards']}, {r['discards_while_waiting']} while "
              f"checkouts slept (in {r['straggler_runs_with_those']} straggler runs, "
              f"{r['other_runs_with_those']} others); {r['requests_waiting_two_holds']} waited "
              f"two holds\n{'':20}connections opened {first} in run 1, then "
              f"{sum(rest) / len(rest):.2f} per run ({min(rest)}-{max(rest)}); max open "
              f"{r['max_open']}; after a run at most {r['most_idle_after']} idle, overflow "
              f"{r['most_overflow_after']}; left after dispose {r['leaked']}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
