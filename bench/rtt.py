"""What network latency does to each setup, predicted from round trips and measured (root).

    python bench/rtt.py [--rtt 0 1 5] [--requests 100] [--duration 3] [--concurrency 20]

For each RTT, on the hosts of kit.net (app and PostgreSQL RTT apart, through kit.relay), and
each scenario: a burst of N to /sleep/postgres/?seconds=0, and /todos/ in throughput mode.
The relay counts the database round trips ("trips") one request makes. The prediction: a
setup that serialises (sync, unpatched gevent) needs trips x RTT + c per request, c being
its cost at RTT 0, so a burst takes N x (trips x RTT + c) and one worker serves at most
1 / (trips x RTT + c) per second; the others overlap their trips, up to the pool (15).
"""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kit import net  # noqa: E402
from kit.run import run_load, serve  # noqa: E402

SCENARIOS = ["sync", "gevent", "green", "gthread", "psycopg3"]
SERIAL = {"sync", "gevent"}


def measure(hosts, name: str, args, tmp: str) -> dict:
    with serve(name, Path(tmp, "gunicorn.log"), max(args.requests, args.concurrency),
               net=hosts) as server:
        before = hosts.turns()
        burst = run_load(args.requests, "--url", server.url, "--endpoint", "postgres",
                         "--seconds", 0, out=Path(tmp, "b.json"), via=server.via)
        trips = (hosts.turns() - before) / args.requests
        rate = run_load("--url", server.url, "--duration", args.duration, "--concurrency",
                        args.concurrency, out=Path(tmp, "r.json"), via=server.via)
    burst, rate = burst["results"][0], rate["results"][0]
    return {"scenario": name, "rtt_ms": hosts.rtt_ms, "trips": trips,
            "burst_s": burst["total_s"], "rps": rate["rps"],
            "errors": sum(burst["errors"].values()) + sum(rate["errors"].values())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rtt", type=float, nargs="+", default=[0, 1, 5])
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--duration", type=float, default=3)
    parser.add_argument("--concurrency", type=int, default=20)
    args = parser.parse_args()
    if net.why_not():
        print(f"rtt: {net.why_not()}", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rtt in args.rtt:
            with net.hosts(rtt) as hosts:
                for name in SCENARIOS:
                    rows.append(measure(hosts, name, args, tmp))
                    print(f"  measured {rows[-1]}", file=sys.stderr, flush=True)
    base = {r["scenario"]: r for r in rows if r["rtt_ms"] == min(args.rtt)}
    print(f"N = {args.requests} to /sleep/postgres/?seconds=0, and /todos/ over "
          f"{args.concurrency} connections; one worker; trips = database round trips per "
          f"request, counted by the relay; c = cost per request at RTT {min(args.rtt):g}")
    print(f"{'scenario':<9} {'RTT':>5} {'trips':>5}  {'burst: predicted':>17}  {'measured':>8}"
          f"  {'/todos/ req/s: predicted':>24}  {'measured':>8}")
    for r in rows:
        c_burst = base[r["scenario"]]["burst_s"] / args.requests
        c_rate = 1 / base[r["scenario"]]["rps"]
        added = r["trips"] * r["rtt_ms"] / 1000
        if r["scenario"] in SERIAL:
            burst = f"{args.requests * (added + c_burst):.2f} s"
            rate = f"{1 / (added + c_rate):.0f}"
            burst_ok = abs(r["burst_s"] / (args.requests * (added + c_burst)) - 1) <= 0.2
            rate_ok = abs(r["rps"] * (added + c_rate) - 1) <= 0.2
            marks = f"{'✓' if burst_ok else '✗'} / {'✓' if rate_ok else '✗'}"
        else:  # overlapped: the pool's 15 connections, or the CPU, whichever is slower
            burst = f"≥ {max(args.requests * c_burst, -(-args.requests // 15) * added):.2f} s"
            rate = f"≤ {min(1 / c_rate, args.concurrency / added if added else 1e9):.0f}"
            marks = ""
        print(f"{r['scenario']:<9} {r['rtt_ms']:>3g} ms {r['trips']:>5.1f}  {burst:>17}  "
              f"{r['burst_s']:>6.2f} s  {rate:>24}  {r['rps']:>8.0f}  {marks}"
              + (f"  errors {r['errors']}" if r["errors"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
