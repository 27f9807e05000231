"""./run_all.sh end to end: its summary and JSON, subsets, budgets and clean exits."""

import contextlib
import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, kit_env, pg

pytestmark = pytest.mark.slow


def run_all(tmp_path, *args, env=None, timeout=300):
    out = tmp_path / "run_all.json"
    done = subprocess.run(["./run_all.sh", *map(str, args), "--json", str(out)], cwd=ROOT,
                          env=env or kit_env(), capture_output=True, text=True,
                          timeout=timeout)
    document = json.loads(out.read_text()) if out.exists() else None
    return done, document


def run_stream(tmp_path, *args, env=None, attempts=3):
    """run_all.sh --rate ...; again, at most ATTEMPTS runs in all, while a row cannot tell
    because of load.py's own lateness (client_disturbed, as_expected None: the machine was
    busy) and the run did not fail (exit 0, no row false). Any other outcome, right or
    wrong, is returned as it came."""
    for attempt in range(attempts):
        folder = tmp_path / f"attempt-{attempt}"
        folder.mkdir()
        done, document = run_all(folder, *args, env=env)
        rows = document["rows"] if document else []
        failed = done.returncode != 0 or any(r.get("as_expected") is False for r in rows)
        if failed or not any(r.get("client_disturbed") and r.get("as_expected") is None
                             for r in rows):
            break
    return done, document


def test_run_all_runs_end_to_end_with_its_own_postgres(tmp_path):
    env = kit_env()
    env.pop("DATABASE_URL", None)  # the embedded default
    done, document = run_all(tmp_path, "--requests", 3, "--seconds", 0.3, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {(r["scenario"], r["endpoint"]): r for r in document["rows"]}
    for scenario in ("sync", "gevent", "green"):
        for endpoint in ("python", "postgres"):
            assert rows[scenario, endpoint]["as_expected"], rows[scenario, endpoint]
    assert rows["gevent", "postgres"]["hub_blocked"] > 0
    assert rows["green", "postgres"]["hub_blocked"] == 0
    assert rows["psycopg3", "postgres"]["hub_blocked"] == 0
    assert rows["flask-sqlalchemy", "postgres"]["as_expected"]  # the reader's kind of app
    assert rows["flask-sqlalchemy", "postgres"]["hub_blocked"] == 0
    assert "sync" in done.stdout and "as expected" in done.stdout  # the table, on stdout
    assert document["machine"]["packages"]["gunicorn"]


def test_a_stream_shows_the_slow_queries_stall_a_serial_worker_only(tmp_path, database_url):
    """./run_all.sh --rate: /todos/ alone and with 5 % of 200 ms queries, 40/s for 4 s; the
    sync worker's fast p99 grows by at least half of what the replay of the run predicts for a
    setup that serialises, green's does not."""
    done, document = run_stream(tmp_path, "--rate", 40, "--duration", 4, "--scenario",
                                "sync", "--scenario", "green", attempts=2,  # 120 s timeout
                                env=kit_env(DATABASE_URL=database_url))
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    rows = {r["scenario"]: r for r in document["rows"]}
    assert rows["sync"]["expected"] == "stalls" and rows["sync"]["stalls"] is True
    assert rows["green"]["expected"] == "unaffected" and rows["green"]["stalls"] is False
    assert document["settings"]["rate"] == 40 and "as expected ✓" in done.stdout


def test_budget_check_refuses_an_oversubscribed_setup(tmp_path, database_url):
    done, document = run_all(tmp_path, "--scenario", "green", "--workers", 2,
                             env=kit_env(POOL_SIZE=60))
    assert done.returncode == 1
    assert "2 workers x 70" in done.stderr and "OVER BUDGET" in done.stderr
    assert all("refused" in row for row in document["rows"])


def session_processes(sid: int | None) -> list[str]:
    """Command lines of live processes in session sid (None: all of them)."""
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = pg.proc_stat(Path(stat).parent.name)
            cmdline = Path(stat).with_name("cmdline").read_text().replace("\0", " ")
        except OSError:
            continue
        if (sid is None or int(fields[3]) == sid) and fields[0] != "Z":
            found.append(cmdline)
    return found


def ctrl_c_works() -> None:
    """In the child: SIGINT to its default. A shell ignores what it was started ignoring, and a
    background job of a non-interactive shell (a CI runner, nohup ... &) starts so."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def left_in(folder: Path) -> list[str]:
    """What a run given FOLDER as its TMPDIR left: files in it, or live processes (its
    PostgreSQL, whose folder kit.pg puts there) that name it."""
    return [str(path) for path in folder.iterdir()] + [
        cmd for cmd in session_processes(None) if str(folder) in cmd]


@pytest.mark.parametrize("sig, after", [(signal.SIGINT, 0.4), (signal.SIGTERM, 1.5),
                                        (signal.SIGINT, 4.0), (signal.SIGTERM, 9.0)])
def test_a_signal_at_any_point_leaves_nothing_behind(own_tmp, sig, after):
    env = kit_env(TMPDIR=own_tmp)
    env.pop("DATABASE_URL", None)
    proc = subprocess.Popen(["./run_all.sh", "--requests", "3", "--seconds", "1"], cwd=ROOT,
                            env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, text=True, preexec_fn=ctrl_c_works)
    time.sleep(after)
    proc.send_signal(sig)
    try:
        _, stderr = proc.communicate(timeout=60)
    finally:  # a run that ignored the signal must not outlive the test
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode != 0
    deadline = time.monotonic() + 10
    while session_processes(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert session_processes(proc.pid) == []
    assert left_in(own_tmp) == [], stderr[-2000:]


def test_outage_scenario_answers_503_and_recovers_without_a_restart(tmp_path):
    out = tmp_path / "outage.json"
    done = subprocess.run([sys.executable, "-m", "kit.outage", "--json", str(out)], cwd=ROOT,
                          env=kit_env(), capture_output=True, text=True, timeout=120)
    checks = {c["check"]: c for c in json.loads(out.read_text())["checks"]}
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert all(c["ok"] for c in checks.values()), checks
    assert set(checks) == {"before the outage", "in flight when it stops",
                           "new requests while it is down", "the worker survives",
                           "after it is back"}


def test_pgbouncer_answers_every_request_where_a_direct_connection_cannot(tmp_path):
    if not pg.pgbouncer_binary():
        message = "pgbouncer is not installed (apt-get install pgbouncer)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    parts = tmp_path / "parts"
    done = subprocess.run([sys.executable, "-m", "kit.bouncer", "--parts", str(parts),
                           "--seconds", "0.5"], cwd=ROOT, env=kit_env(), capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    direct, behind = (json.loads((parts / f"{name}.postgres.json").read_text())["document"][
        "results"][0] for name in ("pgbouncer-direct", "pgbouncer"))
    assert direct["statuses"].get("503", 0) > 0  # PostgreSQL refused connections
    assert "OVER BUDGET" in done.stderr
    assert "too many clients" in done.stderr or "reserved for non-replication" in done.stderr
    assert behind["statuses"] == {"200": 100}
    # PgBouncer's 20 server connections: at most about 20 in flight (100 x 0.5 s / 2.5 s; 13.7
    # was measured on a busy machine). Its waves smear (each server connection takes the next
    # client as soon as it is free), so the overlap is the check; with no limit it is near 100.
    assert 8 <= behind["overlap"] <= 26, (behind["overlap"], behind["waves"])


def test_a_missing_pgbouncer_is_a_summary_row_and_the_run_goes_on(tmp_path):
    done, document = run_all(tmp_path, "--scenario", "pgbouncer", "--scenario", "green",
                             "--requests", 3, "--seconds", 0.2,
                             env=kit_env(PGBOUNCER="/nonexistent/pgbouncer"))
    rows = {row["scenario"]: row for row in document["rows"]}
    assert "apt-get install pgbouncer" in rows["pgbouncer"]["refused"]
    assert "apt-get install pgbouncer" in done.stdout
    assert rows["green"]["as_expected"] and rows["pgbouncer-direct"]["as_expected"]
    assert done.returncode == 1  # not everything ran


def test_serve_keeps_one_scenario_up_for_load_py_until_ctrl_c(own_tmp, load):
    env = kit_env(TMPDIR=own_tmp)
    env.pop("DATABASE_URL", None)
    port = pg.free_port()
    proc = subprocess.Popen(["./run_all.sh", "--serve", "green", "--port", str(port)],
                            cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=ctrl_c_works)
    said: list[str] = []
    reader = threading.Thread(target=lambda: said.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while not any("serving 'green'" in line for line in said):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(said)[-2000:]
            time.sleep(0.1)
        assert any(f"load.py 100 --url http://127.0.0.1:{port}" in line for line in said)
        run = load(10, "--url", f"http://127.0.0.1:{port}", "--endpoint", "postgres",
                   "--seconds", 0.5)
        assert run.status == 0 and run.result("postgres")["total_s"] < 1.0
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends: the whole foreground group
        assert proc.wait(60) == 130
    finally:  # a failed check must not leave the server running
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
        reader.join(10)
        proc.stderr.close()
    assert session_processes(proc.pid) == []
    assert left_in(own_tmp) == []


def test_a_killed_run_leaves_no_server_behind(own_tmp):
    """SIGKILL, which no trap sees, to run_all.sh --serve: kit.run dies with it
    (PR_SET_PDEATHSIG), gunicorn with kit.run, and PostgreSQL's watchdog stops the server
    and removes its folder and the run's temporary folder."""
    import urllib.request

    env = kit_env(TMPDIR=own_tmp)
    env.pop("DATABASE_URL", None)
    port = pg.free_port()
    health = f"http://127.0.0.1:{port}/health"

    def answers() -> bool:
        try:
            return urllib.request.urlopen(health, timeout=2).status == 200
        except OSError:
            return False

    proc = subprocess.Popen(["./run_all.sh", "--serve", "green", "--port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not answers():
            assert proc.poll() is None and time.monotonic() < deadline, "never served"
            time.sleep(0.2)
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 20
        while (answers() or session_processes(proc.pid) or left_in(own_tmp)) and \
                time.monotonic() < deadline:
            time.sleep(0.2)
        assert not answers(), "gunicorn outlived the run"
        assert session_processes(proc.pid) == []
        assert left_in(own_tmp) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def test_cleanup_signals_only_a_step_still_running(tmp_path, database_url):
    """A finished step's pid may already belong to another process: a clean run's cleanup
    sends no signal at all (traced with bash -x)."""
    done = subprocess.run(["bash", "-x", "./run_all.sh", "--scenario", "sync", "--requests", "1",
                           "--seconds", "0"], cwd=ROOT, env=kit_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "cleanup" in done.stderr
    assert not [line for line in done.stderr.splitlines() if "kill -TERM" in line]
