"""Is load.py a fair instrument? Its figures beside wrk's and beside the server's own cost.

    python bench/bench.py [--duration 5] [--concurrency 16]

On the embedded PostgreSQL (or DATABASE_URL), against the green app, it prints:
  (a) load.py's throughput on /todos/ against wrk's (Debian package `wrk`), same server;
  (b) N = 100 and 1000 on /sleep/python/: total - S, against N / (the rate from (a)), the
      time the one worker needs to answer N requests once their sleeps end; and the skew;
  (c) N = 100 on /sleep/postgres/ with POOL_SIZE=100 MAX_OVERFLOW=0: total / S, first on a
      cold pool (it opens its 100 connections), then warm, at S = 1 and 2, then the first
      burst of a server started with POOL_WARM=100;
  (d) every scenario's rate on /todos/ (no sleep): what patching costs on a fast endpoint.
Targets: (a) at least 0.5 of wrk; (b) skew under 50 ms at N = 1000; (c) under 1.10.
"""

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kit.run import run_load, seeded, serve  # noqa: E402

S = 1.0


def load(tmp: str, *args) -> dict:
    return run_load(*args, out=Path(tmp, "load.json"))["results"][0]


def wrk(url: str, duration: float, concurrency: int) -> float | None:
    if not shutil.which("wrk"):
        return None
    out = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{duration:g}s", url],
                         capture_output=True, text=True).stdout
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    return float(found.group(1)) if found else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    # max_connections 200: (c)'s pool of 100 must not meet the limit (97 for the app's role)
    with seeded(max_connections=200), tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp, "gunicorn.log")
        with serve("green", log, requests=1000) as server:
            mine = load(tmp, "--url", server.url, "--endpoint", "todos", "--duration",
                        args.duration, "--concurrency", args.concurrency)
            theirs = wrk(f"{server.url}/todos/", args.duration, args.concurrency)
            rate = mine["rps"]
            print(f"(a) /todos/, {args.concurrency} connections, {args.duration:g} s: load.py "
                  f"{rate:.0f} req/s (p99 {mine['latency_s']['p99'] * 1000:.1f} ms); wrk "
                  + (f"{theirs:.0f} req/s; ratio {rate / theirs:.2f} (target >= 0.50)"
                     if theirs else "not installed (apt-get install wrk)"))
            for n in (100, 1000):
                burst = load(tmp, n, "--url", server.url, "--endpoint", "python",
                             "--seconds", S, "--server-rate", rate)
                print(f"(b) /sleep/python/ N={n}: total - S = {burst['total_s'] - S:.3f} s "
                      f"against N / rate = {n / rate:.3f} s; dispatch skew "
                      f"{burst['dispatch_skew_s'] * 1000:.1f} ms (target < 50 ms); "
                      f"{burst['verdict']}")
        sized = {"POOL_SIZE": "100", "MAX_OVERFLOW": "0"}
        for env, runs in (({}, (("cold pool", S), ("warm pool", S), ("warm pool", 2 * S))),
                          ({"POOL_WARM": "100"}, (("POOL_WARM=100, first burst", S),))):
            with serve("green", log, requests=100, env={**sized, **env}) as server:
                for state, seconds in runs:
                    burst = load(tmp, 100, "--url", server.url, "--endpoint", "postgres",
                                 "--seconds", seconds)
                    floor = (seconds + 100 / rate) / seconds
                    print(f"(c) /sleep/postgres/ N=100, S={seconds:g}, POOL_SIZE=100 "
                          f"MAX_OVERFLOW=0, {state}: total / S = "
                          f"{burst['total_s'] / seconds:.3f} (target <= 1.10; the server's own "
                          f"floor (S + N/rate) / S = {floor:.3f}); waves "
                          f"{'+'.join(str(w['size']) for w in burst['waves'])}")
        rates: dict[str, list[dict]] = {}
        names = ["sync", "gevent", "green", "gthread", "psycopg3"]
        for round_ in range(3):  # three rounds, in a shifted order, against drift
            for name in names[round_:] + names[:round_]:
                with serve(name, log, requests=args.concurrency) as server:
                    rates.setdefault(name, []).append(load(
                        tmp, "--url", server.url, "--endpoint", "todos", "--duration",
                        args.duration, "--concurrency", args.concurrency))
        for name in names:
            runs = sorted(rates[name], key=lambda r: r["rps"])
            mid = runs[1]
            print(f"(d) /todos/ on {name:<9} {mid['rps']:5.0f} req/s (median of 3: "
                  f"{', '.join(str(round(r['rps'])) for r in runs)})  "
                  f"p50 {mid['latency_s']['p50'] * 1000:5.1f} ms  p99 "
                  f"{mid['latency_s']['p99'] * 1000:5.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
