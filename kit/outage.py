"""The outage scenario: stop PostgreSQL under a running green app, then start it again.

    python -m kit.outage [--json FILE]          (also: ./run_all.sh --scenario outage)

Always on a throwaway PostgreSQL of its own (it has to stop it). It shows, each beside what is
expected: requests in flight when the database stops, and new ones while it is down, get a
503 JSON within POOL_TIMEOUT-bounded time; the worker process survives (same pid); once the
database is back, requests succeed again without restarting gunicorn (pool_pre_ping).
Exit status 0 when every check holds.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kit.checks import check
from kit.checks import main as checks_main
from kit.checks import write as write_checks
from kit.run import seeded, serve

POOL_TIMEOUT = 2


def fetch(url: str, timeout: float = 30) -> tuple[int, float, dict]:
    """(status, seconds, JSON body) of one GET; status 0 when no answer came in time."""
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            status, body = answer.status, answer.read()
    except urllib.error.HTTPError as error:
        status, body = error.code, error.read()
    except OSError as error:  # timed out, refused, reset
        return 0, time.perf_counter() - started, {"error": str(error)}
    took = time.perf_counter() - started
    try:
        return status, took, json.loads(body)
    except ValueError:
        return status, took, {"not_json": body[:200].decode("latin-1")}


def many(url: str, n: int) -> list[tuple[int, float, dict]]:
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: fetch(url), range(n)))


def run(tmp: Path) -> list[dict]:
    checks: list[dict] = []
    with seeded(own=True) as (_, server):  # its own: this scenario stops the server
        with serve("green", tmp / "gunicorn.log", requests=5,
                   env={"POOL_TIMEOUT": POOL_TIMEOUT, "CONNECT_TIMEOUT": 2}) as app:
            pid = app.health()["pid"]
            warm = many(f"{app.url}/todos/", 5)
            check(checks, "before the outage", "5 x 200", _statuses(warm),
                  all(s == 200 for s, _, _ in warm))

            print("  stopping PostgreSQL with 3 requests in pg_sleep(3) ...", file=sys.stderr,
                  flush=True)
            with ThreadPoolExecutor(3) as pool:
                flying = [pool.submit(fetch, f"{app.url}/sleep/postgres/?seconds=3")
                          for _ in range(3)]
                time.sleep(0.5)
                stopped_at = time.perf_counter()
                server.pg_ctl("stop")
                in_flight = [f.result() for f in flying]
            late = max(stopped_at - time.perf_counter() + t for _, t, _ in in_flight)
            check(checks, "in flight when it stops", "3 x 503 JSON, well before the 3 s sleep",
                  f"{_statuses(in_flight)}, at most {max(0.0, late):.2f} s after the stop",
                  all(s == 503 and "error" in b for s, _, b in in_flight) and late < 2.5)

            down = many(f"{app.url}/todos/", 5)
            slowest = max(t for _, t, _ in down)
            check(checks, "new requests while it is down",
                  f"5 x 503 JSON within POOL_TIMEOUT ({POOL_TIMEOUT} s)",
                  f"{_statuses(down)}, slowest {slowest:.3f} s",
                  all(s == 503 and "error" in b for s, _, b in down)
                  and slowest <= POOL_TIMEOUT + 1)
            check(checks, "the worker survives", f"pid {pid}", f"pid {app.health()['pid']}",
                  app.health()["pid"] == pid)

            server.pg_ctl("start")
            back = time.perf_counter()
            while time.perf_counter() - back < 10:
                if fetch(f"{app.url}/todos/")[0] == 200:
                    break
                time.sleep(0.05)
            recovered = time.perf_counter() - back
            after = many(f"{app.url}/todos/", 5)
            check(checks, "after it is back", "200 within 2 s, no gunicorn restart",
                  f"first 200 {recovered:.3f} s after pg_ctl start returned; then "
                  f"{_statuses(after)}; pid {app.health()['pid']}",
                  recovered < 2 and all(s == 200 for s, _, _ in after)
                  and app.health()["pid"] == pid)
    return checks


def _statuses(answers) -> str:
    counts: dict[int, int] = {}
    for status, _, _ in answers:
        counts[status] = counts.get(status, 0) + 1
    return ", ".join(f"{n} x {s}" for s, n in sorted(counts.items()))


def run_parts(parts: Path, requests: int = 0, seconds: float = 0) -> list[dict]:
    """Run the checks and write PARTS/outage.json (N and S do not apply)."""
    print("outage: the green app while its database stops and starts again", file=sys.stderr,
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        return write_checks(parts, "outage", run(Path(tmp)))


def main(argv: list[str] | None = None) -> int:
    return checks_main("outage", __doc__, lambda parts, _: run_parts(parts), argv)


if __name__ == "__main__":
    sys.exit(main())
