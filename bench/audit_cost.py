"""What audit.py costs: its tracer's time a greenlet switch, /todos/ requests/s with and
without its instrumentation, and the time of a whole audit of a six-route app.

    python bench/audit_cost.py [--duration 10] [--rounds 7]

First the tracer alone, in this process: 200,000 switches between two greenlets, without it
and with it (the best of 7 each). Then the green app (one gevent worker) is started twice per
round: once as gunicorn runs it, once with audit.py's gunicorn config (its tracer on every
greenlet switch, its monitor thread every 10 ms, the probe every 10 ms), and load.py's closed
loop measures /todos/ at 10 connections on each, alternating so a busy machine affects both
alike (the median of the rounds' ratios is reported). Then it times `audit.py audit_app:app`
(tests/audit_app.py: six routes that answer, one that fails) at the default 10 requests at
once. Starts its own throwaway PostgreSQL when DATABASE_URL is unset.
"""

import argparse
import http.server
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import audit  # noqa: E402
from kit import pg  # noqa: E402
from kit.run import ROOT, kit_env, launch, run_load, seeded  # noqa: E402


def slow_server() -> http.server.ThreadingHTTPServer:
    """What audit_app's /remote/ asks: an HTTP server that answers after 0.3 s."""
    class Slow(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            time.sleep(0.3)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def switch_cost(switches: int = 200_000) -> tuple[float, float]:
    """(µs a greenlet switch without audit.py's tracer, with it), the best of 7 each."""
    import greenlet

    def switched() -> float:
        def pong():
            while True:
                main.switch()
        main, other = greenlet.getcurrent(), greenlet.greenlet(pong)
        started = time.perf_counter()
        for _ in range(switches // 2):
            other.switch()
        return (time.perf_counter() - started) / switches * 1e6

    worker = audit.Worker("bench", 0.02, str(ROOT), {})
    plain, traced = [], []
    for _ in range(7):
        plain.append(switched())
        greenlet.settrace(worker.trace)
        try:
            traced.append(switched())
        finally:
            greenlet.settrace(None)
    return min(plain), min(traced)


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process, from /proc (Linux)."""
    fields = pg.proc_stat(pid)
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
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    without, traced = switch_cost()
    print(f"audit.py's tracer: {traced:.2f} µs a greenlet switch, {without:.2f} without it "
          f"(200,000 switches, the best of 7)")
    plain, audited = [], []
    with seeded(), tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        for n in range(args.rounds):
            plain.append(measure(False, args.duration, tmp))
            audited.append(measure(True, args.duration, tmp))
            print(f"round {n + 1}: /todos/ {plain[-1][0]:.1f} requests/s ({plain[-1][1]:.0f} "
                  f"µs CPU a request) as gunicorn runs it, {audited[-1][0]:.1f} "
                  f"({audited[-1][1]:.0f} µs) with audit.py's instrumentation", file=sys.stderr)
        remote = slow_server()
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "audit.py", "audit_app:app", "--chdir", "tests",
                               "--gunicorn-args=--preload"], cwd=ROOT, capture_output=True,
                              text=True, env=kit_env(REMOTE_URL="http://127.0.0.1:"
                                                     f"{remote.server_address[1]}/"))
        took = time.perf_counter() - started
        remote.shutdown()
        remote.server_close()
    # each round pairs two runs a few seconds apart: the median of the rounds' ratios is
    # what a busy machine disturbs least
    lost = statistics.median(1 - a[0] / p[0] for p, a in zip(plain, audited))
    more = statistics.median(a[1] / p[1] - 1 for p, a in zip(plain, audited))
    print(f"/todos/, 1 gevent worker, 10 connections, {args.duration:g} s x {args.rounds}: "
          f"median {statistics.median(r for r, _ in plain):.1f} requests/s plain, "
          f"{statistics.median(r for r, _ in audited):.1f} audited; per round, the median "
          f"loss {lost * 100:.1f} % (goal: under 10 %), and the worker's CPU a request "
          f"{more * 100:+.1f} % ({statistics.median(c for _, c in plain):.0f} µs plain)")
    print(f"audit.py audit_app:app (6 routes answering + 1 failing, 10 at once each): "
          f"{took:.1f} s, exit {done.returncode} (goal: within 60 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
