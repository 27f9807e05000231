"""The partition scenario: every packet between the app host and the database host dropped.

    python -m kit.partition [--only green] [--json FILE]    (root; or ./run_all.sh --scenario partition)

On the hosts of kit.net (RTT 1 ms), nftables in the database's namespace drops all traffic to
and from the app's side while (1) the pool holds idle connections and (2) two queries are in
flight; then the rules go. POOL_SIZE=3, POOL_WARM=3, STATEMENT_TIMEOUT=2 (QUERY_TIMEOUT 4 s),
CONNECT_TIMEOUT=2. For the green app and psycopg 3 under gevent: every wait is bounded.
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from pathlib import Path

from kit import net
from kit.checks import check
from kit.checks import main as checks_main
from kit.checks import write as write_checks
from kit.run import run_load, serve

ENV = {"POOL_SIZE": "3", "MAX_OVERFLOW": "0", "POOL_WARM": "3", "POOL_TIMEOUT": "20",
       "SLEEP_MAX": "1", "STATEMENT_TIMEOUT": "2", "CONNECT_TIMEOUT": "2"}
QUERY_TIMEOUT, CONNECT_TIMEOUT = 4, 2
SCENARIOS = ("green", "psycopg3")
CUT = """table inet kit_partition {
  chain input { type filter hook input priority 0; ip saddr %(peer)s drop; }
  chain output { type filter hook output priority 0; ip daddr %(peer)s drop; }
}"""


def partition(hosts: net.Hosts, on: bool) -> None:
    """Drop (on) or stop dropping everything between the db host and its neighbour."""
    argv = ["nft", "-f", "-"] if on else ["nft", "delete", "table", "inet", "kit_partition"]
    hosts.call("db", argv, input=CUT % {"peer": hosts.address("relay", "db")} if on else None, text=True,
               check=True, capture_output=True)


def cut_while(hosts: net.Hosts, load, delay, during) -> dict:
    """Start load() (a load.py run) in a thread, cut DELAY seconds later (or, DELAY being a
    function, once it returns true: at most 10 s), call during(thread) while cut, heal (on
    every path), let the load finish; load()'s result."""
    got: dict = {}
    loader = threading.Thread(target=lambda: got.update(load()))
    loader.start()
    if callable(delay):
        deadline = time.monotonic() + 10
        while not delay() and time.monotonic() < deadline:
            time.sleep(0.02)
    else:
        time.sleep(delay)
    partition(hosts, True)
    try:
        during(loader)
    finally:
        partition(hosts, False)
    loader.join(60)
    return got


def burst(app, n: int, route: str, seconds: float, tmp: str, out: str) -> dict:
    """load.py from the client host; its result."""
    document = run_load(n, "--url", app.url, "--endpoint", route, "--seconds", seconds,
                        "--timeout", 15, out=Path(tmp, out), via=app.via)
    return document["results"][0]


def slowest(result: dict) -> float:
    """The slowest answer of any status: load.py's latency_s covers the 2xx ones only."""
    times = (result["latency_s"]["max"], result["others"]["latency_s"]["max"])
    return max((t for t in times if t is not None), default=0.0)


def summary(result: dict) -> str:
    got = {**result["statuses"], **result["errors"]}
    return f"{got}, slowest {slowest(result):.2f} s"


def run_one(name: str, hosts: net.Hosts, tmp: str, checks: list) -> None:
    with serve(name, Path(tmp, f"{name}.log"), requests=3, env=ENV, net=hosts) as app:
        pid = app.health()["pid"]
        partition(hosts, True)
        try:
            idle = burst(app, 3, "todos", 0, tmp, "idle.json")
        finally:
            partition(hosts, False)
        bound = QUERY_TIMEOUT + CONNECT_TIMEOUT + 1
        check(checks, f"{name}: partitioned, idle pool", f"503 within {bound} s",
              summary(idle), idle["statuses"] == {"503": 3} and slowest(idle) < bound)
        flying = cut_while(hosts, lambda: burst(app, 2, "postgres", 1, tmp, "flying.json"),
                           0.5, lambda loader: loader.join(30))
        check(checks, f"{name}: partitioned mid-query", f"503 within {QUERY_TIMEOUT + 1} s",
              summary(flying), flying.get("statuses") == {"503": 2}
              and slowest(flying) < QUERY_TIMEOUT + 1.5)
        healed = burst(app, 5, "todos", 0, tmp, "healed.json")
        check(checks, f"{name}: healed", f"5 x 200, same pid {pid}",
              f"{summary(healed)}, pid {app.health()['pid']}",
              healed["statuses"] == {"200": 5} and app.health()["pid"] == pid)


def run_parts(parts: Path, requests: int = 0, seconds: float = 0,
              scenarios: tuple[str, ...] = SCENARIOS) -> list[dict]:
    """Each scenario on hosts 1 ms apart; writes PARTS/partition.json (or .refused)."""
    if net.why_not():
        (parts / "partition.refused").write_text(f"partition: {net.why_not()}")
        return []
    checks: list[dict] = []
    with net.hosts(1) as hosts, tempfile.TemporaryDirectory() as tmp:
        for name in scenarios:
            print(f"partition: {name}", file=sys.stderr, flush=True)
            run_one(name, hosts, tmp, checks)
    return write_checks(parts, "partition", checks)


def main(argv: list[str] | None = None) -> int:
    if net.why_not():
        print(f"kit.partition: {net.why_not()}", file=sys.stderr)
        return 2
    return checks_main("partition", __doc__, lambda parts, args: run_parts(
        parts, scenarios=tuple(args.only)), argv, lambda parser: parser.add_argument(
            "--only", nargs="+", choices=SCENARIOS, default=SCENARIOS))


if __name__ == "__main__":
    sys.exit(main())
