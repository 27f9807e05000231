"""What each scenario predicts, the budget arithmetic and the summary's verdicts, in-process."""

import json

import pytest
from conftest import DUMMY_URL

from kit import plot, summary
from kit.run import steps
from kit.scenarios import BY_NAME
from models import Budget

ENV = {"DATABASE_URL": DUMMY_URL}  # the defaults: POOL_SIZE 5, MAX_OVERFLOW 10


@pytest.mark.parametrize("name, python, postgres", [
    ("sync", 1, 1), ("gevent", 30, 1), ("green", 30, 15), ("green-pool", 30, 30),
    ("gthread", 30, 15), ("psycopg3", 30, 15), ("pgbouncer", 30, 20)])
def test_per_worker_overlap_follows_the_worker_and_the_pool(name, python, postgres):
    scenario = BY_NAME[name]
    assert scenario.per_worker("python", 30, ENV) == python
    assert scenario.per_worker("postgres", 30, ENV) == postgres


def test_pool_settings_from_the_environment_apply_unless_the_scenario_sets_its_own():
    env = {**ENV, "POOL_SIZE": "8", "MAX_OVERFLOW": "0"}
    assert BY_NAME["green"].per_worker("postgres", 30, env) == 8
    assert BY_NAME["green-pool"].per_worker("postgres", 30, env) == 30
    assert BY_NAME["pgbouncer-direct"].per_worker("postgres", 100, env) == 50


def test_workers_multiply_the_overlap_except_behind_pgbouncer():
    assert BY_NAME["sync"].expected_concurrency("python", 20, 4, ENV) == 4
    assert BY_NAME["green"].expected_concurrency("postgres", 100, 4, ENV) == 60
    assert BY_NAME["pgbouncer"].expected_concurrency("postgres", 100, 1, ENV) == 20
    assert BY_NAME["pgbouncer-direct"].expected_concurrency("postgres", 100, 1, ENV) == 100


def test_uneven_workers_expect_a_range_but_sync_workers_do_not():
    assert BY_NAME["green"].uneven_floor("postgres", 20, 4, ENV) == 15
    assert BY_NAME["gevent"].uneven_floor("postgres", 20, 4, ENV) == 1
    assert BY_NAME["sync"].uneven_floor("python", 20, 4, ENV) == 4
    assert BY_NAME["green"].uneven_floor("postgres", 20, 1, ENV) == 15


def test_commands_bind_loopback_and_cover_the_blocked_time():
    for scenario in BY_NAME.values():
        argv = scenario.command(8123, 100, 2, seconds=1)
        assert argv[argv.index("--bind") + 1] == "127.0.0.1:8123"
        assert int(argv[argv.index("--timeout") + 1]) >= 100 * 1 + 30
        assert "--no-control-socket" in argv
    gevent = BY_NAME["gevent"].command(8000, 2000)
    assert gevent[gevent.index("--worker-connections") + 1] == "2100"
    assert "GEVENT_MONITOR_THREAD_ENABLE=true" in gevent
    gthread = BY_NAME["gthread"].command(8000, 40)
    assert gthread[gthread.index("--threads") + 1] == "40"
    assert "POOL_SIZE=40" in BY_NAME["green-pool"].command(8000, 40)


def test_steps_keep_table_order_and_run_a_shared_runner_once():
    assert steps([]) == ["sync", "gevent", "green", "green-pool", "gthread", "psycopg3",
                        "flask-sqlalchemy", "async"]
    assert steps(["green", "sync"]) == ["sync", "green"]
    assert steps(["pgbouncer", "pgbouncer-direct", "outage"]) == ["pgbouncer-direct", "outage"]
    with pytest.raises(SystemExit, match="unknown scenario nope"):
        steps(["nope"])


def test_budget_arithmetic_counts_hosts_workers_and_pools():
    budget = Budget(hosts=20, workers=4, per_worker=15, max_connections=100, reserved=3)
    assert budget.needed == 1200 and budget.available == 97 and not budget.ok
    assert "OVER BUDGET" in str(budget)
    assert Budget(1, 6, 15, 100, 3).ok


def test_a_pooler_per_host_fits_where_direct_connections_do_not():
    fleet = Budget(hosts=20, workers=4, per_worker=15, max_connections=100, reserved=3,
                   pooler_pool=4, pooler_max_clients=60, poolers=20)
    assert fleet.server_needed == 80 and fleet.ok
    assert "20 x 4 = 80" in str(fleet)
    crowded = Budget(1, 4, 50, 50, 3, pooler_pool=20, pooler_max_clients=100)
    assert crowded.server_needed == 20 and not crowded.ok  # 200 clients, 100 accepted


def part(name: str, endpoint: str, finishes: list[float], expect: int, seconds: float = 1.0,
         hub: int | None = 0, worst: int | None = None, statuses=None) -> dict:
    """A part as kit.run writes it, around a load.py result made from finish times."""
    import load

    target = load.Target(endpoint, "127.0.0.1", 1, False, "/", seconds, True)
    outcomes = [load.Outcome(0.0, t, 200) for t in finishes]
    result = load.analyse(target, len(finishes), outcomes, max(finishes), 0.0, expect, None)
    if statuses:
        result["statuses"] = statuses
    return {"scenario": name, "endpoint": endpoint, "workers": 1, "hub_blocked": hub,
            "expected_worst_concurrency": worst or expect,
            "document": {"results": [result], "server": {"max_overflow": 10}}}


def test_the_summary_passes_a_row_that_matches_and_names_a_straggler_wave():
    good = summary.judge(BY_NAME["green"], part("green", "postgres", [1.0] * 15 + [2.0] * 15,
                                                expect=15))
    assert good["as_expected"]
    straggled = summary.judge(BY_NAME["green"], part(
        "green", "postgres", [1.0] * 15 + [2.0] * 13 + [3.0] * 2, expect=15))
    assert not straggled["as_expected"]
    assert "a straggler wave" in summary.describe(straggled)


def test_the_hub_count_decides_cooperation():
    serial = [1.0, 2.0, 3.0]
    assert summary.judge(BY_NAME["gevent"], part("gevent", "postgres", serial, 1, hub=6))[
        "as_expected"]
    assert not summary.judge(BY_NAME["gevent"], part("gevent", "postgres", serial, 1, hub=0))[
        "as_expected"]
    assert not summary.judge(BY_NAME["green"], part("green", "postgres", [1.0] * 3, 3, hub=2))[
        "as_expected"]


def test_several_workers_pass_anywhere_in_their_range():
    scenario = BY_NAME["green"]
    one_worker_took_it = part("green", "postgres", [1.0] * 15 + [2.0] * 5, expect=20, worst=15)
    assert summary.judge(scenario, one_worker_took_it)["as_expected"]
    assert summary.judge(scenario, part("green", "postgres", [1.0] * 20, 20, worst=15))[
        "as_expected"]


def test_several_workers_never_turn_too_fast_to_tell_into_as_expected():
    """S = 15 ms, waves of 20 then 2 (a pause of the machine, no limit's pace): the analysis
    cannot tell; a range of worker counts does not make it tell."""
    row = summary.judge(BY_NAME["green"], part("green", "postgres",
                                               [0.02] * 20 + [0.15] * 2, 22, 0.015, worst=15))
    assert row["too_fast"] and row["matches_expectation"] is None and row["as_expected"] is None
    assert "too fast to tell" in summary.describe(row) and "cannot tell" in summary.describe(row)


def test_a_forced_scenario_must_show_refusals():
    direct = BY_NAME["pgbouncer-direct"]
    refused = part("pgbouncer-direct", "postgres", [1.0] * 4, 4, statuses={"200": 2, "503": 2})
    assert summary.judge(direct, refused)["as_expected"]
    assert not summary.judge(direct, part("pgbouncer-direct", "postgres", [1.0] * 4, 4))[
        "as_expected"]


def test_a_refused_scenario_is_one_row_of_the_table(tmp_path):
    (tmp_path / "green.refused").write_text("green: connection budget: ... OVER BUDGET\n")
    (tmp_path / "sync.python.json").write_text(json.dumps(part("sync", "python", [1, 2], 1)))
    rows = [r for s in (BY_NAME["sync"], BY_NAME["green"]) for e in ("python", "postgres")
            if (r := summary.row_for(s, e, tmp_path)) is not None]
    assert [(r["scenario"], r["endpoint"]) for r in rows] == [("sync", "python"),
                                                              ("green", "-")]
    lines = summary.table(rows)
    assert "not run: green: connection budget" in lines[-1]


def test_the_plot_draws_every_row_that_ran(tmp_path):
    rows = [summary.judge(BY_NAME[name], part(name, endpoint, finishes, expect))
            for name, endpoint, finishes, expect in [
                ("sync", "python", [1.0, 2.0, 3.0], 1), ("green", "postgres", [1.0] * 3, 3)]]
    document = {"settings": {"requests": 3, "seconds": 1.0}, "machine": {}, "rows": rows}
    scenarios, endpoints, _ = plot.panels(document)
    assert scenarios == ["sync", "green"] and endpoints == ["python", "postgres"]
    plot.draw(document, tmp_path / "out.png")
    assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gthread_workers_also_hold_more_than_worker_connections():
    """gunicorn 27's gthread worker stops accepting at worker_connections (1000) too."""
    gthread = BY_NAME["gthread"].command(8000, 1500)
    assert gthread[gthread.index("--worker-connections") + 1] == "1600"


def test_the_runs_pass_seconds_on_to_gunicorns_timeout(monkeypatch, tmp_path):
    """kit.run.start builds the command with the run's S: 10 x 20 s needs --timeout >= 230."""
    import kit.run

    seen = []
    monkeypatch.setattr(kit.run, "launch", lambda argv, *a, **k: seen.append(argv))
    kit.run.start("sync", tmp_path / "log", requests=10, seconds=20)
    assert int(seen[0][seen[0].index("--timeout") + 1]) >= 10 * 20 + 30


def test_at_seconds_0_sleep_python_waits_only_on_its_query():
    """/sleep/python/?seconds=0 sleeps not at all: on unpatched gevent its todos query holds
    the loop, so one at a time; on green, up to the pool."""
    assert BY_NAME["gevent"].expected_concurrency("python", 20, 1, ENV, seconds=0) == 1
    assert BY_NAME["green"].expected_concurrency("python", 20, 1, ENV, seconds=0) == 15
    assert BY_NAME["gevent"].expected_concurrency("python", 20, 1, ENV, seconds=1) == 20


def test_a_smeared_pgbouncer_row_shows_the_overlap_not_one_wave_of_n():
    """`./run_all.sh --scenario pgbouncer`: 100 x 1 s through 20 server connections, answers
    smeared from 1 s to 6.03 s. The row said 'waves 100 ... concurrent'; about 17 overlapped."""
    finishes = [1.0 + 5.03 * i / 99 for i in range(100)]
    row = summary.judge(BY_NAME["pgbouncer"], part("pgbouncer", "postgres", finishes, 20))
    assert row["as_expected"] and row["pattern"] == "overlap"
    line = summary.table([row])[-1]
    assert "none tight, ~17 at once" in line and "about 17 at once, as expected ✓" in line
    assert " 100 " not in line.replace("100 × 1 s", ""), line


def kit_imports() -> dict[str, set[str]]:
    """Which kit modules each kit module imports, at the top or inside a function."""
    import ast

    from conftest import ROOT

    names = {path.stem for path in (ROOT / "kit").glob("*.py")}
    graph = {}
    for name in names:
        found = set()
        for node in ast.walk(ast.parse((ROOT / "kit" / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "kit":
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kit."):
                found.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("kit.")}
        graph[name] = found & names - {name}
    return graph


def test_kit_modules_import_in_one_direction():
    """kit/run.py and kit/stream.py imported each other (DURATION and run_stream one way,
    run_load and serve the other, hidden inside a function): no circle, at any depth."""
    graph = kit_imports()
    assert "run" in graph["summary"] and "stream" in graph["run"]  # the graph is read

    def circle(name: str, path: tuple[str, ...]) -> tuple[str, ...] | None:
        if name in path:
            return path[path.index(name):] + (name,)
        return next((found for after in sorted(graph[name])
                     if (found := circle(after, path + (name,)))), None)

    assert [found for name in sorted(graph) if (found := circle(name, ()))] == []
