"""Why 30 requests of 1 s sometimes come back in three waves, and the setting that avoids it.

    python bench/stragglers.py [--runs 10] [--requests 30] [--seconds 1]

For each pool setting (the default 5 + 10, and 15 + 0) it starts the green app, runs load.py
--runs times against /sleep/postgres/, and prints the wave patterns it saw with how many
database sessions each run opened (pg_stat_database.sessions). Starts its own PostgreSQL
unless DATABASE_URL is set.
"""

import argparse
import collections
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kit.run import run_load, seeded, serve  # noqa: E402

SETTINGS = [("5 + 10 (default)", {}), ("15 + 0", {"POOL_SIZE": "15", "MAX_OVERFLOW": "0"})]


def sessions(url: str) -> int:
    """Sessions ever opened on this database (PostgreSQL 14+)."""
    import psycopg2

    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT sessions FROM pg_stat_database WHERE datname = current_database()")
        return cur.fetchone()[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args()
    with seeded() as (url, _), tempfile.TemporaryDirectory() as tmp:
        print(f"{args.runs} runs of {args.requests} x /sleep/postgres/?seconds="
              f"{args.seconds:g} against the green app, per pool setting")
        for label, env in SETTINGS:
            patterns, opened, totals = collections.Counter(), [], []
            with serve("green", Path(tmp, "gunicorn.log"), args.requests, env=env) as server:
                for run in range(args.runs):
                    before = sessions(url)
                    result = run_load(args.requests, "--url", server.url, "--endpoint",
                                      "postgres", "--seconds", args.seconds,
                                      out=Path(tmp, f"run{run}.json"))["results"][0]
                    opened.append(sessions(url) - before - 1)  # minus our own probe
                    patterns["+".join(str(w["size"]) for w in result["waves"])] += 1
                    totals.append(result["total_s"])
            third = sum(n for p, n in patterns.items() if p.count("+") >= 2)
            seen = ", ".join(f"{p} x{n}" for p, n in patterns.most_common())
            print(f"\npool {label}: a straggler wave in {third} of {args.runs} runs; total "
                  f"{min(totals):.2f}-{max(totals):.2f} s; database sessions opened per run "
                  f"{min(opened)}-{max(opened)}\n  waves seen: {seen}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
