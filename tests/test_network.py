"""Hosts on one machine: the latency relay against physics, --rtt runs, and what they leave."""

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, kit_env

from kit import net, pg
PING = ("import statistics, sys, time, psycopg2\n"
        "c = psycopg2.connect(sys.argv[1]); c.autocommit = True; cur = c.cursor()\n"
        "took = []\n"
        "for i in range(120):\n"
        "    t = time.perf_counter(); cur.execute('SELECT 1'); cur.fetchall()\n"
        "    took.append(time.perf_counter() - t)\n"
        "print(min(took[20:]) * 1000, statistics.median(took[20:]) * 1000)\n")


def needs_root():
    """Root makes namespaces; in CI (root) these tests never skip."""
    reason = net.why_not()
    if reason and os.environ.get("CI"):
        pytest.fail(reason)
    if reason:
        pytest.skip(reason)


def run_json(argv: list[str], out) -> dict:
    """Run a kit command that writes --json OUT; exit 0 expected; its document."""
    done = subprocess.run([sys.executable, *argv, "--json", str(out)], cwd=ROOT,
                          env=kit_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text())


def kit_hosts() -> dict[str, int]:
    """What kit.net's hosts() made that exists now, each with the pid of its maker."""
    return {name: net.maker(name) for names in net.made().values() for name in names}


def left_behind() -> list[str]:
    """Hosts whose maker has ended, or is this test's process, done with them: what a run
    left. Other runs' hosts (tests beside this one) have a live maker and are theirs."""
    return [name for name, pid in kit_hosts().items()
            if pid == os.getpid() or not pg.alive(pid)]


def session_of(pid: int) -> int | None:
    try:
        return int(pg.proc_stat(pid)[3])
    except (OSError, IndexError, ValueError):
        return None


@pytest.mark.alone  # within 10 % of 20 ms: 22.9 ms was measured beside three other tests
def test_the_relay_adds_its_rtt_on_loopback():
    echo = socket.create_server(("127.0.0.1", 0))

    def answer():  # one connection, every chunk sent back
        peer, _ = echo.accept()
        with peer:
            while data := peer.recv(100):
                peer.sendall(data)

    threading.Thread(target=answer, daemon=True).start()
    relay = subprocess.Popen([sys.executable, "-m", "kit.relay", "--listen", "127.0.0.1:0",
                              "--to", f"127.0.0.1:{echo.getsockname()[1]}", "--rtt-ms", "20"],
                             cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        port = int(relay.stdout.readline().split()[1])
        with socket.create_connection(("127.0.0.1", port)) as conn:
            took = []
            for _ in range(10):
                started = time.perf_counter()
                conn.sendall(b"ping")
                conn.recv(100)
                took.append(time.perf_counter() - started)
        relay.send_signal(signal.SIGUSR1)
        assert relay.stdout.readline().strip() == "turns 10"  # a round trip per ping
    finally:
        relay.terminate()
        try:
            relay.wait(5)
        except subprocess.TimeoutExpired:  # it ignored SIGTERM: fail, but leave nothing
            relay.kill()
            relay.wait()
            raise
        finally:
            relay.stdout.close()
            echo.close()
    assert statistics.median(took) == pytest.approx(0.020, rel=0.1)


def test_only_what_hosts_makes_is_named_as_a_runs_to_sweep():
    """The sweep removes by name: a name that hosts() did not make (another tool's namespace,
    a kit-pg folder whose random tail looks like a tag) has no maker."""
    assert net.maker("kit-app2-5437x21") == net.maker("k3b5437x21") == 5437
    assert net.maker("/etc/netns/kit-relay-12x1") == net.maker("/tmp/kit-net-12x3-a_b9") == 12
    for name in ("kit-pg-1234x567", "kit-net-vjjvg2p5", "kit-app-12x3y", "kit-web-12x3",
                 "k3c12x3", "/tmp/kit-net-12x3", "myns-12x3"):
        assert net.maker(name) is None, name


@pytest.mark.slow
@pytest.mark.alone  # its dead maker's hosts are what every other test checks it left none of
def test_the_hosts_of_a_killed_run_are_removed_by_the_next(tmp_path):
    """kill -9 leaves a run's namespaces, its relay and PostgreSQL running in them, and its
    folders; the next run's sweep ends those processes and removes the rest. Hosts whose
    maker lives (this test's own, made beside it) are never touched."""
    needs_root()
    maker = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom kit import net\n"
                              "with net.hosts(1) as h:\n"
                              "    print(h.relay.pid, h.dir, flush=True); time.sleep(120)"],
                             cwd=ROOT, env=kit_env(), stdout=subprocess.PIPE, text=True)
    try:
        relay, folder = maker.stdout.readline().split()
        state = json.loads(Path(folder, "pg.json").read_text())
        postmaster = int(Path(state["dir"], "data", "postmaster.pid").read_text().split()[0])
    finally:
        maker.kill()
        maker.wait()
        maker.stdout.close()
    left = [name for name, pid in kit_hosts().items() if pid == maker.pid]
    assert len(left) == 5 and pg.alive(int(relay)) and pg.alive(postmaster), left  # 4 + folder
    with net.hosts(1) as mine:
        assert mine.ns("app") in kit_hosts()  # its own, made after the sweep
        assert not [name for name, pid in kit_hosts().items() if pid == maker.pid]
        assert not any(net.tag_of(name) == mine.tag for names in net.orphans().values()
                       for name in names)  # in use: never swept, though its maker is us
    assert pg.gone(int(relay), 5) and pg.gone(postmaster, 5)
    assert not Path(folder).exists() and not Path(state["dir"]).exists()


@pytest.mark.alone  # its made-up leftovers are what every other test checks it left none of
def test_the_sweep_ends_no_process_by_a_pid_a_state_file_recorded(tmp_path):
    """After a reboot a dead run's state files hold pids that other processes now have: the
    sweep finds what to end by what it is (in the namespace, working in the folder), so a
    process that has the recorded pids lives. A dead run's pid this process now has (reused)
    is swept too."""
    needs_root()  # hosts() sweeps, and only as root
    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid: a maker that has ended
    other = subprocess.Popen(["sleep", "60"], cwd=tmp_path)  # has the recorded pids now
    made = [Path(tempfile.mkdtemp(prefix=f"kit-net-{pid}x1-", dir="/tmp"))
            for pid in (gone.pid, os.getpid())]
    data = Path(tempfile.mkdtemp(prefix="kit-pg-", dir="/tmp"), "data")
    try:
        data.mkdir()
        (data / "postmaster.pid").write_text(f"{other.pid}\n")
        for folder in made:
            (folder / "pg.json").write_text(json.dumps({"dir": str(data.parent)}))
            (folder / "pgbouncer-pgb.json").write_text(
                json.dumps({"bouncer": {"dir": str(tmp_path), "pid": other.pid}}))
        assert set(map(str, made)) <= set(net.orphans()["folder"])
        net.sweep()
        assert other.poll() is None and tmp_path.exists()  # not a kit-pgbouncer-* folder
        assert not data.parent.exists() and not any(folder.exists() for folder in made)
    finally:
        other.kill()
        other.wait()
        for folder in (*made, data.parent):
            shutil.rmtree(folder, ignore_errors=True)


def test_rtt_as_an_ordinary_user_is_one_line_and_exit_2(monkeypatch, capsys):
    from kit import run

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert run.main(["plan", "--rtt", "1"]) == 2
    said = capsys.readouterr()
    assert said.out == "" and said.err.count("\n") == 1 and "needs root" in said.err


def ping_ms(rtt: float) -> tuple[float, float]:
    """The quickest and the median of 100 SELECT 1 round trips, in ms, from the app host
    through the relay (after 20 to warm up)."""
    with net.hosts(rtt) as hosts:
        done = hosts.call("app", [sys.executable, "-c", PING, hosts.database_url], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    quickest, median = map(float, done.stdout.split())
    return quickest, median


@pytest.mark.slow
def test_a_select_1_through_the_hosts_takes_the_requested_rtt_more():
    needs_root()
    base, _ = ping_ms(0)  # the relay's own cost, and the query's
    assert base < 1
    # The quickest round trips: a busy machine only adds to a round trip, and the relay
    # cannot make one quicker than its RTT. (Medians, taken at different moments on the 2
    # shared cores, read 0.85-0.98 ms for 1 ms under the full suite, then twice 3.6 and
    # 4.6 ms, the machine slow for the whole run.) Wide enough for a busy machine, narrow
    # enough that a relay that adds nothing, or twice the RTT, fails.
    for rtt, low, high in ((1, 0.6, 1.8), (5, 4.0, 6.5)):
        quickest, median = ping_ms(rtt)
        added = quickest - base
        assert low < added < high, (rtt, added, median)
    assert left_behind() == []


@pytest.mark.slow
def test_run_all_over_hosts_carries_the_rtt_and_leaves_nothing(tmp_path):
    needs_root()
    out = tmp_path / "rtt.json"
    # S = 1 s, the kit's default: the first burst also opens the pool's connections through
    # the relay (+70 ms quiet), and beside the other tests that took +340 ms, past 0.3 s's
    # tolerance (1.25 x S + 0.25 s); 4 requests one at a time (4 s) still fail it
    done = subprocess.run(["./run_all.sh", "--rtt", "2", "--scenario", "green", "--requests",
                           "4", "--seconds", "1", "--json", str(out)], cwd=ROOT,
                          env=kit_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(r["rtt_ms"], r["rtt_via"]) for r in rows} == {(2.0, "relay")}
    assert "hosts 2 ms apart" in done.stdout
    assert left_behind() == []


@pytest.mark.slow
def test_a_signal_during_an_rtt_run_leaves_no_namespace(tmp_path):
    needs_root()
    proc = subprocess.Popen(["./run_all.sh", "--rtt", "1", "--scenario", "sync", "--requests",
                             "20", "--seconds", "1"], cwd=ROOT, env=kit_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 60
    while not [name for name, pid in kit_hosts().items()  # its hosts are up
               if name.startswith("kit-app-") and session_of(pid) == proc.pid]:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.2)
    time.sleep(3)  # the app started, the load under way
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert left_behind() == []


@pytest.mark.slow
def test_a_partition_is_a_bounded_wait_and_heals_without_a_restart(tmp_path):
    needs_root()
    checks = run_json(["-m", "kit.partition", "--only", "green"],
                      tmp_path / "partition.json")["checks"]
    assert len(checks) == 3 and all(c["ok"] for c in checks), checks
    assert left_behind() == []


@pytest.mark.slow
def test_three_app_hosts_are_refused_straight_at_the_server_and_served_through_pgbouncers(
        tmp_path):
    needs_root()
    found = run_json(["bench/fleet.py", "--seconds", "0.3", "--only", "direct", "per-host"],
                     tmp_path / "fleet.json")
    direct = sum(r["statuses"].get("503", 0) for r in found["direct"])
    assert direct > 0, found["direct"]  # 60 client connections, 27 server slots
    assert all(r["statuses"] == {"200": 20} for r in found["per-host"])
    # each host's PgBouncer lets 8 of its 20 through at a time: on average about 20 x 0.3 s /
    # 0.9 s = 6.7 in flight (20 if it did not limit them). Waves of 8 can merge when the
    # first spreads out on a busy machine, so the overlap is the check.
    assert all(r["overlap"] <= 8.5 for r in found["per-host"]), [
        (r["overlap"], [w["size"] for w in r["waves"]]) for r in found["per-host"]]
    assert left_behind() == []


@pytest.mark.slow
def test_a_slow_resolver_holds_green_psycopg2_but_not_psycopg3_or_hostaddr(tmp_path):
    needs_root()
    checks = run_json(["-m", "kit.dnstrap"], tmp_path / "dnstrap.json")["checks"]
    assert len(checks) == 3 and all(c["ok"] for c in checks), checks
    assert left_behind() == []  # the resolv.conf folders in /etc/netns too


@pytest.mark.slow
@pytest.mark.parametrize("case, stale", [("plain", 2), ("keepalive", 0)])
def test_a_partition_past_the_fin_retries_leaves_backends_that_only_keepalive_ends(
        tmp_path, case, stale):
    """The app gives up on its 4 connections during a 12 s cut (503 after its 4 s bound);
    the relay, the backends' TCP peer, gives its FIN up after ~3 s (tcp_retries2=3), before
    the heal. The 2 backends that had nothing to send stay on the server, 'idle', as if the
    app still held them; with the server's tcp_keepalives_* (5 s, then 3 probes 1 s apart)
    they are gone before the heal. Each case on hosts of its own, so the two run side by side."""
    needs_root()
    from bench.leftover import CASES, leftover, superuser

    settings = CASES["long+keepalive"][2] if case == "keepalive" else {}
    with net.hosts(1) as hosts:
        conn = superuser(hosts)
        try:
            row = leftover(hosts, conn, str(tmp_path), 12, 3, settings, after=(3,), name=case)
        finally:
            conn.close()
    assert row["during_cut"] == {"flying": {"503": 2}, "idle": {"503": 2}}, row
    assert row["refill"] == {"200": 4}, row
    assert row["counts"][0]["states"].count("idle") == stale, row
    assert left_behind() == []
