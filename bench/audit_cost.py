"""What audit.py costs: /todos/ requests/s with and without its instrumentation, and the time
of a whole audit of a six-route app.

    python bench/audit_cost.py [--duration 10] [--rounds 3]

The green app (one gevent worker) is started twice per round: once as gunicorn runs it, once
with audit.py's gunicorn config (its tracer on every greenlet switch, gevent's monitor at
10 ms, the probe every 5 ms), and load.py's closed loop measures /todos/ at 10 connections
on each, alternating so a busy machine affects both alike. Then it times `audit.py
audit_app:app` (tests/audit_app.py: six routes that answer, one that fails) at the default 10
requests at once. Starts its own throwaway PostgreSQL when DATABASE_URL is unset.
"""

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import audit
from kit import pg
from kit.run import ROOT, kit_env, launch, run_load, seeded


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker_of(master: int) -> int:
    return int(Path(f"/proc/{master}/task/{master}/children").read_text().split()[0])


def measure(instrumented: bool, duration: float, tmp: Path) -> tuple[float, float]:
    """(/todos/ requests/s, the worker's CPU microseconds per request)."""
    port = pg.free_port()
    argv = ["gunicorn", "-k", "gevent", "-w", "1", "--bind", f"127.0.0.1:{port}",
            "--no-control-socket"]
    env = {}
    if instrumented:
        config = tmp / "audit_conf.py"
        audit.shim(str(config), None)
        argv += ["-c", str(config)]
        env = {"AUDIT_TOKEN": secrets.token_hex(8), "AUDIT_MODE": "audit",
               "AUDIT_ROOT": str(ROOT)}
    server = launch([*argv, "app_green:app"], port, tmp / "gunicorn.log", env)
    try:
        run_load("--url", server.url, "--duration", 2, "--concurrency", 10, "--endpoint",
                 "todos", out=tmp / "warm.json")
        worker = worker_of(server.proc.pid)
        before = cpu_seconds(worker)
        document = run_load("--url", server.url, "--duration", duration, "--concurrency", 10,
                            "--endpoint", "todos", out=tmp / "load.json")
        result = document["results"][0]
        return result["rps"], (cpu_seconds(worker) - before) / result["requests"] * 1e6
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    plain, audited = [], []
    with seeded(), tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        for n in range(args.rounds):
            plain.append(measure(False, args.duration, tmp))
            audited.append(measure(True, args.duration, tmp))
            print(f"round {n + 1}: /todos/ {plain[-1][0]:.1f} requests/s ({plain[-1][1]:.0f} "
                  f"µs CPU a request) as gunicorn runs it, {audited[-1][0]:.1f} "
                  f"({audited[-1][1]:.0f} µs) with audit.py's instrumentation", file=sys.stderr)
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "audit.py", "audit_app:app", "--chdir", "tests",
                               "--gunicorn-args=--preload"], cwd=ROOT, capture_output=True,
                              text=True, env=kit_env(REMOTE_URL=os.environ.get(
                                  "REMOTE_URL", "http://127.0.0.1:9/")))
        took = time.perf_counter() - started
    base, cost = (statistics.median(r for r, _ in plain),
                  statistics.median(r for r, _ in audited))
    base_cpu, cost_cpu = (statistics.median(c for _, c in plain),
                          statistics.median(c for _, c in audited))
    print(f"/todos/, 1 gevent worker, 10 connections, {args.duration:g} s x {args.rounds}: "
          f"median {base:.1f} requests/s plain, {cost:.1f} audited: "
          f"{(1 - cost / base) * 100:.1f} % lost (goal: under 10 %); the worker's CPU a "
          f"request: {base_cpu:.0f} µs plain, {cost_cpu:.0f} µs audited "
          f"(+{(cost_cpu / base_cpu - 1) * 100:.1f} %)")
    print(f"audit.py audit_app:app (6 routes answering + 1 failing, 10 at once each): "
          f"{took:.1f} s, exit {done.returncode} (goal: within 60 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
