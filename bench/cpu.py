"""Where one worker's CPU goes at a given rate: py-spy on the worker, grouped by package (root).

    python bench/cpu.py [--setups green async] [--rate 200] [--rtt 1] [--seconds 10]

For each setup, one worker on kit.net's hosts (as bench/knee.py), loaded with knee.py's mix at
RATE per second on a schedule while py-spy samples the worker (100 per second, idle samples
left out). Prints, per setup, the worker's CPU time per answered request (from /proc, so the
sampler's own cost is not in it) and the share of the samples spent in each package (the
innermost frame's file: gevent, psycopg2, sqlalchemy, flask and werkzeug, quart, uvicorn,
asyncpg, ...). py-spy is a bench dependency only (bench/requirements-profile.txt), installed
into this Python's environment on first use.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kit import net, pg  # noqa: E402
from kit.run import serve  # noqa: E402
from knee import point  # noqa: E402  (bench/, beside this)

HERE = Path(__file__).resolve().parent
TICKS = 100  # os.sysconf("SC_CLK_TCK") on Linux


def py_spy() -> str:
    """py-spy beside this Python, else pip-installed from bench/requirements-profile.txt."""
    found = shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if found:
        return found
    print("bench/cpu.py: installing py-spy (bench/requirements-profile.txt)",
          file=sys.stderr)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r",
                    str(HERE / "requirements-profile.txt")], check=True)
    return shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"


def cpu_seconds(pid: int) -> float:
    fields = pg.proc_stat(pid)
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def package(frame: str) -> str:
    """'function (.../site-packages/pkg/mod.py:12)' -> 'pkg'; the standard library's
    'stdlib MODULE'; the app's own files by name."""
    parts = Path(frame.rsplit("(", 1)[-1].split(":")[0]).parts
    if "site-packages" in parts:
        return parts[parts.index("site-packages") + 1].split(".")[0].lstrip("_")
    lib = [i for i, part in enumerate(parts[:-1]) if part.startswith("python3")]
    if lib:
        return "stdlib " + parts[lib[-1] + 1].removesuffix(".py")
    return parts[-1] if parts and parts[-1] else "(no Python file: native code)"


def profile(spy: str, setup: str, rate: float, rtt: float, seconds: float, tmp: str) -> dict:
    with net.hosts(rtt) as hosts, serve(setup, Path(tmp, f"{setup}.log"), requests=20,
                                        net=hosts) as app:
        pid = app.health()["pid"]
        point(app, rate, 2, tmp)  # warm
        result: dict = {}
        load = threading.Thread(target=lambda: result.update(
            point(app, rate, seconds + 2, tmp)))
        raw = Path(tmp, f"{setup}.txt")
        before = cpu_seconds(pid)
        load.start()
        subprocess.run([spy, "record", "--pid", str(pid), "--rate", "100", "--duration",
                        str(int(seconds)), "--format", "raw", "--output", str(raw),
                        "--nonblocking", "--full-filenames"],
                       check=True, capture_output=True)
        load.join()
        used = cpu_seconds(pid) - before
    shares: collections.Counter = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        shares[package(stack.split(";")[-1])] += int(count)
    total = sum(shares.values()) or 1
    answered = result["answered_rate"] * (seconds + 2)
    return {"setup": setup, "rate": rate, "rtt_ms": rtt, "answered_rate":
            result["answered_rate"], "fast_p99_ms": result["fast_p99_ms"],
            "cpu_ms_per_request": round(1000 * used / answered, 2) if answered else None,
            "samples": total, "shares": {k: round(100 * v / total, 1)
                                         for k, v in shares.most_common(12)}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", nargs="+", default=["green", "async"])
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--rtt", type=float, default=1)
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: hosts and servers go
    if net.why_not():
        print(f"bench/cpu.py: {net.why_not()}", file=sys.stderr)
        return 2
    spy = py_spy()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [profile(spy, setup, args.rate, args.rtt, args.seconds, tmp)
                for setup in args.setups]
    for row in rows:
        print(f"{row['setup']} at {row['rate']:g}/s, RTT {row['rtt_ms']:g} ms: answered "
              f"{row['answered_rate']}/s, fast p99 {row['fast_p99_ms']} ms, worker CPU "
              f"{row['cpu_ms_per_request']} ms per request ({row['samples']} samples)")
        for name, share in row["shares"].items():
            print(f"  {share:5.1f} %  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
