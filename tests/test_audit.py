"""audit.py's fast layer: causes, where, the judgement, the preflight and the flags, from
made-up stacks and reports (no server)."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT

import audit
from audit import Usage


def frame(file: str, line: int, function: str, own: bool) -> dict:
    return {"file": file, "line": line, "function": function, "own": own}


SITE = "/venv/lib/python3.11/site-packages"
VIEW = frame("shop.py", 57, "list_items", True)
FLASK = frame(f"{SITE}/flask/app.py", 900, "dispatch_request", False)
SQLA = frame(f"{SITE}/sqlalchemy/engine/base.py", 1800, "_execute_context", False)
SQLA2 = frame(f"{SITE}/sqlalchemy/engine/default.py", 940, "do_execute", False)
HOOK = frame("harden.py", 100, "run", True)  # a wrapper SQLAlchemy calls around execute
PG2_CONNECT = frame(f"{SITE}/psycopg2/__init__.py", 122, "connect", False)
NOTHING = {"psycopg2_blocks": False, "psycopg_blocks": False, "host_is_name": False}


def test_where_is_the_innermost_own_frame_past_a_hook_the_library_calls():
    frames = [FLASK, VIEW, SQLA, HOOK, SQLA2]
    assert audit.where_of(audit.innermost_own(frames)) == "shop.py:57 in list_items"
    cpu = [FLASK, VIEW, frame("shop.py", 12, "crunch", True)]  # own code innermost: itself
    assert audit.where_of(audit.innermost_own(cpu)) == "shop.py:12 in crunch"
    assert audit.innermost_own([FLASK, SQLA]) is SQLA  # no own frame: the innermost


GUNICORN = frame(f"{SITE}/gunicorn/workers/base_async.py", 115, "handle_request", False)
MIDDLEWARE = frame("shop.py", 22, "__call__", True)  # the app's WSGI middleware
PG2 = frame(f"{SITE}/psycopg2/__init__.py", 122, "connect", False)
JINJA = frame(f"{SITE}/jinja2/environment.py", 1295, "render", False)
TEMPLATE = frame("templates/authors.html", 3, "<template authors.html>", True)
FILTER = frame(f"{SITE}/jinja2/filters.py", 1018, "do_format", False)


def test_where_is_never_a_library_frame_while_an_own_frame_exists():
    """The review's cases: a middleware outside the view, a lazy load in a template, CPU
    in a template's filter, a connection opened by a helper, a comprehension."""
    view = frame("shop.py", 51, "count", True)
    behind = [GUNICORN, MIDDLEWARE, FLASK, view, SQLA, SQLA2]
    assert audit.where_of(audit.innermost_own(behind, True)) == "shop.py:51 in count"
    lazy = [GUNICORN, FLASK, VIEW, JINJA, TEMPLATE, JINJA, SQLA, SQLA2]
    assert audit.innermost_own(lazy, True) is TEMPLATE
    in_filter = [GUNICORN, FLASK, VIEW, JINJA, TEMPLATE, FILTER]
    assert audit.innermost_own(in_filter) is TEMPLATE
    helper = frame("shop.py", 15, "conn", True)
    assert audit.innermost_own([GUNICORN, MIDDLEWARE, FLASK, VIEW, helper, PG2], True) is helper
    listcomp = frame("shop.py", 34, "<listcomp>", True)
    assert audit.where_of(audit.innermost_own([FLASK, VIEW, listcomp])) == \
        "shop.py:34 in list_items"  # the comprehension's line, its function's name
    only_hooks = [FLASK, SQLA, HOOK, SQLA2]  # nothing else of the app's: the hook, not SQLA2
    assert audit.innermost_own(only_hooks) is HOOK


def test_a_template_frame_gets_the_templates_line_and_name():
    class Template:
        name = "big.html"

        def get_corresponding_lineno(self, line):
            return {23: 1}.get(line, line)

    class Code:
        co_filename, co_name = "/app/templates/big.html", "root"
    assert audit.jinja_frame(Template(), Code, 23) == ("/app/templates/big.html", 1,
                                                       "<template big.html>")
    Code.co_name = "block_content"
    assert audit.jinja_frame(Template(), Code, 23)[2] == "<template big.html, block content>"
    fix = audit.fix_for("cpu", "<template big.html>")[1]
    assert "template big.html" in fix and "()" not in fix


MOVED = {"moved": True, "wall_ms": 6.0, "late_ms": 5.0, "gil_wait_ms": 2.0, "hub_ms": 5.0,
         "others_ms": 0.0}
STILL = dict(MOVED, moved=False, wall_ms=2.2, late_ms=0.1, hub_ms=2.0)  # the GIL came back


def test_classify_names_the_driver_dns_a_c_call_or_python():
    assert audit.classify([FLASK, VIEW, SQLA, PG2_CONNECT], STILL,
                          dict(NOTHING, host_is_name=True, host="db.internal"))[0] == "dns"
    assert audit.classify([FLASK, VIEW, SQLA, PG2_CONNECT], STILL, NOTHING)[0] == \
        "c_call"  # an address: connecting, not resolving
    pg3 = frame(f"{SITE}/psycopg/cursor.py", 113, "execute", False)
    assert audit.classify([VIEW, pg3], STILL, dict(NOTHING, psycopg_blocks=True))[0] \
        == "psycopg3"
    dns = frame("/usr/lib/python3.11/socket.py", 960, "getaddrinfo", False)
    assert audit.classify([VIEW, dns], STILL, NOTHING)[0] == "dns"


def test_a_c_call_is_told_from_python_and_the_threadpool_advised_only_when_it_helps():
    """The frame stood still while its thread computed and the monitor got the GIL back at
    once: a C call that released it (a thread can run it). The frame moved, or stood still
    while the monitor waited for the GIL (a Python loop gives the GIL up at the same
    instruction each time): CPU, for a process. Still, no CPU anywhere: a wait in C."""
    cause, detail = audit.classify([VIEW], STILL, NOTHING)
    assert cause == "c_call" and detail.startswith("computing")
    cause, detail = audit.classify([VIEW], dict(STILL, hub_ms=0.0), NOTHING)
    assert cause == "c_call" and detail.startswith("waiting")
    assert audit.classify([VIEW], MOVED, NOTHING)[0] == "cpu"
    python_loop = dict(STILL, late_ms=4.9, wall_ms=6.0, hub_ms=5.5)  # same instruction
    assert audit.classify([VIEW], python_loop, NOTHING)[0] == "cpu"
    idle = dict(python_loop, hub_ms=0.1)  # late, and nothing ran: the machine was busy
    assert audit.classify([VIEW], idle, NOTHING)[0] is None
    held = dict(MOVED, starved={"ms": 120.0, "hub": 0.95, "others": 0.0})  # C kept the GIL
    cause, detail = audit.classify([VIEW], held, NOTHING)
    assert cause == "cpu" and "kept the GIL 120 ms" in detail
    cause, _ = audit.classify([VIEW], dict(MOVED, starved={"ms": 120.0, "hub": 0.02,
                                                          "others": 0.9}), NOTHING)
    assert cause == "gil"
    waiting_for_gil = dict(STILL, hub_ms=0.0, others_ms=2.0)
    assert audit.classify([VIEW], waiting_for_gil, NOTHING)[0] == "gil"
    gevent_send = frame(f"{SITE}/gevent/_socketcommon.py", 700, "sendall", False)
    assert audit.classify([VIEW, gevent_send], STILL, NOTHING)[0] is None
    for cause in ("cpu", "gil"):
        assert "thread" in audit.fix_for(cause)[1] and "threadpool" not in \
            audit.fix_for(cause)[1]
    assert "threadpool" in audit.fix_for("c_call")[1]


def sample(cause, computing=False, where="shop.py:57 in list_items"):
    return {"cause": cause, "computing": computing, "where": where, "frames": [VIEW],
            "function": "list_items", "detail": ""}


def test_a_stretch_takes_the_cause_its_cpu_allows():
    """Finding 1: a hold whose loop thread hardly computed while other threads did is the
    loop waiting for their GIL, not a pause; a pause is little CPU anywhere. A sample's
    cause counts only when the CPU fits it."""
    enough = 0.01
    assert audit.stretch_cause([], 0.002, 0.120, enough) == ("gil", None)
    assert audit.stretch_cause([], 0.002, 0.001, enough) == ("paused", None)
    assert audit.stretch_cause([], 0.090, 0.001, enough) == ("unknown", None)
    assert audit.stretch_cause([sample("cpu")], 0.002, 0.001, enough)[0] == "paused"
    assert audit.stretch_cause([sample("cpu")], 0.080, 0.0, enough)[0] == "cpu"
    assert audit.stretch_cause([sample("c_call")], 0.001, 0.0, enough)[0] == "c_call"  # a wait
    assert audit.stretch_cause([sample("c_call"), sample("cpu")], 0.08, 0.0, enough)[0] == "cpu"
    waiting = sample("gil", where="shop.py:60 in in_pool")  # where the request waited
    assert audit.stretch_cause([waiting], 0.002, 0.2, enough) == ("gil", waiting)
    assert audit.stretch_cause([sample(None)], 0.002, 0.2, enough)[0] == "gil"
    assert audit.stretch_cause([sample("psycopg2")], 0.0, 0.0, enough)[0] == "psycopg2"
    assert audit.late_kind(0.011, 0.120, enough) == "other_thread"
    assert audit.late_kind(0.030, 0.0, enough) == "loop_held"
    assert audit.late_kind(0.001, 0.001, enough) == "paused"


def report(requests: int, long_requests: int, *findings: dict, stalled: int = 0) -> dict:
    return {"requests": requests, "long_requests": long_requests, "stalled_requests": stalled,
            "held_ms": {"total": 50.0, "max": 30.0}, "probe_late_ms": {"max": 31.0},
            "findings": list(findings)}


def found(cause: str, where: str = "shop.py:57 in list_items", ms: float = 1.0,
          function: str | None = "list_items") -> dict:
    return {"cause_id": cause, "where": where, "function": function, "count": 3, "ms": ms,
            "max_ms": ms, "detail": "", "stack": None}


def test_a_driver_wait_blocks_however_short_a_hold_only_when_most_requests_held():
    short = audit.judge(report(11, 0, found("psycopg2", ms=0.4)))
    assert short["blocks"] and short["cause_id"] == "psycopg2"
    assert short["where"] == "shop.py:57 in list_items" and "patch_psycopg" in short["fix"]
    once = audit.judge(report(11, 2, found("cpu", ms=60)))  # the machine paused it twice
    assert once["blocks"] is False and once["findings"][0]["counted"] is False
    most = audit.judge(report(11, 6, found("cpu", "shop.py:12 in crunch", 600, "crunch")))
    assert most["blocks"] and most["cause_id"] == "cpu" and "crunch()" in most["fix"]
    mixed = audit.judge(report(11, 11, found("cpu", ms=500), found("unknown", "?", 90, None)))
    assert mixed["cause_id"] == "cpu"
    assert [f["counted"] for f in mixed["findings"]] == [True, False]
    assert audit.judge(None)["blocks"] is None


def test_the_loop_waiting_for_a_threadpools_gil_blocks():
    """Finding 1: the threadpool's fix followed, the loop still stalls behind the thread's
    GIL: by long stretches, or by the probe waking late while most requests were in flight,
    with no long stretch of theirs at all."""
    pool = found("gil", "shop.py:60 in in_pool", 300, "in_pool")
    assert audit.judge(report(6, 4, pool))["blocks"]
    by_probe = audit.judge(report(6, 0, pool, stalled=6))
    assert by_probe["blocks"] and by_probe["cause_id"] == "gil"
    assert "process" in by_probe["fix"]
    assert audit.judge(report(6, 0, pool, stalled=2))["blocks"] is False
    paused = audit.judge(report(6, 5, found("paused", "?", 300, None)))
    assert paused["blocks"] is False and "busy machine" in paused["note"]


def test_exit_status_blocks_first_then_failures_then_not_reached():
    assert audit.exit_status([{"blocks": False}]) == 0
    assert audit.exit_status([{"blocks": False}, {"reached": False}]) == 3
    assert audit.exit_status([{"reached": False}, {"error": "answered 404"}]) == 2
    assert audit.exit_status([{"error": "x"}, {"blocks": True}]) == 1
    for text in (audit.__doc__, (ROOT / "docs" / "audit.md").read_text(),
                 (ROOT / "README.md").read_text()):  # finding 7: 2 covers a route not audited
        assert "could not be audited" in " ".join(text.split()), text[:80]


def test_not_reached_says_where_it_was_sent_and_the_flag():
    assert "/auth/login" in audit.not_reached_why(302, {"Location": "/auth/login"})
    assert "--login" in audit.not_reached_why(302, {"Location": "/auth/login"})
    assert "Authorization: Bearer" in audit.not_reached_why(401, {"WWW-Authenticate": "Bearer"})
    assert "not enough" in audit.not_reached_why(403, {})


def test_a_plain_redirect_is_not_called_a_login_wall():
    """Finding 8: a view that answers redirect('/home/') ran; a 308 to the path with its
    slash says which --route to give."""
    slash = audit.not_reached_why(308, {"Location": "http://127.0.0.1:1/todos/"}, "/todos")
    assert "--route /todos/" in slash and "none of its code ran" not in slash
    home = audit.not_reached_why(302, {"Location": "/home/"}, "/old/")
    assert "its view answered a redirect" in home and "--route /home/" in home
    assert "--login" not in home and "none of its code ran" not in home
    login = audit.not_reached_why(302, {"Location": "/signin?next=/x"}, "/x", "/signin")
    assert "none of its code ran" in login and "--login" in login


def test_the_summary_counts_in_good_english():
    one = audit.summary([{"reached": False}, {"blocks": False}], 1.0, 20, 5)
    assert "1 route not reached" in one and "0 of 1 audited route blocks" in one


def test_a_password_never_shows_in_a_database_url():
    """Finding 11: a password with an @ in it, or in the query."""
    assert audit.shown_url("postgresql://u:sec@ret@127.0.0.1:1/x") == \
        "postgresql://u:***@127.0.0.1:1/x"
    assert audit.shown_url("postgresql://app@db/app?password=s3&sslmode=require") == \
        "postgresql://app@db/app?password=***&sslmode=require"
    assert audit.shown_url("postgresql://db/app") == "postgresql://db/app"


def test_an_interpreter_that_is_not_python_is_one_line():
    import asyncio

    with pytest.raises(Usage) as caught:
        asyncio.run(audit.app_environment("/bin/sh", str(ROOT), ""))
    assert "is not a Python 3 the audit can run" in str(caught.value)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 200


def checks(versions: dict = (), url: str = "", found: dict = (), **env) -> list:
    versions = {name: None for name in audit.DISTRIBUTIONS} | dict(versions)
    modules = {"psycopg2": True, "psycopg": True, "psycogreen": True} | dict(found)
    environment = {"python": "3.11.7", "executable": "python", "free_threaded": False,
                   "versions": versions, "url": audit.url_driver(url, versions, modules), **env}
    return audit.preflight_checks(environment, None)


def said(lines: list, mark: str) -> str:
    return " | ".join(text for m, text in lines if m == mark)


def test_preflight_names_known_bad_versions_and_interpreters():
    assert "issue 527" in said(checks({"psycopg": "3.1.10"}), "bad")
    assert said(checks({"psycopg": "3.1.14"}), "bad") == ""
    assert "eventlet" in said(checks({"eventlet": "0.36.1"}), "warn")
    assert "free-threaded" in said(checks(free_threaded=True), "bad")


def test_preflight_reads_the_database_url_as_the_installed_sqlalchemy_would():
    lines = checks({"SQLAlchemy": "2.1.9"}, "postgresql://app@db/app", {"psycopg": False})
    assert "psycopg, which is NOT installed" in said(lines, "bad")
    lines = checks({"SQLAlchemy": "2.0.40"}, "postgresql://app@db/app", {"psycogreen": False})
    assert "to psycopg2, which is installed" in said(lines, "info")
    assert "every query will hold the loop" in said(lines, "bad")
    assert "postgresql://" in said(checks({"SQLAlchemy": "2.1.9"}, "postgres://x@y/z"), "bad")


def test_data_belongs_to_the_route_or_login_before_it():
    routes, login = audit.pair_data([("route", "/a"), ("route", "POST /api/tokens"),
                                     ("data", '{"user": "a"}'), ("login", "/auth/login"),
                                     ("data", "username=a&password=b")])
    assert [r.label for r in routes] == ["/a", "POST /api/tokens"]
    assert routes[1].body() == (b'{"user": "a"}', "application/json")
    assert login.path == "/auth/login" and login.body()[1] == \
        "application/x-www-form-urlencoded"
    for bad in ([("data", "a=1")], [("login", "/l")], [("route", "/a"), ("data", "1"),
                                                        ("data", "2")],
                [("route", "FETCH /a")], [("route", "a")]):
        with pytest.raises(Usage):
            audit.pair_data(bad)


def test_gunicorn_args_lose_their_config_which_the_audit_loads_itself(tmp_path):
    (tmp_path / "their.conf.py").write_text("workers = 4\n")
    assert audit.split_gunicorn_args("--preload -c their.conf.py", str(tmp_path)) == \
        (["--preload"], str(tmp_path / "their.conf.py"))
    assert audit.split_gunicorn_args("--config=their.conf.py", str(tmp_path))[1] == \
        str(tmp_path / "their.conf.py")
    assert audit.split_gunicorn_args("", str(tmp_path)) == ([], None)
    (tmp_path / "gunicorn.conf.py").write_text("")  # what gunicorn reads by itself
    assert audit.split_gunicorn_args("", str(tmp_path))[1] == str(tmp_path / "gunicorn.conf.py")
    with pytest.raises(Usage):
        audit.split_gunicorn_args("-c missing.py", str(tmp_path))


def test_the_generated_config_chains_the_apps_hooks(tmp_path):
    their = tmp_path / "their.conf.py"
    their.write_text("workers = 4\ncalls = []\ndef post_fork(server, worker):\n"
                     "    calls.append('theirs')\n")
    settings = audit.gunicorn_settings(str(their))
    assert settings["workers"] == 4 and settings["control_socket_disable"] is True
    settings["post_fork"](None, None)
    assert settings["calls"] == ["theirs"]
    assert {"post_worker_init", "post_request"} <= set(settings)


def test_start_failure_picks_the_line_that_says_why():
    log = ["[INFO] Booting worker with pid: 7", "Traceback (most recent call last):",
           '  File "x.py", line 1', "ModuleNotFoundError: No module named 'nope'",
           "[2026-01-01 00:00:00 +0000] [7] [INFO] Worker exiting (pid: 7)"]
    assert audit.start_failure(log) == "ModuleNotFoundError: No module named 'nope'"
    assert "Failed to find attribute 'x'" in audit.start_failure(
        ["[2026-01-01 00:00:00 +0000] [9] [ERROR] Failed to find attribute 'x' in 'shop'."])


def test_stacks_fold_library_frames_and_keep_the_innermost():
    lines = audit.stack_lines([FLASK, dict(VIEW, code="items = query()"), SQLA, HOOK, SQLA2])
    assert lines[0].strip() == "… 1 frame in flask"
    assert "» shop.py:57 in list_items" in lines[1] and "items = query()" in lines[2]
    assert lines[-1].strip().endswith("do_execute   (innermost)")


@pytest.mark.parametrize("args, said", [
    (["shop"], "give MODULE:APP"),
    (["shop:app", "--requests", "0"], "--requests 0"),
    (["shop:app", "--threshold", "1"], "at least 2 ms"),
    (["shop:app", "--chdir", "/no/such/folder"], "no such folder"),
    (["shop:app", "--data", "a=1"], "right after the --route"),
    (["shop:app", "--header", "nocolon"], "'Name: value'"),
    (["shop:app", "--json", "/no/such/folder/x.json"], "does not exist"),  # before the audit
    (["shop:app", "--compare", "--route", "/a", "--mix", "1:/b"], "not an audited route"),
    (["shop:app", "--compare", "--mix", "9"], "give WEIGHT:ROUTE"),
])
def test_bad_flags_are_one_line_and_exit_2(args, said):
    done = subprocess.run([sys.executable, "audit.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2 and said in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_the_worker_side_loads_without_ssl_or_the_client_libraries():
    """The generated config loads this file into gunicorn's master before gevent patches:
    it must not import ssl (or http.client, which does)."""
    code = ("import importlib.util, sys\n"
            "spec = importlib.util.spec_from_file_location('audit_worker', sys.argv[1])\n"
            "m = importlib.util.module_from_spec(spec); sys.modules['audit_worker'] = m\n"
            "spec.loader.exec_module(m)\n"
            "print(sorted(k for k in ('ssl', 'http.client', 'asyncio', 'load', 'gevent') "
            "if k in sys.modules))")
    done = subprocess.run([sys.executable, "-I", "-c", code, str(ROOT / "audit.py")],
                          capture_output=True, text=True, timeout=30)
    assert json.loads(done.stdout.replace("'", '"')) == [], done.stderr


def test_the_host_libpq_must_resolve_from_either_form_of_connection_string():
    assert audit.dsn_host("postgresql://app:pw@db.kit:5432/app")["host_is_name"]
    assert not audit.dsn_host("postgresql://app@db.kit/app?hostaddr=10.0.0.2")["host_is_name"]
    assert not audit.dsn_host("postgresql://app@127.0.0.1:5432/app")["host_is_name"]
    assert audit.dsn_host("user=app host=db.internal dbname=app")["host"] == "db.internal"
    assert not audit.dsn_host("host=/var/run/postgresql dbname=app")["host_is_name"]


def test_run_all_passes_audit_flags_on_from_the_callers_folder(tmp_path):
    done = subprocess.run([str(ROOT / "run_all.sh"), "--audit", "shop:app", "--chdir",
                           "missing"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--chdir missing: no such folder" in done.stderr, done.stderr


def steps(*rates_ok) -> list[dict]:
    return [{"rate": rate, "ok": ok} for rate, ok in rates_ok]


def worker(name: str, *rates_ok) -> dict:
    return {"worker": name, "sustained_rate": audit.sustained_rate(steps(*rates_ok)),
            "rates": steps(*rates_ok)}


def test_sustained_rate_is_the_highest_pass_below_the_first_failure():
    assert audit.sustained_rate(steps((2, True), (4, True), (8, False), (5.7, True))) == 5.7
    assert audit.sustained_rate(steps((10, True), (20, False), (40, True))) == 10  # not 40
    assert audit.sustained_rate(steps((2, False), (4, False))) is None  # fails at every rate
    assert audit.sustained_rate(steps((2, True), (4, True))) == 4


def test_the_recommendation_needs_a_worker_to_beat_sync_by_more_than_noise():
    waits = [worker("sync", (2, True), (4, False)), worker("gthread", (8, True), (16, False)),
             worker("gevent", (64, True), (128, False))]
    assert audit.recommend(waits)[0] == "gevent" and "32.0 x sync" in audit.recommend(waits)[1]
    cpu = [worker("sync", (32, True), (64, False)), worker("gthread", (32, True), (64, False)),
           worker("gevent", (45.3, True), (64, False))]  # within 1.5 x: noise, not a win
    chosen, why = audit.recommend(cpu)
    assert chosen == "sync" and why.startswith("CPU-bound")
    sync_fails = [worker("sync", (2, False)), worker("gevent", (2, True), (4, False))]
    assert audit.recommend(sync_fails) == (
        "gevent", "gevent sustained 2/s, where sync sustained none of the rates; each route's "
                  "p99 within its SLO")
    none = [worker(w, (2, False)) for w in audit.WORKERS]  # an SLO that no rate meets
    assert audit.recommend(none)[0] is None and "--slo" in audit.recommend(none)[1]
    tie = [worker("sync", (2, True), (4, False)), worker("gthread", (32, True), (64, False)),
           worker("gevent", (32, True), (64, False))]
    assert audit.recommend(tie)[0] == "gthread"  # on a tie of limits found, the simpler


def test_no_winner_and_no_cpu_bound_on_rates_no_worker_failed():
    """Finding 5: a rate every worker passed is a lower bound, not a limit."""
    sleeping = [worker(w, (2, True), (4, True)) for w in audit.WORKERS]
    chosen, why = audit.recommend(sleeping)  # SLEEP_SECONDS=0.05 --rates 2,4
    assert chosen is None and "every worker sustained every rate tried" in why
    assert "CPU-bound" not in why and "--rates" in why
    ceiling = [worker("sync", (2, True), (8, False)), worker("gthread", (2, True), (8, True),
                                                            (32, True)),
               worker("gevent", (2, True), (8, True), (32, True))]  # --rates 2,8,32
    chosen, why = audit.recommend(ceiling)
    assert chosen is None and "gthread and gevent each" in why and "≥ 32/s" in why
    gevent_open = [worker("sync", (2, True), (4, False)), worker("gthread", (32, True),
                                                               (64, False)),
                   worker("gevent", (512, True))]
    assert audit.recommend(gevent_open) == (
        "gevent", "gevent sustained ≥ 512/s, 256.0 x sync's 2/s, each route's p99 within its "
                  "SLO")
    unknown = [worker("sync", (4, True), (5, False)), worker("gthread", (4, True), (5, False)),
               worker("gevent", (4, True), (5, True), (100, False))]
    chosen, why = audit.recommend(unknown)  # gevent fails somewhere in 5..100: cannot tell
    assert chosen is None and "gevent" in why and "CPU-bound" not in why
    assert audit.shown_rate(gevent_open[2]) == "≥ 512/s"
    assert audit.shown_rate(gevent_open[0]) == "2/s"


def test_the_default_ladder_doubles_from_what_the_workers_serve_alone():
    assert audit.ladder(0.3, 1, 64) == [1, 2, 4, 8, 16, 32, 64]
    assert audit.ladder(0.02, 1, 100) == [16, 32, 64]
    assert audit.ladder(0.02, 4, 100)[0] == 64


def test_a_hold_without_a_stack_or_cpu_is_the_machine_pausing_the_process():
    route = audit.Route("/explore")
    route.requests = 4
    route.holds = [(1, 0, 0.1, 0.004, 0.0), (2, 0, 0.1, 0.003, 0.001), (3, 0, 0.2, 0.19, 0.0),
                   (4, 0, 0.15, 0.002, 0.14)]
    found = {f["cause_id"]: f["count"] for f in route.resolved(0.02)}
    assert found == {"paused": 2, "unknown": 1, "gil": 1}
    # the probe's wait for another thread's GIL, at the line where the request waits: a
    # hold without a stack of the app's (it was still in Flask's code) joins it
    pool = frame("shop.py", 60, "in_pool", True)
    route.finding("gil", "shop.py:60 in in_pool", 0.2, [FLASK, pool], "", "in_pool")
    route.samples[(5, 0)] = [dict(sample("gil", where="flask/app.py:900 in dispatch_request"),
                                  frames=[FLASK])]
    route.holds = [(4, 0, 0.15, 0.002, 0.14), (5, 0, 0.1, 0.001, 0.09)]
    assert [(f["cause_id"], f["where"], f["count"]) for f in route.resolved(0.02)] == \
        [("gil", "shop.py:60 in in_pool", 3)]
    paused = audit.judge(report(4, 4, found_as("paused")))
    assert paused["blocks"] is False


def found_as(cause: str) -> dict:
    return found(cause, "?", 100)


def test_a_wrapper_a_library_calls_around_the_driver_is_looked_past_for_its_waits():
    wrapper = frame("harden.py", 123, "within", True)  # SQLAlchemy calls it; it calls psycopg2
    frames = [FLASK, VIEW, SQLA, wrapper]
    assert audit.where_of(audit.innermost_own(frames, True)) == "shop.py:57 in list_items"
    helper = frame("queries.py", 9, "latest", True)  # the view's own helper: kept
    assert audit.innermost_own([FLASK, VIEW, helper, SQLA, wrapper], True) is helper
    teardown = frame("shop.py", 80, "close_session", True)  # Flask calls it, nothing own outside
    assert audit.innermost_own([FLASK, teardown, SQLA, wrapper], True) is teardown
    cpu = [FLASK, VIEW, frame("jinja2/runtime.py", 1, "call", False),
           frame("filters.py", 5, "slugify", True)]  # a template filter computing: itself
    assert audit.innermost_own(cpu)["function"] == "slugify"
    inner = frame("harden.py", 90, "run", True)  # the wrapper's own helper, inside it
    assert audit.innermost_own([FLASK, VIEW, SQLA, inner, wrapper], True) is VIEW
