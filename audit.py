#!/usr/bin/env python3
"""Name the routes of YOUR app that block gevent's event loop, the line, why, and the fix.

    python audit.py yourapp:app                         # every GET route without arguments
    python audit.py 'yourapp:create_app()' --chdir ~/src/yourapp --json audit.json
    python audit.py yourapp:app --route /users/1 --route 'POST /api/tokens' --data 'user=a'
    python audit.py yourapp:app --python ~/src/yourapp/.venv/bin/python \\
        --login /auth/login --data 'username=demo&password=demo'
    python audit.py yourapp:app --compare                # sync, gthread, gevent: which to run

It runs the app for real: gunicorn -k gevent, one worker, from DIR with your environment, and
a database: $DATABASE_URL, or (inside the kit) a throwaway PostgreSQL. Each route gets a
warm-up request, then N at once (load.py's burst and its analysis). Inside the worker, a
greenlet tracer times every stretch a request keeps the loop, with the CPU the loop's thread
and the other threads used meanwhile; a monitor thread of the audit's own takes the stack of
whatever holds the loop while it holds it, and watches it a few ms (does it move? does the
monitor get the GIL back?); a probe greenlet measures how late it wakes; and the database
driver's wait is timed, so a query that holds the loop for a fraction of a millisecond is
still seen. A worker gunicorn kills for holding its loop past --timeout writes down where.

Standard library only, like load.py, which it needs beside it (copy both). Its worker-side
part is this same file, handed to the app's interpreter as a gunicorn config (`--python`).
Preflight and findings go to stdout, progress to stderr. Exit status: 0 when no route
blocks, 1 when one does, 3 when none does but some were not reached (a login, 401, 403, a
redirect), 2 on bad usage, when the app or its database cannot be started, or when a route
could not be audited (it answered 404 or 5xx, or not at all; 2 then takes precedence over
3, never over 1), 130 when interrupted (Ctrl-C, SIGTERM); nothing it started is left
running. --compare: 0 with a recommendation, 1 without one, 2 as above.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time

VERSION = "1"
THRESHOLD_MS = 20.0  # a request that keeps the loop this long at a stretch holds it
PROBE_EVERY = 0.010  # s between the probe greenlet's wake-ups (at 5 ms, with the monitor at
# threshold / 4, the instrumentation cost /todos/ 14.2 % of its requests/s; at 10 ms, with the
# monitor at threshold / 2, 8.8 to 11.3 %: bench/audit_cost.py, docs/audit.md)
SAMPLES = 5  # stacks the monitor takes of one stretch at most (the most common one counts)
LOOK_MS = 5  # ms the monitor watches a sampled frame at most (waiting in C: it stays still)
HERE = os.path.dirname(os.path.realpath(__file__))
CONTROL = "/__audit__/"  # the worker answers PATH_INFO under CONTROL + token itself
DOCS = "docs/"
PREPATCH_MODULES = ("ssl", "psycopg", "psycopg2", "psycopg2.extensions", "urllib3",
                    "requests", "grpc", "redis")

# ------------------------------------------------------------------------- causes and fixes
# One entry per cause: what it is, the one change that fixes it, and the page that proves it.
CAUSES = {
    "psycopg2": ("psycopg2 with no wait callback: libpq waits in C",
                 "call psycogreen's patch_psycopg() right after monkey.patch_all(), at the top "
                 "of the module gunicorn loads",
                 "fix-your-app.md#1-the-preamble-diff-app_syncpy-app_greenpy"),
    "psycopg3": ("psycopg 3 waiting in C: it was imported before gevent patched",
                 "monkey.patch_all() before anything imports psycopg: the first lines of the "
                 "module gunicorn loads (under --preload the master imports it)",
                 "traps.md"),
    "dns": ("a host name resolved in C (libpq resolves it before any wait callback)",
            "give libpq the address too: hostaddr=IP in the URL (keep host= for TLS), or use "
            "psycopg 3, which resolves with gevent's resolver",
            "traps.md"),
    "cpu": ("CPU in the request: it computes without yielding (Python, or C that keeps the "
            "GIL)",
            "move {subject} out of the request, into a process (concurrent.futures."
            "ProcessPoolExecutor, a task queue), or serve this route from sync workers; not "
            "into a thread: it needs the GIL the loop needs",
            "audit.md#cpu-in-the-request"),
    "c_call": ("a C call that releases the GIL but not the loop",
               "run it in gevent's threadpool (gevent.get_hub().threadpool.apply(fn, args)) "
               "or use a cooperative library",
               "audit.md#a-c-call-that-releases-the-gil"),
    "gil": ("another thread of the worker held the GIL: the loop waited for it",
            "run that work in a process (concurrent.futures.ProcessPoolExecutor, a task "
            "queue), not in a thread: Python code, and C code that keeps the GIL, stall the "
            "loop from any thread of the process",
            "audit.md#another-thread-held-the-gil"),
    "timeout": ("held the loop past gunicorn's --timeout: the worker was killed",
                "make what runs at this line cooperative (a patched or gevent-aware library), "
                "or move it out of the request; a larger --timeout only hides it",
                "audit.md#held-past-gunicorns---timeout"),
    "unknown": ("the loop was held, computing, but no stack was caught",
                "lower --threshold, or run gevent's monitor (GEVENT_MONITOR_THREAD_ENABLE)",
                "audit.md#unknown-and-paused"),
    "paused": ("the process was not running (the machine was busy): not the app's doing",
               "nothing in the app; rerun the audit on a quieter machine",
               "audit.md#unknown-and-paused"),
}
DRIVER_CAUSES = ("psycopg2", "psycopg3")
SHORT_FIX = {"psycopg2": "patch_psycopg()", "psycopg3": "patch before import",
             "dns": "hostaddr=", "cpu": "a process, not a thread", "c_call": "threadpool",
             "gil": "a process, not a thread", "timeout": "see its stack",
             "unknown": "--threshold", "paused": "rerun"}
# the packages of the database stack: a frame of the app's that one of them calls in the
# middle of its own work (a wrapper around execute, an event listener) is looked past
DATABASE_STACK = ("sqlalchemy", "psycopg2", "psycopg", "flask_sqlalchemy", "psycogreen")
INNER_CODE = ("<listcomp>", "<dictcomp>", "<setcomp>", "<genexpr>", "<lambda>")


def fix_for(cause: str, function: str | None = None) -> tuple[str, str, str]:
    """(title, fix, link) of a cause; the CPU fix names the function (or the template)."""
    title, fix, link = CAUSES.get(cause, CAUSES["unknown"])
    if function and function.startswith("<template"):
        subject = f"the work of the {function.strip('<>')} (render less, or precompute it)"
    else:
        subject = f"{function}()" if function and not function.startswith("<") else \
            "the computation"
    return title, fix.format(subject=subject), DOCS + link


def library_package(filename: str) -> str:
    """The top-level package of a library file: .../site-packages/sqlalchemy/orm/x.py ->
    sqlalchemy; a standard-library file -> its module name."""
    if filename.startswith("<"):
        return "generated code"
    parts = filename.replace("\\", "/").split("/")
    for marker in ("site-packages", "dist-packages"):
        if marker in parts and parts.index(marker) + 1 < len(parts):
            return parts[parts.index(marker) + 1].removesuffix(".py")
    return parts[-1].removesuffix(".py") if parts else "?"


def classify(frames: list[dict], motion: dict, drivers: dict) -> tuple[str | None, str]:
    """The cause of a held loop from one sample: its stack (outermost first, each frame
    {"file", "line", "function", "own"}), what the audit's monitor saw while it watched the
    innermost frame (motion: did it move; over the watch, its wall time, how late the
    monitor's sleeps returned at the most, the lateness that means it waited for the GIL,
    and the CPU of the loop's thread and of the other threads: {"moved", "wall_ms",
    "late_ms", "gil_wait_ms", "hub_ms", "others_ms"}; and, when the monitor itself could
    not run for a while before it, "starved": {"ms", "hub", "others"}, the shares of that
    time the loop's thread and the other threads computed) and the drivers' state
    ({"psycopg2_blocks", "psycopg_blocks", "host_is_name", "host"}). Returns (cause,
    detail); cause None when the sample cannot tell."""
    inner = frames[-6:]
    packages = [library_package(f["file"]) for f in inner if not f["own"]]
    in_connect = any(f["function"] in ("connect", "_connect", "connect_start", "wait_conn")
                     for f in inner)
    if any(f["function"] in ("getaddrinfo", "gethostbyname", "gethostbyname_ex")
           for f in inner):
        return "dns", "getaddrinfo outside gevent's resolver"
    for package, driver, blocks in (("psycopg2", "psycopg2", "psycopg2_blocks"),
                                    ("psycopg", "psycopg3", "psycopg_blocks")):
        if package in packages:
            if in_connect and drivers.get("host_is_name") and package == "psycopg2":
                return "dns", f"{package}.connect: libpq resolving {drivers.get('host')!r}"
            if drivers.get(blocks):
                return driver, f"{package} waiting in C"
    top = frames[-1] if frames else None
    name = top["function"] if top else "?"
    starved = motion.get("starved")
    if starved:  # Python gives up the GIL every few ms; only C code keeps it this long
        if starved["hub"] >= 0.5:
            return "cpu", (f"C code kept the GIL {starved['ms']:.0f} ms (the audit's monitor "
                           f"thread could not run), then returned to {name}")
        if starved["others"] >= 0.5:
            return "gil", (f"another thread kept the GIL {starved['ms']:.0f} ms (the audit's "
                           f"monitor thread could not run either)")
    wall = max(motion["wall_ms"], 1e-3)
    computing = motion["hub_ms"] >= 0.5 * wall
    if not motion["moved"] and motion["others_ms"] >= 0.5 * wall and not computing:
        return "gil", "this thread stood still while another thread of the process computed"
    if top is not None and not top["own"] and library_package(top["file"]) == "gevent":
        return None, "in gevent's own code"  # a send that would yield if it had to
    if motion["moved"]:
        return "cpu", f"Python code running in {name}"
    if motion["late_ms"] >= motion["gil_wait_ms"]:  # the monitor waited for the GIL
        # a Python loop, stopped at the same instruction each time it gave the GIL up
        return ("cpu", f"Python code running in {name}") if computing else \
            (None, "the process hardly ran while the monitor watched (a busy machine)")
    if computing:
        return "c_call", (f"computing in C with the GIL released (the audit's monitor got "
                          f"it back at once), called from {name}")
    return "c_call", f"waiting in C (a sleep or I/O gevent did not patch), called from {name}"


def stretch_cause(samples: list[dict], hub: float, others: float,
                  enough: float) -> tuple[str, dict | None]:
    """The cause of one stretch over the threshold, from the monitor's samples of it
    ({"cause", "computing", "frames", ...}) and what the process computed meanwhile: the
    loop's thread (hub) and the other threads (others), in seconds. A cause must fit that
    CPU: computing needs `enough` CPU of the loop's thread, another thread holding the GIL
    needs enough of theirs, a wait needs neither. Returns (cause, the sample that says so)."""
    usable = [s for s in samples if s["cause"] is not None]
    driver = [s for s in usable if s["cause"] in DRIVER_CAUSES + ("dns",)]
    fitting = driver or [s for s in usable if fits(s, hub, others, enough)]
    if fitting:
        votes: dict = {}
        for sample in fitting:
            votes.setdefault((sample["cause"], sample["where"]), []).append(sample)
        picked = max(votes.values(), key=len)
        return picked[0]["cause"], picked[0]
    kind = late_kind(hub, others, enough)
    if kind == "other_thread":
        return "gil", (samples or [None])[0]  # its stack shows where the request waited
    return ("unknown" if kind == "loop_held" else "paused"), None


def fits(sample: dict, hub: float, others: float, enough: float) -> bool:
    cause = sample["cause"]
    if cause == "gil":
        return others >= enough
    if cause == "cpu" or (cause == "c_call" and sample.get("computing")):
        return hub >= enough
    return hub < enough  # waiting in C


def innermost_own(frames: list[dict], inside_database: bool = False) -> dict | None:
    """The innermost frame in the app's own files, looking past the app's frames that the
    database stack calls in the middle of its own work (between two of its frames: a
    wrapper around execute such as harden()'s, an event listener): the line to change is
    where the app called the database. `inside_database`: the stack ends inside the
    database's C code (a driver's wait). A comprehension is named by its function. Never a
    library frame while an own frame exists; none at all: the innermost frame."""
    own = [i for i, f in enumerate(frames) if f["own"]]
    for i in reversed(own):
        if not in_database_stack(frames, i, inside_database):
            return named(frames, i)
    return named(frames, own[-1]) if own else (frames[-1] if frames else None)


def in_database_stack(frames: list[dict], i: int, inside_database: bool) -> bool:
    """Is own frame i in a run of own frames with the database stack on both sides?"""
    first, last = i, i
    while first > 0 and frames[first - 1]["own"]:
        first -= 1
    while last + 1 < len(frames) and frames[last + 1]["own"]:
        last += 1
    caller = frames[first - 1] if first > 0 else None
    called = frames[last + 1] if last + 1 < len(frames) else None
    return caller is not None and library_package(caller["file"]) in DATABASE_STACK and (
        library_package(called["file"]) in DATABASE_STACK if called is not None
        else inside_database)


def named(frames: list[dict], i: int) -> dict:
    """Frame i, a comprehension or lambda named by the function it is in."""
    frame = frames[i]
    outer = next((f for f in reversed(frames[:i]) if f["file"] == frame["file"]
                  and f["function"] not in INNER_CODE), None) \
        if frame["function"] in INNER_CODE else None
    return dict(frame, function=outer["function"]) if outer else frame


def where_of(frame: dict | None) -> str:
    return "?" if frame is None else f"{frame['file']}:{frame['line']} in {frame['function']}"


# ------------------------------------------------------------------------- the worker side
# Everything below up to "the client" runs inside gunicorn's worker, under the app's own
# interpreter: the generated config (shim()) loads this file and calls gunicorn_settings().


class Files:
    """Which files are the app's own: not the standard library, not site-packages, not
    this file. Paths are shown relative to the app's folder."""

    def __init__(self, root: str):
        import site
        import sysconfig

        self.root = os.path.realpath(root) + os.sep
        paths = set(sysconfig.get_paths().values())
        paths.update(site.getsitepackages() if hasattr(site, "getsitepackages") else [])
        paths.add(getattr(site, "USER_SITE", None) or "")
        for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix}:
            paths.add(os.path.join(prefix, "lib"))
        paths.discard("")
        self.library = tuple(os.path.realpath(p) + os.sep for p in paths
                             if p and os.path.realpath(p) + os.sep != self.root)
        self.me = os.path.realpath(__file__)
        self.cache: dict[str, tuple[bool, str]] = {}

    def look(self, filename: str) -> tuple[bool, str]:
        """(own?, the name to show)."""
        known = self.cache.get(filename)
        if known is None:
            if filename.startswith("<"):
                known = (False, filename)
            else:
                path = os.path.realpath(filename)
                own = not path.startswith(self.library) and path != self.me \
                    and not path.startswith(self.root + ".venv" + os.sep)
                shown = path[len(self.root):] if path.startswith(self.root) else path
                known = (own, self.me if path == self.me else shown)
            self.cache[filename] = known
        return known

    def stack(self, frame) -> list[dict]:
        """The stack from frame outward, as frames outermost first; own frames carry their
        source line."""
        return self.described(raw_stack(frame))

    def described(self, raw: list[tuple[str, int, str]], code: bool = True) -> list[dict]:
        import linecache

        frames = []
        for filename, line, function in reversed(raw):
            own, shown = self.look(filename)
            if shown == self.me:
                continue
            entry = {"file": shown, "line": line, "function": function, "own": own}
            if own and code:
                entry["code"] = linecache.getline(filename, line).strip()
            frames.append(entry)
        return frames

    def where(self, frame) -> tuple[str, str | None]:
        """(where, function) a driver's wait was called from: the per-query path."""
        return place(innermost_own(self.described(raw_stack(frame), code=False),
                                   inside_database=True))


def raw_stack(frame, limit: int = 80) -> list[tuple[str, int, str]]:
    """(file, line, function) from frame outward: quick, for a frame that is about to move.
    A Jinja template's frame gets the template's line, and the template for its function."""
    found = []
    while frame is not None and len(found) < limit:
        code, line = frame.f_code, frame.f_lineno
        template = frame.f_globals.get("__jinja_template__")
        if template is None:
            found.append((code.co_filename, line, code.co_name))
        else:
            found.append(jinja_frame(template, code, line))
        frame = frame.f_back
    return found


def jinja_frame(template, code, line: int) -> tuple[str, int, str]:
    """A frame of Jinja's code compiled from a template: its line in the template, and
    '<template NAME>' (or '<template NAME, block B>') for a function."""
    try:
        line = template.get_corresponding_lineno(line)
    except Exception:  # noqa: BLE001  an older or odd Jinja: its own line, then
        pass
    name = getattr(template, "name", None) or "?"
    block = code.co_name[6:] if code.co_name.startswith("block_") else None
    return code.co_filename, line, f"<template {name}" + (f", block {block}>" if block else ">")


class Route:
    """What the worker saw of one route: its requests, every stretch they held the loop, the
    probe's lateness while they ran, and the findings (cause, where) with their stacks."""

    def __init__(self, label: str):
        self.label = label
        self.requests = 0
        self.held_total = 0.0
        self.held_max = 0.0
        self.long_requests = 0
        self.long_total = 0.0
        self.stalled_requests = 0  # in flight while the loop waited for another thread
        self.late: list[float] = []
        self.late_kinds = dict.fromkeys(LATE_KINDS, 0)  # the probe's wake-ups past the threshold
        self.findings: dict[tuple[str, str], dict] = {}
        # (request, stretch, s, CPU s of the loop's thread, CPU s of the other threads)
        self.holds: list[tuple[int, int, float, float, float]] = []
        self.samples: dict[tuple[int, int], list] = {}  # (request, stretch) -> the monitor's

    def finding(self, cause: str, where: str, seconds: float, stack=None, detail: str = "",
                function: str | None = None) -> None:
        found = self.findings.get((cause, where))
        if found is None:
            found = self.findings[(cause, where)] = {
                "cause_id": cause, "where": where, "function": function, "count": 0,
                "ms": 0.0, "max_ms": 0.0, "detail": detail, "stack": stack}
        found["count"] += 1
        found["ms"] += seconds * 1000
        if stack is not None and (found["stack"] is None or seconds * 1000 > found["max_ms"]):
            found["stack"], found["detail"] = stack, detail  # the longest one's
        found["max_ms"] = max(found["max_ms"], seconds * 1000)

    def resolved(self, threshold: float) -> list[dict]:
        """The findings: the drivers' waits and the probe's, and each hold with the monitor's
        samples of it (a sample can come in after its stretch ended: matched here, not
        then), the cause fitting the CPU the hold used."""
        holds = Route(self.label)
        holds.findings = {key: dict(found) for key, found in list(self.findings.items())}
        judged = []
        for request, stretch, seconds, hub, others in list(self.holds):
            cause, sample = stretch_cause(self.samples.get((request, stretch), []), hub,
                                          others, threshold / 2)
            spent = (f"over this {seconds * 1000:.0f} ms hold the loop's thread computed "
                     f"{hub * 1000:.0f} ms, the other threads {others * 1000:.0f} ms")
            judged.append((cause, sample, seconds, spent))
        # the holds whose stack shows a line of the app's first: a wait for another thread's
        # GIL caught where the app had no frame yet (in Flask's own code) joins one that has
        judged.sort(key=lambda j: not (j[1] and any(f["own"] for f in j[1]["frames"])))
        for cause, sample, seconds, spent in judged:
            known = next((f for f in holds.findings.values() if f["cause_id"] == cause
                          and any(x["own"] for x in f["stack"] or ())), None)
            if cause == "gil" and known is not None and not (
                    sample and any(f["own"] for f in sample["frames"])):
                holds.finding(cause, known["where"], seconds, known["stack"], known["detail"],
                              known["function"])
            elif sample is None:
                holds.finding(cause, "?", seconds, None, spent)
            else:
                holds.finding(cause, sample["where"], seconds, sample["frames"],
                              sample["detail"] if sample["cause"] == cause else spent,
                              sample["function"])
        return list(holds.findings.values())

    def report(self, threshold: float) -> dict:
        late = sorted(self.late)
        p99 = late[max(0, math.ceil(0.99 * len(late)) - 1)] if late else None
        return {"requests": self.requests,
                "held_ms": {"total": round(self.held_total * 1000, 2),
                            "max": round(self.held_max * 1000, 2)},
                "long_requests": self.long_requests,
                "long_ms": round(self.long_total * 1000, 2),
                "stalled_requests": self.stalled_requests,
                "probe_late_ms": {"max": round(late[-1] * 1000, 2) if late else None,
                                  "p99": round(p99 * 1000, 2) if p99 is not None else None,
                                  "samples": len(late),
                                  "over_threshold": dict(self.late_kinds)},
                "findings": [dict(f, ms=round(f["ms"], 3), max_ms=round(f["max_ms"], 3))
                             for f in sorted(self.resolved(threshold), key=lambda f: -f["ms"])]}


LATE_KINDS = ("loop_held", "other_thread", "paused")


def late_kind(hub: float, others: float, enough: float) -> str:
    """Why the probe woke late, from what the process computed meanwhile: the loop's thread
    (a request, or anything else on the loop), the other threads (the loop waited for the
    GIL), or neither (the process was not running)."""
    if others >= enough and others >= hub:
        return "other_thread"
    return "loop_held" if hub >= enough else "paused"


def place(frame: dict | None) -> tuple[str, str | None]:
    """(where, function) of the frame innermost_own() picked."""
    return where_of(frame), None if frame is None else frame["function"]


class Request:
    """One request in flight: its route, its number, how many stretches it has run, the
    longest, and the time the current one spent in a driver's wait."""

    __slots__ = ("route", "number", "stretches", "longest", "in_driver", "stalled")
    count = 0

    def __init__(self, route: Route):
        Request.count += 1
        self.route, self.number, self.stretches = route, Request.count, 0
        self.longest, self.in_driver = 0.0, 0.0
        self.stalled = False  # in flight while the loop waited for another thread's GIL


class Worker:
    """The audit inside one gunicorn worker: the WSGI wrapper, the control answers, and
    (under gevent) the tracer, the monitor thread, the probe and the driver timers."""

    def __init__(self, token: str, threshold: float, root: str, before_patch: dict):
        self.prefix = CONTROL + token + "/"
        self.threshold = threshold
        self.files = Files(root)
        self.before_patch = before_patch
        self.routes: dict[str, Route] = {}
        self.requests: dict = {}  # greenlet (or thread) -> Request
        self.app = None
        self.gevent = False
        self.patched = False  # gevent patched socket (under any worker class)
        # the last switch: its time, the loop thread's CPU, the process's
        self.since, self.cpu_since = time.perf_counter(), time.thread_time()
        self.proc_since = time.process_time()
        self.previous_trace = None
        self.drivers = {"psycopg2_blocks": False, "psycopg_blocks": False,
                        "host_is_name": False, "host": None, "psycopg2_imported": False,
                        "psycopg2_wait_callback": None, "psycopg_imported": False,
                        "psycopg_wait": None}
        self.read_host()
        self.hub_ident = None
        self.hub_clock = None
        self.sleep = time.sleep  # the unpatched one, once gevent is there
        self.period = threshold / 2  # the monitor thread's: a hold of the threshold spans a
        # whole period, so a check finds it held for half the threshold
        # how late the monitor may run before that says C code kept the GIL: Python code
        # gives it up every switch interval (5 ms) when another thread asks
        self.starve_min = max(threshold, 3 * sys.getswitchinterval())
        self.last_check = None  # (when, loop CPU, process CPU, monitor CPU) the monitor ran
        self.waiting = None  # the driver whose wait holds the loop right now
        self.running = None  # the greenlet the last switch went to
        self.errors: list[str] = []  # what went wrong while sampling
        self.ran: set = set()  # the routes that held the loop since the probe last woke
        self.events = dict.fromkeys(("checks", "sampled", "not a request's",
                                     "in a driver's wait", "moved on", "no frame",
                                     "could not tell", "starved"), 0)

    # -- the app ----------------------------------------------------------------------
    def wrap(self, app):
        self.app = app
        return self.__call__

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path.startswith(self.prefix):
            return self.control(path[len(self.prefix):], start_response)
        label = environ.get("HTTP_X_AUDIT_ROUTE") or path
        route = self.routes.get(label) or self.routes.setdefault(label, Route(label))
        route.requests += 1
        if self.gevent:
            self.watch_drivers()
        state = Request(route)
        environ["audit.request"] = state
        self.requests[self.current()] = state
        return self.app(environ, start_response)

    def finished(self, environ) -> None:
        """gunicorn's post_request: the answer is written; the greenlet is no longer this
        request's."""
        state = environ.get("audit.request")
        if state is not None and self.requests.get(self.current()) is state:
            del self.requests[self.current()]
            if self.gevent:  # the stretch since the last switch was this request's
                now, used, everyone = time.perf_counter(), time.thread_time(), \
                    time.process_time()
                self.stretch(state, now - self.since, used - self.cpu_since,
                             everyone - self.proc_since)
                self.since, self.cpu_since, self.proc_since = now, used, everyone

    def current(self):
        """This request's greenlet (under gevent) or thread."""
        import threading

        return threading.get_ident()

    def control(self, what: str, start_response):
        if what == "hello":
            body = {"pid": os.getpid(), "gevent": self.gevent, "patched": self.patched}
        elif what == "preflight":
            body = self.preflight()
        elif what == "routes":
            body = discover(self.app)
        elif what == "report":
            body = {"pid": os.getpid(), "threshold_ms": self.threshold * 1000,
                    "sampling_errors": self.errors[:5], "monitor": dict(self.events),
                    "routes": {label: r.report(self.threshold)
                               for label, r in self.routes.items()}}
        else:
            start_response("404 Not Found", [("Content-Type", "application/json")])
            return [b'{"error": "no such audit call"}']
        data = json.dumps(body).encode()
        start_response("200 OK", [("Content-Type", "application/json"),
                                  ("Content-Length", str(len(data)))])
        return [data]

    # -- the database URL, the drivers ----------------------------------------------------
    def read_host(self) -> None:
        """Is DATABASE_URL's host a name libpq must resolve (no hostaddr= beside it)?"""
        self.drivers.update(dsn_host(os.environ.get("DATABASE_URL", "")))

    def watch_drivers(self) -> None:
        """Time each wait of a driver that holds the loop. Called after the app is loaded,
        and again at each request (an app may import its driver late)."""
        if not self.drivers["psycopg2_imported"] and "psycopg2.extensions" in sys.modules:
            self.drivers["psycopg2_imported"] = True
            extensions = sys.modules["psycopg2.extensions"]
            callback = extensions.get_wait_callback()
            self.drivers["psycopg2_wait_callback"] = None if callback is None else \
                f"{getattr(callback, '__module__', '?')}.{getattr(callback, '__name__', '?')}"
            if callback is None:
                self.drivers["psycopg2_blocks"] = True
                extensions.set_wait_callback(self.holding_wait(extensions))
        if not self.drivers["psycopg_imported"] and "psycopg.waiting" in sys.modules \
                and "psycopg" in sys.modules:
            self.drivers["psycopg_imported"] = True
            waiting = sys.modules["psycopg.waiting"]
            self.drivers["psycopg_wait"] = waiting.wait.__name__
            if waiting.wait.__name__ == "wait_c":
                self.drivers["psycopg_blocks"] = True
                self.time_psycopg(sys.modules["psycopg"], waiting)

    def holding_wait(self, extensions):
        """psycopg2's wait callback that keeps the loop held, as no callback would (it waits
        with the unpatched poll), and times each wait. libpq's connect_timeout is kept."""
        from gevent.monkey import get_original

        poll = get_original("select", "poll")
        import select

        connecting = (extensions.STATUS_SETUP, getattr(extensions, "STATUS_CONNECTING", 20))

        def wait(conn):
            started = time.perf_counter()
            limit = None
            if conn.status in connecting:
                found = re.search(r"connect_timeout=(\d+)", conn.dsn or "")
                limit = int(found.group(1)) * 1000 if found and int(found.group(1)) else None
            self.waiting = "psycopg2"
            try:
                while True:
                    state = conn.poll()
                    if state == extensions.POLL_OK:
                        return
                    poller = poll()
                    poller.register(conn.fileno(), select.POLLIN
                                    if state == extensions.POLL_READ else select.POLLOUT)
                    if not poller.poll(limit):
                        raise extensions.OperationalError("timeout expired")
            finally:
                self.waiting = None
                self.held_in_driver("psycopg2", time.perf_counter() - started,
                                    sys._getframe(1))
        return wait

    def time_psycopg(self, psycopg, waiting) -> None:
        """psycopg 3 imported before the patch: time its waits (all held in C)."""
        connection = psycopg.Connection
        original, original_conn = connection.wait, waiting.wait_conn
        audit = self

        def timed(call):
            def run(*args, **kw):
                started = time.perf_counter()
                audit.waiting = "psycopg3"
                try:
                    return call(*args, **kw)
                finally:
                    audit.waiting = None
                    audit.held_in_driver("psycopg3", time.perf_counter() - started,
                                         sys._getframe(1))
            return run
        connection.wait, waiting.wait_conn = timed(original), timed(original_conn)

    def held_in_driver(self, cause: str, seconds: float, frame) -> None:
        state = self.requests.get(self.current())
        if state is None:
            return  # outside a request (start-up): not a route's doing
        state.in_driver += seconds  # this stretch's time in the driver: not a hold of its own
        where, function = self.files.where(frame)
        found = state.route.findings.get((cause, where))
        longest = found is None or seconds * 1000 > found["max_ms"]
        stack = self.files.stack(frame) if longest else None
        state.route.finding(cause, where, seconds, stack, fix_for(cause)[0], function)

    # -- gevent: the tracer, the monitor, the probe ---------------------------------------
    def instrument(self) -> None:
        import gevent
        import greenlet
        from gevent.monkey import get_original

        self.gevent = True
        self.current = greenlet.getcurrent
        self.hub_ident = gevent.get_hub().thread_ident
        try:
            self.hub_clock = time.pthread_getcpuclockid(self.hub_ident)
        except (AttributeError, OSError):
            self.hub_clock = None
        self.sleep = get_original("time", "sleep")
        self.previous_trace = greenlet.settrace(self.trace)
        # a thread of its own (not gevent's monitor, whose tracer and reports would cost
        # every switch, and CPU in the middle of the holds it measures)
        get_original("_thread", "start_new_thread")(self.monitor, ())
        gevent.spawn(self.probe)
        self.watch_drivers()

    def trace(self, event, args, clock=time.perf_counter, cpu=time.thread_time,
              process=time.process_time) -> None:
        """greenlet's trace function: on every switch, the greenlet switched away from held
        the loop since the previous switch. The hot path: three clock reads (the thread's
        and the process's CPU clocks are a system call each, about 0.23 us) and a few
        attribute reads."""
        if event == "switch" or event == "throw":
            now, used, everyone = clock(), cpu(), process()
            self.running = args[1]
            state = self.requests.get(args[0])
            if state is not None:
                self.stretch(state, now - self.since, used - self.cpu_since,
                             everyone - self.proc_since)
            self.since, self.cpu_since, self.proc_since = now, used, everyone
        if self.previous_trace is not None:
            self.previous_trace(event, args)

    def stretch(self, state: Request, held: float, cpu: float, process: float) -> None:
        """A stretch of STATE's greenlet: HELD s, CPU s of the loop's thread, PROCESS s of
        the process's (the monitor thread's own, a ms or two a sampled stretch, is among
        the other threads')."""
        route = state.route
        self.ran.add(route)
        route.held_total += held
        route.held_max = max(route.held_max, held)
        in_driver, state.in_driver = state.in_driver, 0.0
        state.stretches += 1
        if held < self.threshold or held - in_driver < self.threshold:
            return  # short, or mostly the driver's waits (counted as such)
        if state.longest < self.threshold:
            route.long_requests += 1
        state.longest = max(state.longest, held)
        route.long_total += held
        route.holds.append((state.number, state.stretches - 1, held, cpu,
                            max(0.0, process - cpu)))

    def guarded(self, call, *args) -> None:
        """CALL(*args) in the monitor thread, never raising: an exception would end that
        thread for the rest of the run."""
        try:
            call(*args)
        except Exception as exc:  # noqa: BLE001  the first is kept for the report
            self.errors.append(f"{type(exc).__name__}: {exc}")
            if len(self.errors) == 1:
                import traceback

                traceback.print_exc()

    def monitor(self) -> None:
        """The monitor thread: every threshold / 2, check()."""
        while True:
            self.sleep(self.period)
            self.guarded(self.check)

    def check(self) -> None:
        """In the monitor thread: a request that has held the loop for half the threshold is
        sampled now, while it holds it. This thread needs the GIL to run: when it ran much
        later than its period while the loop's stretch lasted, what kept the GIL meanwhile
        (the loop's thread, or another) comes with the sample."""
        now, hub, everyone, mine = time.perf_counter(), self.hub_cpu(), time.process_time(), \
            time.thread_time()
        last, starved = self.last_check, None
        if last is not None and now - max(last[0], self.since) - self.period >= \
                self.starve_min:
            self.events["starved"] += 1
            gap = now - last[0]
            hub_share = (hub - last[1]) / gap
            starved = {"ms": (gap - self.period) * 1000, "hub": hub_share,
                       "others": (everyone - last[2] - (mine - last[3])) / gap - hub_share}
        running = self.running
        if running in self.requests and now - self.since >= self.threshold / 2:
            self.events["checks"] += 1
            self.take(running, starved)
        self.last_check = (time.perf_counter(), self.hub_cpu(), time.process_time(),
                           time.thread_time())

    def take(self, greenlet, starved: dict | None) -> None:
        """Take the stack of the request holding the loop, watch its innermost frame a few
        ms (look()), classify, and keep the sample under (request, stretch), for the report
        to match with the stretch the tracer timed."""
        state = self.requests.get(greenlet)
        seen = self.events
        if state is None or self.waiting is not None or self.running is not greenlet:
            # not a request's; in a driver's wait (timed there); or it moved on
            seen["not a request's" if state is None else "in a driver's wait"
                 if self.waiting is not None else "moved on"] += 1
            return
        key = (state.number, state.stretches)
        if len(state.route.samples.get(key, ())) >= SAMPLES:
            return  # this stretch is sampled enough
        frame = sys._current_frames().get(self.hub_ident)
        if frame is None:
            seen["no frame"] += 1
            return
        raw, drivers = raw_stack(frame), connecting_to(frame)
        if starved and max(starved["hub"], starved["others"]) >= 0.5:
            motion = {"moved": False}  # the wait for the GIL says it: no time to lose, the
        else:  # stretch often ends as soon as the C call returns
            motion = self.look(frame)
            if self.running is not greenlet or state.stretches != key[1]:
                seen["moved on"] += 1
                return  # the stretch ended while we looked: the sample may be another's
        del frame
        described = self.files.described(raw)
        cause, detail = classify(described, dict(motion, starved=starved),
                                 dict(self.drivers, **drivers))
        seen["sampled" if cause else "could not tell"] += 1
        where, function = place(innermost_own(described, cause in DRIVER_CAUSES + ("dns",)))
        state.route.samples.setdefault(key, []).append(
            {"cause": cause, "detail": detail, "frames": described, "where": where,
             "function": function, "computing": cause == "c_call" and
             detail.startswith("computing")})

    def look(self, frame) -> dict:
        """Watch the loop thread's innermost frame in sleeps of 1 ms (this thread gives up
        the GIL meanwhile, and needs it back to look again) until the frame moves, or its
        thread has computed 1 ms over two sleeps at least, or LOOK_MS have passed; with how
        late the sleeps returned at the most (Python code that ran meanwhile keeps the GIL
        until this thread has waited a switch interval for it; a C call that released it
        gives it back at once) and the CPU of the loop's thread and of the others."""
        lasti, hub, everyone, mine = frame.f_lasti, self.hub_cpu(), time.process_time(), \
            time.thread_time()
        started, sleeps, moved, late = time.perf_counter(), 0, False, 0.0
        while sleeps < LOOK_MS:
            before = time.perf_counter()
            self.sleep(0.001)
            late = max(late, time.perf_counter() - before - 0.001)
            sleeps += 1
            now = sys._current_frames().get(self.hub_ident)
            if now is not frame or frame.f_lasti != lasti:
                moved = True
                break
            if sleeps >= 2 and self.hub_cpu() - hub >= 0.001:
                break
        wall, hub = time.perf_counter() - started, self.hub_cpu() - hub
        others = time.process_time() - everyone - (time.thread_time() - mine) - hub
        return {"moved": moved, "wall_ms": wall * 1000, "late_ms": late * 1000,
                "gil_wait_ms": 400 * sys.getswitchinterval(), "hub_ms": hub * 1000,
                "others_ms": max(0.0, others) * 1000}

    def hub_cpu(self) -> float:
        """The CPU seconds of the loop's thread, read from any thread."""
        return 0.0 if self.hub_clock is None else time.clock_gettime(self.hub_clock)

    def probe(self) -> None:
        """Wake every PROBE_EVERY s; how late each wake-up came is charged to every route
        that ran since the last one or has a request in flight (the audit runs one route at
        a time). A wake-up late by the threshold or more is sorted by what computed
        meanwhile; when the loop waited for another thread's GIL, the requests in flight
        are where it waited."""
        import gevent

        clock, cpu, process = time.perf_counter, time.thread_time, time.process_time
        enough = self.threshold / 2
        while True:
            started, used, everyone = clock(), cpu(), process()
            gevent.sleep(PROBE_EVERY)
            late = clock() - started - PROBE_EVERY
            ran, self.ran = self.ran, set()
            if self.requests:
                ran.update(state.route for state in list(self.requests.values()))
            kind = None
            if late >= self.threshold:
                hub = cpu() - used
                kind = late_kind(hub, process() - everyone - hub, enough)
            for route in ran:
                if len(route.late) < 100_000:
                    route.late.append(late)
                if kind is not None:
                    route.late_kinds[kind] += 1
                    if kind == "other_thread":
                        self.waited_for_gil(route, late)
            if kind == "other_thread":
                for state in list(self.requests.values()):
                    if not state.stalled:
                        state.stalled = True
                        state.route.stalled_requests += 1

    def waited_for_gil(self, route: Route, late: float) -> None:
        """The loop waited LATE s for another thread's GIL while ROUTE ran: a finding at the
        line where one of its requests in flight waits (a threadpool's apply)."""
        frame = next((getattr(g, "gr_frame", None) for g, state in list(self.requests.items())
                      if state.route is route and getattr(g, "gr_frame", None) is not None),
                     None)
        stack = self.files.stack(frame) if frame is not None else None
        where, function = place(innermost_own(stack)) if stack else ("?", None)
        route.finding("gil", where, late, stack, f"the loop woke {late * 1000:.0f} ms late "
                      f"while other threads of the process computed", function)

    def aborted(self, frame) -> None:
        """gunicorn's worker_abort: the arbiter is killing this worker, its loop held past
        --timeout. The stack of what holds it, and for how long, go to a file the client
        reads (AUDIT_DIR/abort-PID.json)."""
        folder = os.environ.get("AUDIT_DIR")
        if not folder or not self.gevent:
            return
        state = self.requests.get(self.current())
        stack = self.files.stack(frame)
        where, function = place(innermost_own(stack))
        held, cpu = time.perf_counter() - self.since, time.thread_time() - self.cpu_since
        found = {"pid": os.getpid(), "route": state.route.label if state else None,
                 "where": where, "function": function, "stack": stack,
                 "held_ms": round(held * 1000, 1), "cpu_ms": round(cpu * 1000, 1)}
        with open(os.path.join(folder, f"abort-{os.getpid()}.json"), "w") as out:
            json.dump(found, out)

    # -- the preflight, as the worker sees it -----------------------------------------------
    def preflight(self) -> dict:
        runtime = {"pid": os.getpid(), "gevent": self.gevent,
                   "patched": [], "before_patch": self.before_patch,
                   "ssl_unpatched_refs": [], **self.drivers}
        if "gevent.monkey" in sys.modules:
            monkey = sys.modules["gevent.monkey"]
            runtime["patched"] = sorted(m for m in getattr(monkey, "saved", {})
                                        if not m.startswith("_gevent"))
            runtime["ssl_unpatched_refs"] = ssl_refs(monkey)
        return {"environment": environment(os.environ.get("DATABASE_URL", "")),
                "runtime": runtime}


def connecting_to(frame) -> dict:
    """Inside psycopg2.connect: the host it connects to, and whether libpq must resolve it
    (a name, with no hostaddr= beside it)."""
    while frame is not None:
        code = frame.f_code
        if code.co_name == "connect" and code.co_filename.replace("\\", "/").endswith(
                "psycopg2/__init__.py"):
            return dsn_host(str(frame.f_locals.get("dsn") or ""))
        frame = frame.f_back
    return {}


def dsn_host(dsn: str) -> dict:
    """The host of a libpq connection string (a URI or key=value pairs), and whether libpq
    must resolve it: a name, with no hostaddr beside it."""
    from urllib.parse import parse_qs, urlsplit

    if "://" in dsn:
        try:
            parts = urlsplit(dsn)
            query = parse_qs(parts.query)
            host = query.get("host", [parts.hostname or ""])[0]
        except ValueError:
            return {}
        given = "hostaddr" in query
    else:
        found = re.search(r"(?:^|\s)host=(\S+)", dsn)
        host = found.group(1).strip("'") if found else ""
        given = "hostaddr=" in dsn
    return {"host": host, "host_is_name": bool(host) and not host.startswith("/")
            and not given and not is_address(host)}


def is_address(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


def ssl_refs(monkey) -> list[str]:
    """Modules holding ssl's unpatched SSLContext (gevent's own rule for its warning)."""
    if "ssl" not in getattr(monkey, "saved", {}):
        return []
    original = monkey.get_original("ssl", "SSLContext")
    found = []
    for name, module in list(sys.modules.items()):
        if module is None or name in ("ssl", "gevent.ssl") or name.startswith("gevent."):
            continue
        for value in list(getattr(module, "__dict__", {}).values()):
            if value is original or (isinstance(value, type) and value is not original
                                     and issubclass(value, original)):
                found.append(name)
                break
    return sorted(found)


def discover(app) -> dict:
    """Routes from Flask's url_map: every GET rule without an argument; the rest listed as
    skipped. Another WSGI app: {"flask": false}."""
    seen, found = set(), None
    while app is not None and id(app) not in seen and found is None:
        seen.add(id(app))
        if hasattr(app, "url_map") and hasattr(app, "view_functions"):
            found = app
        else:
            app = next((getattr(app, name) for name in ("app", "wsgi_app", "application",
                                                         "__wrapped__")
                        if getattr(app, name, None) is not None), None)
    if found is None:
        return {"flask": False, "kind": type(app).__name__ if app is not None else "?"}
    get, with_arguments, other = [], [], []
    for rule in found.url_map.iter_rules():
        methods = set(rule.methods or ()) - {"HEAD", "OPTIONS"}
        if "<" in rule.rule or getattr(rule, "host", None) or getattr(rule, "subdomain", None):
            with_arguments.append(rule.rule)
        elif "GET" in methods:
            get.append(rule.rule)
        for method in sorted(methods - {"GET"}):
            other.append(f"{method} {rule.rule}")
    return {"flask": True, "get": sorted(set(get)), "with_arguments": sorted(set(with_arguments)),
            "other_methods": sorted(set(other))}


DISTRIBUTIONS = ("gevent", "greenlet", "gunicorn", "psycopg2", "psycopg2-binary", "psycopg",
                 "psycopg-binary", "psycopg-c", "psycogreen", "SQLAlchemy", "Flask",
                 "Flask-SQLAlchemy", "eventlet")


def environment(url: str) -> dict:
    """What is installed in this interpreter, without importing the app or gevent: run by the
    client through --python before the app starts, and by the worker for its preflight."""
    import importlib.util
    import platform
    import sysconfig
    from importlib import metadata

    versions = {}
    for name in DISTRIBUTIONS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    found = {m: importlib.util.find_spec(m) is not None
             for m in ("gunicorn", "gevent", "psycopg2", "psycopg", "psycogreen", "sqlalchemy",
                       "eventlet")}
    return {"python": platform.python_version(), "executable": sys.executable,
            "implementation": platform.python_implementation(),
            "free_threaded": bool(sysconfig.get_config_var("Py_GIL_DISABLED")),
            "versions": versions, "modules": found, "url": url_driver(url, versions, found)}


def version_tuple(text: str | None) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text or "")[:3])


def url_driver(url: str, versions: dict, found: dict) -> dict:
    """Which driver a postgresql URL gets from the installed SQLAlchemy, and whether it is
    there (SQLAlchemy 2.1 gives a plain postgresql:// to psycopg 3; 2.0 to psycopg2)."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if not scheme.startswith(("postgresql", "postgres")):
        return {"scheme": scheme or None}
    dialect, _, named = scheme.partition("+")
    sqlalchemy = versions.get("SQLAlchemy")
    driver = named or None
    implied = False
    if not named and sqlalchemy:
        driver, implied = ("psycopg" if version_tuple(sqlalchemy) >= (2, 1) else "psycopg2"), True
    module = {"psycopg2": "psycopg2", "psycopg": "psycopg"}.get(driver or "", driver)
    return {"scheme": scheme, "dialect_ok": dialect == "postgresql", "driver": driver,
            "implied": implied, "installed": bool(module and found.get(module, False)),
            "psycogreen": found.get("psycogreen", False)}


_WORKER: Worker | None = None
_BEFORE_PATCH: dict = {}  # what post_fork saw imported, before the gevent worker patched


def gunicorn_settings(user_config: str | None) -> dict:
    """The settings the generated config hands gunicorn: the app's own config file's (when
    given), with the audit's hooks chained to theirs."""
    import runpy

    settings = runpy.run_path(user_config) if user_config else {}
    settings = {k: v for k, v in settings.items() if not k.startswith("__")}
    theirs = {name: settings.get(name) for name in ("post_fork", "post_worker_init",
                                                    "post_request", "worker_abort")}

    def post_fork(server, worker):
        before = {m: m in sys.modules for m in PREPATCH_MODULES}
        extensions = sys.modules.get("psycopg2.extensions")
        if extensions is not None:
            before["psycopg2_wait_callback"] = extensions.get_wait_callback() is not None
        _BEFORE_PATCH.update(before)
        if theirs["post_fork"]:
            theirs["post_fork"](server, worker)

    def post_worker_init(worker):
        global _WORKER
        if theirs["post_worker_init"]:
            theirs["post_worker_init"](worker)
        _WORKER = Worker(os.environ["AUDIT_TOKEN"],
                         float(os.environ.get("AUDIT_THRESHOLD_MS", THRESHOLD_MS)) / 1000,
                         os.environ.get("AUDIT_ROOT", os.getcwd()),
                         dict(_BEFORE_PATCH))
        worker.wsgi = _WORKER.wrap(worker.wsgi)
        _WORKER.patched = "gevent.monkey" in sys.modules and \
            sys.modules["gevent.monkey"].is_module_patched("socket")
        if _WORKER.patched and os.environ.get("AUDIT_MODE") == "audit":
            _WORKER.instrument()

    def post_request(worker, req, environ, resp):
        if _WORKER is not None:
            _WORKER.finished(environ)
        if theirs["post_request"]:
            theirs["post_request"](worker, req, environ, resp)

    def worker_abort(worker):
        """The arbiter kills this worker (its loop held past --timeout): say where."""
        if _WORKER is not None:
            try:  # the frame the signal interrupted: past gunicorn's handle_abort
                _WORKER.aborted(sys._getframe(2))
            except Exception:  # noqa: BLE001  the worker is dying: never in its way
                pass
        if theirs["worker_abort"]:
            theirs["worker_abort"](worker)

    # no graceful wait: a request still holding the loop when the audit stops is killed
    settings.update(post_fork=post_fork, post_worker_init=post_worker_init,
                    post_request=post_request, worker_abort=worker_abort,
                    control_socket_disable=True, graceful_timeout=3)
    return settings


# ------------------------------------------------------------------------- the client
# Everything below runs in the process you start: it never imports the app.


class Usage(Exception):
    """Bad input, or the app or its database cannot be started: one line, exit 2."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: clean up, exit 130."""


def import_load():
    """load.py, from beside this file (copy both), else from the import path."""
    if os.path.exists(os.path.join(HERE, "load.py")) and HERE not in sys.path:
        sys.path.insert(0, HERE)
    try:
        import load
    except ImportError:
        raise Usage("audit.py needs load.py beside it (both are standard library only: copy "
                    "the two files together)") from None
    return load


# -- the routes to audit, and what to send -------------------------------------------------


class Spec:
    """One route to audit: method, path (with its query), and the body to send."""

    def __init__(self, method: str, path: str, data: str | None = None):
        self.method, self.path, self.data = method, path, data

    @property
    def label(self) -> str:
        return self.path if self.method == "GET" else f"{self.method} {self.path}"

    def body(self) -> tuple[bytes, str | None]:
        """The body and its Content-Type: JSON when --data parses as a JSON object or
        array, else a form."""
        if self.data is None:
            return b"", None
        try:
            if isinstance(json.loads(self.data), (dict, list)):
                return self.data.encode(), "application/json"
        except ValueError:
            pass
        return self.data.encode(), "application/x-www-form-urlencoded"


METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def parse_route(text: str) -> Spec:
    """'/users/1' or 'POST /api/tokens'."""
    method, _, path = text.strip().rpartition(" ")
    method = method.strip().upper() or "GET"
    if method not in METHODS or not path.startswith("/"):
        raise Usage(f"--route {text!r}: give a path (/users/1) or METHOD PATH "
                    f"('POST /api/tokens'), METHOD one of {', '.join(METHODS)}")
    return Spec(method, path)


def pair_data(ordered: list[tuple[str, str]]) -> tuple[list[Spec], Spec | None]:
    """--route, --login and --data in the order given: each --data belongs to the --route
    or --login just before it."""
    routes, login, last = [], None, None
    for kind, value in ordered:
        if kind == "route":
            last = parse_route(value)
            routes.append(last)
        elif kind == "login":
            if not value.startswith("/"):
                raise Usage(f"--login {value!r}: give the path of the login form, e.g. "
                            f"/auth/login")
            last = login = Spec("POST", value)
        elif last is None or last.data is not None:
            raise Usage(f"--data {value!r}: put it right after the --route or --login it is "
                        f"for")
        else:
            last.data = value
    if login is not None and login.data is None:
        raise Usage("--login PATH needs --data 'field=value&...' right after it")
    return routes, login


def parse_headers(headers: list[str], cookies: list[str]) -> tuple[dict, dict]:
    found, jar = {}, {}
    for header in headers:
        name, sep, value = header.partition(":")
        if not sep or not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", name.strip()):
            raise Usage(f"--header {header!r}: give 'Name: value'")
        found[name.strip()] = value.strip()
    for cookie in cookies:
        name, sep, value = cookie.partition("=")
        if not sep or not name.strip():
            raise Usage(f"--cookie {cookie!r}: give 'name=value'")
        jar[name.strip()] = value.strip()
    return found, jar


def split_gunicorn_args(text: str, folder: str) -> tuple[list[str], str | None]:
    """The caller's gunicorn flags, less -c/--config (loaded by the audit's own config, which
    chains its hooks to theirs). Without -c, ./gunicorn.conf.py in DIR, as gunicorn would."""
    import shlex

    try:
        args = shlex.split(text or "")
    except ValueError as exc:
        raise Usage(f"--gunicorn-args: {exc}") from None
    kept, config, i = [], None, 0
    while i < len(args):
        arg = args[i]
        if arg in ("-c", "--config"):
            if i + 1 >= len(args):
                raise Usage(f"--gunicorn-args: {arg} needs a file")
            config, i = args[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        elif arg.startswith("-c") and len(arg) > 2:
            config = arg[2:]
        else:
            kept.append(arg)
        i += 1
    if config is not None:
        if config.startswith("python:"):
            raise Usage("--gunicorn-args: a config given as python:MODULE is not supported; "
                        "give its file")
        path = config if os.path.isabs(config) else os.path.join(folder, config)
        if not os.path.isfile(path):
            raise Usage(f"--gunicorn-args: the config file {config} does not exist in {folder}")
        return kept, os.path.realpath(path)
    default = os.path.join(folder, "gunicorn.conf.py")
    return kept, default if os.path.isfile(default) else None


# -- the app's interpreter, the database, the server ---------------------------------------

PROBE = ("import sys\n"
         "sys.version_info >= (3, 9) or sys.exit('Python %s: the audit needs 3.9 or newer' "
         "% sys.version.split()[0])\n"
         "import importlib.util, json\n"
         "spec = importlib.util.spec_from_file_location('audit_probe', sys.argv[1])\n"
         "module = importlib.util.module_from_spec(spec)\n"
         "sys.modules['audit_probe'] = module\n"
         "spec.loader.exec_module(module)\n"
         "print('AUDIT ' + json.dumps(module.environment(sys.argv[2])))\n")


async def app_environment(python: str, folder: str, url: str) -> dict:
    """What the app's interpreter has installed (it must have gunicorn and gevent)."""
    try:
        done = await run_child([python, "-c", PROBE, os.path.realpath(__file__), url],
                               cwd=folder, timeout=60)
    except (OSError, TimeoutError) as exc:
        raise Usage(f"--python {python}: cannot run it: {exc.strerror or exc}"
                    if isinstance(exc, OSError) else f"--python {python}: no answer in 60 s") \
            from None
    found = next((line[6:] for line in done.stdout.splitlines() if line.startswith("AUDIT ")),
                 None)
    if done.returncode or found is None:
        said = (done.stderr.strip().splitlines() or [""])[-1]
        python_said = re.match(r"(Python \d|[\w.]*(Error|Exception)\b)", said)
        raise Usage(f"--python {python} is not a Python 3 the audit can run (exit "
                    f"{done.returncode}" + (f": {said[:120]})" if python_said else ")"))
    found = json.loads(found)
    missing = [m for m in ("gunicorn", "gevent") if not found["modules"].get(m)]
    if missing:
        raise Usage(f"{python} has no {' and no '.join(missing)}: the audit runs the app under "
                    f"gunicorn -k gevent in its own environment: {python} -m pip install "
                    f"{' '.join(missing)}")
    return found


async def run_child(argv: list[str], cwd: str | None = None, env: dict | None = None,
                    timeout: float | None = None):
    """Run a child to its end, in a session of its own (a Ctrl-C at the terminal reaches the
    audit alone, which stops it); an interrupt or the timeout kills it and its children at
    once. Returns a subprocess.CompletedProcess with text output."""
    import asyncio
    import signal
    import subprocess

    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except BaseException:  # cancelled (Ctrl-C, SIGTERM), or the timeout
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        await proc.wait()
        raise
    return subprocess.CompletedProcess(argv, proc.returncode, out.decode(errors="replace"),
                                       err.decode(errors="replace"))


def shown_url(url: str) -> str:
    """The URL without its password (in the user part or in the query)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return "(a URL the audit cannot read)"
    userinfo, at, host = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        parts = parts._replace(netloc=f"{userinfo.split(':', 1)[0]}:***@{host}")
    return re.sub(r"(?i)\b(password=)[^&\s]*", r"\1***", parts.geturl())


async def reachable(url: str) -> None:
    """One clear line when DATABASE_URL's server refuses or does not answer."""
    import asyncio
    from urllib.parse import parse_qs, urlsplit

    try:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        host = query.get("hostaddr", query.get("host", [parts.hostname or ""]))[0]
        port = int(query.get("port", [parts.port or 5432])[0])
    except ValueError as exc:
        raise Usage(f"DATABASE_URL is not a URL the audit can read: {exc}") from None
    if not host or host.startswith("/"):
        return  # a Unix socket: left to the app
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
        writer.close()
    except (OSError, asyncio.TimeoutError) as exc:
        what = "refuses connections" if isinstance(exc, ConnectionRefusedError) else \
            "does not answer within 5 s" if isinstance(exc, asyncio.TimeoutError) else \
            f"cannot be reached ({exc.strerror or exc})"
        raise Usage(f"the database at {host}:{port} {what}: is it running? "
                    f"(DATABASE_URL={shown_url(url)})") from None


async def throwaway_database(stack, tmp: str, python: str) -> str:
    """Inside the kit: its throwaway PostgreSQL (kit/pg.py, standard library), seeded with the
    kit's todos table by seed.py, run with the kit's .venv when there is one (seed.py needs
    SQLAlchemy), else with the app's interpreter. Stopped on the way out, and by its own
    watchdog should this process be killed (it then removes TMP too)."""
    import subprocess

    if not os.path.exists(os.path.join(HERE, "kit", "pg.py")):
        raise Usage("DATABASE_URL is not set, and this copy of audit.py has no kit/pg.py "
                    "beside it to start a throwaway PostgreSQL: set DATABASE_URL")
    state = os.path.join(tmp, "pg.json")
    stack.callback(subprocess.run, [sys.executable, "-m", "kit.pg", "stop", state], cwd=HERE,
                   capture_output=True)
    print("audit: starting a throwaway PostgreSQL (DATABASE_URL is not set)", file=sys.stderr,
          flush=True)
    done = await run_child([sys.executable, "-m", "kit.pg", "start", state, "--owner",
                            str(os.getpid()), "--cleanup", tmp], cwd=HERE)
    if done.returncode:
        raise Usage(f"cannot start a throwaway PostgreSQL: "
                    f"{(done.stderr.strip().splitlines() or ['?'])[-1]}")
    url = done.stdout.strip()
    said = (done.stderr.strip().splitlines() or [""])[-1]
    print(f"audit: {said}", file=sys.stderr, flush=True)  # kit.pg: version, port, folder
    kit_python = os.path.join(HERE, ".venv", "bin", "python")
    seeder = kit_python if os.path.exists(kit_python) else python
    seeded = await run_child([seeder, "seed.py"], cwd=HERE,
                             env={**os.environ, "DATABASE_URL": url})
    if seeded.returncode:
        last = (seeded.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"audit: the throwaway database is empty: the kit's seed.py failed under "
              f"{seeder} ({last[:120]}); if your app needs tables it does not create itself, "
              f"set DATABASE_URL", file=sys.stderr, flush=True)
    return url


def tidy_after(stack, tmp: str) -> None:
    """Should this process be killed (SIGKILL: nothing of it runs), a small watchdog removes
    TMP: it waits for the end of a pipe only this process holds. gunicorn gets its own
    death signal (die_with_parent), and kit.pg's watchdog stops the throwaway database."""
    import subprocess

    watchdog = subprocess.Popen(
        [sys.executable, "-c", "import shutil, sys; sys.stdin.buffer.read(); "
                               "shutil.rmtree(sys.argv[1], ignore_errors=True)", tmp],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)

    def done() -> None:
        watchdog.stdin.close()
        watchdog.wait()
    stack.callback(done)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shim(path: str, user_config: str | None) -> None:
    """The gunicorn config the audit hands the app's interpreter: this file, loaded by path,
    gives its settings (the app's own config's, with the audit's hooks chained)."""
    with open(path, "w") as out:
        out.write("# written by audit.py: the app's gunicorn config, with the audit's hooks\n"
                  "import importlib.util as _util\n"
                  "import sys as _sys\n"
                  f"_spec = _util.spec_from_file_location('audit_worker', "
                  f"{os.path.realpath(__file__)!r})\n"
                  "_audit = _util.module_from_spec(_spec)\n"
                  "_sys.modules['audit_worker'] = _audit\n"
                  "_spec.loader.exec_module(_audit)\n"
                  f"globals().update(_audit.gunicorn_settings({user_config!r}))\n")


def die_with_parent():
    """For Popen: on Linux the child gets SIGINT when this process dies, even by SIGKILL."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    return lambda: libc.prctl(1, signal.SIGINT)  # 1: PR_SET_PDEATHSIG; gunicorn's quick stop


class Server:
    """gunicorn, in a process group of its own, its output in a log file."""

    def __init__(self, argv: list[str], folder: str, env: dict, log: str, port: int,
                 keep: str | None = None):
        import subprocess

        self.port, self.log, self.keep = port, log, keep
        with open(log, "w") as out:
            self.proc = subprocess.Popen(argv, cwd=folder, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=die_with_parent())

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 12) -> list[str]:
        try:
            with open(self.log, errors="replace") as f:
                return [line.rstrip() for line in f.read().splitlines()[-lines:]]
        except OSError:
            return []

    def stop(self) -> None:
        """SIGINT (gunicorn's quick shutdown); after 10 s, SIGKILL to the whole group."""
        if self.keep:
            import shutil

            shutil.copy(self.log, self.keep)
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()


def start_failure(lines: list[str]) -> str:
    """The one line of gunicorn's log that says why the app did not start."""
    for line in reversed(lines):
        text = line.strip()
        if re.match(r"^[\w.]*(Error|Exception|Exit)\b", text) or "Failed to find attribute" \
                in text or "Failed to parse" in text:
            return re.sub(r"^\[[^]]*\] \[\d+\] \[\w+\] ", "", text)
    return "gunicorn exited (its last lines are below)"


class Answer:
    def __init__(self, status: int, reason: str, headers, body: bytes):
        self.status, self.reason, self.headers, self.body = status, reason, headers, body

    def json(self):
        return json.loads(self.body)


def http(port: int, method: str, path: str, headers: dict, body: bytes = b"",
         timeout: float = 30) -> Answer:
    """One request, its answer never followed (a redirect is an answer)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body or None, headers=headers)
        answer = conn.getresponse()
        return Answer(answer.status, answer.reason, answer.headers, answer.read())
    finally:
        conn.close()


# -- judging what the worker saw -------------------------------------------------------------


def judge(seen: dict | None) -> dict:
    """Does the route block, why, where, and the fix, from the worker's report of it.

    A driver that waits in C holds the loop on every wait, however short: any such wait
    counts. A stretch over the threshold counts when at least half the route's requests
    held one (a systematic block, not the machine pausing the process once), and never when
    the process hardly ran meanwhile (paused). The loop waiting for another thread's GIL
    also counts when half the requests were in flight while the probe woke that late."""
    if not seen:
        return {"blocks": None, "findings": []}
    findings = seen["findings"]
    most = math.ceil(max(1, seen["requests"]) / 2)
    systematic = seen["long_requests"] >= most
    waited = seen.get("stalled_requests", 0) >= most
    sampled = any(f["cause_id"] not in DRIVER_CAUSES + ("unknown", "paused") for f in findings)

    def counts(found: dict) -> bool:
        cause = found["cause_id"]
        if cause in DRIVER_CAUSES:
            return True
        if cause == "gil":
            return systematic or waited
        return systematic and cause != "paused" and not (cause == "unknown" and sampled)
    counted = [f for f in findings if counts(f)]
    top = max(counted, key=lambda f: (f["cause_id"] != "unknown", f["ms"])) if counted else None
    result = {"blocks": bool(counted), "blocked_ms": round(sum(f["ms"] for f in counted), 2),
              "held_ms": seen["held_ms"], "probe_late_ms": seen["probe_late_ms"],
              "long_requests": seen["long_requests"], "worker_requests": seen["requests"],
              "stalled_requests": seen.get("stalled_requests", 0),
              "cause": None, "cause_id": None, "where": None, "fix": None, "link": None,
              "findings": []}
    for found in findings:
        title, fix, link = fix_for(found["cause_id"], found.get("function"))
        result["findings"].append(dict(found, cause=title, fix=fix, link=link,
                                       counted=found in counted))
        if found is top:
            result.update(cause=title, cause_id=top["cause_id"], where=top["where"], fix=fix,
                          link=link)
    paused = sum(f["count"] for f in findings if f["cause_id"] == "paused")
    if not counted and systematic and paused:
        result["note"] = (f"{paused} holds past the threshold came while the process hardly "
                          f"ran (a busy machine): not counted; rerun on a quieter machine to "
                          f"be sure")
    return result


def to_login(location: str, login_path: str | None) -> bool:
    """Does a redirect go to a login page (the --login path, or one that looks like it)?"""
    from urllib.parse import urlsplit

    path = urlsplit(location).path.lower()
    return bool(login_path and path == login_path.lower()) or any(
        word in path for word in ("login", "signin", "sign-in", "sign_in", "auth"))


def not_reached_why(status: int, headers, path: str = "", login_path: str | None = None) -> str:
    """Where a 3xx, 401 or 403 sent the audit, and the flag that gets past it."""
    from urllib.parse import urlsplit

    if 300 <= status < 400:
        where = headers.get("Location", "?") if headers is not None else "?"
        target = urlsplit(where).path
        if to_login(where, login_path):
            return (f"redirected ({status}) to {where}, a login: none of its code ran; --login "
                    f"PATH --data 'field=value&...' (or --cookie 'name=value') gets past it")
        bare = path.split("?", 1)[0]
        if target == bare + "/":
            return (f"redirected ({status}) to {where}: the route's path ends with a slash; "
                    f"audit it as --route {target}")
        return (f"its view answered a redirect ({status}) to {where}: audit that page with "
                f"--route {target or where}")
    if status == 401:
        scheme = (headers.get("WWW-Authenticate") or "") if headers is not None else ""
        said = f" (WWW-Authenticate: {scheme})" if scheme else ""
        return (f"answered 401{said}: --header 'Authorization: Bearer TOKEN' (or --login) "
                f"gets past it")
    return f"answered {status}: the credentials given are not enough (--header, --cookie, --login)"


def exit_status(routes: list[dict]) -> int:
    """1 when a route blocks; else 2 when one could not be audited (it answered 404 or 5xx,
    or not at all: the audit is incomplete, as when the app does not start); else 3 when
    one was not reached (a login, 401, 403, a redirect); else 0."""
    if any(r.get("blocks") for r in routes):
        return 1
    if any(r.get("error") for r in routes):
        return 2
    if any(r.get("reached") is False for r in routes):
        return 3
    return 0


# -- the preflight, in words ------------------------------------------------------------------


def preflight_checks(environment: dict, runtime: dict | None) -> list[tuple[str, str]]:
    """(mark, text) lines: 'ok', 'info', 'warn' or 'bad'."""
    versions = environment.get("versions", {})
    shown = ", ".join(f"{name} {version}" for name, version in versions.items() if version)
    lines = [("info", f"Python {environment.get('python')} "
                      f"({environment.get('executable')}); {shown}")]
    if environment.get("free_threaded"):
        lines.append(("bad", "a free-threaded Python: gevent does not support it"))
    if versions.get("eventlet"):
        lines.append(("warn", f"eventlet {versions['eventlet']} is installed: retired by its "
                              f"maintainers, and gunicorn 26 dropped its worker; use gevent"))
    psycopg = version_tuple(versions.get("psycopg"))
    if psycopg and (3, 1, 5) <= psycopg < (3, 1, 14):
        lines.append(("bad", f"psycopg {versions['psycopg']} blocks under gevent (psycopg issue "
                             f"527, fixed in 3.1.14): upgrade it"))
    url = environment.get("url") or {}
    if url.get("scheme") and url["scheme"].startswith("postgres"):
        lines.extend(url_checks(url))
    if runtime:
        lines.extend(runtime_checks(runtime))
    return lines


def url_checks(url: dict) -> list[tuple[str, str]]:
    lines = []
    if not url.get("dialect_ok"):
        lines.append(("bad", f"DATABASE_URL starts {url['scheme']}://: SQLAlchemy wants "
                             f"postgresql:// (postgres:// was removed in 1.4)"))
    driver = url.get("driver")
    if driver is None:
        return lines
    if url.get("implied"):
        said = (f"DATABASE_URL names no driver: handed to SQLAlchemy as it is, the installed "
                f"release gives {url['scheme']}:// to {driver}")
        if url.get("installed"):
            lines.append(("info", said + ", which is installed"))
        else:
            lines.append(("bad", said + f", which is NOT installed: the app cannot connect; "
                                        f"name the one you have (postgresql+psycopg2://) or "
                                        f"install {driver}"))
    elif not url.get("installed"):
        lines.append(("bad", f"DATABASE_URL names {driver}, which is not installed"))
    if driver == "psycopg2" and url.get("installed") and not url.get("psycogreen"):
        lines.append(("bad", "psycopg2 without psycogreen installed: nothing gives psycopg2 a "
                             "wait callback, so every query will hold the loop "
                             "(pip install psycogreen, then patch_psycopg())"))
    return lines


def runtime_checks(rt: dict) -> list[tuple[str, str]]:
    lines = []
    patched = rt.get("patched") or []
    if rt.get("gevent"):
        lines.append(("ok" if "socket" in patched else "bad",
                      f"gevent patched: {', '.join(patched) or 'nothing'}"))
    before = rt.get("before_patch") or {}
    early = [m for m in ("psycopg", "psycopg2", "urllib3", "requests", "grpc", "redis")
             if before.get(m)]
    if early:
        lines.append(("warn", f"imported before gevent patched (--preload, or the config): "
                              f"{', '.join(early)}"))
    if before.get("ssl"):
        refs = rt.get("ssl_unpatched_refs") or []
        if refs:
            lines.append(("bad", f"ssl was imported before the patch, and these hold its "
                                 f"unpatched SSLContext: {', '.join(refs[:5])}: patch first"))
        else:
            lines.append(("ok", "ssl was imported before the patch (gunicorn imports it), but "
                                "nothing holds its unpatched SSLContext (gevent's own rule)"))
    if rt.get("psycopg2_imported"):
        callback = rt.get("psycopg2_wait_callback")
        lines.append(("ok", f"psycopg2's wait callback: {callback}") if callback else
                     ("bad", "psycopg2 has no wait callback: every query holds the loop "
                             "(psycogreen's patch_psycopg())"))
    if rt.get("psycopg_imported"):
        wait = rt.get("psycopg_wait")
        lines.append(("bad", "psycopg 3 waits with wait_c, in C: it was imported before gevent "
                             "patched, so every query holds the loop") if wait == "wait_c" else
                     ("ok", f"psycopg 3 waits with {wait}, which yields to gevent"))
    if rt.get("host_is_name"):
        lines.append(("warn", f"the database host {rt.get('host')!r} is a name: libpq resolves "
                              f"it in C on every new psycopg2 connection (hostaddr= avoids it)"))
    return lines


MARKS = {"ok": "✓", "info": "·", "warn": "!", "bad": "✗"}


# -- the report ---------------------------------------------------------------------------------


def aligned(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
            for row in rows]


def ms(value) -> str:
    return "-" if value is None else (f"{value:.0f}" if value >= 100 else f"{value:.1f}")


def table(routes: list[dict]) -> list[str]:
    """One row per route; the routes not reached or not audited below the audited ones."""
    head = ["route", "n", "p50 ms", "p99 ms", "pattern", "held ms (sum/max)", "probe late ms",
            "blocks", "cause", "where", "fix"]
    rows = [head]
    for r in sorted(routes, key=lambda r: (r.get("reached") is False, bool(r.get("error")))):
        latency = r.get("latency_ms") or {}
        held = r.get("held_ms") or {}
        if r.get("error"):
            rows.append([r["route"], "-", "-", "-", "-", "-", "-", "error", r["error"], "", ""])
            continue
        if r.get("reached") is False:
            rows.append([r["route"], "-", "-", "-", "-", "-", "-", "not reached",
                         f"{r['status']}: see below", "", ""])
            continue
        rows.append([r["route"], str(r.get("requests", "-")), ms(latency.get("p50")),
                     ms(latency.get("p99")), r.get("pattern") or "-",
                     f"{ms(held.get('total'))}/{ms(held.get('max'))}",
                     ms((r.get("probe_late_ms") or {}).get("max")),
                     "BLOCKS" if r.get("blocks") else "no", r.get("cause_id") or "",
                     r.get("where") or "", SHORT_FIX.get(r.get("cause_id") or "", "")])
    return aligned(rows)


def stack_lines(frames: list[dict]) -> list[str]:
    """Innermost last, like py-spy: the app's own frames with their line (»), library frames
    folded to a count and their packages, the innermost frame always shown."""
    out, folded = [], []

    def fold():
        if folded:
            packages = ", ".join(dict.fromkeys(library_package(f["file"]) for f in folded))
            out.append(f"        … {len(folded)} frame{'s' * (len(folded) > 1)} in {packages}")
            folded.clear()
    for i, frame in enumerate(frames):
        if frame["own"]:
            fold()
            out.append(f"      » {frame['file']}:{frame['line']} in {frame['function']}")
            if frame.get("code"):
                out.append(f"            {frame['code']}")
        elif i == len(frames) - 1:
            fold()
            out.append(f"        {frame['file']}:{frame['line']} in {frame['function']}"
                       f"   (innermost)")
        else:
            folded.append(frame)
    fold()
    return out


def details(routes: list[dict], per_route: int = 2) -> list[str]:
    """The stacks of each route's main findings (all of them are in --json)."""
    out = []
    n = 0
    for r in routes:
        shown = [f for f in r.get("findings") or [] if f.get("stack") and f["counted"]]
        for found in shown[:per_route]:
            n += 1
            out.append(f"[{n}] {r['route']}: {found['cause']}: {counted(found)}")
            if found.get("detail") and found["detail"] != found["cause"]:
                out.append(f"      ({found['detail']})")
            out.extend(stack_lines(found["stack"]))
        if len(shown) > per_route:
            out.append(f"    … {len(shown) - per_route} more for {r['route']} (--json)")
    return out


def counted(found: dict) -> str:
    what = "wait" if found["cause_id"] in DRIVER_CAUSES else "hold"
    return (f"{found['count']} {what}{'s' * (found['count'] != 1)}, {found['ms']:.1f} ms in "
            f"all, the longest {found['max_ms']:.1f} ms")


def finding_lines(routes: list[dict]) -> list[str]:
    """ruff-style: path:line: what, and what to do."""
    out = []
    for r in routes:
        if r.get("reached") is False:
            out.append(f"{r['route']}: not reached: {r['why']}")
            continue
        if r.get("error"):
            out.append(f"{r['route']}: not audited: {r['error']}")
            continue
        for found in r.get("findings") or []:
            if not found["counted"]:
                continue
            place = found["where"].split(" in ")[0] if found["where"] != "?" else r["route"]
            out.append(f"{place}: {r['route']} holds the loop: {found['cause']} "
                       f"({counted(found)}). Fix: {found['fix']} ({found['link']})")
    return out


def summary(routes: list[dict], took: float, threshold: float, n: int) -> str:
    audited = [r for r in routes if r.get("reached") is not False and not r.get("error")]
    blocking = [r for r in audited if r.get("blocks")]
    causes = ", ".join(dict.fromkeys(r["cause_id"] for r in blocking))
    text = (f"audit: {len(blocking)} of {len(audited)} audited route"
            f"{'s' * (len(audited) != 1)} block{'s' * (len(audited) == 1)} the loop"
            + (f" ({causes})" if causes else ""))
    missed = sum(r.get("reached") is False for r in routes)
    failed = sum(bool(r.get("error")) for r in routes)
    if missed:
        text += f"; {missed} route{'s' * (missed != 1)} not reached"
    if failed:
        text += f"; {failed} not audited"
    return text + f" ({n} requests at once each, threshold {threshold:g} ms, {took:.1f} s)"


# -- the run ------------------------------------------------------------------------------------


class Context:
    """The app under audit: its server, what to send with every request, the loader."""

    def __init__(self, args, load, server: Server, token: str, tmp: str):
        self.args, self.load, self.server, self.token = args, load, server, token
        self.tmp = tmp  # where a worker killed for --timeout writes what held its loop
        self.headers, self.cookies = parse_headers(args.header, args.cookie)
        self.pid = None
        self.patched = False  # the app's worker runs on gevent's patched socket
        self.login_path = None

    def sent_headers(self, spec: Spec) -> dict:
        headers = {"User-Agent": f"audit.py/{VERSION}", "Accept": "*/*",
                   "X-Audit-Route": spec.label, **self.headers}
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        body, ctype = spec.body()
        if body:
            headers.setdefault("Content-Type", ctype)
        return headers

    async def request(self, spec: Spec, timeout: float | None = None) -> Answer:
        import asyncio

        body, _ = spec.body()
        return await asyncio.to_thread(http, self.server.port, spec.method, spec.path,
                                       self.sent_headers(spec), body,
                                       timeout or self.args.timeout)

    async def control(self, what: str, wait: float = 0.0) -> dict:
        """A call to the worker's audit part; retried for up to `wait` s."""
        import asyncio

        deadline = time.monotonic() + wait
        while True:
            try:
                answer = await asyncio.to_thread(http, self.server.port, "GET",
                                                 f"{CONTROL}{self.token}/{what}", {}, b"", 30)
                if answer.status == 200:
                    return answer.json()
                problem = f"answered {answer.status}"
            except (OSError, ValueError) as exc:
                problem = str(exc)
            if not self.server.alive():
                raise Usage(f"the app did not start: {start_failure(self.server.tail(40))}\n"
                            + "\n".join(f"    {line}" for line in self.server.tail()))
            if time.monotonic() > deadline:
                raise Usage(f"the app's worker does not answer the audit ({problem}); its last "
                            f"lines:\n" + "\n".join(f"    {line}" for line in self.server.tail()))
            await asyncio.sleep(0.1)

    def target(self, spec: Spec):
        """A load.py target that sends this route's method, headers and body."""
        target = self.load.Target(spec.label, "127.0.0.1", self.server.port, False, spec.path,
                                  None, False)
        body, _ = spec.body()
        headers = self.sent_headers(spec)
        if body:
            headers["Content-Length"] = str(len(body))

        def request(keep_alive: bool) -> bytes:
            lines = [f"{spec.method} {spec.path} HTTP/1.1", f"Host: 127.0.0.1:{target.port}",
                     *(f"{k}: {v}" for k, v in headers.items()),
                     f"Connection: {'keep-alive' if keep_alive else 'close'}"]
            return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        target.request = request
        return target


def gunicorn_argv(python: str, shim_path: str, extra: list[str], worker: str, workers: int,
                  port: int, app: str, threads: int | None = None) -> list[str]:
    argv = [python, "-m", "gunicorn", "-c", shim_path, *extra, "--worker-class", worker,
            "--workers", str(workers), "--bind", f"127.0.0.1:{port}"]
    if threads:
        argv += ["--threads", str(threads)]
    return argv + [app]


async def start_app(args, load, stack, tmp: str, url: str, worker: str = "gevent",
                    workers: int = 1, threads: int | None = None,
                    mode: str = "audit") -> Context:
    import secrets

    extra, user_config = split_gunicorn_args(args.gunicorn_args, args.chdir)
    shim_path = os.path.join(tmp, "audit_gunicorn_conf.py")
    shim(shim_path, user_config)
    token, port = secrets.token_hex(8), free_port()
    env = {**os.environ, "DATABASE_URL": url, "AUDIT_TOKEN": token, "AUDIT_MODE": mode,
           "AUDIT_THRESHOLD_MS": str(args.threshold), "AUDIT_ROOT": args.chdir,
           "AUDIT_DIR": tmp, "PYTHONUNBUFFERED": "1"}
    argv = gunicorn_argv(args.python, shim_path, extra, worker, workers, port, args.app,
                         threads)
    keep = args.log
    if keep and args.compare:  # one log per worker class: audit.log -> audit-sync.log
        stem, ext = os.path.splitext(keep)
        keep = f"{stem}-{worker}{ext}"
    server = Server(argv, args.chdir, env, os.path.join(tmp, f"gunicorn-{worker}.log"), port,
                    keep)
    stack.callback(server.stop)
    print(f"audit: {' '.join(argv[1:])}  (pid {server.proc.pid}, in {args.chdir})",
          file=sys.stderr, flush=True)
    context = Context(args, load, server, token, tmp)
    hello = await context.control("hello", wait=args.start_timeout)
    context.pid, context.patched = hello["pid"], bool(hello.get("patched"))
    return context


async def audit_route(context: Context, spec: Spec) -> dict:
    args, load = context.args, context.load
    result = {"route": spec.label, "method": spec.method, "path": spec.path, "reached": None,
              "status": None, "blocks": None}
    print(f"audit: {spec.label}: a warm-up request, then {args.requests} at once",
          file=sys.stderr, flush=True)
    try:
        answer = await context.request(spec)
    except OSError as exc:
        if not context.server.alive():
            await context.control("hello")  # raises with the app's last lines
        hello = await context.control("hello", wait=args.start_timeout)
        if hello["pid"] != context.pid:  # gunicorn killed the worker: --timeout
            result.update(reached=True, **timed_out(context, hello["pid"]))
            return result
        result["error"] = f"no answer to the warm-up request: {exc}"
        return result
    result["status"] = answer.status
    moved = 300 <= answer.status < 400
    done_then_moved = moved and spec.method != "GET" and not to_login(
        answer.headers.get("Location") or "", context.login_path)  # POST, then redirect
    if (moved and not done_then_moved) or answer.status in (401, 403):
        result.update(reached=False, why=not_reached_why(answer.status, answer.headers,
                                                         spec.path, context.login_path))
        return result
    if not (200 <= answer.status < 300 or done_then_moved):
        said = answer.body.decode("utf-8", "replace").strip().splitlines()
        json_body = "json" in (answer.headers.get("Content-Type") or "")
        hint = f": {said[0][:100]}" if said and json_body and answer.status != 404 else ""
        result["error"] = (f"answered {answer.status} {answer.reason}{hint}"
                           + (" (is the path right? --route)" if answer.status == 404 else ""))
        return result
    import asyncio

    target = context.target(spec)
    outcomes, total, skew, stopped, connect_s = await load.burst(
        target, args.requests, args.timeout, False, asyncio.Event())
    statuses: dict[str, int] = {}
    for outcome in outcomes:
        if outcome.status is not None:
            statuses[str(outcome.status)] = statuses.get(str(outcome.status), 0) + 1
            if done_then_moved and 300 <= outcome.status < 400:
                outcome.status = 200  # the redirect after a POST is its answer
    analysed = load.analyse(target, args.requests, outcomes, total, skew, None, None,
                            connect_s)
    analysed["statuses"] = dict(sorted(statuses.items()))
    report = await context.control("report", wait=5)
    result.update(reached=True, requests=args.requests, total_s=analysed["total_s"],
                  latency_ms={k: None if v is None else round(v * 1000, 2)
                              for k, v in analysed["latency_s"].items()},
                  statuses=analysed["statuses"], errors=analysed["errors"],
                  pattern=analysed["pattern"], verdict=analysed["verdict"])
    if report["pid"] != context.pid:  # gunicorn killed the worker: --timeout
        result.update(timed_out(context, report["pid"]))
        return result
    result.update(judge(report["routes"].get(spec.label)))
    if report.get("sampling_errors"):
        result["sampling_errors"] = report["sampling_errors"]
    result["monitor"] = report.get("monitor")  # the monitor's checks so far, and their fate
    return result


def timed_out(context: Context, pid: int) -> dict:
    """The judgement of a route during which gunicorn's arbiter killed the worker for
    holding its loop past --timeout (WORKER TIMEOUT), and started PID: a block, at the
    line the dying worker wrote down (its worker_abort hook)."""
    old, context.pid = context.pid, pid
    try:
        with open(os.path.join(context.tmp, f"abort-{old}.json")) as f:
            found = json.load(f)
    except (OSError, ValueError):
        found = {}
    held, cpu = found.get("held_ms"), found.get("cpu_ms") or 0.0
    title, fix, link = fix_for("timeout", found.get("function"))
    detail = (f"worker {old} was killed after holding the loop {held / 1000:.1f} s, "
              f"{'computing' if cpu >= 0.5 * held else 'waiting'} ({cpu / 1000:.1f} s of CPU)"
              if held else f"worker {old} was killed (its log says WORKER TIMEOUT)") + \
        f"; worker {pid} replaced it"
    where = found.get("where") or "?"
    finding = {"cause_id": "timeout", "where": where, "function": found.get("function"),
               "count": 1, "ms": held or 0.0, "max_ms": held or 0.0, "detail": detail,
               "stack": found.get("stack"), "cause": title, "fix": fix, "link": link,
               "counted": True}
    return {"blocks": True, "blocked_ms": held or 0.0, "cause": title, "cause_id": "timeout",
            "where": where, "fix": fix, "link": link, "findings": [finding],
            "worker_replaced": {"pid": old, "by": pid}}


async def login(context: Context, spec: Spec) -> None:
    """POST the login form once and keep the cookies it sets."""
    from http.cookies import CookieError, SimpleCookie

    print(f"audit: logging in: POST {spec.path}", file=sys.stderr, flush=True)
    try:
        answer = await context.request(spec)
    except OSError as exc:
        raise Usage(f"--login {spec.path}: no answer: {exc}") from None
    if answer.status >= 400:
        raise Usage(f"--login {spec.path} answered {answer.status} {answer.reason}: check the "
                    f"path and --data (a form with a CSRF token needs it off for the audit, "
                    f"or log in by hand and pass --cookie)")
    jar = SimpleCookie()
    for header in answer.headers.get_all("Set-Cookie") or []:
        try:
            jar.load(header)
        except CookieError:
            continue
    if not jar:
        raise Usage(f"--login {spec.path} answered {answer.status} and set no cookie: is it "
                    f"the form's path? (its answer: {answer.body[:80]!r})")
    context.cookies.update({name: morsel.value for name, morsel in jar.items()})


async def run(args, load) -> tuple[dict, int]:
    import asyncio
    import contextlib
    import shutil
    import signal
    import tempfile

    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, me.cancel)
    started = time.perf_counter()
    specs, login_spec = pair_data(args.ordered)
    if args.compare and specs:
        parse_weights(args.mix, specs)  # a --mix naming no --route: refused before anything
    settings = {"requests": args.requests, "threshold_ms": args.threshold,
                "chdir": args.chdir, "python": args.python, "gunicorn_args": args.gunicorn_args}
    if args.compare:
        settings.update(compare=True, workers=args.workers, threads=args.threads,
                        slo_ms=args.slo, mix=args.mix, rates=args.rate_list,
                        max_rate=args.max_rate, step_s=args.step)
    document = {"schema": f"audit.py/{VERSION}", "app": args.app,
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "settings": settings}
    try:
        with contextlib.ExitStack() as stack:
            tmp = tempfile.mkdtemp(prefix="audit-")
            stack.callback(shutil.rmtree, tmp, ignore_errors=True)
            if os.environ.get("DATABASE_URL"):
                tidy_after(stack, tmp)  # (else kit.pg's watchdog removes it)
                url = os.environ["DATABASE_URL"]
            else:
                url = await throwaway_database(stack, tmp, args.python)
            await reachable(url)
            environment_found = await app_environment(args.python, args.chdir, url)
            how = "sync, gthread and gevent workers" if args.compare else \
                "gunicorn -k gevent, 1 worker"
            print(f"audit.py {VERSION}: {args.app} under {how}, in {args.chdir}; database "
                  f"{shown_url(url)}")
            if args.compare:
                document.update(await compare_workers(args, load, stack, tmp, url, specs,
                                                      login_spec))
                document["total_s"] = round(time.perf_counter() - started, 2)
                document["exit"] = 0 if document["recommended"] else 1
                return document, document["exit"]
            try:
                context = await start_app(args, load, stack, tmp, url)
            except Usage:
                print("preflight (from the app's interpreter: the app did not start)")
                for mark, text in preflight_checks(environment_found, None):
                    print(f"  {MARKS[mark]} {text}")
                raise
            preflight = await context.control("preflight")
            document["preflight"] = preflight
            print("preflight")
            for mark, text in preflight_checks(preflight["environment"], preflight["runtime"]):
                print(f"  {MARKS[mark]} {text}")
            if environment_found["versions"] != preflight["environment"]["versions"]:
                print("  ! the worker's packages differ from --python's: is --python the "
                      "app's interpreter?")
            specs, document["discovery"] = await routes_to_audit(context, specs)
            if login_spec is not None:
                context.login_path = login_spec.path
                await login(context, login_spec)
            document["routes"] = [await audit_route(context, spec) for spec in specs]
    except asyncio.CancelledError:
        raise Interrupted() from None
    routes = document["routes"]
    took = time.perf_counter() - started
    print()
    print("\n".join(table(routes)))
    lines = details(routes)
    if lines:
        print("\nstacks (innermost last; » marks your code, … library frames folded)")
        print("\n".join(lines))
    lines = finding_lines(routes)
    if lines:
        print()
        print("\n".join(lines))
    print()
    print(summary(routes, took, args.threshold, args.requests))
    document["total_s"] = round(took, 2)
    status = exit_status(routes)
    document["exit"] = status
    return document, status


async def routes_to_audit(context: Context, given: list[Spec]) -> tuple[list[Spec], dict]:
    found = await context.control("routes")
    if given:
        return given, found
    if not found.get("flask"):
        raise Usage(f"{context.args.app} is not a Flask app (it is a {found.get('kind')}): "
                    f"name the routes to audit with --route PATH")
    print(f"routes: {len(found['get'])} GET routes without arguments in the url_map")
    for kind, label in (("with_arguments", "skipped, they take arguments (give them with "
                                           "--route /path/1)"),
                        ("other_methods", "skipped, not GET (audit them with --route "
                                          "'POST /path' --data ...)")):
        if found.get(kind):
            print(f"  {label}: {', '.join(found[kind])}")
    if not found["get"]:
        raise Usage("the app has no GET route without arguments: name routes with --route")
    return [Spec("GET", path) for path in found["get"]], found


def parse_args(argv: list[str] | None):
    import argparse

    class Ordered(argparse.Action):
        """--route, --login and --data keep their order: a --data is for the one before."""

        def __call__(self, parser, namespace, values, option_string=None):
            namespace.ordered = [*(getattr(namespace, "ordered", None) or []),
                                 (self.dest, values)]

    parser = argparse.ArgumentParser(
        prog="audit.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("app", metavar="MODULE:APP",
                        help="the app as gunicorn takes it, e.g. shop:app or "
                             "'shop:create_app()'")
    parser.add_argument("--chdir", default=".", metavar="DIR",
                        help="the folder to run the app from")
    parser.add_argument("--route", action=Ordered, metavar="[METHOD] PATH", default=None,
                        help="audit this route instead of the discovered ones (repeatable): "
                             "/users/1, 'POST /api/tokens'")
    parser.add_argument("--data", action=Ordered, metavar="BODY", default=None,
                        help="the body for the --route or --login just before it: a form "
                             "(a=1&b=2) or JSON")
    parser.add_argument("--login", action=Ordered, metavar="PATH", default=None,
                        help="POST --data to PATH once before the audit and keep the "
                             "session cookie it sets")
    parser.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'",
                        help="sent with every request (repeatable)")
    parser.add_argument("--cookie", action="append", default=[], metavar="NAME=VALUE",
                        help="sent with every request (repeatable)")
    parser.add_argument("--requests", type=int, default=10, metavar="N",
                        help="requests at once per route, after one warm-up request")
    parser.add_argument("--threshold", type=float, default=THRESHOLD_MS, metavar="MS",
                        help="a request that keeps the loop this long at a stretch holds it")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds one request may take")
    parser.add_argument("--start-timeout", type=float, default=60.0, metavar="S",
                        help="seconds the app may take to start answering")
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter of the app's environment (with gunicorn and "
                             "gevent installed)")
    parser.add_argument("--gunicorn-args", default="", metavar="'...'",
                        help="your own gunicorn flags, e.g. '--preload -c gunicorn.conf.py' "
                             "(paths relative to DIR)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--log", metavar="FILE", help="keep gunicorn's log (the app's output)")
    compare_arguments(parser)
    args = parser.parse_args(argv)
    args.ordered = getattr(args, "ordered", None) or []
    if ":" not in args.app or args.app.startswith(":"):
        raise Usage(f"{args.app!r}: give MODULE:APP, as gunicorn takes it (shop:app)")
    if not os.path.isdir(args.chdir):
        raise Usage(f"--chdir {args.chdir}: no such folder")
    args.chdir = os.path.realpath(args.chdir)
    if os.sep in args.python and not os.path.isabs(args.python):
        args.python = os.path.abspath(args.python)  # from here, not from --chdir
    if not 1 <= args.requests <= 1000:
        raise Usage(f"--requests {args.requests}: give from 1 to 1000")
    for name in ("threshold", "timeout", "start_timeout"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            raise Usage(f"--{name.replace('_', '-')} {value:g}: give a number > 0")
    if args.threshold < 2:
        raise Usage(f"--threshold {args.threshold:g}: at least 2 ms (the audit's monitor "
                    f"checks every threshold / 2)")
    for flag in ("json", "log"):
        writable(getattr(args, flag), flag)
    check_compare_arguments(args)
    return args


def writable(path: str | None, flag: str) -> None:
    """--json and --log are checked before the audit, not after it."""
    if not path:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise Usage(f"--{flag} {path}: the folder {folder} does not exist")
    if os.path.isdir(path) or not os.access(path if os.path.exists(path) else folder, os.W_OK):
        raise Usage(f"--{flag} {path}: cannot write there")


def main(argv: list[str] | None = None) -> int:
    import asyncio

    try:
        args = parse_args(argv)
        pair_data(args.ordered)
        parse_headers(args.header, args.cookie)
        load = import_load()
        document, status = asyncio.run(run(args, load))
    except Usage as exc:
        print(f"audit.py: {exc}", file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt):
        print("audit.py: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    if args.json:
        try:
            with open(args.json, "w") as out:
                json.dump(document, out, indent=2)
                out.write("\n")
        except OSError as exc:
            print(f"audit.py: cannot write {args.json}: {exc.strerror}", file=sys.stderr)
            return 2
    return status


# ------------------------------------------------------------------------- --compare
# The same app under sync, gthread and gevent workers, each loaded at rising open-loop rates
# (load.py's open loop) with the audited routes: which one sustains the most?

WORKERS = ("sync", "gthread", "gevent")
NOISE = 1.5  # a worker must sustain more than this times sync's rate to be worth it


def compare_arguments(parser) -> None:
    group = parser.add_argument_group("--compare: which worker class for this app")
    group.add_argument("--compare", action="store_true",
                       help="run the app under sync, gthread and gevent workers at rising "
                            "open-loop rates and recommend one")
    group.add_argument("--workers", type=int, default=1, metavar="W",
                       help="gunicorn workers of each class")
    group.add_argument("--threads", type=int, default=10, metavar="T",
                       help="threads of each gthread worker")
    group.add_argument("--slo", type=float, default=None, metavar="MS",
                       help="the p99 each route must keep (default: 3 x its p99 alone, at "
                            "least 100 ms)")
    group.add_argument("--mix", default=None, metavar="SPEC",
                       help="weights of the routes, e.g. '9:/todos/,1:/report/' (default: "
                            "equal)")
    group.add_argument("--rates", default=None, metavar="R1,R2,...",
                       help="the offered rates to try, requests/s (default: doubling from "
                            "what one worker serves alone, up to --max-rate)")
    group.add_argument("--max-rate", type=float, default=512.0, metavar="R",
                       help="the highest rate the default ladder tries")
    group.add_argument("--step", type=float, default=5.0, metavar="S",
                       help="seconds of load at each rate")


def check_compare_arguments(args) -> None:
    if not 1 <= args.workers <= 64:
        raise Usage(f"--workers {args.workers}: give from 1 to 64")
    if not 1 <= args.threads <= 1000:
        raise Usage(f"--threads {args.threads}: give from 1 to 1000")
    if args.slo is not None and not (math.isfinite(args.slo) and args.slo > 0):
        raise Usage(f"--slo {args.slo:g}: give milliseconds > 0")
    if not (math.isfinite(args.step) and 0.5 <= args.step <= 600):
        raise Usage(f"--step {args.step:g}: give from 0.5 to 600 seconds")
    if not (math.isfinite(args.max_rate) and args.max_rate > 0):
        raise Usage(f"--max-rate {args.max_rate:g}: give a number > 0")
    if args.mix is not None:
        parse_mix(args.mix)
    args.rate_list = None
    if args.rates is not None:
        try:
            args.rate_list = sorted({float(r) for r in args.rates.split(",") if r.strip()})
        except ValueError:
            raise Usage(f"--rates {args.rates!r}: give rates, e.g. 2,8,32") from None
        if not args.rate_list or not all(math.isfinite(r) and r > 0 for r in args.rate_list):
            raise Usage(f"--rates {args.rates!r}: give rates > 0, e.g. 2,8,32")


def ladder(alone_s: float, workers: int, max_rate: float) -> list[float]:
    """Doubling rates from about half of what the workers serve one request at a time."""
    start = max(1.0, 2 ** math.floor(math.log2(max(1e-9, 0.5 * workers / max(alone_s,
                                                                          1e-4)))))
    rates = []
    while start <= max_rate:
        rates.append(start)
        start *= 2
    return rates or [max_rate]


def sustained_rate(steps: list[dict]) -> float | None:
    """The highest rate that passed below the lowest that failed (a pass above a failure is
    not claimed); None when none passed."""
    failed = [s["rate"] for s in steps if not s["ok"]]
    ceiling = min(failed) if failed else math.inf
    passed = [s["rate"] for s in steps if s["ok"] and s["rate"] < ceiling]
    return max(passed) if passed else None


def limit_of(worker: dict) -> float | None:
    """The lowest rate the worker failed at; None when it passed every rate tried (its
    sustained rate is then only a lower bound)."""
    failed = [s["rate"] for s in worker.get("rates") or [] if not s["ok"]]
    return min(failed) if failed else None


def listed(names: list[str]) -> str:
    return " and ".join(names) if len(names) < 3 else \
        f"{', '.join(names[:-1])} and {names[-1]}"


def shown_rate(worker: dict) -> str:
    rate = worker["sustained_rate"]
    return "-" if rate is None else f"{'≥ ' if limit_of(worker) is None else ''}{rate:g}/s"


def recommend(table: list[dict], noise: float = NOISE) -> tuple[str | None, str]:
    """(the worker, why in one line). A worker that does not beat sync by more than noise is
    not worth its complexity: with CPU-bound routes, that is every worker. A rate a worker
    passed without failing any is a lower bound: no winner, and no "CPU-bound", is named
    on lower bounds alone."""
    ran = [w for w in table if not w.get("error")]
    rated = [w for w in ran if w["sustained_rate"] is not None]
    if not rated:
        return None, ("no worker sustained even the lowest rate within the SLO: try lower "
                      "--rates or a larger --slo")
    sync = next((w for w in ran if w["worker"] == "sync"), None)
    top = max(w["sustained_rate"] for w in rated)
    best = [w for w in rated if w["sustained_rate"] == top]  # WORKERS order: simplest first
    open_ended = [w["worker"] for w in best if limit_of(w) is None]
    raise_rates = "raise --rates (or --max-rate) to tell"
    if len(open_ended) > 1:
        who = "every worker" if len(open_ended) == len(ran) else \
            f"{listed(open_ended)} each"
        return None, f"{who} sustained every rate tried (≥ {top:g}/s): {raise_rates} them apart"
    base = sync["sustained_rate"] if sync else None
    if sync is None or base is None:
        said = "sync did not run" if sync is None else "sync sustained none of the rates"
        return best[0]["worker"], (f"{best[0]['worker']} sustained {shown_rate(best[0])}, "
                                   f"where {said}; each route's p99 within its SLO")
    if top > noise * base:
        return best[0]["worker"], (f"{best[0]['worker']} sustained {shown_rate(best[0])}, "
                                   f"{top / base:.1f} x sync's {shown_rate(sync)}, each "
                                   f"route's p99 within its SLO")
    if limit_of(sync) is None:  # sync alone passed every rate: the others failed below it
        others = ", ".join(f"{w['worker']} {shown_rate(w)}" for w in ran if w is not sync)
        return "sync", (f"sync sustained every rate tried ({shown_rate(sync)}), the others "
                        f"less ({others}); sync is the simplest (raise --rates to find its "
                        f"limit)")
    unknown = [w["worker"] for w in ran if w is not sync and (
        limit_of(w) is None or limit_of(w) > noise * limit_of(sync))]
    if unknown:
        return None, (f"no worker beat sync's {base:g}/s by more than {noise:g} x at the rates "
                      f"tried, but where {listed(unknown)} fail is not known within "
                      f"{noise:g} x of sync's limit: rates closer together (--rates) tell")
    best_other = max((w for w in rated if w is not sync), default=sync,
                     key=lambda w: w["sustained_rate"])
    return "sync", (f"CPU-bound: no worker sustained more than {noise:g} x sync's {base:g}/s "
                    f"(best: {best_other['worker']} at {best_other['sustained_rate']:g}/s, "
                    f"each failing by {noise:g} x sync's failing rate); more concurrency does "
                    f"not help CPU work, and sync is the simplest")


def parse_mix(spec: str | None) -> dict[str, float]:
    """--mix '9:/todos/,1:/report/' as {route: weight}."""
    weights: dict[str, float] = {}
    for entry in (spec or "").split(","):
        if not entry.strip() and spec:
            continue
        weight, sep, what = entry.strip().partition(":")
        try:
            share = float(weight)
        except ValueError:
            share = -1
        if not sep or not what.strip() or not (math.isfinite(share) and share > 0):
            raise Usage(f"--mix {entry.strip()!r}: give WEIGHT:ROUTE, e.g. 9:/todos/")
        weights[what.strip()] = share
    return weights


def parse_weights(spec: str | None, specs: list[Spec]) -> list[float]:
    """Each route's weight in the --mix (equal without one); a --mix naming a route that is
    not audited is refused."""
    if not spec:
        return [1.0] * len(specs)
    weights = parse_mix(spec)
    unknown = set(weights) - {s.label for s in specs} - {s.path for s in specs}
    if unknown:
        raise Usage(f"--mix: {', '.join(sorted(unknown))} is not an audited route")
    return [weights.get(s.label, weights.get(s.path, 0.0)) for s in specs]


def worker_pids(master: int) -> list[int]:
    try:
        with open(f"/proc/{master}/task/{master}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def database_connections(pid: int, port: int) -> int:
    """The process's established TCP connections to the database's port (Linux): the
    backends it holds, as pg_stat_activity lists them."""
    try:
        inodes = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        count = 0
        for table in ("tcp", "tcp6"):
            with open(f"/proc/{pid}/net/{table}") as f:
                for line in f.readlines()[1:]:
                    fields = line.split()
                    if fields[3] == "01" and int(fields[2].rsplit(":", 1)[1], 16) == port \
                            and fields[9] in inodes:
                        count += 1
        return count
    except OSError:
        return 0


async def watch(server: Server, db_port: int, peak: dict, stop) -> None:
    """Every 0.1 s: the workers' RSS and database connections, keeping the peaks."""
    import asyncio

    while not stop.is_set():
        pids = worker_pids(server.proc.pid)
        peak["rss_mb"] = max(peak["rss_mb"], sum(rss_mb(p) for p in pids) / max(1, len(pids)))
        peak["connections"] = max(peak["connections"],
                                  sum(database_connections(p, db_port) for p in pids))
        try:
            await asyncio.wait_for(stop.wait(), 0.1)
        except asyncio.TimeoutError:
            pass


async def alone(context: Context, specs: list[Spec], n: int = 10) -> dict:
    """Each route's p99 alone: n requests one after another (the slowest of them)."""
    took = {}
    for spec in specs:
        times = []
        for _ in range(n):
            started = time.perf_counter()
            answer = await context.request(spec)
            if not 200 <= answer.status < 300:
                hint = not_reached_why(answer.status, answer.headers) if \
                    300 <= answer.status < 400 or answer.status in (401, 403) else \
                    "audit it first"
                raise Usage(f"{spec.label} answered {answer.status}: --compare needs routes "
                            f"that answer 2xx ({hint})")
            times.append(time.perf_counter() - started)
        took[spec.label] = sorted(times)[max(0, math.ceil(0.99 * n) - 1)]
    return took


async def step(context: Context, specs, weights, rate: float, slo: dict, duration: float,
               connections: int) -> dict:
    """One open-loop run at RATE; ok when every request got a 2xx and each route's p99
    stayed within its SLO."""
    import asyncio

    load = context.load
    mix = [(w, context.target(s)) for w, s in zip(weights, specs) if w > 0]
    timeout = max(2.0, 5 * max(slo.values()) / 1000)
    try:
        per_target, run, _ = await load.open_loop(mix, rate, duration, "constant", connections,
                                                  timeout, 1, asyncio.Event())
    except load.Unreachable as exc:
        return {"rate": rate, "ok": False, "error": str(exc)}
    routes, ok, all_ok = {}, run["sent"] == run["planned"], []
    for (share, target), outcomes in zip(mix, per_target):
        result = load.analyse_open(target, outcomes, run, share / sum(weights))
        latency = result["latency_s"]
        bad = sum(v for k, v in result["statuses"].items() if not k.startswith("2")) + \
            sum(result["errors"].values())
        p99 = None if latency["p99"] is None else latency["p99"] * 1000
        route_ok = bad == 0 and p99 is not None and p99 <= slo[target.endpoint]
        ok = ok and route_ok
        all_ok += [o.done - o.sent for o in outcomes if load.is_ok(o)]
        routes[target.endpoint] = {"p50_ms": None if latency["p50"] is None else
                                   round(latency["p50"] * 1000, 1),
                                   "p99_ms": None if p99 is None else round(p99, 1),
                                   "not_2xx": bad, "ok": route_ok}
    p50, p99 = load.percentile(all_ok, 50), load.percentile(all_ok, 99)
    return {"rate": rate, "ok": ok, "sent": run["sent"], "answered_2xx": len(all_ok),
            "p50_ms": None if p50 is None else round(p50 * 1000, 1),
            "p99_ms": None if p99 is None else round(p99 * 1000, 1),
            "client_lag_p99_ms": round((run["lag_s"]["p99"] or 0) * 1000, 2),
            "routes": routes}


async def compare_workers(args, load, stack, tmp, url, specs, login_spec) -> dict:
    """Each worker class in turn: start, log in, the rates, stop. Returns the document's
    compare part, and prints the table."""
    import asyncio
    import contextlib
    from urllib.parse import urlsplit

    db_port = urlsplit(url).port or 5432
    table, slo, rates, took_alone = [], None, args.rate_list, None
    weights = None
    for worker in WORKERS:
        print(f"audit: --compare: {worker} x {args.workers}", file=sys.stderr, flush=True)
        with contextlib.ExitStack() as own:
            try:
                context = await start_app(args, load, own, tmp, url, worker, args.workers,
                                          args.threads if worker == "gthread" else None,
                                          mode="compare")
            except Usage as exc:
                if worker == WORKERS[-1] and not table:
                    raise
                said = str(exc).splitlines()[0]
                print(f"audit: --compare: {worker}: {said}", file=sys.stderr, flush=True)
                table.append({"worker": worker, "workers": args.workers,
                              "threads": args.threads if worker == "gthread" else None,
                              "sustained_rate": None, "rates": [], "peak_connections": None,
                              "rss_mb": None, "error": said})
                continue
            if worker != "gevent" and context.patched:
                raise Usage(f"{args.app} runs on gevent's patched sockets under a {worker} "
                            f"worker: the app calls gevent's monkey.patch_all() when imported, "
                            f"so it runs only under gevent (a gthread worker hangs); compare "
                            f"the module without its patching preamble (app_sync.py is "
                            f"app_green.py without it)")
            if not specs:
                specs, _ = await routes_to_audit(context, [])
            if weights is None:
                weights = parse_weights(args.mix, specs)
            if login_spec is not None:
                await login(context, login_spec)
            if took_alone is None:
                took_alone = await alone(context, specs)
                slo = {label: args.slo or max(100.0, 3000 * s) for label, s in
                       took_alone.items()}
                mean = sum(took_alone[s.label] * w for s, w in zip(specs, weights)) / \
                    sum(weights)
                rates = rates or ladder(mean, args.workers, args.max_rate)
                print(f"audit: --compare: SLO (p99) "
                      + ", ".join(f"{k} {v:.0f} ms" for k, v in slo.items())
                      + f"; rates {', '.join(f'{r:g}' for r in rates)}/s, {args.step:g} s each",
                      file=sys.stderr, flush=True)
            peak, stop = {"rss_mb": 0.0, "connections": 0}, asyncio.Event()
            watcher = asyncio.ensure_future(watch(context.server, db_port, peak, stop))
            steps = []
            try:
                for rate in rates:
                    steps.append(await step(context, specs, weights, rate, slo, args.step,
                                            min(load.MAX_OPEN, 200)))
                    say_step(worker, steps[-1])
                    if not steps[-1]["ok"]:
                        break
                fine, failed = sustained_rate(steps), next((s["rate"] for s in steps
                                                            if not s["ok"]), None)
                if args.rate_list is None and fine is not None and failed is not None:
                    between = round(math.sqrt(fine * failed), 1)  # one step between them
                    if fine < between < failed:
                        steps.append(await step(context, specs, weights, between, slo,
                                                args.step, min(load.MAX_OPEN, 200)))
                        say_step(worker, steps[-1])
            finally:
                stop.set()
                await watcher
        table.append({"worker": worker, "workers": args.workers,
                      "threads": args.threads if worker == "gthread" else None,
                      "sustained_rate": sustained_rate(steps),
                      "limit_found": any(not s["ok"] for s in steps), "rates": steps,
                      "peak_connections": peak["connections"],
                      "rss_mb": round(peak["rss_mb"], 1)})
    rates = rates or []
    common = [r for r in rates if all(any(s["rate"] == r and s["ok"] for s in w["rates"])
                                      for w in table if not w.get("error"))]
    common_rate = max(common) if common else None
    for w in table:
        at = next((s for s in w["rates"] if s["rate"] == common_rate), None)
        w["p99_at_common_ms"] = None if at is None else at["p99_ms"]
    recommended, why = recommend(table)
    print_compare(table, common_rate, recommended, why, slo)
    return {"compare": table, "common_rate": common_rate, "slo_ms": slo,
            "alone_ms": {k: round(v * 1000, 1) for k, v in (took_alone or {}).items()},
            "recommended": recommended, "why": why}


def say_step(worker: str, result: dict) -> None:
    mark = "ok" if result["ok"] else "FAILED"
    print(f"  {worker} at {result['rate']:g}/s: p50 {ms(result.get('p50_ms'))} p99 "
          f"{ms(result.get('p99_ms'))} ms, {result.get('answered_2xx', 0)} of "
          f"{result.get('sent', 0)} answered 2xx: {mark}", file=sys.stderr, flush=True)


def print_compare(table, common_rate, recommended, why, slo) -> None:
    rows = [["worker", "sustained/s", "rates tried: rate ok? p50/p99 ms", "peak db conns",
             "RSS MB", f"p99 ms at {common_rate:g}/s" if common_rate else "p99 (common)"]]
    for w in table:
        tried = ", ".join(f"{s['rate']:g} {'✓' if s['ok'] else '✗'} {ms(s.get('p50_ms'))}/"
                          f"{ms(s.get('p99_ms'))}" for s in sorted(w["rates"],
                                                                 key=lambda s: s["rate"]))
        label = w["worker"] + (f" ({w['threads']} threads)" if w["threads"] else "")
        if w.get("error"):
            rows.append([label, "-", f"did not run: {w['error'][:70]}", "-", "-", "-"])
            continue
        rows.append([label, shown_rate(w).removesuffix("/s"),
                     tried, str(w["peak_connections"]), f"{w['rss_mb']:.0f}",
                     ms(w["p99_at_common_ms"])])
    print()
    print("\n".join(aligned(rows)))
    print(f"\nSLO (p99): " + ", ".join(f"{k} {v:.0f} ms" for k, v in slo.items()))
    print(f"recommended: {recommended or 'none'}: {why}")


if __name__ == "__main__":
    sys.exit(main())
