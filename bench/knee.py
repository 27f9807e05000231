"""Latency against offered load, per setup: where each one's p99 leaves its floor (root).

    python bench/knee.py [--rtt 0 1] [--setups sync gevent green gthread psycopg3 async]
                         [--duration 8] [--json docs/knee.json]

On the hosts of kit.net, one worker per setup: load.py in open-loop mode (constant arrivals)
at rising rates, with the production mix MIX: 95 % /todos/, 5 % /sleep/postgres/?seconds=0.2.
For each rate: the fast requests' p50/p99/p99.9, the slow ones' p50, and the answered rate (2xx
answers / the time from the first send to the last answer): it follows the offered rate up to
the knee, then stays flat at the setup's capacity while the backlog, and the p99, grow with the
run. The knee is that plateau: the most answers per second at any offered rate.

The prediction, from measured parts: c, a request's cost at RTT 0 (1 / the setup's closed-loop
rate on /todos/); trips, the database round trips of each request (the relay counts them). A
worker that serialises spends 0.95 x (trips_f x RTT + c) + 0.05 x (0.2 + trips_s x RTT + c) per
request of the mix, so its knee is 1 / that. One that overlaps its waits is bounded by the CPU:
1 / c, whatever the RTT.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kit import net  # noqa: E402
from kit.run import run_load, serve  # noqa: E402
from kit.summary import machine  # noqa: E402

MIX = "95:/todos/,5:/sleep/postgres/?seconds=0.2"
SLOW_S, SLOW_SHARE = 0.2, 0.05
SETUPS = ["sync", "gevent", "green", "gthread", "psycopg3", "async"]
CHOICES = SETUPS + ["async-psycopg"]
SERIAL = {"sync", "gevent"}
LADDER = (0.25, 0.5, 0.7, 0.85, 1.0, 1.15, 1.35, 1.6)  # x the predicted knee


def trips(hosts: net.Hosts, app, path: str, tmp: str, n: int = 20) -> float:
    """Database round trips per request on PATH (one at a time, so none overlap)."""
    before = hosts.turns()
    for i in range(n):
        run_load(1, "--url", f"{app.url}{path}", "--timeout", 10,
                 out=Path(tmp, "trip.json"), via=app.via)
    return (hosts.turns() - before) / n


def cost(app, tmp: str) -> float:
    """c: seconds per /todos/ request, from the closed-loop rate (20 connections, 3 s)."""
    done = run_load("--url", app.url, "--endpoint", "todos", "--duration", 3,
                    "--concurrency", 20, out=Path(tmp, "rate.json"), via=app.via)
    return 1 / done["results"][0]["rps"]


def predict(setup: str, rtt_s: float, trips_f: float, trips_s: float, c: float) -> float:
    if setup in SERIAL:
        return 1 / ((1 - SLOW_SHARE) * (trips_f * rtt_s + c)
                    + SLOW_SHARE * (SLOW_S + trips_s * rtt_s + c))
    return 1 / c


def point(app, rate: float, duration: float, tmp: str, mix: str = MIX) -> dict:
    """One open-loop run of load.py; the figures of the knee table (and of bench/k6.py's)."""
    doc = run_load("--url", app.url, "--rate", f"{rate:.2f}", "--duration", duration,
                   "--mix", mix, "--connections", 200, "--timeout", 60,
                   out=Path(tmp, "open.json"), via=app.via)
    fast, *slow = doc["results"]
    run = fast["open_loop"]
    answered = sum(res["statuses"].get("200", 0) for res in doc["results"])
    return {"rate": round(rate, 2), "sent": run["sent"], "achieved_rate": run["achieved_rate"],
            "answered_rate": round(answered / run["total_s"], 1),
            "fast_p50_ms": ms(fast["latency_s"]["p50"]),
            "fast_p99_ms": ms(fast["latency_s"]["p99"]),
            "fast_p99_9_ms": ms(fast["latency_s"]["p99_9"]),
            "slow_p50_ms": ms(slow[0]["latency_s"]["p50"]) if slow else None,
            "errors": sum(sum(res["errors"].values()) + sum(
                v for k, v in res["statuses"].items() if k != "200") for res in doc["results"]),
            "lag_p99_ms": ms(run["lag_s"]["p99"]), "behind": run["behind"],
            "waited": run["waited"]}


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def knee(points: list[dict]) -> float | None:
    """The most answers per second at any offered rate. Below the knee the answers follow
    the offered rate (a little less: the run's tail); past it the server is busy from the
    first request to the last, so answers / time is its capacity, however much is offered."""
    return max((p["answered_rate"] for p in points), default=None)


def leaves_floor(points: list[dict], factor: float = 3.0) -> float | None:
    """The lowest offered rate whose fast p99 is over FACTOR x the p99 at the lowest rate."""
    ordered = sorted(points, key=lambda p: p["rate"])
    floor = ordered[0]["fast_p99_ms"] if ordered else None
    return next((p["rate"] for p in ordered
                 if floor and p["fast_p99_ms"] and p["fast_p99_ms"] > factor * floor), None)


def measure(setup: str, rtt: float, c0: float | None, duration: float, tmp: str) -> dict:
    with net.hosts(rtt) as hosts, serve(setup, Path(tmp, f"{setup}.log"), requests=20,
                                        net=hosts) as app:
        trips_f = trips(hosts, app, "/todos/", tmp)
        c = c0 if c0 is not None else cost(app, tmp) - (
            trips_f * rtt / 1000 if setup in SERIAL else 0)  # the RTT's part taken out
        trips_s = trips(hosts, app, "/sleep/postgres/?seconds=0.2", tmp, n=5)
        predicted = predict(setup, rtt / 1000, trips_f, trips_s, c)
        point(app, predicted * LADDER[0], 2, tmp)  # warm: every pool connection opened once
        points = []
        for x in LADDER:
            points.append(point(app, predicted * x, duration, tmp))
            print(f"  {setup} RTT {rtt:g}: {points[-1]}", file=sys.stderr, flush=True)
    return {"setup": setup, "rtt_ms": rtt, "c_ms": ms(c), "trips_fast": round(trips_f, 2),
            "trips_slow": round(trips_s, 2), "predicted_knee": round(predicted, 1),
            "knee": knee(points), "p99_leaves_floor_at": leaves_floor(points),
            "points": points}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rtt", type=float, nargs="+", default=[0, 1])
    parser.add_argument("--setups", nargs="+", default=SETUPS, choices=CHOICES)
    parser.add_argument("--duration", type=float, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: hosts and servers go
    if net.why_not():
        print(f"bench/knee.py: {net.why_not()}", file=sys.stderr)
        return 2
    rows, costs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for rtt in sorted(args.rtt):
            for setup in args.setups:
                print(f"knee: {setup} at RTT {rtt:g} ms", file=sys.stderr, flush=True)
                row = measure(setup, rtt, costs.get(setup), args.duration, tmp)
                costs.setdefault(setup, row["c_ms"] / 1000)  # c is the cost at RTT 0
                rows.append(row)
    print("| setup | RTT | c | trips fast/slow | predicted knee | measured knee (most answered/s) "
          "| fast p99 over 3 x its floor from |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        got = row["knee"]
        ratio = f" ({got / row['predicted_knee']:.2f} x)" if got else ""
        print(f"| {row['setup']} | {row['rtt_ms']:g} ms | {row['c_ms']:.2f} ms | "
              f"{row['trips_fast']:.1f} / {row['trips_slow']:.1f} | {row['predicted_knee']:.1f}/s | "
              f"{got}/s{ratio} | {row['p99_leaves_floor_at'] or '-'}/s |")
    if args.json:
        about = machine()
        args.json.write_text(json.dumps({"mix": MIX, "duration_s": args.duration,
                                         "machine": f"{about['cores']} cores {about['cpu']}, "
                                                    f"Python {about['python']}",
                                         "rows": rows},
                                        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
