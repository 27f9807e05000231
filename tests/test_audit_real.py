"""audit.py on the real stack: this kit's apps, the tests' own app (tests/audit_app.py) with
one route per cause, bad input, and an audit killed half-way."""

import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT, kit_env

from kit import net
from kit.dnstrap import NAME, resolver_for

pytestmark = pytest.mark.slow
TESTS = ROOT / "tests"


@dataclass
class Audit:
    status: int
    stdout: str
    stderr: str
    document: dict | None

    def route(self, label: str) -> dict:
        return next(r for r in self.document["routes"] if r["route"] == label)


def run_audit(tmp_path: Path, *args, env: dict | None = None, via: list[str] = (),
              timeout: float = 180, command: list[str] = (sys.executable, "audit.py")) -> Audit:
    out = tmp_path / f"audit-{time.monotonic_ns()}.json"
    done = subprocess.run([*via, *command, *map(str, args), "--json", str(out)], cwd=ROOT,
                          env=kit_env(**(env or {})), capture_output=True, text=True,
                          timeout=timeout)
    document = json.loads(out.read_text()) if out.exists() else None
    return Audit(done.returncode, done.stdout, done.stderr, document)


@pytest.fixture
def audit(database_url, tmp_path):
    """Run audit.py as a user would, against the tests' database."""
    return lambda *args, **env: run_audit(tmp_path, *args,
                                          env={"DATABASE_URL": database_url, **env})


def test_app_sync_blocks_on_psycopg2_in_its_own_file_and_app_green_does_not(audit):
    plain = audit("app_sync:app", "--requests", 4, SLEEP_SECONDS="0.3")
    assert plain.status == 1, plain.stderr[-2000:]
    for label in ("/sleep/postgres/", "/todos/"):
        route = plain.route(label)
        assert route["blocks"] and route["cause_id"] == "psycopg2", route
        assert route["where"].startswith("app_sync.py:"), route["where"]
    assert plain.route("/health")["blocks"] is False
    assert "psycopg2 has no wait callback" in plain.stdout
    green = audit("app_green:app", "--requests", 4, SLEEP_SECONDS="0.3")
    assert green.status == 0, green.stdout[-3000:]
    assert not any(r["blocks"] for r in green.document["routes"])
    assert "psycopg2's wait callback: psycogreen" in green.stdout


def test_the_flask_sqlalchemy_example_passes_and_fails_without_its_fix_1(audit, tmp_path):
    fixed = audit("examples.flask_sqlalchemy_app:app", "--requests", 3, "--route", "/todos/",
                  "--route", "/sleep/postgres/?seconds=0.2")
    assert fixed.status == 0, fixed.stdout[-3000:]
    source = (ROOT / "examples" / "flask_sqlalchemy_app.py").read_text()
    head, rest = source.split("# ---- FIX 1", 1)
    tail = rest.split("# ---- end of FIX 1 ----\n")[1]
    (tmp_path / "unpatched_example.py").write_text(head + tail)
    plain = audit("unpatched_example:app", "--chdir", tmp_path, "--requests", 3, "--route",
                  "/todos/")
    route = plain.route("/todos/")
    assert plain.status == 1 and route["cause_id"] == "psycopg2", plain.stdout[-3000:]
    assert route["where"].startswith("unpatched_example.py:"), route["where"]


@pytest.fixture
def remote():
    """An HTTP server that answers after 0.3 s."""
    class Slow(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            time.sleep(0.3)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_each_cause_is_named_at_its_line_and_a_slow_http_call_is_not(audit, remote):
    found = audit("audit_app:app", "--chdir", TESTS, "--gunicorn-args=--preload",
                  "--requests", 5, REMOTE_URL=remote, CPU_ROUNDS="1000000")
    assert found.status == 1, found.stderr[-2000:]
    cpu, hashed = found.route("/cpu/"), found.route("/hash/")
    assert cpu["blocks"] and cpu["cause_id"] == "cpu", cpu
    assert re.fullmatch(r"audit_app\.py:\d+ in crunch", cpu["where"]) and "crunch()" in cpu["fix"]
    assert cpu["probe_late_ms"]["max"] > 50  # the proof without a stack: the probe woke late
    assert hashed["blocks"] and hashed["cause_id"] == "c_call", hashed
    assert hashed["where"].startswith("audit_app.py:") and "hash_password" in hashed["where"]
    pg3 = found.route("/pg3/")
    assert pg3["blocks"] and pg3["cause_id"] == "psycopg3", pg3  # imported before the patch
    assert "psycopg 3 waits with wait_c" in found.stdout
    far = found.route("/remote/")
    assert far["blocks"] is False and far["latency_ms"]["p50"] >= 300, far
    assert far["pattern"] == "concurrent"
    assert found.route("/health")["blocks"] is False
    assert "answered 500" in found.route("/boom/")["error"]


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
def test_a_host_name_resolved_by_libpq_is_flagged(tmp_path):
    """kit.net's hosts, the app host resolving db.kit through kit.resolver (2 s a lookup):
    the audit runs inside the app host; psycopg2 is green, only the lookup blocks."""
    with net.hosts(0) as hosts:
        resolver = resolver_for(hosts, "app")
        try:
            url = f"postgresql://app:{hosts.password}@{NAME}:{net.DB_PORT}/app"
            found = run_audit(tmp_path, "audit_app:app", "--chdir", TESTS, "--route",
                              "/connect/", "--requests", 2, env={"DATABASE_URL": url},
                              via=hosts.exec("app"))
        finally:
            resolver.kill()
            resolver.wait()
            resolver.stdout.close()
    route = found.route("/connect/")
    assert found.status == 1 and route["cause_id"] == "dns", found.stdout[-3000:]
    assert route["where"].startswith("audit_app.py:") and "connect" in route["where"]
    assert "libpq resolves it in C" in found.stdout


@pytest.mark.parametrize("app, args, said", [
    ("no_such_module:app", [], "No module named 'no_such_module'"),
    ("app_sync:no_such_app", [], "Failed to find attribute 'no_such_app'"),
    ("audit_app:app", ["--route", "/no/such/route"], "answered 404"),
])
def test_bad_input_is_one_clear_line(audit, app, args, said):
    done = audit(app, "--chdir", TESTS if app.startswith("audit_") else ROOT, *args,
                 "--requests", 2, REMOTE_URL="http://127.0.0.1:1/")
    assert done.status == 2 and said in done.stderr + done.stdout, done.stderr[-2000:]
    assert "Traceback" not in done.stderr.split("last lines")[0]


def test_an_app_that_crashes_at_start_shows_why_and_its_last_lines(audit, tmp_path):
    (tmp_path / "crashing.py").write_text("raise RuntimeError('SECRET_KEY is not set')\n")
    done = audit("crashing:app", "--chdir", tmp_path)
    assert done.status == 2, done.stderr
    first = done.stderr.strip().splitlines()
    line = next(x for x in first if x.startswith("audit.py:"))
    assert "RuntimeError: SECRET_KEY is not set" in line
    assert any("crashing.py" in x for x in first)  # its last lines follow


def test_a_database_that_refuses_is_one_line(tmp_path):
    done = run_audit(tmp_path, "app_sync:app",
                     env={"DATABASE_URL": "postgresql://app:secret@127.0.0.1:1/app"})
    assert done.status == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    assert "refuses connections" in done.stderr and "secret" not in done.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_an_audit_stopped_half_way_leaves_nothing_running(own_tmp, sig):
    """Without DATABASE_URL it starts PostgreSQL too; stopped while a route blocks, the
    gunicorn process group and the database's folder are gone."""
    env = {k: v for k, v in kit_env(TMPDIR=str(own_tmp)).items() if k != "DATABASE_URL"}
    said = []
    with subprocess.Popen([sys.executable, "audit.py", "app_sync:app", "--route",
                           "/sleep/postgres/?seconds=2", "--requests", "5"], cwd=ROOT,
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True) as proc:
        for line in proc.stderr:
            said.append(line)
            if "a warm-up request" in line:
                break
        time.sleep(3)  # inside the burst, each request holding the loop 2 s
        proc.send_signal(sig)
        proc.stderr.read()
        status = proc.wait(60)
    text = "".join(said)
    group = int(re.search(r"\(pid (\d+), in", text).group(1))
    folder = re.search(r"folder (\S+)", text).group(1)
    deadline = time.monotonic() + 30  # SIGKILL: gunicorn's death signal and kit.pg's watchdog
    while time.monotonic() < deadline and (alive(group) or Path(folder).exists()
                                           or any(own_tmp.iterdir())):
        time.sleep(0.2)
    assert not alive(group) and not Path(folder).exists(), text
    assert not list(own_tmp.iterdir())  # the audit's own temporary folder too
    if sig == signal.SIGTERM:
        assert status == 130


def alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
        return True
    except ProcessLookupError:
        return False


def test_compare_recommends_gevent_for_a_route_that_waits(audit):
    """0.3 s of time.sleep: one sync worker serves about 3/s, ten gthread threads about 33/s,
    gevent far more. Rates with room on each side of those limits, 2 s each, and an SLO of 1 s
    that a worker past its limit misses by seconds (its queue grows) and one within it keeps
    on a busy machine."""
    found = audit("compare_app:app", "--chdir", TESTS, "--compare", "--route", "/sleep/",
                  "--rates", "2,8,64", "--step", 2, "--slo", 1000)
    assert found.status == 0, found.stderr[-3000:]
    rated = {w["worker"]: w["sustained_rate"] for w in found.document["compare"]}
    assert rated == {"sync": 2, "gthread": 8, "gevent": 64}, rated
    assert found.document["recommended"] == "gevent"
    assert "recommended: gevent" in found.stdout
    gevent = found.document["compare"][2]
    assert [s["rate"] for s in gevent["rates"]] == [2, 8, 64] and gevent["rss_mb"] > 0


def test_compare_does_not_sell_gevent_for_pure_python_cpu(audit):
    """15 ms of pure Python a request: every worker serves 4/s and none 400/s."""
    found = audit("compare_app:app", "--chdir", TESTS, "--compare", "--route", "/cpu/",
                  "--rates", "4,400", "--step", 2, "--slo", 1000, CPU_ROUNDS="150000")
    assert found.status == 0, found.stderr[-3000:]
    rated = {w["worker"]: w["sustained_rate"] for w in found.document["compare"]}
    assert rated == {"sync": 4, "gthread": 4, "gevent": 4}, rated
    assert found.document["recommended"] == "sync"
    assert found.document["why"].startswith("CPU-bound")
