"""The app itself: its two files, bad input, overload, timeouts, leaks and safe defaults."""

import http.client
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import ROOT, kit_env

pytestmark = pytest.mark.slow


def test_seeding_twice_leaves_50_todos(database_url, psql):
    for _ in range(2):
        done = subprocess.run([sys.executable, "seed.py"], cwd=ROOT, env=kit_env(),
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    assert psql("SELECT count(*) FROM todos") == [(50,)]


def test_seed_against_an_unreachable_database_is_one_line_and_exit_1():
    done = subprocess.run([sys.executable, "seed.py"], cwd=ROOT, capture_output=True,
                          text=True,
                          env=kit_env(DATABASE_URL="postgresql://u:secret@127.0.0.1:1/x"))
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "cannot reach the database" in done.stderr
    assert "secret" not in done.stderr + done.stdout


def get(url: str, method: str = "GET", headers: dict | None = None) -> tuple[int, dict, dict]:
    """(status, headers, body) of one request (HEADERS may replace Host)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request(method, parts.path + (f"?{parts.query}" if parts.query else ""),
                     headers=headers or {})
        answer = conn.getresponse()
        body = answer.read()
        return answer.status, dict(answer.getheaders()), body
    finally:
        conn.close()


BAD_SECONDS = ["", "abc", "-1", "-0.5", "nan", "NaN", "inf", "-inf", "1e999", "11",
               "99999999999999999999", "0x10", "1,5", "%00", "1%202", "seconds=1", "9" * 5000]
ROUTES = ["/sleep/python/", "/sleep/postgres/", "/todos/"]
SLEEP_ROUTES = ROUTES[:2]
BAD_HOSTS = ["a" * 64, "a..b", "a" * 64 + ".example:80"]  # no host name: IDNA refuses them
BAD_REQUESTS = [(path, query, method, {}) for path, query, method in (
    [(route, f"seconds={value}", "GET") for route in SLEEP_ROUTES for value in BAD_SECONDS]
    + [(route, "seconds=0.1&seconds=0.2", "GET") for route in SLEEP_ROUTES]
    + [(path, "", "GET") for path in ("/nope", "/sleep/", "/sleep/ruby/", "/todos/1",
                                      "/" + "x" * 3000)]
    + [(route, "", method) for route in ROUTES + ["/health"] for method in ("POST", "PUT",
                                                                          "DELETE")]
    + [("/sleep/python/", "seconds=" + "1" * 8000, "GET")]  # past gunicorn's line limit
)] + [(route, "", "GET", {"Host": host}) for route in ("/todos/", "/health")
      for host in BAD_HOSTS]


def test_a_405_says_which_methods_are_allowed(serve):
    """RFC 9110: a 405 carries Allow."""
    server = serve("green", requests=1)
    status, headers, _ = get(f"{server.url}/todos/", "DELETE")
    assert status == 405 and set(headers.get("Allow", "").replace(" ", "").split(",")) >= {
        "GET", "HEAD"}, headers


def test_every_bad_request_is_a_4xx_without_a_traceback(serve):
    server = serve("green", requests=4)
    failures = []
    for path, query, method, sent in BAD_REQUESTS:
        status, headers, body = get(f"{server.url}{path}?{query}", method, sent)
        text = body.decode("latin-1")
        leaked = any(word in text for word in ("Traceback", "SELECT", "psycopg2", "File \""))
        json_ok = headers.get("Content-Type", "").startswith("application/json") or (
            len(path) + len(query) > 4000)  # gunicorn itself refuses an over-long line
        if not 400 <= status < 500 or leaked or not json_ok:
            failures.append((method, path[:40], query[:40], sent, status, text[:120]))
    assert not failures, failures
    assert server.health()["status"] == "ok"


def test_a_bad_seconds_is_400_json_on_each_sleep_route(serve):
    server = serve("sync", requests=1)
    for route in SLEEP_ROUTES:
        status, _, body = get(f"{server.url}{route}?seconds=banana")
        assert status == 400
        assert json.loads(body) == {"error": "seconds must be a number",
                                    "parameter": "seconds"}


def test_pool_timeout_answers_503_with_retry_after_and_the_worker_survives(serve):
    server = serve("green", requests=3, POOL_SIZE=1, MAX_OVERFLOW=0, POOL_TIMEOUT=1)
    pid = server.health()["pid"]
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: get(f"{server.url}/sleep/postgres/?seconds=2"),
                                range(3)))
    statuses = sorted(status for status, _, _ in answers)
    assert statuses == [200, 503, 503], statuses
    for status, headers, body in answers:
        if status == 503:
            assert headers["Retry-After"] == "1"
            assert json.loads(body)["pool_limit"] == 1
    assert server.health()["pid"] == pid
    assert get(f"{server.url}/todos/")[0] == 200


def test_a_silent_database_is_a_503_within_connect_timeout(serve):
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    port = silent.getsockname()[1]
    try:
        for scenario in ("green", "psycopg3", "sync"):
            server = serve(scenario, requests=1, CONNECT_TIMEOUT=1,
                           DATABASE_URL=f"postgresql://app@127.0.0.1:{port}/app")
            started = time.monotonic()
            status, _, body = get(f"{server.url}/todos/")
            took = time.monotonic() - started
            assert status == 503 and json.loads(body)["error"] == "database unavailable"
            assert took < 3, (scenario, took)
            server.stop()
    finally:
        silent.close()


def test_statement_timeout_cancels_a_runaway_query(database_url):
    code = ("from models import engine; from sqlalchemy import text\n"
            "with engine.connect() as c:\n"
            "    print(c.scalar(text('SHOW statement_timeout')))\n"
            "    c.execute(text('SELECT pg_sleep(3)'))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, env=kit_env(SLEEP_SECONDS=0.1, SLEEP_MAX=0.5, STATEMENT_TIMEOUT=1),
                          timeout=30)
    assert done.stdout.strip() == "1s"
    assert "canceling statement due to statement timeout" in done.stderr


def test_no_connection_leaks_after_a_load_run(serve, load, psql, app_name):
    server = serve("green", requests=40, PGAPPNAME=app_name)
    run = load(40, "--url", server.url, "--endpoint", "all", "--seconds", 0.2)
    assert run.status == 0, run.stderr
    # 40 at once took all 15 (5 + 10 overflow); once they are back, the overflow ones are
    # closed and the pool keeps pool_size (5), idle. A leak keeps more, or keeps them busy.
    deadline = time.monotonic() + 5  # closed backends take a moment to leave the view
    while True:
        states = dict(psql("SELECT state, count(*) FROM pg_stat_activity WHERE "
                           "application_name = %s GROUP BY state", app_name))
        if sum(states.values()) <= 5 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert sum(states.values()) <= 5, states
    assert set(states) <= {"idle"}, states


def test_servers_never_run_in_debug_mode(serve):
    server = serve("green", requests=1)
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(f"{server.url}/sleep/python/?seconds=x")
    assert b"Traceback" not in error.value.read()
    assert "FLASK_DEBUG" not in (ROOT / "run_all.sh").read_text()


def test_a_port_someone_else_answers_on_is_never_taken_for_our_server(database_url, tmp_path):
    """free_port() then bind is a race: should another process take the port meanwhile, its
    /health must not pass for our gunicorn's (which cannot bind, and exits)."""
    import http.server
    import threading

    from conftest import launch

    class Impostor(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"status": "ok", "pid": 1}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Impostor)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    port = other.server_address[1]
    try:
        with pytest.raises(RuntimeError, match="gunicorn"):
            launch(["gunicorn", "--bind", f"127.0.0.1:{port}", "--no-control-socket",
                    "app_sync:app"], port, tmp_path / "gunicorn.log")
    finally:
        other.shutdown()
        other.server_close()
