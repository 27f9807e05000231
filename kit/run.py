"""The one place that runs a scenario: start gunicorn, wait until ready, load it, stop it.

    python -m kit.run plan [--scenario NAME ...] [--requests N --seconds S --workers W]
    python -m kit.run one NAME --parts DIR [--requests N --seconds S --workers W] [--rtt MS]
                                           [--rate R --duration D]
    python -m kit.run serve NAME [--port 8000] [--requests 100]     # until Ctrl-C

run_all.sh calls `plan` (check the arguments, list the steps), then `one` per step, which
writes `<scenario>.<endpoint>.json` (with --rate, `<scenario>.stream.json`, judged by
kit/stream.py; or `<scenario>.refused`) into DIR for kit.summary. The tests and bench/ import
start(), serve(), run_load() and run_scenario() from here.
DATABASE_URL must be set (run_all.sh, the tests and `seeded()` set it); with --rtt each
scenario gets hosts of its own (kit.net), its database on the db host.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from kit import net as hosts
from kit import pg
from kit.scenarios import BLOCKED_MARK, BY_NAME, add_size_arguments, budget, pick
from kit.stream import DURATION, FAST, MIX, SLOW

ROOT = Path(__file__).resolve().parent.parent
ENDPOINTS = ["python", "postgres"]


def kit_env(**extra) -> dict[str, str]:
    """Our environment with this Python's bin folder first on PATH, plus extra."""
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ.get('PATH', '')}"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def load_timeout(requests: int, seconds: float) -> float:
    """load.py's --timeout for a burst: every request served one at a time, with room."""
    return requests * (seconds + 2) + 30


HEALTH = ("import json, sys, urllib.request\n"
          "print(urllib.request.urlopen(sys.argv[1] + '/health', timeout=5).read().decode())")


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path
    via: list[str] = field(default_factory=list)  # the client host's `ip netns exec ...`

    def health(self) -> dict:
        if self.via:  # on another host: ask from the client's namespace
            done = subprocess.run([*self.via, sys.executable, "-c", HEALTH, self.url],
                                  capture_output=True, text=True)
            if done.returncode:
                raise OSError(done.stderr.strip()[-200:])
            return json.loads(done.stdout)
        with urllib.request.urlopen(f"{self.url}/health", timeout=5) as answer:
            return json.load(answer)

    def blocked_reports(self) -> int:
        """How often gevent's monitor said the event loop was blocked."""
        return self.log.read_text().count(BLOCKED_MARK)

    def wait_ready(self, seconds: float = 30) -> None:
        """Poll /health until our gunicorn answers (its master, or a worker of it: a port
        another process took between free_port() and our bind answers for someone else);
        raise with the log's tail if it dies or times out."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                pid = self.health().get("pid")
                if pid is not None and pid != self.proc.pid and \
                        pid not in pg.children(self.proc.pid):
                    raise OSError(f"127.0.0.1's port answers for pid {pid}, not our gunicorn")
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"gunicorn exited: {self.log.read_text()[-1500:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"gunicorn not ready after {seconds:g} s: "
                                       f"{self.log.read_text()[-1500:]}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM to gunicorn's master; after 15 s, SIGKILL to its whole process group (the
        master and its workers), so no worker outlives it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own group: start_new_session
        self.proc.wait()


def die_with_parent():
    """For Popen's preexec_fn: on Linux the child gets SIGTERM when this thread ends, even by
    SIGKILL (PR_SET_PDEATHSIG; gunicorn's workers follow their master). Main thread only:
    the setting follows the thread that forked, not the process."""
    if not sys.platform.startswith("linux") or \
            threading.current_thread() is not threading.main_thread():
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    return lambda: libc.prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def start(scenario: str, log: Path, requests: int = 5, workers: int = 1,
          env: dict | None = None, port: int | None = None,
          net: hosts.Hosts | None = None, role: str = "app", seconds: float = 1.0,
          app: str | None = None) -> Server:
    """Start the scenario on 127.0.0.1 (a free port unless given), or on NET's host ROLE,
    and wait until it answers. app: serve this module:app instead of the scenario's own
    (kit.frozen's wrapper of the green app)."""
    port = port or pg.free_port()
    host = net.address(role) if net else "127.0.0.1"
    if net:  # unless told otherwise, the database on the db host, through the relay
        env = {"DATABASE_URL": net.database_url_for(role), **(env or {})}
    argv = BY_NAME[scenario].command(port, requests, workers, seconds, host)
    if app:
        argv[-1] = app
    return launch(argv, port, log, env, net, role)


def launch(argv: list[str], port: int, log: Path, env: dict | None = None,
           net: hosts.Hosts | None = None, role: str = "app") -> Server:
    """Run a gunicorn command line that binds 127.0.0.1:PORT (host ROLE's address in NET's
    namespace, when given); wait until it answers."""
    address, via = "127.0.0.1", []
    if net:
        address, via = net.address(role), net.exec("client")
        argv = net.exec(role) + argv
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=kit_env(**(env or {})), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=die_with_parent())
    server = Server(f"http://{address}:{port}", proc, Path(log), via)
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def serve(scenario: str, log: Path, requests: int = 5, workers: int = 1,
          env: dict | None = None, port: int | None = None, net: hosts.Hosts | None = None,
          role: str = "app", seconds: float = 1.0, app: str | None = None):
    server = start(scenario, log, requests, workers, env, port, net, role, seconds, app)
    try:
        yield server
    finally:
        server.stop()


def run_load(*args, out: Path, report=subprocess.DEVNULL, via: list[str] = ()) -> dict:
    """Run load.py as a user would, with --no-lines --json OUT; returns its JSON document.

    report: where its printed report goes (default: nowhere; sys.stderr to show it).
    via: a prefix such as the client host's `ip netns exec ...`."""
    done = subprocess.run([*via, sys.executable, "load.py", *map(str, args), "--no-lines",
                           "--json", str(out)], cwd=ROOT, env=kit_env(), check=False,
                          stdout=report,
                          stderr=subprocess.DEVNULL if report == subprocess.DEVNULL else None)
    if done.returncode > 1:  # 0: all 2xx, 1: some not; anything else is not a measurement
        raise RuntimeError(f"load.py {' '.join(map(str, args))} exited {done.returncode}")
    return json.loads(out.read_text())


@contextlib.contextmanager
def seeded(max_connections: int = pg.DEFAULT_MAX_CONNECTIONS, own: bool = False):
    """A seeded database exported as DATABASE_URL for the block; yields (url, server).

    DATABASE_URL if set (and not `own`), else a throwaway server (kit.pg.database)."""
    previous = os.environ.get("DATABASE_URL")
    with pg.database(max_connections, own) as (url, server):
        os.environ["DATABASE_URL"] = url
        try:
            done = subprocess.run([sys.executable, "seed.py"], cwd=ROOT, env=kit_env(),
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise pg.PgError(done.stderr.strip() or "seed.py failed")
            yield url, server
        finally:
            if previous is None:
                os.environ.pop("DATABASE_URL", None)
            else:
                os.environ["DATABASE_URL"] = previous


def run_scenario(name: str, parts: Path, requests: int, seconds: float, workers: int = 1,
                 env: dict | None = None, endpoints=ENDPOINTS,
                 net: hosts.Hosts | None = None) -> str:
    """Budget check, gunicorn, load.py on each endpoint, stop; writes the parts for the
    summary and returns gunicorn's log. env: variables on top of ours (e.g. DATABASE_URL);
    net: run the app, PostgreSQL and load.py on the hosts of kit.net instead of loopback."""
    scenario = BY_NAME[name]
    full_env = {**os.environ, **(env or {})}
    if net:  # the server is only reachable from the app host; one app, well within 97
        full_env["DATABASE_URL"] = net.database_url
        print(f"{name}: on hosts {net.rtt_ms:g} ms apart", file=sys.stderr)
    else:
        verdict = budget(scenario, requests, workers, full_env)
        print(f"{name}: connection budget: {verdict}", file=sys.stderr)
        if not verdict.ok and not scenario.refusals:
            (parts / f"{name}.refused").write_text(f"{name}: connection budget: {verdict}\n")
            return ""
        if not verdict.ok:
            print(f"{name}: forced past the check, to show what users would see",
                  file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp, \
            serve(name, Path(tmp, "gunicorn.log"), requests, workers, env, net=net,
                  seconds=seconds) as server:
        print(f"{name}: {' '.join(server.proc.args)}", file=sys.stderr)
        for endpoint in endpoints:
            expect = scenario.expected_concurrency(endpoint, requests, workers, full_env, seconds)
            before = server.blocked_reports()
            document = run_load(requests, "--url", server.url, "--endpoint", endpoint,
                                "--seconds", seconds, "--expect-concurrency", expect,
                                "--timeout", load_timeout(requests, seconds),
                                out=Path(tmp, "load.json"), report=sys.stderr, via=server.via)
            part = {"scenario": name, "endpoint": endpoint, "workers": workers,
                    "rtt_ms": net.rtt_ms if net else None, "rtt_via": "relay" if net else None,
                    "hub_blocked": (server.blocked_reports() - before
                                    if scenario.hub_blocked else None),
                    "expected_worst_concurrency": scenario.uneven_floor(
                        endpoint, requests, workers, full_env, seconds),
                    "document": document}
            (parts / f"{name}.{endpoint}.json").write_text(json.dumps(part, indent=1))
        return server.log.read_text()


def run_stream(name: str, parts: Path, rate: float, duration: float, workers: int = 1,
               net: hosts.Hosts | None = None) -> None:
    """A stream (kit/stream.py): /todos/ alone, then the mix, at RATE per second for DURATION
    seconds against one server; writes PARTS/NAME.stream.json for kit.summary."""
    with tempfile.TemporaryDirectory() as tmp, \
            serve(name, Path(tmp, "gunicorn.log"), 20, workers, net=net) as server:
        print(f"{name}: {rate:g}/s for {duration:g} s, /todos/ alone, then with 5 % "
              f"{SLOW}", file=sys.stderr)
        documents = {label: run_load("--url", server.url, "--rate", rate, "--duration",
                                     duration, "--mix", mix, "--timeout", 60,
                                     out=Path(tmp, f"{label}.json"), report=sys.stderr,
                                     via=server.via)
                     for label, mix in (("alone", f"1:{FAST}"), ("mixed", MIX))}
    part = {"scenario": name, "workers": workers, "rtt_ms": net.rtt_ms if net else None,
            **documents}
    (parts / f"{name}.stream.json").write_text(json.dumps(part, indent=1))


def steps(names: list[str]) -> list[str]:
    """The picked scenarios in table order; scenarios that share a runner are one step."""
    seen, result = set(), []
    for scenario in pick(names):
        if scenario.runner in seen:
            continue
        if scenario.runner:
            seen.add(scenario.runner)
        result.append(scenario.name)
    return result


def one(name: str, parts: Path, requests: int, seconds: float, workers: int,
        rtt: float | None = None, rate: float | None = None, duration: float = 10.0) -> None:
    runner = BY_NAME[name].runner
    if runner and rtt is not None:
        (parts / f"{name}.refused").write_text(f"{name}: not run with --rtt (loopback only)")
    elif runner and rate is not None:
        (parts / f"{name}.refused").write_text(f"{name}: not run with --rate (bursts only)")
    elif rate is not None:
        with hosts.hosts(rtt) if rtt is not None else contextlib.nullcontext() as net:
            run_stream(name, parts, rate, duration, workers, net=net)
    elif runner:  # scenarios with servers of their own: outage, pgbouncer, ...
        importlib.import_module(runner).run_parts(parts, requests, seconds)
    elif rtt is not None:  # hosts of their own, PostgreSQL seeded on the db host
        with hosts.hosts(rtt) as net:
            run_scenario(name, parts, requests, seconds, workers, net=net)
    else:
        run_scenario(name, parts, requests, seconds, workers)


def servable(name: str) -> None:
    """Exit 2 with a reason unless NAME is one gunicorn command that --serve can run."""
    [scenario] = pick([name])
    if scenario.runner:
        raise SystemExit(f"kit.run: {name} starts servers of its own; run it with "
                         f"./run_all.sh --scenario {name}")


def serve_forever(name: str, port: int, requests: int, workers: int) -> None:
    """Serve NAME on 127.0.0.1:PORT until SIGINT or SIGTERM, and say how to load it."""
    servable(name)
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise SystemExit(f"kit.run: port {port} on 127.0.0.1 is in use: stop what "
                             f"listens there, or pass --port") from None
    with tempfile.TemporaryDirectory() as tmp, \
            serve(name, Path(tmp, "gunicorn.log"), requests, workers, port=port) as server:
        url = "" if port == 8000 else f" --url {server.url}"
        print(f"\nserving '{name}' on {server.url} ({BY_NAME[name].shows}).\n"
              f"In another terminal, in this folder:\n"
              f"  .venv/bin/python load.py 100{url}                      # both /sleep/ routes\n"
              f"  .venv/bin/python load.py 30 --endpoint postgres{url}   # pg_sleep only\n"
              f"  .venv/bin/python load.py --duration 5{url}             # requests/s on /todos/\n"
              f"Ctrl-C stops it and removes everything it started.", file=sys.stderr,
              flush=True)
        while server.proc.poll() is None:
            time.sleep(0.5)
        raise RuntimeError(f"gunicorn exited: {server.log.read_text()[-1500:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kit.run", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["plan", "one", "serve"])
    parser.add_argument("name", nargs="?", help="the scenario, for one and serve")
    parser.add_argument("--scenario", action="append", default=[], metavar="NAME",
                        help="with plan: a scenario to run (repeatable; default: the usual set)")
    parser.add_argument("--serve", metavar="NAME", help="with plan: check NAME can be served")
    parser.add_argument("--parts", type=Path, help="with one: the folder for the summary")
    parser.add_argument("--port", type=int, default=8000, help="with serve")
    add_size_arguments(parser, requests=None)
    args = parser.parse_args(argv)
    if args.action != "plan" and args.name not in BY_NAME:
        parser.error(f"{args.action} needs a scenario: one of {', '.join(BY_NAME)}")
    if args.action != "plan":  # SIGTERM (run_all.sh's cleanup) unwinds like Ctrl-C, so
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # every `finally` runs
        follow = die_with_parent()  # and a killed run_all.sh takes this process with it
        if follow:
            follow()
    requests = args.requests or (100 if args.action == "serve" else 5)
    try:
        if args.duration is not None and args.rate is None:
            print("kit.run: --duration goes with --rate R (a stream)", file=sys.stderr)
            return 2
        if args.action == "plan" and args.rtt is not None and hosts.why_not():
            print(f"kit.run: {hosts.why_not()}", file=sys.stderr)
            return 2
        if args.action == "plan" and args.serve:
            servable(args.serve)
            print(args.serve)
        elif args.action == "plan":
            print("\n".join(steps(args.scenario)))
        elif args.action == "one":
            args.parts.mkdir(parents=True, exist_ok=True)
            one(args.name, args.parts, requests, args.seconds, args.workers, args.rtt,
                args.rate, args.duration or DURATION)
        else:
            serve_forever(args.name, args.port, requests, args.workers)
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, pg.PgError, hosts.NetError) as exc:
        print(f"kit.run: {args.name}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
