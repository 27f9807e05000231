"""audit.py on the real stack, on the app shapes a review found it wrong about: CPU of each
kind and the GIL behind a threadpool (tests/audit_gil_app.py), a route held past gunicorn's
--timeout (tests/audit_stall_app.py), a middleware and Jinja templates
(tests/audit_orm_app.py), an app that patches itself under --compare, and the audit's own
start-up: seeding from a Python with no packages, an interrupt, a kill."""

import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import ROOT, kit_env
from test_audit_real import run_audit

pytestmark = pytest.mark.slow
TESTS = ROOT / "tests"


@pytest.fixture(scope="module")
def gil(database_url, tmp_path_factory):
    """One audit of audit_gil_app's four routes, 5 requests at once each."""
    return run_audit(tmp_path_factory.mktemp("gil"), "audit_gil_app:app", "--chdir", TESTS,
                     "--requests", 5, env={"DATABASE_URL": database_url})


def test_pure_python_gil_holding_c_and_gil_releasing_c_each_get_their_fix(gil):
    """Only the C call that releases the GIL gets the threadpool; pure Python and a C call
    that keeps the GIL (sorted) get a process."""
    assert gil.status == 1, gil.stdout[-3000:] + gil.stderr[-2000:]
    python, held, released = (gil.route(label) for label in ("/python/", "/held/",
                                                              "/released/"))
    assert python["blocks"] and python["cause_id"] == "cpu", python
    assert re.fullmatch(r"audit_gil_app\.py:\d+ in digests", python["where"])
    assert held["blocks"] and held["cause_id"] == "cpu", held
    assert re.fullmatch(r"audit_gil_app\.py:\d+ in held", held["where"])
    for route in (python, held):
        assert "threadpool" not in route["fix"] and "process" in route["fix"]
        assert not any(f["cause_id"] == "c_call" and f["counted"] for f in route["findings"])
    assert released["blocks"] and released["cause_id"] == "c_call", released
    assert "threadpool" in released["fix"] and "released" in released["where"]


def test_the_threadpools_fix_for_a_gil_holding_call_still_blocks(gil):
    """The review's false all-clear: sorted() moved into gevent's threadpool keeps the GIL in
    its thread, and the loop waits for it; the audit said 'paused', then 'no'."""
    pool = gil.route("/pool/")
    assert pool["blocks"] and pool["cause_id"] == "gil", pool
    assert re.fullmatch(r"audit_gil_app\.py:\d+ in pool", pool["where"]), pool["where"]
    assert "process" in pool["fix"] and pool["stalled_requests"] >= 3
    assert not any(f["cause_id"] == "paused" and f["counted"] for f in pool["findings"])


def test_a_route_held_past_gunicorns_timeout_blocks(database_url, tmp_path):
    """/later/ holds the loop 3 s from its second call (the burst), /stall/ from its first
    (the warm-up gets no answer): gunicorn kills the worker after 1 s; both are BLOCKS, at
    their line, and counted, where they read 'error' and '0 of 1 audited routes'."""
    found = run_audit(tmp_path, "audit_stall_app:app", "--chdir", TESTS, "--gunicorn-args",
                      "--timeout 1", "--requests", 2, "--route", "/later/", "--route",
                      "/stall/", "--route", "/ok/", env={"DATABASE_URL": database_url})
    assert found.status == 1, found.stdout[-3000:] + found.stderr[-2000:]
    for label, function in (("/later/", "later"), ("/stall/", "stall")):
        route = found.route(label)
        assert route["blocks"] and route["cause_id"] == "timeout", route
        assert not route.get("error")
        assert re.fullmatch(rf"audit_stall_app\.py:\d+ in {function}", route["where"])
        row = next(line for line in found.stdout.splitlines() if line.startswith(label))
        assert "BLOCKS" in row and "timeout" in row
    assert found.route("/ok/")["blocks"] is False
    assert "2 of 3 audited routes block the loop (timeout)" in found.stdout


@pytest.fixture
def orm_app(database_url, psql):
    """audit_orm_app's tables, named for this test, dropped afterwards."""
    prefix = f"orm_{uuid.uuid4().hex[:8]}_"
    yield {"DATABASE_URL": database_url, "TABLE_PREFIX": prefix}
    psql(f"DROP TABLE IF EXISTS {prefix}book, {prefix}author")


def test_a_middleware_and_a_template_are_looked_through_to_the_apps_line(orm_app, tmp_path):
    """The review's cases: an ORM view behind the app's middleware read
    site-packages/sqlalchemy; an N+1 in a template read a template line past its end; CPU
    in a template named do_format()."""
    found = run_audit(tmp_path, "audit_orm_app:app", "--chdir", TESTS, "--requests", 5,
                      env=orm_app)
    assert found.status == 1, found.stdout[-3000:] + found.stderr[-2000:]
    count = found.route("/count/")
    assert count["cause_id"] == "psycopg2" and re.fullmatch(r"audit_orm_app\.py:\d+ in count",
                                                           count["where"]), count["where"]
    authors = found.route("/authors/")
    template = (TESTS / "audit_templates" / "authors.html").read_text().splitlines()
    # its two findings, the view's query and the template's lazy loads, weigh about the same:
    # either may lead the route (the view's led once beside five other tests)
    assert authors["cause_id"] == "psycopg2", authors
    assert re.fullmatch(r"audit_orm_app\.py:\d+ in authors|audit_templates/authors\.html:\d+ "
                        r"in <template authors\.html>", authors["where"]), authors["where"]
    lazy = [re.fullmatch(r"audit_templates/authors\.html:(\d+) in <template authors\.html>",
                         finding["where"]) for finding in authors["findings"]]
    lines = [int(found_line.group(1)) for found_line in lazy if found_line]
    assert lines and "a.books" in template[lines[0] - 1], authors["findings"]  # its own line
    cpu = found.route("/cpu-template/")
    assert cpu["blocks"] and cpu["cause_id"] == "cpu", cpu
    assert cpu["where"] == "audit_templates/numbers.html:1 in <template numbers.html>"
    assert "template numbers.html" in cpu["fix"] and "do_format" not in cpu["fix"]
    for route in (count, authors, cpu):
        for finding in route["findings"]:
            own = [f for f in finding["stack"] or [] if f["own"]]
            if own:  # never a library frame while one of the app's is in the stack
                assert "site-packages" not in finding["where"], finding["where"]


def test_compare_refuses_an_app_that_patches_itself_at_once(database_url, tmp_path):
    """app_green calls monkey.patch_all() when imported: under sync it runs on gevent's
    sockets, under gthread it hung the audit for its whole start timeout."""
    started = time.monotonic()
    found = run_audit(tmp_path, "app_green:app", "--compare", "--route", "/todos/", "--rates",
                      "5", "--step", 0.5, "--start-timeout", 30,
                      env={"DATABASE_URL": database_url})
    assert found.status == 2, found.stderr[-2000:]
    assert "monkey.patch_all()" in found.stderr and "without its patching preamble" in \
        found.stderr
    assert "--compare: gthread" not in found.stderr  # stopped after the first worker
    assert time.monotonic() - started < 25


def test_the_throwaway_database_is_seeded_when_audit_runs_on_a_bare_python(own_tmp,
                                                                           tmp_path):
    """audit.py run by a Python with no packages (-I): seed.py needs SQLAlchemy; it runs
    under the kit's .venv, and /todos/ is audited instead of answering 500."""
    bare = tmp_path / "bare"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    env = {k: v for k, v in kit_env(TMPDIR=str(own_tmp)).items() if k != "DATABASE_URL"}
    done = subprocess.run([str(bare / "bin" / "python"), "-I", "audit.py", "app_sync:app",
                           "--python", sys.executable, "--route", "/todos/", "--requests", "2"],
                          cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "database is empty" not in done.stderr
    assert re.search(r"^/todos/ .* BLOCKS +psycopg2", done.stdout, re.M), done.stdout


def start_audit(own_tmp: Path, **env) -> subprocess.Popen:
    full = {k: v for k, v in kit_env(TMPDIR=str(own_tmp), **env).items()
            if k != "DATABASE_URL" or "DATABASE_URL" in env}
    return subprocess.Popen([sys.executable, "audit.py", "app_sync:app", "--route",
                             "/sleep/postgres/?seconds=2", "--requests", "3"], cwd=ROOT,
                            env=full, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def test_an_interrupt_while_the_database_starts_stops_the_audit_at_once(own_tmp):
    """SIGTERM while kit.pg starts PostgreSQL: the audit used to seed the database and start
    gunicorn first, and exit 130 only then."""
    with start_audit(own_tmp) as proc:
        said = [proc.stderr.readline()]
        assert "starting a throwaway PostgreSQL" in said[0], said
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        said.append(proc.stderr.read())
        status = proc.wait(60)
    took = time.monotonic() - signalled
    assert status == 130 and took < 5, (status, took, said)
    assert "gunicorn" not in "".join(said) and "database is empty" not in "".join(said)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(own_tmp.iterdir()):
        time.sleep(0.2)
    assert not list(own_tmp.iterdir())  # PostgreSQL's folder and the audit's


def test_a_killed_audit_with_database_url_leaves_no_temporary_folder(own_tmp, database_url):
    """SIGKILL runs nothing of the audit's: its watchdog removes its folder (gunicorn's
    config and log), as kit.pg's does when the audit started the database."""
    with start_audit(own_tmp, DATABASE_URL=database_url) as proc:
        for line in proc.stderr:
            if "a warm-up request" in line:
                break
        assert [p.name for p in own_tmp.iterdir()][0].startswith("audit-")
        proc.kill()
        proc.wait(30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(own_tmp.iterdir()):
        time.sleep(0.1)
    assert not list(own_tmp.iterdir())
