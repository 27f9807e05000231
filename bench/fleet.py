"""Several app hosts against one small server: straight at it, through one PgBouncer, or one each.

    python bench/fleet.py [--seconds 1] [--only direct per-host] [--json FILE]     (root)

3 app hosts x 2 green workers x pools of 10 (POOL_SIZE=10, MAX_OVERFLOW=0: 60 client
connections) against PostgreSQL with max_connections = 30, the hosts 1 ms apart (kit.net).
Each app host gets 20 requests of pg_sleep(S) at once, 60 in all, three ways:
  direct    every pooled connection is a server connection: 60 against 27, refusals;
  central   through one PgBouncer on a host of its own (default_pool_size 20);
  per-host  through a PgBouncer on each app host (default_pool_size 8: 24 in all).
The arithmetic (models.Budget) is printed beside what was measured.
"""

import argparse
import json
import math
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kit import net  # noqa: E402
from kit.run import run_load, start  # noqa: E402
from models import Budget  # noqa: E402

HOSTS, WORKERS, POOL, MAX_CONNECTIONS, RESERVED, EACH = 3, 2, 10, 30, 3, 20
WAYS = {"direct": (None, 0), "central": (20, 1), "per-host": (8, HOSTS)}  # pool, poolers


def run(way: str, seconds: float, tmp: str) -> list[dict]:
    pool, poolers = WAYS[way]
    with net.hosts(1, apps=HOSTS, pooler=way == "central", max_connections=MAX_CONNECTIONS,
                   pooler_pool=pool or 20) as hosts:
        results, ports = {}, {}
        env = {"POOL_SIZE": str(POOL), "MAX_OVERFLOW": "0", "POOL_TIMEOUT": "10"}
        for app in net.APPS[:HOSTS]:
            if way == "per-host":  # the app's PgBouncer on its own host, toward the relay
                ports[app] = hosts.bouncer(app, "127.0.0.1",
                                           f"{hosts.address('relay', app)}:{net.DB_PORT}")

        def serve_and_load(app: str) -> None:
            url = {}
            if ports:
                url = {"DATABASE_URL": f"postgresql://app:{hosts.password}@127.0.0.1:"
                                       f"{ports[app]}/app"}
            server = start("green", Path(tmp, f"{way}-{app}.log"), EACH, WORKERS,
                           {**env, **url}, net=hosts, role=app)
            try:
                ready.wait()  # every host up before any burst
                results[app] = run_load(EACH, "--url", server.url, "--endpoint", "postgres",
                                        "--seconds", seconds, "--timeout", 60,
                                        out=Path(tmp, f"{app}.json"), via=server.via)
            finally:
                server.stop()

        ready = threading.Barrier(HOSTS, timeout=60)
        with ThreadPoolExecutor(HOSTS) as pool:
            list(pool.map(serve_and_load, net.APPS[:HOSTS]))
    return [results[app]["results"][0] for app in net.APPS[:HOSTS]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--only", nargs="+", choices=list(WAYS), default=list(WAYS))
    parser.add_argument("--json", metavar="FILE", help="every host's load.py result, by way")
    args = parser.parse_args()
    if net.why_not():
        print(f"fleet: {net.why_not()}", file=sys.stderr)
        return 2
    print(f"{HOSTS} app hosts x {WORKERS} workers x pools of {POOL}, {EACH} requests of "
          f"{args.seconds:g} s per host at once; max_connections {MAX_CONNECTIONS}; RTT 1 ms")
    found = {}
    with tempfile.TemporaryDirectory() as tmp:
        for way in args.only:
            pool, poolers = WAYS[way]
            budget = Budget(HOSTS, WORKERS, POOL, MAX_CONNECTIONS, RESERVED, pool,
                            1000 if pool else None, poolers or 1)
            rows = found[way] = run(way, args.seconds, tmp)
            statuses: dict = {}
            for row in rows:
                for key, n in {**row["statuses"], **row["errors"]}.items():
                    statuses[key] = statuses.get(key, 0) + n
            expected = "some 503: PostgreSQL refuses past its limit"
            if pool:  # every request answered, in waves of the server connections
                expected = (f"all 200, waves of {pool}, ~"
                            f"{math.ceil(HOSTS * EACH / (pool * poolers)) * args.seconds:g} s")
            print(f"\n{way}: {budget}")
            print(f"  expected: {expected}; measured: {statuses}, "
                  f"{max(r['total_s'] for r in rows):.2f} s, waves per host "
                  + "; ".join("+".join(str(w["size"]) for w in r["waves"]) for r in rows))
    if args.json:
        Path(args.json).write_text(json.dumps(found, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
