"""Nobody else gets in: the throwaway PostgreSQL and PgBouncer ask every TCP client for this
run's password (scram-sha-256), and the unix socket sits in a folder only its owner enters."""

import os
import shutil
import subprocess
from pathlib import Path

import psycopg2
import pytest

from kit import pg

pytestmark = pytest.mark.slow


def refused(url: str) -> str:
    """The error of a connection to URL; fails the test if it connects."""
    try:
        psycopg2.connect(url, connect_timeout=5).close()
    except psycopg2.OperationalError as error:
        return str(error)
    raise AssertionError(f"connected without the password: {url}")


def as_nobody(psql: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([shutil.which("runuser"), "-u", "nobody", "--", psql, "-w", "-X", *args,
                           "-c", "SELECT 1"], capture_output=True, text=True, timeout=30,
                          env={"PATH": "/usr/bin:/bin", "PGCONNECT_TIMEOUT": "5"})


def test_no_password_no_connection_to_the_server_or_pgbouncer():
    with pg.database(own=True) as (url, server):
        assert server.password and f":{server.password}@" in url
        for user, db in (("kit", "postgres"), ("app", "app")):  # the superuser, the app
            said = refused(f"postgresql://{user}@127.0.0.1:{server.port}/{db}")
            assert "password" in said, said
        assert "password" in refused(url.replace(server.password, "wrong"))
        psycopg2.connect(url, connect_timeout=5).close()  # the URL's password works
        assert oct(os.stat(server.dir).st_mode & 0o777) == "0o700"  # the socket's folder
        if os.geteuid() == 0 and shutil.which("runuser"):  # another local account
            psql = f"{server.bindir}/psql"
            over_tcp = as_nobody(psql, "-h", "127.0.0.1", "-p", str(server.port), "-U", "kit",
                                 "-d", "postgres")
            assert over_tcp.returncode != 0 and "password" in over_tcp.stderr, over_tcp
            socket = as_nobody(psql, "-h", server.dir, "-p", str(server.port), "-U", "kit",
                               "-d", "postgres")
            assert socket.returncode != 0, socket
        if pg.pgbouncer_binary() or os.environ.get("CI"):
            with pg.bouncer(server.port, 2, 15_000, password=server.password) as (burl, b):
                said = refused(f"postgresql://app@127.0.0.1:{b.port}/app")
                assert "password" in said or "SASL" in said, said
                psycopg2.connect(burl, connect_timeout=5).close()


def environ_of(pid: int) -> str:
    return Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")


def test_the_server_and_pgbouncer_never_see_the_callers_environment(monkeypatch):
    """initdb, pg_ctl, the server and PgBouncer run as another account when we are root: a
    secret in our environment would be theirs to read in /proc/PID/environ."""
    monkeypatch.setenv("ROOT_ONLY_TOKEN", "token-for-root-only")
    monkeypatch.setenv("KIT_APP_PASSWORD", "only-kit-pg-bouncer-reads-this")
    with pg.database(own=True) as (_, server):
        postmaster = environ_of(server.postmaster())
        assert "token-for-root-only" not in postmaster and "KIT_APP" not in postmaster
        assert f"HOME={server.dir}" in postmaster  # what it needs, it has
        if pg.pgbouncer_binary() or os.environ.get("CI"):
            with pg.bouncer(server.port, 2, 15_000, password=server.password) as (_, b):
                bouncer = environ_of(b.pid)
                assert "token-for-root-only" not in bouncer
                assert "only-kit-pg-bouncer-reads-this" not in bouncer
