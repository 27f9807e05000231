"""audit.py on a real app (issue 27): tests/real_app/microblog.py in a virtualenv of its own,
with Flask-Login, a login that hashes a password, a page behind the login, an API behind a
bearer token and a form that writes a row.

The app's virtualenv is built once (pip, from tests/real_app/requirements.txt, about 20 s)
and cached inside the running virtualenv, at `<sys.prefix>/cache/real-app-<hash of the
requirements>`: .venv is not committed, and a change of the requirements builds a new one.
A file lock makes parallel test processes wait for one build; it is built in a folder of its
own and renamed into place, so no one sees half a virtualenv.
"""

import fcntl
import hashlib
import hmac
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from test_audit_real import run_audit

pytestmark = pytest.mark.slow
APP = ROOT / "tests" / "real_app"
REQUIREMENTS = APP / "requirements.txt"


@pytest.fixture(scope="session")
def app_python() -> str:
    """The app's own interpreter, from the cache or built now."""
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()[:12]
    cache = Path(sys.prefix) / "cache"
    cache.mkdir(exist_ok=True)
    venv = cache / f"real-app-{digest}"
    with open(cache / "real-app.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (venv / "bin" / "python").exists():
            building = cache / f"real-app-{digest}.{os.getpid()}"
            shutil.rmtree(building, ignore_errors=True)
            try:
                subprocess.run([sys._base_executable, "-m", "venv", str(building)], check=True)
                done = subprocess.run([str(building / "bin" / "python"), "-m", "pip",
                                       "install", "-q", "-r", str(REQUIREMENTS)],
                                      capture_output=True, text=True)
                assert done.returncode == 0, done.stderr[-2000:]
                building.rename(venv)
            finally:
                shutil.rmtree(building, ignore_errors=True)
    return str(venv / "bin" / "python")


@pytest.fixture
def microblog(database_url, app_python, tmp_path):
    """Run audit.py on microblog:app with its own interpreter, its tables this test's."""
    prefix = f"mb_{os.getpid()}_{tmp_path.name.replace('-', '_')}_"
    url = database_url.replace("postgresql://", "postgresql+psycopg2://", 1)

    def run(*args, python: str = app_python, url: str = url, via_copy: bool = False):
        env = {"DATABASE_URL": url, "TABLE_PREFIX": prefix, "SECRET_KEY": "test-secret"}
        head = ["microblog:app", "--chdir", APP, "--python", python, "--requests", 4]
        if not via_copy:
            return run_audit(tmp_path, *head, *args, env=env)
        tools = tmp_path / "tools"  # audit.py copied with load.py, run outside any venv
        tools.mkdir(exist_ok=True)
        for name in ("audit.py", "load.py"):
            shutil.copy(ROOT / name, tools)
        return run_audit(tmp_path, *head, *args, env=env,
                         command=[sys._base_executable, "-I", str(tools / "audit.py")])
    yield run
    import psycopg2

    with psycopg2.connect(database_url) as conn, conn.cursor() as cursor:
        cursor.execute(f"DROP TABLE IF EXISTS {prefix}posts, {prefix}users")


def test_without_credentials_protected_routes_are_not_reached_never_all_clear(microblog):
    found = microblog()
    assert found.status == 3, found.stdout[-3000:] + found.stderr[-2000:]
    for label in ("/index", "/explore"):
        route = found.route(label)
        assert route["reached"] is False and route["blocks"] is None, route
        assert route["status"] == 302 and "/auth/login" in route["why"]
        assert "--login" in route["why"]
    api = found.route("/api/users")
    assert api["reached"] is False and api["status"] == 401 and "Bearer" in api["why"]
    assert found.route("/health")["blocks"] is False  # public routes are still audited
    assert "3 routes not reached" in found.stdout.strip().splitlines()[-1]
    skipped = found.document["discovery"]["other_methods"]
    assert {"POST /api/tokens", "POST /auth/login", "POST /post"} <= set(skipped)
    assert "POST /api/tokens" in found.stdout  # the reader sees what the GET audit missed


def test_a_login_a_token_and_post_routes_audited_from_a_copy_outside_any_venv(microblog):
    token = "demo." + hmac.new(b"test-secret", b"demo", hashlib.sha256).hexdigest()
    found = microblog("--login", "/auth/login", "--data", "username=demo&password=demo",
                      "--header", f"Authorization: Bearer {token}",
                      "--route", "/index", "--route", "/api/users",
                      "--route", "POST /api/tokens", "--data",
                      '{"username": "demo", "password": "demo"}',
                      "--route", "POST /post", "--data", "body=hello", via_copy=True)
    assert found.status == 1, found.stdout[-3000:] + found.stderr[-2000:]
    for label in ("/index", "/api/users", "POST /post"):
        route = found.route(label)
        assert route["reached"] and route["blocks"] is False, route
    assert found.route("POST /post")["statuses"] == {"302": 4}  # the redirect after a write
    tokens = found.route("POST /api/tokens")
    assert tokens["blocks"] and tokens["cause_id"] == "c_call", tokens  # scrypt
    assert tokens["where"].startswith("microblog.py:") and "check_password" in tokens["where"]
    assert found.document["settings"]["python"].endswith("/bin/python")


def test_an_interpreter_without_gunicorn_is_one_line_with_the_pip_command(microblog,
                                                                             tmp_path):
    bare = tmp_path / "bare"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(bare)],
                   check=True)
    found = microblog(python=str(bare / "bin" / "python"))
    assert found.status == 2 and found.stderr.count("\n") == 1, found.stderr
    assert "has no gunicorn and no gevent" in found.stderr
    assert "-m pip install gunicorn gevent" in found.stderr


def test_a_url_that_names_no_driver_is_read_as_the_installed_sqlalchemy_reads_it(
        microblog, database_url):
    found = microblog(url=database_url)  # postgresql://: SQLAlchemy 2.1 means psycopg 3
    assert found.status == 2, found.stderr[-2000:]
    assert "No module named 'psycopg'" in found.stderr
    assert "gives postgresql:// to psycopg, which is NOT installed" in found.stdout
