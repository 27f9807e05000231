"""Scenarios judged by checks (outage, preload, frozen, partition): record, write, run.

Each check is {check, expected, measured, ok}; a runner writes its list to PARTS/NAME.json
for run_all.sh's summary, and checks.main() is its command line (`--json FILE`; exit 0 when
every check holds, 1 when one does not or the run could not be made).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from kit import net, pg


def check(checks: list, what: str, expected: str, measured: str, ok: bool) -> None:
    """Record one check and say it on stderr, expectation beside measurement."""
    checks.append({"check": what, "expected": expected, "measured": measured, "ok": ok})
    print(f"  {what}: expected {expected}; measured {measured} {'✓' if ok else '✗'}",
          file=sys.stderr, flush=True)


def write(parts: Path, name: str, checks: list, **extra) -> list:
    """PARTS/NAME.json, which the summary prints; returns the checks."""
    (parts / f"{name}.json").write_text(json.dumps({"scenario": name, "checks": checks,
                                                    **extra}, indent=2) + "\n")
    return checks


def main(name: str, doc: str, run, argv: list[str] | None, options=None) -> int:
    """The command line of a runner: run(parts, args) returns its checks."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--json", metavar="FILE", help="write the checks as JSON")
    if options:
        options(parser)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so every `finally` cleans up
    with tempfile.TemporaryDirectory() as tmp:
        try:
            checks = run(Path(tmp), args)
        except (pg.PgError, net.NetError, subprocess.CalledProcessError) as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            return 1
        if args.json:
            Path(args.json).write_text(Path(tmp, f"{name}.json").read_text())
    return 0 if all(c["ok"] for c in checks) else 1
