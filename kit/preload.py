"""The preload scenarios: connections opened in gunicorn's master, then shared by its workers.

    python -m kit.preload [--bursts 3] [--requests 40] [--hang-after 10]
    (also: ./run_all.sh --scenario preload)

`preload` runs `gunicorn --preload -w 2 -k gevent app_green:app` with POOL_WARM=2 and HARDEN=0:
the app opens two connections at import, in the master, and both workers fork with the same
two sockets. `preload-fixed` is the same app with harden() (the default) and no gunicorn
config: each forked worker starts a pool of its own.
Each gets bursts of mixed requests (/todos/, /sleep/postgres/, /sleep/python/); every answer
is checked against the todos in the database. `preload-fixed` gets --bursts; `preload`, whose
trap is a race, up to 10 bursts, stopping at the first that shows it. Needs DATABASE_URL
(run_all.sh sets it).
"""

from __future__ import annotations

import collections
import http.client
import json
import re
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kit.checks import check
from kit.checks import main as checks_main
from kit.checks import write as write_checks
from kit.run import seeded, serve

ROUTES = ["/todos/", "/sleep/postgres/?seconds=0.2", "/sleep/python/?seconds=0.2"]
HANG = 10  # seconds without an answer that count as a hang (--hang-after)
MAX_BURSTS = 10  # the trap scenario's bound (it stops at the first burst that shows it)
LOG_ERROR = re.compile(r"(\w*(?:Error|Exception)): (.{0,80})")  # the app's logged database errors


def expected_todos() -> list[dict]:
    """The todos as the database holds them: what every 200 must carry."""
    from sqlalchemy import select

    from models import Settings, Todo, make_engine

    engine = make_engine(Settings.from_env())
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(Todo.__table__).order_by(Todo.id)).mappings().all()
        return [dict(row) for row in rows]
    finally:
        engine.dispose()


def ask(url: str, path: str, todos: list[dict], hang: float = HANG) -> str:
    """One GET; what became of it: ok, wrong_body, http_5xx, hang, reset, ..."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=hang)
    try:
        conn.request("GET", path)
        answer = conn.getresponse()
        body = answer.read()
    except TimeoutError:
        return "hang"
    except (ConnectionError, http.client.HTTPException) as exc:
        return type(exc).__name__
    finally:
        conn.close()
    if answer.status != 200:
        return f"http_{answer.status}"
    try:
        return "ok" if json.loads(body).get("todos") == todos else "wrong_body"
    except ValueError:
        return "wrong_body"


def run_one(name: str, bursts: int, requests: int, tmp: Path, hang: float = HANG,
            until_bad: bool = False) -> dict:
    """Start NAME, fire the bursts, count outcomes and the errors the workers logged.
    until_bad: the trap is a race between the two workers on one socket, which a few bursts
    can miss on a slow machine: fire up to MAX_BURSTS, stopping at the first that shows it."""
    todos = expected_todos()
    outcomes: collections.Counter = collections.Counter()
    paths = [ROUTES[i % len(ROUTES)] for i in range(requests)]
    took = []
    with serve(name, tmp / f"{name}.log", requests, workers=2) as server, \
            ThreadPoolExecutor(requests) as pool:
        for _ in range(MAX_BURSTS if until_bad else bursts):
            started = time.perf_counter()
            outcomes.update(pool.map(lambda path: ask(server.url, path, todos, hang), paths))
            took.append(round(time.perf_counter() - started, 3))
            if until_bad and set(outcomes) - {"ok"}:
                break
        log = server.log.read_text()
    logged = collections.Counter(f"{kind}: {text.strip()}" for kind, text in
                                 LOG_ERROR.findall(log) if "Warning" not in kind)
    warnings = sorted({(kind, text) for kind, text in re.findall(r"(\w+Warning): (.{0,90})", log)
                       if kind != "MonitorWarning"})  # gevent's: psutil is not installed
    return {"scenario": name, "requests": len(took) * requests, "outcomes": dict(outcomes),
            "burst_s": took, "postgres_sleeps": paths.count(ROUTES[1]),
            "logged_errors": dict(logged.most_common(5)),
            "warnings": [f"{kind}: {text}" for kind, text in warnings][:3]}


def judge(checks: list, result: dict) -> None:
    """preload: the trap should show (something not ok); preload-fixed: every answer ok, and
    the pg_sleeps overlap (one at a time, two workers would need sleeps x 0.2 s / 2)."""
    bad = result["requests"] - result["outcomes"].get("ok", 0)
    measured = (", ".join(f"{n} {k}" for k, n in sorted(result["outcomes"].items()))
                + f"; slowest burst {max(result['burst_s']):.2f} s")
    if result["scenario"] == "preload":
        check(checks, "preload (shared connections)", "errors, hangs or wrong answers",
              measured, bad > 0)
        return
    serial = result["postgres_sleeps"] * 0.2 / 2
    check(checks, "preload-fixed (harden: a new pool at fork)",
          f"{result['requests']} ok, each burst under {serial:.2f} s", measured,
          bad == 0 and max(result["burst_s"]) < serial)


def run_parts(parts: Path, requests: int = 40, seconds: float = 0, bursts: int = 3,
              hang: float = HANG) -> list:
    """Both scenarios; writes PARTS/preload.json for the summary (S does not apply)."""
    requests, results, checks = max(requests, 40), [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("preload", "preload-fixed"):
            print(f"{name}: bursts of {requests} mixed requests", file=sys.stderr)
            results.append(run_one(name, bursts, requests, Path(tmp), hang,
                                   until_bad=name == "preload"))
            print(f"  {json.dumps(results[-1])}", file=sys.stderr)
            judge(checks, results[-1])
    return write_checks(parts, "preload", checks, results=results)


def main(argv: list[str] | None = None) -> int:
    def run(parts: Path, args) -> list:
        with seeded():
            return run_parts(parts, args.requests, bursts=args.bursts, hang=args.hang_after)

    def options(parser) -> None:
        parser.add_argument("--bursts", type=int, default=3)
        parser.add_argument("--requests", type=int, default=40)
        parser.add_argument("--hang-after", type=float, default=HANG,
                            help="seconds without an answer that count as a hang")
    return checks_main("preload", __doc__, run, argv, options)


if __name__ == "__main__":
    sys.exit(main())
