"""harden.py, the file users copy: alone, idempotent, fork-safe, and bounded under gevent."""

import shutil
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT, kit_env

from harden import parse_interval

HARDEN = ROOT / "harden.py"


@pytest.mark.parametrize("shown, seconds", [("0", 0), ("500ms", 0.5), ("15s", 15),
                                            ("2min", 120), ("1h", 3600), ("1500", 1.5),
                                            ("1d", 86400)])
def test_statement_timeout_as_postgresql_shows_it(shown, seconds):
    assert parse_interval(shown) == seconds


def test_an_unknown_time_setting_is_refused():
    with pytest.raises(ValueError):
        parse_interval("soon")


def test_it_imports_alone_from_an_empty_folder(tmp_path):
    """Copied beside a fresh app, with nothing of the kit: stdlib and SQLAlchemy only."""
    shutil.copy(HARDEN, tmp_path / "harden.py")
    code = textwrap.dedent("""
        import sys
        before = set(sys.modules)
        import harden
        from sqlalchemy import create_engine
        engine = create_engine("postgresql+psycopg2://u@127.0.0.1:1/x")
        assert harden.harden(engine) is engine
        first = engine.dialect.do_execute
        assert harden.harden(engine, query_timeout=1) is engine  # applied once only
        assert engine.dialect.do_execute is first
        new = {m.split(".")[0] for m in set(sys.modules) - before}
        assert harden.__file__.startswith(sys.argv[1]), harden.__file__
        print(sorted(m for m in new if m not in sys.stdlib_module_names and not
                     m.startswith("_")))
    """)
    env = {k: v for k, v in kit_env().items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # create_engine loads the DBAPI it was given; harden itself adds nothing but SQLAlchemy
    assert set(eval(done.stdout)) <= {"harden", "sqlalchemy", "psycopg2",
                                      "typing_extensions", "greenlet", "cython_runtime"}, done.stdout
    assert "gevent" not in done.stdout and "kit" not in eval(done.stdout)


FORK = textwrap.dedent("""
    import os, sys
    from sqlalchemy import create_engine, text
    from harden import harden
    engine = create_engine(os.environ["DATABASE_URL"].replace("postgresql://",
                           "postgresql+psycopg2://"), pool_pre_ping=True)
    if sys.argv[1] == "harden":
        harden(engine)
    if sys.argv[1] == "recipe":  # SQLAlchemy's docs: a pid check on checkout
        from sqlalchemy import event, exc

        @event.listens_for(engine, "connect")
        def connect(dbapi_connection, record):
            record.info["pid"] = os.getpid()

        @event.listens_for(engine, "checkout")
        def checkout(dbapi_connection, record, proxy):
            if record.info["pid"] != os.getpid():
                record.dbapi_connection = proxy.dbapi_connection = None
                raise exc.DisconnectionError("opened in another process")
    with engine.connect() as c:
        c.execute(text("SELECT 1"))
        parent = c.connection.dbapi_connection
    touched = []
    ping = engine.dialect.do_ping
    engine.dialect.do_ping = lambda conn: touched.append(
        getattr(conn, "dbapi_connection", conn) is parent) or ping(conn)
    pid = os.fork()
    if pid == 0:
        with engine.connect() as c:
            c.execute(text("SELECT 1"))
            mine = c.connection.dbapi_connection is not parent
        parent = None  # what a child that drops its copy does: finalise it
        import gc; gc.collect()
        os._exit(0 if mine and not any(touched) else 3)
    child = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    with engine.connect() as c:
        kept = c.connection.dbapi_connection is parent
    print(child, kept)
""")


@pytest.mark.slow
@pytest.mark.parametrize("mode, expect", [("harden", "0 True"), ("plain", "3 True"),
                                          ("recipe", "3 True")])
def test_a_forked_child_never_touches_the_parents_connection(database_url, mode, expect):
    """harden: the child opens its own and sends nothing on the parent's socket (0), and the
    parent keeps its connection (True). Plain: the child uses the parent's connection (3).
    SQLAlchemy's pid check on checkout: pool_pre_ping has pinged it before the check (3)."""
    done = subprocess.run([sys.executable, "-c", FORK, mode], cwd=ROOT, env=kit_env(),
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == expect.split(), done.stdout + done.stderr


FREEZE = textwrap.dedent("""
    from gevent import monkey; monkey.patch_all()
    from psycogreen.gevent import patch_psycopg; patch_psycopg()
    import os, signal, sys, time
    from sqlalchemy import create_engine, exc, text
    from sqlalchemy.orm import Session
    from harden import harden
    driver, step = sys.argv[1:]
    url = os.environ["DATABASE_URL"].replace("postgresql://", f"postgresql+{driver}://")
    engine = harden(create_engine(url, pool_pre_ping=True), query_timeout=1)
    session = Session(engine)
    backend = session.execute(text("SELECT pg_backend_pid()")).scalar()
    os.kill(backend, signal.SIGSTOP)
    started = time.monotonic()
    try:
        if step == "commit":
            session.commit()
        elif step == "close":
            session.close()
        else:  # executemany: one statement, two rows
            session.execute(text("UPDATE todos SET priority = priority WHERE id = :id"),
                            [{"id": 1}, {"id": 2}])
        outcome = "no error"
    except Exception as error:
        outcome = type(error).__name__
    finally:
        os.kill(backend, signal.SIGCONT)
    print(outcome, round(time.monotonic() - started, 2))
    session.invalidate()
    engine.dispose()
""")


@pytest.mark.slow
@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
@pytest.mark.parametrize("step", ["commit", "close", "executemany"])
def test_a_frozen_commit_rollback_or_executemany_is_a_bounded_operational_error(
        database_url, driver, step):
    done = subprocess.run([sys.executable, "-c", FREEZE, driver, step], cwd=ROOT,
                          env=kit_env(), capture_output=True, text=True, timeout=30)
    outcome, took = done.stdout.split()
    assert outcome == "OperationalError" and float(took) < 1 + 2, done.stdout + done.stderr
    assert "Exception during reset" not in done.stderr, done.stderr  # the proxy, not closed


def test_the_kit_builds_its_engine_through_harden():
    from models import Settings, make_engine

    env = {"DATABASE_URL": "postgresql://app@127.0.0.1:1/app"}
    hardened = make_engine(Settings.from_env(env))
    plain = make_engine(Settings.from_env({**env, "HARDEN": "0"}))
    assert getattr(hardened.dialect, "_hardened", False)
    assert not getattr(plain.dialect, "_hardened", False)



LEFTOVER = textwrap.dedent("""
    from gevent import monkey; monkey.patch_all()
    from psycogreen.gevent import patch_psycopg; patch_psycopg()
    import os, sys, time, psycopg2
    from sqlalchemy import create_engine, text
    from harden import harden
    url, driver = os.environ["DATABASE_URL"], sys.argv[1]
    options = "-c statement_timeout=10000" + "".join(f" -c {o}" for o in sys.argv[2:])
    engine = harden(create_engine(url.replace("postgresql://", f"postgresql+{driver}://"),
                                  connect_args={"options": options,
                                                "application_name": "leftover"}),
                    query_timeout=1)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_sleep(4)"))
    except Exception:
        pass
    gave_up = time.perf_counter()
    with psycopg2.connect(url) as probe, probe.cursor() as cur:
        while time.perf_counter() - gave_up < 8:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE "
                        "application_name = 'leftover' AND state = 'active'")
            probe.rollback()
            if cur.fetchone()[0] == 0:
                break
            time.sleep(0.05)
    print(round(time.perf_counter() - gave_up, 2))
""")


@pytest.mark.slow
@pytest.mark.parametrize("driver, options, low, high", [
    ("psycopg2", [], 2.0, 8), ("psycopg2", ["client_connection_check_interval=250"], 0, 1.5),
    ("psycopg", [], 0, 1.0)])
def test_work_left_on_the_server_after_the_bound_gives_up(database_url, driver, options, low,
                                                          high):
    """query_timeout 1 s against pg_sleep(4): closing alone leaves the query running on the
    server (psycopg2: ~3 s more); the server's client_connection_check_interval, or psycopg 3's
    cancel_safe() (which harden() sends), stops it."""
    done = subprocess.run([sys.executable, "-c", LEFTOVER, driver, *options], cwd=ROOT,
                          env=kit_env(), capture_output=True, text=True, timeout=60)
    assert low <= float(done.stdout.strip() or -1) < high, done.stdout + done.stderr[-500:]
