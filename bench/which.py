"""Which should I use: every way to serve the app, measured the same way, in one table (root).

    python bench/which.py [--setups sync gthread gevent green psycopg3 async async-psycopg]
                          [--duration 8] [--stream 20] [--json docs/which.json]

For each setup, one worker, on the hosts of kit.net (load.py on a client host, the app on its
own, PostgreSQL behind the latency relay):
  - closed-loop req/s on /todos/ at RTT 0 (bench/knee.py's c: 20 connections, 3 s);
  - the knee with 5 % slow queries at RTT 0 and 1 ms (bench/knee.py's measure(): the most
    answers per second at rising open-loop rates of its mix);
  - at RTT 1 ms, a stream of that mix at half the unpatched gevent worker's knee (as measured
    here) for --stream seconds: the fast requests' p50/p99, the most connections the worker
    held to PostgreSQL meanwhile (its sockets to the relay, sampled every 50 ms), and its peak
    RSS (VmHWM);
  - the lines of code that differ from app_sync.py (code only: no docstring, comment or blank
    line): what the move costs.
Prints a Markdown table (stdout) to paste into docs/results.md; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import io
import json
import signal
import sys
import tempfile
import threading
import time
import tokenize
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kit import net  # noqa: E402
from kit.run import ROOT, serve  # noqa: E402
from kit.scenarios import BY_NAME  # noqa: E402
from kit.summary import machine  # noqa: E402
from knee import measure, point  # noqa: E402  (bench/, beside this)

SETUPS = ["sync", "gthread", "gevent", "green", "psycopg3", "async", "async-psycopg"]
UNPATCHED = "gevent"
DB_PORT_HEX = f"{net.DB_PORT:04X}"


def code_lines(path: Path) -> list[str]:
    """PATH's code: docstrings, comments and blank lines left out."""
    source = path.read_text()
    skip = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) \
                and ast.get_docstring(node) is not None:
            first = node.body[0]
            skip.update(range(first.lineno, first.end_lineno + 1))
    comments = {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT}
    return [line.rstrip() for n, line in enumerate(source.splitlines(), 1)
            if n not in skip and line.strip() and not (n in comments and
                                                       line.lstrip().startswith("#"))]


def differing_lines(app: str) -> dict:
    """Code lines added and removed going from app_sync.py to APP's module."""
    module = app.split(":")[0].replace(".", "/") + ".py"
    diff = list(difflib.ndiff(code_lines(ROOT / "app_sync.py"), code_lines(ROOT / module)))
    return {"file": module, "added": sum(d.startswith("+ ") for d in diff),
            "removed": sum(d.startswith("- ") for d in diff)}


def db_connections(pid: int) -> int:
    """Established TCP connections to PostgreSQL's port (the relay) in PID's network
    namespace: on kit.net's app host, only this app's."""
    count = 0
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[2].endswith(f":{DB_PORT_HEX}") and fields[3] == "01":
                count += 1
    return count


def rss_mb(pid: int) -> dict:
    status = dict(line.split(":", 1) for line in
                  Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    mb = lambda key: round(int(status[key].split()[0]) / 1024, 1)  # noqa: E731  (kB)
    return {"rss_mb": mb("VmRSS"), "peak_rss_mb": mb("VmHWM")}


def stream(setup: str, rate: float, duration: float, tmp: str) -> dict:
    """At RTT 1 ms: the mix at RATE for DURATION s, with the worker's connections and RSS."""
    with net.hosts(1) as hosts, serve(setup, Path(tmp, f"{setup}.stream.log"), requests=20,
                                      net=hosts) as app:
        pid = app.health()["pid"]
        point(app, rate, 2, tmp)  # warm, as knee.py does
        peak, done = [0], threading.Event()

        def sample():
            while not done.wait(0.05):
                peak[0] = max(peak[0], db_connections(pid))
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            got = point(app, rate, duration, tmp)
        finally:
            done.set()
            sampler.join()
        return {**got, "peak_connections": peak[0], "connections_after": db_connections(pid),
                **rss_mb(pid)}


def row_line(setup: str, knees: dict, at: dict, loc: dict) -> str:
    r0, r1 = knees[setup, 0], knees[setup, 1]
    return (f"| {setup} | {1000 / r0['c_ms']:.0f} | {r0['knee']:.0f}/s | {r1['knee']:.0f}/s | "
            f"{at['fast_p50_ms']:.1f} / {at['fast_p99_ms']:.1f} ms | "
            f"{at['peak_connections']} | {at['peak_rss_mb']:.0f} MB | "
            f"+{loc['added']} −{loc['removed']} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", nargs="+", default=SETUPS, choices=SETUPS)
    parser.add_argument("--duration", type=float, default=8, help="seconds per knee point")
    parser.add_argument("--stream", type=float, default=20, help="seconds of the stream")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: hosts and servers go
    if net.why_not():
        print(f"bench/which.py: {net.why_not()}", file=sys.stderr)
        return 2
    setups = list(dict.fromkeys([UNPATCHED, *args.setups]))  # its knee sets the stream's rate
    knees, costs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for rtt in (0, 1):
            for setup in setups:
                print(f"which: knee of {setup} at RTT {rtt} ms", file=sys.stderr, flush=True)
                row = measure(setup, rtt, costs.get(setup), args.duration, tmp)
                costs.setdefault(setup, row["c_ms"] / 1000)
                knees[setup, rtt] = row
        rate = round(knees[UNPATCHED, 1]["knee"] / 2, 1)
        streams = {}
        for setup in setups:
            print(f"which: {setup} at {rate}/s, RTT 1 ms", file=sys.stderr, flush=True)
            streams[setup] = stream(setup, rate, args.stream, tmp)
            print(f"  {streams[setup]}", file=sys.stderr, flush=True)
    loc = {setup: differing_lines(BY_NAME[setup].app) for setup in setups}
    shown = [s for s in SETUPS if s in args.setups]
    print(f"| setup | /todos/ closed loop, req/s | knee, RTT 0 | knee, RTT 1 ms | fast p50 / p99 "
          f"at {rate:g}/s, RTT 1 ms | connections held | peak RSS | code lines vs app_sync.py |")
    print("|---|---|---|---|---|---|---|---|")
    for setup in shown:
        print(row_line(setup, knees, streams[setup], loc[setup]))
    if args.json:
        about = machine()
        args.json.write_text(json.dumps({
            "machine": f"{about['cores']} cores {about['cpu']}, Python {about['python']}",
            "packages": about["packages"], "knee_duration_s": args.duration,
            "stream": {"rate": rate, "duration_s": args.stream, "rtt_ms": 1},
            "knees": [knees[s, rtt] for rtt in (0, 1) for s in setups],
            "streams": streams, "lines": loc}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
