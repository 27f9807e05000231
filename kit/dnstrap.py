"""The resolver trap: a host name in DATABASE_URL, a resolver that answers after 2 s.

    python -m kit.dnstrap [--json FILE]          (root: it builds hosts with kit.net)

libpq resolves a host name inside PQconnectStart, in C, before psycopg2's wait callback can
yield (its docs: PQconnectStart does not block only with hostaddr). psycopg 3 resolves with
Python's getaddrinfo, which gevent patches. On kit.net's hosts (RTT 0), the app host's
resolv.conf points at kit.resolver, which answers `db.kit` after 2 s. The green app, a cold
pool of 5, gets 5 requests that each need a new connection, while /health (no database) is
asked every 50 ms: the slowest /health answer and gevent's blocked-loop reports say whether
the resolution held the whole worker. For green psycopg2, psycopg 3, and psycopg2 with
hostaddr (no resolution at all).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from kit import net
from kit.checks import check
from kit.checks import main as checks_main
from kit.checks import write as write_checks
from kit.run import ROOT, serve

NAME, DELAY = "db.kit", 2.0
CASES = [("green", "psycopg2", False), ("psycopg3", "psycopg", False),
         ("green", "psycopg2", True)]  # (scenario, driver, hostaddr?)
PROBE = """
import json, sys, threading, time, urllib.request
base, n = sys.argv[1], int(sys.argv[2])
took, slowest, stop = [], [0.0], threading.Event()
def request(path):
    started = time.perf_counter()
    try:
        urllib.request.urlopen(base + path, timeout=30).read()
    except OSError:
        pass
    return time.perf_counter() - started
def burst(_):
    took.append(request("/sleep/postgres/?seconds=0"))
def probe():
    while not stop.is_set():
        slowest[0] = max(slowest[0], request("/health"))
        time.sleep(0.05)
prober = threading.Thread(target=probe); prober.start()
time.sleep(0.3)
threads = [threading.Thread(target=burst, args=(i,)) for i in range(n)]
for t in threads: t.start()
for t in threads: t.join()
stop.set(); prober.join()
print(json.dumps({"burst_s": round(max(took), 2), "health_max_s": round(slowest[0], 2)}))
"""


def resolver_for(hosts: net.Hosts, role: str) -> subprocess.Popen:
    """kit.resolver on ROLE's host, which resolves through it from now on."""
    folder = Path("/etc/netns", hosts.ns(role))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:10 attempts:1\n")
    proc = hosts.run(role, [sys.executable, "-m", "kit.resolver", NAME,
                            hosts.address("relay", role), "--delay", str(DELAY)],
                     stdout=subprocess.PIPE, text=True, cwd=ROOT)
    if proc.stdout.readline().strip() != "ready":
        raise net.NetError("the resolver did not start")
    return proc


def run_case(hosts: net.Hosts, scenario: str, driver: str, hostaddr: bool, tmp: Path,
             checks: list) -> None:
    relay = hosts.address("relay", "app")
    url = f"postgresql://app:{hosts.password}@{NAME}:{net.DB_PORT}/app"
    if hostaddr:
        url += f"?hostaddr={relay}"
    env = {"DATABASE_URL": url, "DB_DRIVER": driver, "POOL_SIZE": "5", "MAX_OVERFLOW": "0",
           "CONNECT_TIMEOUT": "10"}
    with serve(scenario, tmp / f"{scenario}-{driver}-{hostaddr}.log", 5, env=env,
               net=hosts) as server:
        done = hosts.call("client", [sys.executable, "-c", PROBE, server.url, "5"],
                          capture_output=True, text=True, timeout=120)
        found = json.loads(done.stdout)
        reports = server.blocked_reports()
    label = f"{driver}{' + hostaddr' if hostaddr else ''}"
    blocks = driver == "psycopg2" and not hostaddr
    expected = (f"the hub held by each resolution in turn: /health waits {DELAY:g} s or "
                f"more, blocked-loop reports" if blocks else
                "/health unaffected (under 0.5 s), no blocked-loop report")
    measured = (f"5 new connections in {found['burst_s']} s; slowest /health "
                f"{found['health_max_s']} s; {reports} blocked-loop reports")
    ok = (found["health_max_s"] > 0.8 * DELAY and reports > 0) if blocks else (
        found["health_max_s"] < 0.5 and reports == 0)
    check(checks, f"resolver 2 s away: {label}", expected, measured, ok)


def run_parts(parts: Path, requests: int = 0, seconds: float = 0) -> list:
    checks: list = []
    with net.hosts(0) as hosts, tempfile.TemporaryDirectory() as tmp:
        resolver = resolver_for(hosts, "app")
        try:
            for scenario, driver, hostaddr in CASES:
                print(f"dnstrap: {driver}{' + hostaddr' if hostaddr else ''}",
                      file=sys.stderr, flush=True)
                run_case(hosts, scenario, driver, hostaddr, Path(tmp), checks)
        finally:
            resolver.kill()
            resolver.wait()
            resolver.stdout.close()
            shutil.rmtree(Path("/etc/netns", hosts.ns("app")), ignore_errors=True)
    return write_checks(parts, "dnstrap", checks)


def main(argv: list[str] | None = None) -> int:
    return checks_main("dnstrap", __doc__, lambda parts, args: run_parts(parts), argv)


if __name__ == "__main__":
    sys.exit(main())
