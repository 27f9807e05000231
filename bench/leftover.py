"""What a partition leaves on the server after the app gave up on its connections (root).

    python bench/leftover.py [--cases short long long+keepalive ...] [--json FILE]

On the hosts of kit.net (RTT 1 ms), the green app with a pool of 4 (all open, STATEMENT_TIMEOUT
2 s, so harden()'s QUERY_TIMEOUT is 4 s) sends 2 x /sleep/postgres/?seconds=1; once both run
on the server (about 0.4 s in), nftables on the db host drops everything to and from the
relay, and 2 x /todos/ take the pool's 2 idle connections. All 4 answer 503 after 4 s: the app closed the 4 connections. The
server cannot hear that while the cut lasts. Then the cut heals, 4 requests refill the pool,
and the server's backends for the app are counted 2, 10, 30 and 60 s after the heal, with how
many of them are the 4 the app abandoned ("stale").

The backend's TCP peer is the relay (kit.relay), which stands in for the app host's kernel:
when the app closes, the relay sends the FIN and retransmits it. "long" lowers the relay
host's tcp_retries2 to 3 (about 3 s of retries) and cuts for 20 s, so the FIN is given up
before the heal, as it is after ~15 min of a real partition with Linux's defaults. The fixes
are server settings (ALTER SYSTEM, reloaded before the case); "client-keepalive" gives libpq
keepalives and tcp_user_timeout to a sync app instead and times its stuck request.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg2  # noqa: E402

from kit import net  # noqa: E402
from kit.frozen import signal_all  # noqa: E402
from kit.partition import burst, cut_while, slowest  # noqa: E402
from kit.run import serve  # noqa: E402

ENV = {"POOL_SIZE": "4", "MAX_OVERFLOW": "0", "POOL_WARM": "4", "POOL_TIMEOUT": "20",
       "SLEEP_MAX": "1", "STATEMENT_TIMEOUT": "2", "CONNECT_TIMEOUT": "2"}
AFTER = (2, 10, 30, 60)  # seconds after the heal
CASES = {  # name: (cut seconds, relay's tcp_retries2 or None, server settings)
    "short": (10, None, {}),
    "long": (20, 3, {}),
    "long+keepalive": (20, 3, {"tcp_keepalives_idle": "5", "tcp_keepalives_interval": "1",
                               "tcp_keepalives_count": "3"}),
    "long+idle_session_timeout": (20, 3, {"idle_session_timeout": "10s"}),
    "long+idle_in_transaction": (20, 3, {"idle_in_transaction_session_timeout": "10s"}),
    "long+check_interval": (20, 3, {"client_connection_check_interval": "250ms"}),
}
CLIENT_KEEPALIVE = "keepalives_idle=1&keepalives_interval=1&keepalives_count=2&tcp_user_timeout=3000"


def superuser(hosts: net.Hosts):
    """A connection to the db host's server as the superuser, over its unix socket."""
    state = json.loads(Path(hosts.state).read_text())
    conn = psycopg2.connect(host=state["dir"], port=state["port"], user="kit",
                            dbname="postgres", application_name="bench.leftover")
    conn.autocommit = True
    query(conn, "SET idle_session_timeout = 0")  # the bench's own session is exempt
    return conn


def query(conn, sql: str, *params) -> list:
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall() if cur.description else []


def configure(conn, settings: dict[str, str]) -> None:
    for name in ("tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count",
                 "idle_session_timeout", "idle_in_transaction_session_timeout",
                 "client_connection_check_interval"):
        if name in settings:
            query(conn, f"ALTER SYSTEM SET {name} = %s", settings[name])
        else:
            query(conn, f"ALTER SYSTEM RESET {name}")
    query(conn, "SELECT pg_reload_conf()")


def app_backends(conn) -> list[tuple[int, str]]:
    return query(conn, "SELECT pid, coalesce(state, '') FROM pg_stat_activity "
                       "WHERE application_name = 'flask-blocking-kit' ORDER BY pid")


def relay_retries(hosts: net.Hosts, value: int) -> None:
    hosts.call("relay", ["sysctl", "-q", f"net.ipv4.tcp_retries2={value}"], check=True)


def run_case(name: str, hosts: net.Hosts, conn, tmp: str, after: tuple = AFTER) -> dict:
    cut, retries, settings = CASES[name]
    return leftover(hosts, conn, tmp, cut, retries, settings, after, name)


def leftover(hosts: net.Hosts, conn, tmp: str, cut: float, retries: int | None,
             settings: dict[str, str], after: tuple = AFTER, name: str = "case") -> dict:
    """One case: configure, serve, cut, heal, count; the row."""
    configure(conn, settings)
    relay_retries(hosts, retries or 15)
    with serve("green", Path(tmp, f"{name}.log"), requests=4, env=ENV, net=hosts) as app:
        abandoned = {pid for pid, _ in app_backends(conn)}
        got: dict = {}

        def during(flying) -> None:  # the idle pair taken, then the rest of the cut
            cut_at = time.monotonic()
            got["idle"] = burst(app, 2, "todos", 0, tmp, "idle.json")["statuses"]
            flying.join(15)
            time.sleep(max(0.0, cut - (time.monotonic() - cut_at)))
        def both_running() -> bool:  # the 2 pg_sleeps, on the server (0.4 s in, when idle)
            return [state for _, state in app_backends(conn)].count("active") >= 2
        got["flying"] = cut_while(hosts, lambda: burst(app, 2, "postgres", 1, tmp,
                                                       "flying.json"), both_running,
                                  during)["statuses"]
        healed = time.monotonic()
        refill = burst(app, 4, "postgres", 0.2, tmp, "refill.json")["statuses"]
        counts = []
        for seconds in after:
            time.sleep(max(0.0, healed + seconds - time.monotonic()))
            now = app_backends(conn)
            counts.append({"after_s": seconds, "backends": len(now),
                           "stale": sum(pid in abandoned for pid, _ in now)})
            counts[-1]["states"] = sorted(state for pid, state in now if pid in abandoned)
            print(f"  {name}: +{seconds} s: {counts[-1]}", file=sys.stderr, flush=True)
        query(conn, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = 'flask-blocking-kit'")  # the next case starts clean
    return {"case": name, "cut_s": cut, "relay_tcp_retries2": retries or 15,
            "server": settings, "during_cut": got, "refill": refill, "counts": counts}


def frozen(hosts: net.Hosts, conn, tmp: str) -> dict:
    """The pool's 4 backends stopped (SIGSTOP): 4 requests give up on them (503 after 4 s),
    4 more open new ones; counted while frozen, and 2 s after they are thawed."""
    configure(conn, {})
    with serve("green", Path(tmp, "frozen.log"), requests=4, env=ENV, net=hosts) as app:
        stopped = [pid for pid, _ in app_backends(conn)]
        signal_all(stopped, signal.SIGSTOP)
        try:
            gave_up = burst(app, 4, "todos", 0, tmp, "gave-up.json")["statuses"]
            reopened = burst(app, 4, "postgres", 0.2, tmp, "reopened.json")["statuses"]
            during = len(app_backends(conn))
        finally:
            signal_all(stopped, signal.SIGCONT)
        time.sleep(2)
        after = app_backends(conn)
    row = {"case": "frozen", "during_cut": {"gave_up": gave_up, "reopened": reopened},
           "backends_frozen": during, "after_thaw": len(after),
           "stale_after_thaw": sum(pid in stopped for pid, _ in after)}
    print(f"  frozen: {row}", file=sys.stderr, flush=True)
    return row


def client_keepalive(hosts: net.Hosts, conn, tmp: str) -> dict:
    """A sync app (no query bound of its own) with libpq keepalives + tcp_user_timeout: how long
    its request stays stuck behind a cut on the far side of the relay."""
    configure(conn, {})
    relay_retries(hosts, 15)
    result: dict = {"case": "client-keepalive", "libpq": CLIENT_KEEPALIVE}
    env = {**ENV, "DATABASE_URL": f"{hosts.database_url_for('app')}?{CLIENT_KEEPALIVE}"}
    with serve("sync", Path(tmp, "sync.log"), requests=2, env=env, net=hosts) as app:
        answer = cut_while(hosts, lambda: burst(app, 1, "postgres", 1, tmp, "stuck.json"), 0.4,
                           lambda asker: asker.join(25))
        result["answer"] = {**answer.get("statuses", {}), **answer.get("errors", {})}
        result["slowest_s"] = slowest(answer) if answer else None
    print(f"  client-keepalive: {result['answer']} {result['slowest_s']}", file=sys.stderr, flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=[*CASES, "frozen", "client-keepalive"],
                        choices=[*CASES, "frozen", "client-keepalive"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: hosts and servers go
    if net.why_not():
        print(f"bench/leftover.py: {net.why_not()}", file=sys.stderr)
        return 2
    rows = []
    with net.hosts(1) as hosts, tempfile.TemporaryDirectory() as tmp:
        conn = superuser(hosts)
        try:
            for name in args.cases:
                print(f"leftover: {name}", file=sys.stderr, flush=True)
                special = {"frozen": frozen, "client-keepalive": client_keepalive}
                rows.append(special[name](hosts, conn, tmp) if name in special
                            else run_case(name, hosts, conn, tmp))
        finally:
            conn.close()
    print("| case | cut | during the cut | " + " | ".join(f"+{a} s" for a in AFTER) + " |")
    print("|---|---|---|" + "---|" * len(AFTER))
    for row in rows:
        if "counts" in row:
            cells = [f"{c['backends']} ({c['stale']} stale)" for c in row["counts"]]
            print(f"| {row['case']} | {row['cut_s']} s | {row['during_cut']} | "
                  + " | ".join(cells) + " |")
        elif row["case"] == "frozen":
            print(f"| frozen | (SIGSTOP) | {row['during_cut']}, {row['backends_frozen']} backends "
                  f"while frozen | {row['after_thaw']} ({row['stale_after_thaw']} stale) after "
                  f"the thaw |" + " |" * (len(AFTER) - 1))
        else:
            print(f"| {row['case']} | (a sync app) | {row['answer']} after {row['slowest_s']:.2f} s |"
                  + " |" * len(AFTER))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
