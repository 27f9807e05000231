"""The summary table of run_all.sh, built from the parts kit.run wrote (never from text).

    python -m kit.summary PARTS_DIR [--requests N --seconds S --workers W] [--rate R
                                    --duration D] [--json FILE]

PARTS_DIR holds `<scenario>.<endpoint>.json` (load.py's document with the hub count and the
worst-case expectation beside it), with --rate `<scenario>.stream.json` (kit/stream.py: two
open-loop documents), `<scenario>.refused` (why it did not run), and the checks
of the scenarios judged by checks (`outage.json`, `preload.json`, `frozen.json`, `partition.json`).
Rows come in the scenario table's order. Exit status 1 when any row is not as expected.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

from kit import stream
from kit.run import ENDPOINTS
from kit.scenarios import MONITOR_ENV, SCENARIOS, add_size_arguments
from load import within
from models import ConfigError, Settings

CHECKED = {"outage": "PostgreSQL stopped under the green app, then started again",
           "preload": "connections opened in gunicorn's master, shared after fork",
           "frozen": "PostgreSQL backends frozen with SIGSTOP, then thawed",
           "partition": "app and database hosts 1 ms apart, every packet between them dropped",
           "traps": "traps users reported: COPY, shared sessions, idle drops, GC on the hub"}
PACKAGES = ["Flask", "SQLAlchemy", "psycopg2-binary", "psycogreen", "gevent", "gunicorn",
            "psycopg", "Flask-SQLAlchemy", "Quart", "uvicorn", "asyncpg"]


def row_for(scenario, endpoint: str, parts: Path) -> dict | None:
    """One row: load.py's result with the scenario's verdict beside it (None: not run)."""
    refused = parts / f"{scenario.name}.refused"
    if refused.exists():  # one row for the scenario, whatever its endpoints
        return None if endpoint != ENDPOINTS[0] else {
            "scenario": scenario.name, "endpoint": "-", "refused": refused.read_text().strip(),
            "as_expected": False}
    path = parts / f"{scenario.name}.{endpoint}.json"
    return judge(scenario, json.loads(path.read_text())) if path.exists() else None


def judge(scenario, part: dict) -> dict:
    """Is a measured part what the scenario predicts? Timing, statuses and the hub count."""
    result = dict(part["document"]["results"][0])
    hub, floor = part["hub_blocked"], part["expected_worst_concurrency"]
    n, seconds = result["requests"], result["seconds"] or 0.0
    worst = math.ceil(n / floor) * seconds
    undecided = result["matches_expectation"] is None and result.get("too_fast")
    if (result["expected_s"] is not None and floor < result["expected_concurrency"]
            and not undecided):  # too fast to tell stays so, whatever the workers
        # several workers: anything from an even spread to one worker taking the burst
        result["matches_expectation"] = within(result["total_s"], result["expected_s"], worst)
    if scenario.refusals:  # forced past the budget: PostgreSQL must refuse some
        ok_statuses = "503" in result["statuses"] and not result["errors"]
        result["matches_expectation"] = True  # its timing is not the point
    else:
        ok_statuses = set(result["statuses"]) <= {"200"} and not result["errors"]
    hub_ok = True
    if scenario.hub_blocked and hub is not None:
        blocking = scenario.hub_blocked == "some" and part["endpoint"] == "postgres"
        if blocking and seconds < float(MONITOR_ENV["GEVENT_MAX_BLOCKING_TIME"]):
            hub_ok = True  # each block is shorter than what the monitor reports
        else:
            hub_ok = hub > 0 if blocking else hub == 0  # time.sleep is patched in every one
    as_expected = bool(result["matches_expectation"]) and ok_statuses and hub_ok
    if undecided and ok_statuses:
        as_expected = None  # one at a time, or all CPU: the measurement cannot tell
    return {"scenario": scenario.name, **result, "expected_worst_concurrency": floor,
            "expected_worst_s": round(worst, 4), "hub_blocked": hub,
            "expected_blocks": result["expected_concurrency"] < n,
            "rtt_ms": part.get("rtt_ms"), "rtt_via": part.get("rtt_via"),
            "as_expected": as_expected, "server": part["document"]["server"]}


def describe(row: dict) -> str:
    if "refused" in row:
        return f"not run: {row['refused']}"
    pattern = row["pattern"]
    shape = {"concurrent": "concurrent", "serial": "blocks", "failed": "no 2xx",
             "single": "one answer", "overlap": f"about {row['overlap']:.0f} at once"}.get(
        pattern, f"waves of {row['concurrency']}")
    if row.get("too_fast"):
        shape += (" (or a pause of the machine: too fast to tell)" if pattern == "waves" else
                  " (or all CPU: too fast to tell)")
    refused = row["statuses"].get("503")
    if refused:
        shape = f"{refused} x 503 (refused), {shape}"
    mark = {True: "as expected ✓", False: "NOT as expected ✗"}.get(
        row["as_expected"], "cannot tell ? (ask for --seconds 0.1 or more)")
    verdict = f"{shape}, {mark}"
    overflow = (row.get("server") or {}).get("max_overflow")
    if (not row["as_expected"] and overflow and row["pattern"] == "waves"
            and len(row["waves"]) > math.ceil(row["requests"] / row["expected_concurrency"])):
        verdict += " (a straggler wave: MAX_OVERFLOW > 0; see docs/pool.md)"
    return verdict


def table(rows: list[dict]) -> list[str]:
    head = ["scenario", "endpoint", "N × S", "expected", "measured", "p99", "waves", "hub",
            "verdict"]
    lines = []
    for row in rows:
        if "refused" in row:
            lines.append([row["scenario"], row["endpoint"], "", "", "", "", "", "",
                          describe(row)])
            continue
        sizes = [str(w["size"]) for w in row["waves"]]
        waves = "+".join(sizes) if len(sizes) <= 6 else f"{len(sizes)} waves"
        if row["pattern"] == "overlap":  # smeared answers: the overlap, not a wave of N
            waves = f"none tight, ~{row['overlap']:.0f} at once"
        expected = (f"~{row['expected_s']:.2f} s" if row["expected_s"] is not None else "-")
        width = f"W={row['expected_concurrency']}"
        if row["expected_worst_concurrency"] < row["expected_concurrency"]:
            expected = f"~{row['expected_s']:.2f}-{row['expected_worst_s']:.2f} s"
            width = f"W={row['expected_concurrency']}..{row['expected_worst_concurrency']}"
        lines.append([row["scenario"], row["endpoint"], f"{row['requests']} × {row['seconds']:g} s",
                      f"{expected} ({width})",
                      f"{row['total_s']:.2f} s", f"{row['latency_s']['p99'] or 0:.2f} s",
                      waves, "-" if row["hub_blocked"] is None else str(row["hub_blocked"]),
                      describe(row)])
    return aligned(head, lines)


def aligned(head: list[str], lines: list[list[str]]) -> list[str]:
    """Columns as wide as their widest cell, a rule under the head."""
    widths = [max(len(str(x[i])) for x in [head, *lines]) for i in range(len(head))]
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return [fmt(head), fmt(["-" * w for w in widths]), *map(fmt, lines)]


def machine() -> dict:
    """What produced the numbers: CPU, cores, OS, Python, packages, PostgreSQL."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"cpu": cpu or platform.processor(), "cores": os.cpu_count(),
            "os": platform.platform(), "python": platform.python_version(),
            "packages": versions, "postgresql": server_version()}


def server_version() -> str | None:
    """PostgreSQL's version as the server in DATABASE_URL reports it, if it answers."""
    if not os.environ.get("DATABASE_URL"):
        return None
    from sqlalchemy import text

    from models import Settings, make_engine

    engine = make_engine(Settings.from_env())
    try:
        with engine.connect() as conn:
            return "PostgreSQL " + conn.scalar(text("SHOW server_version")).split()[0]
    except Exception:  # a summary without the version is still a summary
        return None
    finally:
        engine.dispose()


def pool_settings() -> dict:
    """The pool settings every scenario starts from (models.Settings: the one reading)."""
    try:
        settings = Settings.from_env()
    except ConfigError:
        return {}
    return {"pool_size": settings.pool_size, "max_overflow": settings.max_overflow,
            "pool_timeout": settings.pool_timeout}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", type=Path)
    add_size_arguments(parser)
    parser.add_argument("--json", metavar="FILE")
    opts = parser.parse_args(argv)
    rows = [row for s in SCENARIOS for e in ENDPOINTS
            if (row := row_for(s, e, opts.parts)) is not None]
    about = machine()
    where = (f"; app and PostgreSQL on hosts {opts.rtt:g} ms apart (RTT via a relay)"
             if opts.rtt is not None else "")
    if opts.rate is not None:  # streams: their rows, then the scenarios that did not run
        refused = rows
        rows = [stream.judge(s, json.loads(path.read_text())) for s in SCENARIOS
                if (path := opts.parts / f"{s.name}.stream.json").exists()]
        seconds = opts.duration or stream.DURATION
        print(f"\n{opts.rate:g} requests/s on a schedule for {seconds:g} s, twice per "
              f"scenario: /todos/ alone, then with 5 % {stream.SLOW}; {opts.workers} "
              f"worker(s); latency from each request's scheduled send{where}")
        print("\n".join(aligned(stream.HEAD, [stream.cells(row) for row in rows])))
        for row in refused:
            print(f"{row['scenario']}: {describe(row)}")
        rows += refused
    else:
        print(f"\n{opts.requests} requests at once per endpoint, {opts.seconds:g} s each, "
              f"{opts.workers} worker(s); W = requests the setup should overlap"
              + ("; W=a..b: several workers may not share a burst evenly" if opts.workers > 1
                 else "") + where)
        print("\n".join(table(rows)))
    pkgs = ", ".join(f"{k} {v}" for k, v in about["packages"].items() if v)
    print(f"\n{about['cpu']}, {about['cores']} cores; Python {about['python']}; "
          f"{about['postgresql'] or 'PostgreSQL (version unknown)'}; {pkgs}")
    checks = {name: json.loads(path.read_text())["checks"] for name in CHECKED
              if (path := opts.parts / f"{name}.json").exists()}
    for name, found in checks.items():
        print(f"\n{name} ({CHECKED[name]}):")
        for c in found:
            print(f"  {c['check']:<36} expected {c['expected']}; measured {c['measured']} "
                  f"{'✓' if c['ok'] else '✗'}")
    if opts.json:
        document = {"schema": "run_all/1", "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "settings": {"requests": opts.requests, "seconds": opts.seconds,
                                 "workers": opts.workers, "rtt_ms": opts.rtt,
                                 "rate": opts.rate, "duration_s": opts.rate and (
                                     opts.duration or stream.DURATION),
                                 **pool_settings()},
                    "machine": about, "rows": rows, "outage": checks.get("outage", []),
                    "checks": checks}
        Path(opts.json).write_text(json.dumps(document, indent=2) + "\n")
    ok = all(r["as_expected"] is not False for r in rows) and all(  # None: cannot tell
        c["ok"] for found in checks.values() for c in found)
    return 0 if (rows or checks) and ok else 1


if __name__ == "__main__":
    sys.exit(main())
