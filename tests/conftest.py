"""Fixtures: a real PostgreSQL, real gunicorn processes, load.py run as a user runs it.

PostgreSQL is DATABASE_URL when set, else a throwaway server from kit.pg (the same code that
run_all.sh uses). When it cannot be started the tests fail; they never skip.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

import pytest

from kit import pg
from kit.run import ROOT, Server, kit_env, launch, seeded
from kit.run import start as serve_scenario

DUMMY_URL = "postgresql://app@127.0.0.1:1/app"  # for settings read in-process, never dialled


@pytest.fixture(scope="session")
def database_url() -> str:
    """A seeded PostgreSQL for the whole session: DATABASE_URL, or a throwaway server."""
    try:
        with seeded() as (url, _):
            yield url
    except pg.PgError as exc:
        pytest.fail(f"cannot start PostgreSQL for the tests: {exc}", pytrace=False)


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
