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


def frozen_then_stopped(tmp_path, freeze) -> tuple[pg.Server, int, list[int], float]:
    """Start a server, connect, SIGSTOP the pids freeze(postmaster, our backend) gives, then
    time its cleanup; (the server, its postmaster, the frozen pids, the cleanup's seconds)."""
    state = str(tmp_path / "pg.json")
    server = pg.start(state)
    conn = psycopg2.connect(server.url)
    try:
        postmaster = server.postmaster()
        with conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            frozen = freeze(postmaster, cur.fetchone()[0])
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        started = time.perf_counter()
        pg.stop(state)
        return server, postmaster, frozen, time.perf_counter() - started
    finally:
        conn.close()


@pytest.mark.slow
def test_a_frozen_backend_cannot_keep_the_server_alive_past_its_cleanup(tmp_path):
    """A fast shutdown waits for every backend, and a stopped one never answers: the cleanup
    continues it first (and would fall back to an immediate shutdown), and removes the folder
    only once the postmaster is gone (it used to delete the folder under a postmaster that
    lived on for 76 s)."""
    server, postmaster, frozen, took = frozen_then_stopped(
        tmp_path, lambda _, backend: [backend])
    assert not pg.alive(postmaster), "the postmaster outlived the cleanup"
    assert not pg.alive(frozen[0])
    assert not Path(server.dir).exists()
    assert took < 30, took


@pytest.mark.slow
def test_a_whole_frozen_server_is_stopped_and_nothing_of_it_stays_stopped(tmp_path):
    """The postmaster and every child stopped (a frozen VM's server): the cleanup continues
    them before it shuts the server down, so none stays behind, stopped for good (it used to
    take 25 s and leave the postmaster a zombie and six children in state T)."""
    server, _, frozen, took = frozen_then_stopped(
        tmp_path, lambda postmaster, _: [postmaster, *pg.children(postmaster)])
    assert len(frozen) >= 4  # checkpointer, writers, our backend
    assert [pid for pid in frozen if pg.alive(pid)] == []
    assert not Path(server.dir).exists()
    assert took < 20, took


@pytest.mark.slow
def test_the_owners_stop_ends_the_watchdog_too(tmp_path, monkeypatch):
    """run_all.sh starts PostgreSQL with a watchdog (kit.pg start --owner), and stops it
    itself on the way out. The watchdog must go with that stop, not some milliseconds after
    the owner's exit (a fresh-clone run found it still alive as the run's test looked); but
    only once the stop is done: a stop that fails (a second Ctrl-C) leaves it to finish."""
    state = str(tmp_path / "pg.json")
    owner = subprocess.Popen(["sleep", "60"])
    try:
        pg.start(state, owner=owner.pid)
        deadline = time.monotonic() + 10  # the watchdog is forked twice, then exec'd
        while not pg.watchers(state):
            assert time.monotonic() < deadline, "no watchdog started"
            time.sleep(0.05)
        [watchdog] = pg.watchers(state)

        def interrupted(server):
            raise KeyboardInterrupt  # a second Ctrl-C during the owner's stop

        with monkeypatch.context() as patch:
            patch.setattr(pg.Server, "stop", interrupted)
            with pytest.raises(KeyboardInterrupt):
                pg.stop(state)
        assert pg.watchers(state) == [watchdog]  # still there to finish the job
        pg.stop(state)
        assert not pg.alive(watchdog) and pg.watchers(state) == []
        assert owner.poll() is None  # the owner still runs: the stop ended the watchdog
    finally:
        owner.kill()
        owner.wait()
        pg.stop(state)


def test_a_start_that_failed_before_it_saved_leaves_no_state_file(tmp_path):
    """database() makes its state file, then starts; a start that fails first (no server
    binaries, a bad option) leaves it empty, and the stop on the way out removes it (eight
    such files were left in /tmp by a run whose start raised)."""
    state = tmp_path / "pg.json"
    state.touch()
    pg.stop(str(state))
    assert not state.exists()
    state.write_text('{"dir": ')  # half a state: kept, it may name a server
    pg.stop(str(state))
    assert state.exists()
