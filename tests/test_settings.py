"""Settings read once, in models.Settings: defaults, validation, the driver, in-process."""

import re
import subprocess
import sys

import pytest
from conftest import DUMMY_URL, ROOT

from models import ConfigError, Settings, database_url, masked

MARK = "# ---- app_sync.py and app_green.py are identical from this line down"


def settings(**env) -> Settings:
    return Settings.from_env({"DATABASE_URL": DUMMY_URL, **env})


def test_defaults_are_the_documented_ones():
    s = settings()
    assert (s.driver, s.pool_size, s.max_overflow, s.pool_timeout) == ("psycopg2", 5, 10, 30)
    assert (s.sleep_seconds, s.sleep_max, s.statement_timeout, s.connect_timeout) == (
        1.0, 10, 15, 5)
    assert s.pool_limit == 15 and s.pool_warm == 0
    assert s.query_timeout == 17 and settings(STATEMENT_TIMEOUT="12").query_timeout == 14


@pytest.mark.parametrize("env, says", [
    ({"POOL_SIZE": "0"}, "POOL_SIZE"), ({"POOL_SIZE": "two"}, "POOL_SIZE"),
    ({"MAX_OVERFLOW": "-1"}, "MAX_OVERFLOW"), ({"POOL_TIMEOUT": "nan"}, "POOL_TIMEOUT"),
    ({"SLEEP_MAX": "inf"}, "SLEEP_MAX"), ({"CONNECT_TIMEOUT": "0"}, "CONNECT_TIMEOUT"),
    ({"SLEEP_MAX": "5", "STATEMENT_TIMEOUT": "5"}, "STATEMENT_TIMEOUT"),
    ({"SLEEP_SECONDS": "11"}, "SLEEP_SECONDS"), ({"DB_DRIVER": "pg8000"}, "DB_DRIVER"),
    ({"POOL_WARM": "6"}, "POOL_WARM"), ({"POOL_WARM": "-1"}, "POOL_WARM"),
    ({"STATEMENT_TIMEOUT": "20", "QUERY_TIMEOUT": "20"}, "QUERY_TIMEOUT"),
    ({"DATABASE_URL": ""}, "DATABASE_URL is not set"),
    ({"DATABASE_URL": "mysql://u@h/db"}, "PostgreSQL URL"),
])
def test_a_bad_setting_is_refused_with_its_name(env, says):
    with pytest.raises(ConfigError, match=says):
        settings(**env)


@pytest.mark.parametrize("raw, driver, expected", [
    ("postgresql://u@h/db", "psycopg2", "postgresql+psycopg2"),
    ("postgres://u@h/db", "psycopg2", "postgresql+psycopg2"),
    ("postgresql://u@h/db", "psycopg", "postgresql+psycopg"),
    ("postgresql+psycopg://u@h/db", "psycopg2", "postgresql+psycopg"),
])
def test_a_plain_url_lands_on_the_chosen_driver(raw, driver, expected):
    assert database_url(raw, driver).drivername == expected


def test_passwords_are_masked_wherever_a_url_is_shown():
    assert masked("postgresql://me:hunter2@127.0.0.1/db") == "postgresql://me:***@127.0.0.1/db"
    assert masked(settings(DATABASE_URL="postgresql://me:pw@h/db").database_url) == (
        "postgresql+psycopg2://me:***@h/db")


def test_importing_models_reads_nothing_until_the_app_asks():
    code = ("import models; print(hasattr(models, 'Settings'))\n"
            "try:\n    models.settings\nexcept models.ConfigError as e:\n    print('refused')")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin"})
    assert done.stdout.split() == ["True", "refused"], done.stderr


def test_app_files_are_identical_below_the_preamble():
    bodies = []
    for name in ("app_sync.py", "app_green.py"):
        text = (ROOT / name).read_text()
        assert text.count(MARK) == 1, name
        bodies.append(text.split(MARK)[1])
    assert bodies[0] == bodies[1]
    preamble = (ROOT / "app_green.py").read_text().split(MARK)[0]
    assert "monkey.patch_all()" in preamble and "patch_psycopg()" in preamble


def test_run_all_refuses_an_old_python_in_one_line(tmp_path):
    """Python 3.10 (Ubuntu 22.04's) would fail deep inside pip: refuse first, naming PYTHON=."""
    import shutil
    import subprocess

    from conftest import ROOT

    for name in ("run_all.sh", "requirements.txt", "requirements-test.txt"):
        shutil.copy(ROOT / name, tmp_path / name)
    old = tmp_path / "python3.10"
    old.write_text("#!/bin/sh\necho 3.10\n")
    old.chmod(0o755)
    done = subprocess.run(["./run_all.sh", "--test"], cwd=tmp_path, capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "PYTHON": str(old)},
                          timeout=30)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "Python 3.10" in done.stderr and "PYTHON=" in done.stderr
    assert not (tmp_path / ".venv").exists()


@pytest.mark.parametrize("env, says", [
    ({"SLEEP_MAX": "3000000"}, "STATEMENT_TIMEOUT (3e+06 s) must be from 0.001 to 2147483 s"),
    ({"SLEEP_MAX": "0", "SLEEP_SECONDS": "0", "STATEMENT_TIMEOUT": "0.0004"},
     "0 would mean no limit"),
    ({"DB_DRIVER": "psycopg2", "DATABASE_URL": "postgresql+psycopg://a@h/d"},
     "DB_DRIVER=psycopg2 but DATABASE_URL names psycopg"),
    ({"DATABASE_URL": "postgresql+pg8000://a@h/d"}, "names the driver 'pg8000'"),
])
def test_settings_the_server_would_reject_or_ignore_are_refused_at_start(env, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        Settings.from_env({"DATABASE_URL": DUMMY_URL, **env})


def test_the_driver_comes_from_the_url_when_it_names_one():
    settings = Settings.from_env({"DATABASE_URL": "postgresql+psycopg://a@h/d"})
    assert settings.driver == "psycopg"
    assert Settings.from_env({"DATABASE_URL": DUMMY_URL}).driver == "psycopg2"
    assert Settings.from_env({"DATABASE_URL": DUMMY_URL, "DB_DRIVER": "psycopg"}).driver == \
        "psycopg"
