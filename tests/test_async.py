"""app_async.py, the asyncio alternative: its scenario's expectations and settings (fast), and
on the real stack the same answers as app_sync.py, its verdicts in a burst and under a stream,
and its bounds."""

import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import DUMMY_URL, ROOT, kit_env
from test_app import BAD_REQUESTS, get
from test_run_all import run_all

from kit.run import steps
from kit.scenarios import BY_NAME
from models import ConfigError, Settings, make_async_engine, make_engine

ENV = {"DATABASE_URL": DUMMY_URL}


@pytest.mark.parametrize("name", ["async", "async-psycopg"])
def test_the_async_scenarios_overlap_every_sleep_and_queries_up_to_the_pool(name):
    scenario = BY_NAME[name]
    assert scenario.per_worker("python", 30, ENV) == 30
    assert scenario.per_worker("postgres", 30, ENV) == 15
    assert scenario.per_worker("postgres", 30, {**ENV, "POOL_SIZE": "8",
                                                "MAX_OVERFLOW": "0"}) == 8
    assert scenario.expected_concurrency("postgres", 100, 4, ENV) == 60
    argv = scenario.command(8000, 20)
    assert argv[argv.index("--worker-class") + 1] == "uvicorn_worker.UvicornWorker"
    assert argv[-1] == "app_async:app"


def test_async_runs_by_default_and_its_psycopg_variant_on_request():
    assert "async" in steps([]) and "async-psycopg" not in steps([])


def test_the_async_engine_takes_the_pool_settings_and_its_driver_from_settings():
    env = {**ENV, "POOL_SIZE": "7", "MAX_OVERFLOW": "2", "POOL_TIMEOUT": "3"}
    for driver, dialect in (("", "asyncpg"), ("asyncpg", "asyncpg"), ("psycopg", "psycopg")):
        engine = make_async_engine(Settings.from_env({**env, "DB_DRIVER": driver}))
        assert engine.dialect.driver == dialect and engine.dialect.is_async
        assert (engine.pool.size(), engine.pool._max_overflow, engine.pool.timeout()) == (
            7, 2, 3)
        assert engine.pool._pre_ping


def test_asyncpg_is_refused_by_the_blocking_apps_in_one_clear_line():
    settings = Settings.from_env({"DATABASE_URL": "postgresql+asyncpg://a@h/d"})
    assert settings.driver == "asyncpg"
    with pytest.raises(ConfigError, match="asyncpg is an asyncio driver: serve app_async.py"):
        make_engine(settings)


def test_app_async_has_app_syncs_routes_and_methods():
    code = ("import app_sync, app_async\n"
            "for app in (app_sync.app, app_async.app):\n"
            "    print(sorted((r.rule, sorted(r.methods)) for r in app.url_map.iter_rules()"
            " if r.endpoint != 'static'))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, env=kit_env(DATABASE_URL=DUMMY_URL), timeout=60)
    assert done.returncode == 0, done.stderr
    flask, quart = done.stdout.splitlines()
    assert flask == quart and "/sleep/postgres/" in flask


@pytest.mark.slow
def test_every_bad_request_gets_the_answer_app_sync_gives(serve):
    """Same status and same JSON for every bad request of tests/test_app.py; none a 5xx, none
    with a traceback. (An over-long request line: gunicorn's own 414 for the sync worker, the
    app's JSON 400 under uvicorn: a 4xx from both.)"""
    sync, asyncio_app = serve("sync", requests=1), serve("async", requests=1)
    differ = []
    for path, query, method in BAD_REQUESTS:
        (status, _, body), (a_status, a_headers, a_body) = (
            get(f"{server.url}{path}?{query}", method) for server in (sync, asyncio_app))
        text = a_body.decode("latin-1")
        leaked = any(word in text for word in ("Traceback", "SELECT", "asyncpg", "File \""))
        long_line = len(path) + len(query) > 4000
        same = long_line or (a_status == status and json.loads(a_body) == json.loads(body))
        if not (400 <= a_status < 500 and same and not leaked and a_headers.get(
                "content-type", "").startswith("application/json")):
            differ.append((method, path[:40], query[:40], status, a_status, text[:120]))
    assert not differ, differ
    for route in ("/todos/", "/sleep/postgres/?seconds=0", "/sleep/python/?seconds=0"):
        assert get(f"{asyncio_app.url}{route}")[2] == get(f"{sync.url}{route}")[2]
    assert asyncio_app.health()["driver"] == "asyncpg"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["async", "async-psycopg"])
def test_pool_timeout_answers_503_with_retry_after_and_the_worker_survives(serve, name):
    server = serve(name, requests=3, POOL_SIZE=1, MAX_OVERFLOW=0, POOL_TIMEOUT=1)
    pid = server.health()["pid"]
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: get(f"{server.url}/sleep/postgres/?seconds=2"),
                                range(3)))
    assert sorted(status for status, _, _ in answers) == [200, 503, 503]
    for status, headers, body in answers:
        if status == 503:
            assert headers["retry-after"] == "1" and json.loads(body)["pool_limit"] == 1
    assert server.health()["pid"] == pid and get(f"{server.url}/todos/")[0] == 200


@pytest.mark.slow
def test_a_silent_or_refusing_database_is_a_503_within_connect_timeout(serve):
    """asyncpg's connect errors are not wrapped by SQLAlchemy (OSError, TimeoutError): the app
    answers them 503 all the same. psycopg tries twice (sslmode=prefer): 2 x CONNECT_TIMEOUT."""
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    try:
        for name, port, bound in (("async", silent.getsockname()[1], 3),
                                  ("async-psycopg", silent.getsockname()[1], 4),
                                  ("async", 1, 1)):  # port 1: refused at once
            server = serve(name, requests=1, CONNECT_TIMEOUT=1,
                           DATABASE_URL=f"postgresql://app@127.0.0.1:{port}/app")
            started = time.monotonic()
            status, headers, body = get(f"{server.url}/todos/")
            took = time.monotonic() - started
            assert (status, json.loads(body)) == (503, {"error": "database unavailable"})
            assert headers["retry-after"] == "1" and took < bound, (name, port, took)
            server.stop()
    finally:
        silent.close()


BOUNDS = """
import asyncio, os, signal, sys, time
from sqlalchemy import exc, text
import app_async

async def main():
    async with app_async.app.app_context():
        session = app_async.db()
        conn = await session.connection()
        print(await conn.scalar(text("SHOW statement_timeout")),
              await conn.scalar(text("SHOW application_name")))
        try:
            await app_async.execute(text("SELECT pg_sleep(3)"))
        except exc.DBAPIError as error:
            print(getattr(error.orig, "pgcode", None) or error.orig.sqlstate)
        await session.rollback()  # gives the connection back: take one again
        backend = await (await session.connection()).scalar(text("SELECT pg_backend_pid()"))
        os.kill(backend, signal.SIGSTOP)  # this connection's backend only: a frozen server
        started = time.monotonic()
        try:
            await app_async.execute(text("SELECT 1"))
        except TimeoutError:
            print(f"{time.monotonic() - started:.1f}")
        finally:
            os.kill(backend, signal.SIGCONT)
        await app_async.close_session()
    async with app_async.app.app_context():  # the pool goes on, on a new connection
        print((await app_async.execute(text("SELECT pg_backend_pid()"))).scalar() != backend)
        await app_async.close_session()
    await app_async.engine.dispose()

asyncio.run(main())
"""


@pytest.mark.slow
@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
def test_the_async_engine_honours_statement_timeout_and_query_timeout(database_url, driver,
                                                                     app_name):
    """STATEMENT_TIMEOUT and PGAPPNAME reach the server (57014, which the app answers 'statement
    cancelled'); QUERY_TIMEOUT bounds a statement to a frozen backend (SIGSTOP), where
    statement_timeout cannot fire; the connection is discarded and the pool goes on.
    psycopg 3, cancelled, waits up to 5 s more for the server to end the query (its
    AsyncConnection._wait), so there the bound is QUERY_TIMEOUT + 5 s; asyncpg keeps it."""
    done = subprocess.run([sys.executable, "-c", BOUNDS], cwd=ROOT, capture_output=True,
                          text=True, timeout=60,
                          env=kit_env(DB_DRIVER=driver, SLEEP_MAX=0.2, SLEEP_SECONDS=0.1,
                                      STATEMENT_TIMEOUT=0.5, QUERY_TIMEOUT=1,
                                      PGAPPNAME=app_name))
    assert done.returncode == 0, done.stderr[-2000:]
    shown, cancelled, bounded, new_connection = done.stdout.splitlines()
    assert shown == f"500ms {app_name}" and cancelled == "57014", done.stdout
    low, high = (0.8, 3) if driver == "asyncpg" else (5.8, 9)
    assert low <= float(bounded) < high, done.stdout
    assert new_connection == "True", done.stdout


@pytest.mark.slow
def test_run_all_scenario_async_overlaps_both_routes_as_expected(tmp_path, database_url):
    """./run_all.sh --scenario async: N requests of S seconds on each route end together."""
    done, document = run_all(tmp_path, "--scenario", "async", "--requests", 6, "--seconds",
                             0.4, env=kit_env(DATABASE_URL=database_url))
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    rows = {row["endpoint"]: row for row in document["rows"]}
    for endpoint in ("python", "postgres"):
        row = rows[endpoint]
        assert row["scenario"] == "async" and row["expected_concurrency"] == 6
        assert row["as_expected"] and row["total_s"] < 2 * 0.4, row
    assert "1 workers x 15 (pool_size + max_overflow)" in done.stderr  # its budget
    assert document["machine"]["packages"]["Quart"]


@pytest.mark.slow
def test_under_a_stream_the_slow_queries_do_not_stall_the_async_app(tmp_path, database_url):
    """./run_all.sh --rate 50 --duration 3 --scenario async: the fast requests' p99 does not
    grow by half a slow query when 5 % of the requests are a 200 ms query."""
    done, document = run_all(tmp_path, "--rate", 50, "--duration", 3, "--scenario", "async",
                             env=kit_env(DATABASE_URL=database_url))
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    [row] = document["rows"]
    assert row["expected"] == "unaffected" and row["stalls"] is False, row
    assert row["as_expected"] and row["slow_requests"] >= 5
