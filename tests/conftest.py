"""Fixtures: a real PostgreSQL, real gunicorn processes, load.py run as a user runs it.

PostgreSQL is DATABASE_URL when set, else a throwaway server from kit.pg (the same code that
run_all.sh uses). When it cannot be started the tests fail; they never skip.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kit import pg  # noqa: E402
from kit.scenarios import BY_NAME  # noqa: E402

BIN = str(Path(sys.executable).parent)


def kit_env(**extra) -> dict[str, str]:
    """The environment for the kit's processes: ours, the venv's bin first, plus extra."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture(scope="session")
def database_url(tmp_path_factory) -> str:
    """A seeded PostgreSQL for the whole session: DATABASE_URL, or a throwaway server."""
    state = tmp_path_factory.mktemp("pg") / "pg.json"
    url = os.environ.get("DATABASE_URL")
    if not url:
        try:
            url = pg.start(str(state)).url
        except pg.PgError as exc:
            pg.stop(str(state))
            pytest.fail(f"cannot start PostgreSQL for the tests: {exc}", pytrace=False)
    os.environ["DATABASE_URL"] = url
    seeded = subprocess.run([sys.executable, "seed.py", "--reset"], cwd=ROOT,
                            env=kit_env(), capture_output=True, text=True)
    assert seeded.returncode == 0, seeded.stderr
    yield url
    pg.stop(str(state))


@pytest.fixture
def psql(database_url):
    """Run one SQL statement against the test database; returns all rows."""
    import psycopg2

    def query(sql: str, *params):
        with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []
    return query


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path

    def health(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/health", timeout=5) as answer:
            return json.load(answer)

    def blocked_reports(self) -> int:
        """How often gevent's monitor said the event loop was blocked."""
        return self.log.read_text().count("appears to be blocked")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_ready(server: Server, seconds: float = 30) -> None:
    """Poll /health until it answers, the process dies, or time runs out."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            server.health()
            return
        except OSError:
            if server.proc.poll() is not None:
                raise AssertionError(f"gunicorn exited: {server.log.read_text()[-1500:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"gunicorn not ready: {server.log.read_text()[-1500:]}")
            time.sleep(0.1)


@pytest.fixture
def serve(database_url, tmp_path):
    """Start a scenario of the table under gunicorn; every server is stopped afterwards."""
    servers: list[Server] = []

    def start(scenario: str, requests: int = 8, workers: int = 1, **env) -> Server:
        port = pg.free_port()
        argv = BY_NAME[scenario].command(port, requests, workers)
        log = tmp_path / f"{scenario}-{port}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(argv, cwd=ROOT, env=kit_env(**env), stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        server = Server(f"http://127.0.0.1:{port}", proc, log)
        servers.append(server)
        wait_ready(server)
        return server

    yield start
    for server in servers:
        server.stop()


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
