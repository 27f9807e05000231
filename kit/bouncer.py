"""The pgbouncer scenarios: more app connections than PostgreSQL allows, without and with PgBouncer.

    python -m kit.bouncer [--requests 100] [--seconds 1] [--parts DIR]
    (also: ./run_all.sh --scenario pgbouncer)

On a throwaway PostgreSQL with max_connections = 50, the green app runs with 4 workers and
pools of 50 (POOL_SIZE=50, MAX_OVERFLOW=0: 200 client connections):
  pgbouncer-direct  straight at the server: the budget check refuses; forced anyway, PostgreSQL
                    refuses connections past its limit and the app answers 503;
  pgbouncer         through a throwaway PgBouncer (transaction pooling, 20 server connections):
                    every request is answered, in waves of 20.
Each run's load.py JSON goes to --parts for run_all.sh's summary. At least 100 requests are
sent: fewer would not outnumber the server's connections.
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from kit import pg
from kit.scenarios import BOUNCER_MAX_CLIENTS, BOUNCER_POOL, BY_NAME, SERVER_MAX_CONNECTIONS
from kit.serve import ROOT, kit_env, run_load, serve

REFUSAL = "database unavailable: "  # how the app logs a failed connection


def budget(name: str, requests: int, url: str) -> str:
    """What the connection-budget check says of the scenario (it is over budget)."""
    done = subprocess.run([sys.executable, "-m", "kit.scenarios", "budget", name,
                           "--requests", str(requests)], cwd=ROOT,
                          env=kit_env(DATABASE_URL=url), capture_output=True, text=True)
    return (done.stdout + done.stderr).strip()


def load(url: str, requests: int, seconds: float, expect: int, out: Path) -> None:
    """load.py against /sleep/postgres/, its report on stderr."""
    run_load(requests, "--url", url, "--endpoint", "postgres", "--seconds", seconds,
             "--expect-concurrency", expect, "--timeout", int(requests * (seconds + 1) + 30),
             out=out, report=sys.stderr)


def run(parts: Path, requests: int, seconds: float, tmp: Path) -> None:
    # always a small server of its own: DATABASE_URL's would not have max_connections = 50
    with pg.database(max_connections=SERVER_MAX_CONNECTIONS, own=True) as (url, server):
        os.environ["DATABASE_URL"] = url
        subprocess.run([sys.executable, "seed.py"], cwd=ROOT, env=kit_env(), check=True,
                       stdout=subprocess.DEVNULL)

        direct = BY_NAME["pgbouncer-direct"]
        print(budget(direct.name, requests, url), file=sys.stderr)
        print("pgbouncer-direct: forced past the check, to show what users would see",
              file=sys.stderr)
        with serve(direct.name, tmp / "direct.log", requests, direct.workers) as app:
            load(app.url, requests, seconds, direct.expected_concurrency(
                "postgres", requests, direct.workers), parts / "pgbouncer-direct.postgres.json")
            (parts / "pgbouncer-direct.postgres.hub").write_text(str(app.blocked_reports()))
            reasons = collections.Counter(
                line.split(REFUSAL, 1)[1].strip() for line in app.log.read_text().splitlines()
                if REFUSAL in line)
        print("pgbouncer-direct: what the app logged for its 503s (the users' error):",
              file=sys.stderr)
        for reason, count in reasons.most_common():
            print(f"  {count} x {reason}", file=sys.stderr)

        behind = BY_NAME["pgbouncer"]
        try:
            with pg.bouncer(server.port, BOUNCER_POOL, 15_000,
                            BOUNCER_MAX_CLIENTS) as (bouncer_url, _):
                print(budget(behind.name, requests, bouncer_url), file=sys.stderr)
                with serve(behind.name, tmp / "bouncer.log", requests, behind.workers,
                           env={"DATABASE_URL": bouncer_url}) as app:
                    load(app.url, requests, seconds, behind.expected_concurrency(
                        "postgres", requests, behind.workers), parts / "pgbouncer.postgres.json")
                    (parts / "pgbouncer.postgres.hub").write_text(str(app.blocked_reports()))
        except pg.PgError as exc:
            (parts / "pgbouncer.refused").write_text(str(exc))
            print(f"pgbouncer: not run: {exc}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--parts", type=Path, default=None,
                        help="folder for the load.py JSON of each run (default: a temporary one)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so every `finally` cleans up
    requests = max(100, args.requests)
    with tempfile.TemporaryDirectory() as tmp:
        parts = args.parts or Path(tmp)
        parts.mkdir(parents=True, exist_ok=True)
        try:
            run(parts, requests, args.seconds, Path(tmp))
        except pg.PgError as exc:
            print(f"kit.bouncer: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
