"""The pgbouncer scenarios: more app connections than PostgreSQL allows, without and with PgBouncer.

    python -m kit.bouncer [--requests 100] [--seconds 1] [--parts DIR]
    (also: ./run_all.sh --scenario pgbouncer)

On a throwaway PostgreSQL with max_connections = 50, the green app runs with 4 workers and
pools of 50 (POOL_SIZE=50, MAX_OVERFLOW=0: 200 client connections):
  pgbouncer-direct  straight at the server: the budget check refuses; forced anyway, PostgreSQL
                    refuses connections past its limit and the app answers 503;
  pgbouncer         through a throwaway PgBouncer (transaction pooling, 20 server connections):
                    every request is answered, in waves of 20.
Each run's part goes to --parts for run_all.sh's summary. At least 100 requests are sent.
"""

from __future__ import annotations

import argparse
import collections
import signal
import sys
import tempfile
from pathlib import Path

from kit import pg
from kit.run import run_scenario, seeded
from kit.scenarios import BOUNCER_MAX_CLIENTS, BOUNCER_POOL, SERVER_MAX_CONNECTIONS
from kit.scenarios import add_size_arguments

REFUSAL = "database unavailable: "  # how the app logs a failed connection


def run_parts(parts: Path, requests: int, seconds: float) -> None:
    """Both runs on a small server of their own (DATABASE_URL's would not have 50 slots)."""
    requests = max(100, requests)  # fewer would not outnumber the server's connections
    with seeded(max_connections=SERVER_MAX_CONNECTIONS, own=True) as (url, server):
        log = run_scenario("pgbouncer-direct", parts, requests, seconds,
                           endpoints=["postgres"])
        reasons = collections.Counter(line.split(REFUSAL, 1)[1].strip()
                                      for line in log.splitlines() if REFUSAL in line)
        print("pgbouncer-direct: what the app logged for its 503s (the users' error):",
              file=sys.stderr)
        for reason, count in reasons.most_common():
            print(f"  {count} x {reason}", file=sys.stderr)
        try:
            with pg.bouncer(server.port, BOUNCER_POOL, 15_000, BOUNCER_MAX_CLIENTS,
                            password=server.password) as (bouncer_url, _):
                run_scenario("pgbouncer", parts, requests, seconds, endpoints=["postgres"],
                             env={"DATABASE_URL": bouncer_url})
        except pg.PgError as exc:
            (parts / "pgbouncer.refused").write_text(str(exc))
            print(f"pgbouncer: not run: {exc}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_arguments(parser, requests=100)
    parser.add_argument("--parts", type=Path, default=None,
                        help="folder for the parts of each run (default: a temporary one)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so every `finally` cleans up
    with tempfile.TemporaryDirectory() as tmp:
        parts = args.parts or Path(tmp)
        parts.mkdir(parents=True, exist_ok=True)
        try:
            run_parts(parts, args.requests, args.seconds)
        except pg.PgError as exc:
            print(f"kit.bouncer: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
