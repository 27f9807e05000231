"""The throwaway PostgreSQL: its cleanup leaves no postmaster, whatever its backends do."""

import os
import signal
import subprocess
import time
from pathlib import Path

import psycopg2
import pytest

from kit import pg
from kit.frozen import signal_all


def test_signal_all_goes_on_past_a_process_that_has_exited():
    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: its pid names nobody now
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        signal_all([gone.pid, sleeper.pid], signal.SIGTERM)
        assert sleeper.wait(5) == -signal.SIGTERM
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.slow
def test_a_frozen_backend_cannot_keep_the_server_alive_past_its_cleanup(tmp_path):
    """A fast shutdown waits for every backend, and a stopped one never answers: the cleanup
    falls back to an immediate shutdown and removes the folder only once the postmaster is
    gone (it used to delete the folder under a postmaster that lived on for 76 s)."""
    state = str(tmp_path / "pg.json")
    server = pg.start(state)
    postmaster = server.postmaster()
    conn = psycopg2.connect(server.url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            backend = cur.fetchone()[0]
        os.kill(backend, signal.SIGSTOP)
        started = time.perf_counter()
        pg.stop(state)
        took = time.perf_counter() - started
    finally:
        conn.close()
    assert postmaster and not pg.alive(postmaster), "the postmaster outlived the cleanup"
    assert not pg.alive(backend)
    assert not Path(server.dir).exists()
    assert took < 30, took  # fast 5 s, immediate about 5 s more


@pytest.mark.slow
def test_a_whole_frozen_server_is_stopped_and_nothing_of_it_stays_stopped(tmp_path):
    """The postmaster and every child stopped (a frozen VM's server): the cleanup continues
    them before it shuts the server down, so none stays behind, stopped for good (it used to
    take 25 s and leave the postmaster a zombie and six children in state T)."""
    state = str(tmp_path / "pg.json")
    server = pg.start(state)
    postmaster = server.postmaster()
    conn = psycopg2.connect(server.url)
    try:
        family = [postmaster, *pg.children(postmaster)]
        assert len(family) >= 4  # checkpointer, writers, our backend
        for pid in family:
            os.kill(pid, signal.SIGSTOP)
        started = time.perf_counter()
        pg.stop(state)
        took = time.perf_counter() - started
    finally:
        conn.close()
    assert [pid for pid in family if pg.alive(pid)] == []
    assert not Path(server.dir).exists()
    assert took < 20, took
