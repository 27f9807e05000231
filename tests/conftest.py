"""Fixtures: a real PostgreSQL, real gunicorn processes, load.py run as a user runs it.

PostgreSQL is DATABASE_URL when set, else a throwaway server from kit.pg (the same code that
run_all.sh uses). When it cannot be started the tests fail; they never skip.

The suite runs in parallel (pytest-xdist, `-n` in pytest.ini). Each worker process starts a
PostgreSQL of its own: its tests see no other worker's connections in pg_stat_activity, and
their pools cannot add up past one server's max_connections. With DATABASE_URL set, the
workers share that database (the first one seeds it) and each test counts only its own app's
connections (`app_name`). Tests marked `alone` run while no other test runs
(pytest_runtest_protocol below).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from kit import pg
from kit.run import ROOT, Server, kit_env, launch, seeded
from kit.run import start as serve_scenario

DUMMY_URL = "postgresql://app@127.0.0.1:1/app"  # for settings read in-process, never dialled


@contextlib.contextmanager
def flock(path: Path, how: int):
    """Hold an flock (fcntl.LOCK_SH or LOCK_EX) on PATH for the block."""
    with open(path, "a") as handle:
        fcntl.flock(handle, how)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


SHARED = "KIT_TESTS_SHARED"  # the folder the xdist workers of one run share (locks)
ALONE_WAIT = 90  # s after its first test a worker waits for the `alone` ones, at most
ALONE, DEADLINE = pytest.StashKey[int](), pytest.StashKey[float]()


def pytest_configure(config):
    """In the controller (or a run without xdist): the run's shared folder, handed to the
    workers it starts through the environment, removed in pytest_unconfigure."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ[SHARED] = tempfile.mkdtemp(prefix="kit-tests-")


def pytest_unconfigure(config):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        shutil.rmtree(os.environ.pop(SHARED, ""), ignore_errors=True)


def shared(name: str) -> Path:
    return Path(os.environ[SHARED], name)


def finished(done: Path) -> int:
    """How many `alone` tests have ended (a line each in DONE)."""
    return len(done.read_text().splitlines()) if done.exists() else 0


@pytest.fixture(scope="session")
def database_url() -> str:
    """A seeded PostgreSQL for this worker: a throwaway server, or the shared DATABASE_URL."""
    given = os.environ.get("DATABASE_URL")  # then one worker seeds at a time
    try:
        with contextlib.ExitStack() as session:
            with flock(shared("seed.lock"), fcntl.LOCK_EX) if given else \
                    contextlib.nullcontext():
                url, _ = session.enter_context(seeded())
            yield url
    except pg.PgError as exc:
        pytest.fail(f"cannot start PostgreSQL for the tests: {exc}", pytrace=False)


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected what does not run
def pytest_collection_modifyitems(config, items):
    """The tests marked `alone` first: xdist hands the head of the list to one worker, which
    runs them one after another while the other workers wait (pytest_runtest_protocol), so
    the machine is quiet for them once, at the start, not drained again for each."""
    items.sort(key=lambda item: item.get_closest_marker("alone") is None)
    config.stash[ALONE] = sum(item.get_closest_marker("alone") is not None for item in items)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Tests run side by side, except those marked `alone`: their timing cannot hold beside
    others on two cores. Each test takes its turn around its whole protocol, so fixtures of
    every scope (a worker's PostgreSQL, a module's measurements) start inside it too. The
    `alone` ones come first; every other test waits until they are done (each that ends,
    run or skipped, adds a line to alone.done), then all run at once. A writer-first lock
    keeps the rule should one come later (a worker that took it from another's queue): an
    `alone` test waits for every running test to end, and the gate stops new ones meanwhile."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return (yield)
    gate, turns, done = shared("gate.lock"), shared("turns.lock"), shared("alone.done")
    if item.get_closest_marker("alone") is not None:
        try:
            with flock(gate, fcntl.LOCK_EX), flock(turns, fcntl.LOCK_EX):
                return (yield)
        finally:
            with open(done, "a") as log:
                log.write(f"{item.nodeid}\n")
    deadline = item.config.stash.setdefault(DEADLINE, time.monotonic() + ALONE_WAIT)
    while finished(done) < item.config.stash[ALONE] and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.ExitStack() as held:
        with flock(gate, fcntl.LOCK_EX):
            held.enter_context(flock(turns, fcntl.LOCK_SH))
        return (yield)


@pytest.fixture
def app_name() -> str:
    """An application_name (PGAPPNAME) of this test's own, to count only its app's
    connections on a server other tests use too."""
    return f"kit-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def own_tmp() -> Path:
    """An empty TMPDIR for a run under test, which the server's account can enter when we
    are root (kit.pg then puts the server's folder in it): afterwards it must be empty."""
    folder = Path(tempfile.mkdtemp(prefix="kit-test-", dir="/tmp"))
    folder.chmod(0o711)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def psql(database_url):
    """Run one SQL statement against the test database; returns all rows."""
    import psycopg2

    def query(sql: str, *params):
        with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []
    return query


def stopped_afterwards(launcher):
    """A fixture's body: yields start(*args, **kw) -> launcher(n, *args, **kw), the n-th
    server; every server started is stopped when the test ends, however it ends."""
    servers: list[Server] = []

    def start(*args, **kw) -> Server:
        servers.append(launcher(len(servers), *args, **kw))
        return servers[-1]

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def serve(database_url, tmp_path):
    """Start a scenario of the table under gunicorn; every server is stopped afterwards."""
    def one(n: int, scenario: str, requests: int = 8, workers: int = 1, **env) -> Server:
        return serve_scenario(scenario, tmp_path / f"{scenario}-{n}.log", requests, workers,
                              env)
    yield from stopped_afterwards(one)


@pytest.fixture
def gunicorn_command(database_url, tmp_path):
    """Run `gunicorn ARGS` on a free 127.0.0.1 port, without a control socket, and wait until
    it answers; every one is stopped afterwards."""
    def one(n: int, *args: str, **env) -> Server:
        port = pg.free_port()
        argv = ["gunicorn", "--bind", f"127.0.0.1:{port}", "--no-control-socket", *args]
        return launch(argv, port, tmp_path / f"gunicorn-{n}.log", env)
    yield from stopped_afterwards(one)


@dataclass
class LoadRun:
    status: int
    stdout: str
    stderr: str
    document: dict | None

    def result(self, endpoint: str) -> dict:
        return next(r for r in self.document["results"] if r["endpoint"] == endpoint)


@pytest.fixture
def load(tmp_path):
    """Run load.py as a user would; returns its exit status, output and JSON."""
    runs = iter(range(1000))

    def run(*args, timeout: float = 180) -> LoadRun:
        out = tmp_path / f"load-{next(runs)}.json"
        done = subprocess.run([sys.executable, "load.py", *map(str, args), "--json", str(out)],
                              cwd=ROOT, env=kit_env(), capture_output=True, text=True,
                              timeout=timeout)
        document = json.loads(out.read_text()) if out.exists() else None
        return LoadRun(done.returncode, done.stdout, done.stderr, document)
    return run
