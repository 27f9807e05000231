"""examples/flask_sqlalchemy_app.py, the way users write apps, on the real stack: the preamble
is what makes pg_sleep overlap, harden() bounds a frozen or silent database, and --preload
with a query at import needs no gunicorn config."""

import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import ROOT, kit_env

from kit.preload import ROUTES, ask, expected_todos

pytestmark = pytest.mark.slow
EXAMPLE = ROOT / "examples" / "flask_sqlalchemy_app.py"


@pytest.fixture
def example(gunicorn_command):
    """Start the example (or a copy of it) under gevent; stopped afterwards."""
    return lambda app="examples.flask_sqlalchemy_app:app", *options, **env: gunicorn_command(
        "-k", "gevent", "--timeout", "60", *options, app, **env)


def without_preamble(folder: Path) -> str:
    """A copy of the example with FIX 1 cut out; returns the module name."""
    source = EXAMPLE.read_text()
    head, rest = source.split("# ---- FIX 1", 1)
    _, tail = rest.split("# ---- end of FIX 1 ----\n", 1)
    (folder / "unpatched_example.py").write_text(head + tail)
    return "unpatched_example"


def test_without_the_preamble_pg_sleep_is_a_staircase_with_it_one_wave(example, load,
                                                                       tmp_path):
    plain = example(f"{without_preamble(tmp_path)}:app", "--pythonpath", str(tmp_path))
    assert plain.health()["psycopg2_green"] is False
    staircase = load(5, "--url", plain.url, "--endpoint", "postgres", "--seconds", 1)
    blocked = staircase.result("postgres")
    assert blocked["total_s"] > 0.7 * 5 * 1 and blocked["pattern"] == "serial", blocked
    green = example()
    one_wave = load(5, "--url", green.url, "--endpoint", "postgres", "--seconds", 1)
    result = one_wave.result("postgres")
    assert result["total_s"] < 2 * 1 and result["pattern"] == "concurrent", result


def test_frozen_backends_are_bounded_and_the_same_worker_recovers(tmp_path):
    out = tmp_path / "frozen.json"
    done = subprocess.run([sys.executable, "-m", "kit.frozen", "--only", "flask-sqlalchemy",
                           "--json", str(out)], cwd=ROOT, env=kit_env(), capture_output=True,
                          text=True, timeout=120)
    checks = json.loads(out.read_text())["checks"]
    assert len(checks) == 3 and all(c["ok"] for c in checks), checks
    assert done.returncode == 0, done.stderr[-2000:]


def test_preload_with_a_query_at_import_needs_no_gunicorn_config(example):
    server = example("examples.flask_sqlalchemy_app:app", "--preload", "-w", "2")
    assert "database not reachable" not in server.log.read_text()  # the import-time query ran
    todos = expected_todos()
    paths = [ROUTES[i % len(ROUTES)] for i in range(40)]
    outcomes, slowest = [], 0.0
    with ThreadPoolExecutor(40) as pool:
        for _ in range(3):
            started = time.perf_counter()
            outcomes += pool.map(lambda path: ask(server.url, path, todos, hang=5), paths)
            slowest = max(slowest, time.perf_counter() - started)
    assert outcomes.count("ok") == 120, sorted(set(outcomes))
    assert slowest < 14 * 0.2 / 2  # the 14 pg_sleep(0.2) of a burst overlap


def test_a_silent_database_answers_within_connect_timeout(example):
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    try:
        server = example(CONNECT_TIMEOUT="1",
                         DATABASE_URL=f"postgresql://app@127.0.0.1:{silent.getsockname()[1]}/app")
        started = time.monotonic()
        status = ask(server.url, "/todos/", [], hang=10)
        took = time.monotonic() - started
    finally:
        silent.close()
    assert status == "http_503" and took < 1 + 1, (status, took)
