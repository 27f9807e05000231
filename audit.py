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
warm-up request, then N at once (load.py's burst and its analysis). Inside the worker,
gevent's own monitor (its EventLoopBlocked event) takes the stack of whatever holds the loop,
while it holds it; a greenlet tracer times every stretch a request keeps the loop; a probe
greenlet measures how late it wakes; and the database driver's wait is timed, so a query that
holds the loop for a fraction of a millisecond is still seen.

Standard library only, like load.py, which it needs beside it (copy both). Its worker-side
part is this same file, handed to the app's interpreter as a gunicorn config (`--python`).
Preflight and findings go to stdout, progress to stderr. Exit status: 0 when no route
blocks, 1 when one does, 3 when none does but some were not reached (a redirect to a login,
401, 403), 2 on bad usage or when the app or its database cannot be started, 130 when
interrupted (Ctrl-C, SIGTERM); nothing it started is left running.
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
PROBE_EVERY = 0.005  # s between the probe greenlet's wake-ups
SAMPLES = 5  # stacks the monitor takes of one stretch at most (the most common one counts)
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
    "cpu": ("CPU in Python: the request computes without yielding",
            "move {function} out of the request (a process pool, a task queue), or serve "
            "this route from a sync or gthread worker",
            "audit.md#cpu-in-python"),
    "c_call": ("a C call that does not yield to gevent",
               "run it in gevent's threadpool (gevent.get_hub().threadpool.apply(fn, args)) "
               "or use a cooperative library",
               "audit.md#a-c-call"),
    "unknown": ("the loop was held, computing, but no stack was caught",
                "lower --threshold, or run gevent's monitor (GEVENT_MONITOR_THREAD_ENABLE)",
                "audit.md#unknown"),
    "paused": ("the process was not running (the machine was busy): not the app's doing",
               "nothing in the app; rerun the audit on a quieter machine",
               "audit.md#unknown"),
}
DRIVER_CAUSES = ("psycopg2", "psycopg3")
SHORT_FIX = {"psycopg2": "patch_psycopg()", "psycopg3": "patch before import",
             "dns": "hostaddr=", "cpu": "move out of request", "c_call": "threadpool",
             "unknown": "--threshold", "paused": "rerun"}


def fix_for(cause: str, function: str | None = None) -> tuple[str, str, str]:
    """(title, fix, link) of a cause; the CPU fix names the function."""
    title, fix, link = CAUSES.get(cause, CAUSES["unknown"])
    return title, fix.format(function=f"{function}()" if function else "the computation"), \
        DOCS + link


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


def classify(frames: list[dict], calling: bool, busy: bool, drivers: dict) -> tuple[str, str]:
    """The cause of a held loop from one sample of its stack (outermost first, each frame
    {"file", "line", "function", "own"}), whether the innermost frame was at a call into C,
    whether the thread then used its CPU, and the drivers' state ({"psycopg2_blocks",
    "psycopg_blocks", "host_is_name", "host"}). Returns (cause, detail)."""
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
    where = "" if top is None else f"{top['function']}"
    if calling:
        return "c_call", ("computing in C (it released the GIL: a thread can run it)" if busy
                          else "waiting in C (a sleep or I/O gevent did not patch)") + \
            (f", called from {where}" if where else "")
    return "cpu", f"Python code running in {where}" if where else "Python code running"


def innermost_own(frames: list[dict], driver: bool = False) -> dict | None:
    """The innermost frame in the app's own files, else the innermost frame. An own frame
    with the same library just outside and just inside it is a hook that library calls in
    the middle of its own work (an event listener): the line to change is further out,
    where the app called the library. For a driver's wait (driver=True), so is any own frame
    a library called on behalf of the app's code further out (a wrapper around the driver's
    execute or connect, such as harden()'s)."""
    for i in range(len(frames) - 1, -1, -1):
        if frames[i]["own"] and not hooked(frames, i) and not (driver and called_back(frames, i)):
            return frames[i]
    return frames[-1] if frames else None


def called_back(frames: list[dict], i: int) -> bool:
    """Is own frame i in a run of own frames that a library called, inside a call the app's
    own code made (a wrapper and its helpers)?"""
    while i > 0 and frames[i - 1]["own"]:
        i -= 1
    return i > 0 and any(f["own"] for f in frames[:i - 1])


def hooked(frames: list[dict], i: int) -> bool:
    inner = frames[i + 1] if i + 1 < len(frames) else None
    outer = frames[i - 1] if i > 0 else None
    return inner is not None and outer is not None and not inner["own"] \
        and not outer["own"] and library_package(inner["file"]) == \
        library_package(outer["file"])


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

    def described(self, raw: list[tuple[str, int, str]]) -> list[dict]:
        import linecache

        frames = []
        for filename, line, function in reversed(raw):
            own, shown = self.look(filename)
            if shown == self.me:
                continue
            entry = {"file": shown, "line": line, "function": function, "own": own}
            if own:
                entry["code"] = linecache.getline(filename, line).strip()
            frames.append(entry)
        return frames

    def where(self, frame) -> str:
        """where_of(innermost_own(..., driver=True)) from frame outward (the per-query path:
        file names are looked up once each)."""
        frames: list[dict] = []
        while frame is not None:
            code = frame.f_code
            own, shown = self.look(code.co_filename)
            if shown != self.me:
                frames.append({"file": shown, "line": frame.f_lineno,
                               "function": code.co_name, "own": own})
            frame = frame.f_back
        frames.reverse()
        return where_of(innermost_own(frames, driver=True))


def raw_stack(frame, limit: int = 80) -> list[tuple[str, int, str]]:
    """(file, line, function) from frame outward: quick, for a frame that is about to move."""
    found = []
    while frame is not None and len(found) < limit:
        found.append((frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name))
        frame = frame.f_back
    return found


def in_c_call(frame) -> bool:
    """Is this (innermost) frame at a call instruction? A Python callee would be a frame of
    its own: the call is into C."""
    import dis

    code, lasti = frame.f_code.co_code, frame.f_lasti
    return 0 <= lasti < len(code) and "CALL" in dis.opname[code[lasti]]


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
        self.late: list[float] = []
        self.findings: dict[tuple[str, str], dict] = {}
        self.holds: list[tuple[int, int, float, float]] = []  # (request, stretch, s, CPU s)
        self.samples: dict[tuple[int, int], list] = {}  # (request, stretch) -> the monitor's

    def finding(self, cause: str, where: str, seconds: float, stack=None,
                detail: str = "") -> None:
        found = self.findings.get((cause, where))
        if found is None:
            found = self.findings[(cause, where)] = {
                "cause_id": cause, "where": where, "count": 0, "ms": 0.0, "max_ms": 0.0,
                "detail": detail, "stack": stack}
        found["count"] += 1
        found["ms"] += seconds * 1000
        if stack is not None and (found["stack"] is None or seconds * 1000 > found["max_ms"]):
            found["stack"] = stack  # the longest one's
        found["max_ms"] = max(found["max_ms"], seconds * 1000)

    def resolved(self) -> list[dict]:
        """The findings: the drivers' waits, and each hold with the monitor's sample of its
        stack (a sample can come in after its stretch ended: matched here, not then)."""
        holds = Route(self.label)
        for request, stretch, seconds, cpu in list(self.holds):
            samples = self.samples.get((request, stretch))
            if not samples:
                # no stack: gevent's monitor thread did not run either, unless it failed.
                # Little CPU used: the whole process was paused, not the app's doing.
                cause = "unknown" if cpu >= 0.5 * seconds else "paused"
                holds.finding(cause, "?", seconds, None, fix_for(cause)[0])
                continue
            # the monitor may sample a stretch more than once: the most common answer wins
            votes: dict = {}
            for cause, detail, frames in samples:
                where = where_of(innermost_own(frames, driver=cause in ("psycopg2", "psycopg3",
                                                                        "dns")))
                votes.setdefault((cause, where), []).append((detail, frames))
            (cause, where), picked = max(votes.items(), key=lambda item: len(item[1]))
            holds.finding(cause, where, seconds, picked[0][1], picked[0][0])
        return list(self.findings.values()) + list(holds.findings.values())

    def report(self) -> dict:
        late = sorted(self.late)
        p99 = late[max(0, math.ceil(0.99 * len(late)) - 1)] if late else None
        return {"requests": self.requests,
                "held_ms": {"total": round(self.held_total * 1000, 2),
                            "max": round(self.held_max * 1000, 2)},
                "long_requests": self.long_requests,
                "long_ms": round(self.long_total * 1000, 2),
                "probe_late_ms": {"max": round(late[-1] * 1000, 2) if late else None,
                                  "p99": round(p99 * 1000, 2) if p99 is not None else None,
                                  "samples": len(late)},
                "findings": [dict(f, ms=round(f["ms"], 3), max_ms=round(f["max_ms"], 3))
                             for f in sorted(self.resolved(), key=lambda f: -f["ms"])]}


class Request:
    """One request in flight: its route, its number, how many stretches it has run, the
    longest, and the time the current one spent in a driver's wait."""

    __slots__ = ("route", "number", "stretches", "longest", "in_driver")
    count = 0

    def __init__(self, route: Route):
        Request.count += 1
        self.route, self.number, self.stretches = route, Request.count, 0
        self.longest, self.in_driver = 0.0, 0.0


class Worker:
    """The audit inside one gunicorn worker: the WSGI wrapper, the control answers, and
    (under gevent) the tracer, the monitor's subscriber, the probe and the driver timers."""

    def __init__(self, token: str, threshold: float, root: str, before_patch: dict):
        self.prefix = CONTROL + token + "/"
        self.threshold = threshold
        self.files = Files(root)
        self.before_patch = before_patch
        self.routes: dict[str, Route] = {}
        self.requests: dict = {}  # greenlet (or thread) -> Request
        self.app = None
        self.gevent = False
        self.since, self.cpu_since = time.perf_counter(), time.thread_time()
        self.previous_trace = None
        self.drivers = {"psycopg2_blocks": False, "psycopg_blocks": False,
                        "host_is_name": False, "host": None, "psycopg2_imported": False,
                        "psycopg2_wait_callback": None, "psycopg_imported": False,
                        "psycopg_wait": None}
        self.read_host()
        self.hub_ident = None
        self.cpu_clock = None
        self.waiting = None  # the driver whose wait holds the loop right now
        self.running = None  # the greenlet the last switch went to
        self.errors: list[str] = []  # what went wrong while sampling
        self.ran: set = set()  # the routes that held the loop since the probe last woke
        self.events = dict.fromkeys(("events", "checks", "sampled", "not a request's",
                                     "in a driver's wait", "moved on", "no frame",
                                     "in gevent's own I/O"), 0)

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
                now, used = time.perf_counter(), time.thread_time()
                self.stretch(state, now - self.since, used - self.cpu_since)
                self.since, self.cpu_since = now, used

    def current(self):
        """This request's greenlet (under gevent) or thread."""
        import threading

        return threading.get_ident()

    def control(self, what: str, start_response):
        if what == "hello":
            body = {"pid": os.getpid(), "gevent": self.gevent}
        elif what == "preflight":
            body = self.preflight()
        elif what == "routes":
            body = discover(self.app)
        elif what == "report":
            body = {"pid": os.getpid(), "threshold_ms": self.threshold * 1000,
                    "sampling_errors": self.errors[:5], "monitor": dict(self.events),
                    "routes": {label: r.report() for label, r in self.routes.items()}}
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
        where = self.files.where(frame)
        found = state.route.findings.get((cause, where))
        longest = found is None or seconds * 1000 > found["max_ms"]
        stack = self.files.stack(frame) if longest else None
        state.route.finding(cause, where, seconds, stack, fix_for(cause)[0])

    # -- gevent: the tracer, the monitor, the probe ---------------------------------------
    def instrument(self) -> None:
        import gevent
        import greenlet
        from gevent import events

        self.gevent = True
        self.current = greenlet.getcurrent
        hub = gevent.get_hub()
        self.hub_ident = hub.thread_ident
        try:
            self.cpu_clock = time.pthread_getcpuclockid(self.hub_ident)
        except (AttributeError, OSError):
            self.cpu_clock = None
        self.previous_trace = greenlet.settrace(self.trace)
        gevent.config.max_blocking_time = self.threshold / 2  # a hold >= threshold spans a
        gevent.config.monitor_thread = True                    # whole period: it is caught
        gevent.config.print_blocking_reports = False  # the stacks come to us, not the log
        events.subscribers.append(self.blocked)
        monitor = hub.start_periodic_monitoring_thread()
        # and a check of our own in the same thread, every threshold / 4: gevent's reports
        # a hold after two of its periods without a switch, often as the stretch ends
        # (answering, or past the request); the tracer knows when the stretch began
        monitor.add_monitoring_function(self.check, self.threshold / 4)
        gevent.spawn(self.probe)
        self.watch_drivers()

    def trace(self, event, args, clock=time.perf_counter, cpu=time.thread_time) -> None:
        """greenlet's trace function: on every switch, the greenlet switched away from held
        the loop since the previous switch. The hot path: a few attribute reads."""
        if event == "switch" or event == "throw":
            now, used = clock(), cpu()
            self.running = args[1]
            state = self.requests.get(args[0])
            if state is not None:
                self.stretch(state, now - self.since, used - self.cpu_since)
            self.since, self.cpu_since = now, used
        if self.previous_trace is not None:
            self.previous_trace(event, args)

    def stretch(self, state: Request, held: float, cpu: float = 0.0) -> None:
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
        route.holds.append((state.number, state.stretches - 1, held, cpu))

    def guarded(self, call, *args) -> None:
        """CALL(*args) in gevent's monitor thread, never raising: an exception would end that
        thread for the rest of the run."""
        try:
            call(*args)
        except Exception as exc:  # noqa: BLE001  the first is kept for the report
            self.errors.append(f"{type(exc).__name__}: {exc}")
            if len(self.errors) == 1:
                import traceback

                traceback.print_exc()

    def blocked(self, event) -> None:
        """gevent's subscriber: EventLoopBlocked, while the loop is still held."""
        self.guarded(self.sample, event)

    def check(self, _hub) -> None:
        """In gevent's monitor thread, every threshold / 4: a request that has held the loop
        for half the threshold is sampled now, while it holds it."""
        self.guarded(self.sample_long_hold)

    def sample_long_hold(self) -> None:
        running = self.running
        if running in self.requests and time.perf_counter() - self.since >= self.threshold / 2:
            self.events["checks"] += 1
            self.take(running)

    def sample(self, event) -> None:
        from gevent.events import EventLoopBlocked

        if isinstance(event, EventLoopBlocked):
            self.events["events"] += 1
            self.take(event.greenlet)

    def take(self, greenlet) -> None:
        """Take the stack of the request holding the loop, note whether it is in a call into
        C (and then whether the thread computes or waits), and keep it under (request,
        stretch), for the report to match with the stretch the tracer timed."""
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
        raw, calling, drivers = raw_stack(frame), in_c_call(frame), connecting_to(frame)
        del frame
        if self.running is not greenlet or state.stretches != key[1]:
            seen["moved on"] += 1
            return  # the stretch ended while we looked: the sample may be another's
        described = self.files.described(raw)
        if described and not described[-1]["own"] and \
                library_package(described[-1]["file"]) == "gevent":
            seen["in gevent's own I/O"] += 1  # a socket call that would yield if it had to
            return  # (the answer being sent): never what holds the loop
        seen["sampled"] += 1
        busy = False
        if calling and self.cpu_clock is not None:  # computing, or waiting?
            from gevent.monkey import get_original

            cpu = self.cpu_seconds()
            get_original("time", "sleep")(0.001)
            busy = self.cpu_seconds() - cpu > 0.0005
        cause, detail = classify(described, calling, busy, dict(self.drivers, **drivers))
        state.route.samples.setdefault(key, []).append((cause, detail, described))

    def cpu_seconds(self) -> float | None:
        return None if self.cpu_clock is None else time.clock_gettime(self.cpu_clock)

    def probe(self) -> None:
        """Wake every PROBE_EVERY s; how late each wake-up came is charged to every route
        that ran since the last one or has a request in flight (the audit runs one route at
        a time)."""
        import gevent

        while True:
            started = time.perf_counter()
            gevent.sleep(PROBE_EVERY)
            late = time.perf_counter() - started - PROBE_EVERY
            ran, self.ran = self.ran, set()
            if self.requests:
                ran.update(state.route for state in list(self.requests.values()))
            for route in ran:
                if len(route.late) < 100_000:
                    route.late.append(late)

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
                                                    "post_request")}

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
        green = "gevent.monkey" in sys.modules and \
            sys.modules["gevent.monkey"].is_module_patched("socket")
        if green and os.environ.get("AUDIT_MODE") == "audit":
            _WORKER.instrument()

    def post_request(worker, req, environ, resp):
        if _WORKER is not None:
            _WORKER.finished(environ)
        if theirs["post_request"]:
            theirs["post_request"](worker, req, environ, resp)

    # no graceful wait: a request still holding the loop when the audit stops is killed
    settings.update(post_fork=post_fork, post_worker_init=post_worker_init,
                    post_request=post_request, control_socket_disable=True,
                    graceful_timeout=3)
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

PROBE = ("import importlib.util, json, sys\n"
         "spec = importlib.util.spec_from_file_location('audit_probe', sys.argv[1])\n"
         "module = importlib.util.module_from_spec(spec)\n"
         "sys.modules['audit_probe'] = module\n"
         "spec.loader.exec_module(module)\n"
         "print(json.dumps(module.environment(sys.argv[2])))\n")


def app_environment(python: str, folder: str, url: str) -> dict:
    """What the app's interpreter has installed (it must have gunicorn and gevent)."""
    import subprocess

    try:
        done = subprocess.run([python, "-c", PROBE, os.path.realpath(__file__), url],
                              cwd=folder, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Usage(f"--python {python}: cannot run it: {exc}") from None
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise Usage(f"--python {python}: cannot run it: {last}")
    found = json.loads(done.stdout)
    missing = [m for m in ("gunicorn", "gevent") if not found["modules"].get(m)]
    if missing:
        raise Usage(f"{python} has no {' and no '.join(missing)}: the audit runs the app under "
                    f"gunicorn -k gevent in its own environment: {python} -m pip install "
                    f"{' '.join(missing)}")
    return found


def shown_url(url: str) -> str:
    """The URL without its password."""
    return re.sub(r"://([^:/@]*):[^@/]*@", r"://\1:***@", url)


def reachable(url: str) -> None:
    """One clear line when DATABASE_URL's server refuses or does not answer."""
    import socket
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
        socket.create_connection((host, port), timeout=5).close()
    except OSError as exc:
        what = "refuses connections" if isinstance(exc, ConnectionRefusedError) else \
            f"cannot be reached ({exc.strerror or exc})"
        raise Usage(f"the database at {host}:{port} {what}: is it running? "
                    f"(DATABASE_URL={shown_url(url)})") from None


def throwaway_database(stack, tmp: str) -> str:
    """Inside the kit: its throwaway PostgreSQL (kit/pg.py, standard library), seeded with the
    kit's todos table; stopped on the way out, and by its own watchdog should this process
    be killed."""
    import subprocess

    if not os.path.exists(os.path.join(HERE, "kit", "pg.py")):
        raise Usage("DATABASE_URL is not set, and this copy of audit.py has no kit/pg.py "
                    "beside it to start a throwaway PostgreSQL: set DATABASE_URL")
    state = os.path.join(tmp, "pg.json")
    stack.callback(subprocess.run, [sys.executable, "-m", "kit.pg", "stop", state], cwd=HERE,
                   capture_output=True)
    print("audit: starting a throwaway PostgreSQL (DATABASE_URL is not set)", file=sys.stderr)
    done = subprocess.run([sys.executable, "-m", "kit.pg", "start", state, "--owner",
                           str(os.getpid()), "--cleanup", tmp], cwd=HERE, capture_output=True,
                          text=True)
    if done.returncode:
        raise Usage(f"cannot start a throwaway PostgreSQL: "
                    f"{(done.stderr.strip().splitlines() or ['?'])[-1]}")
    url = done.stdout.strip()
    said = (done.stderr.strip().splitlines() or [""])[-1]
    print(f"audit: {said}", file=sys.stderr, flush=True)  # kit.pg: version, port, folder
    seeded = subprocess.run([sys.executable, "seed.py"], cwd=HERE, capture_output=True,
                            text=True, env={**os.environ, "DATABASE_URL": url})
    if seeded.returncode:
        print("audit: the throwaway database is empty (the kit's seed.py did not run here): "
              "your app creates its own tables, or set DATABASE_URL", file=sys.stderr)
    return url


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
    held one (a systematic block, not the machine pausing the process once)."""
    if not seen:
        return {"blocks": None, "findings": []}
    findings = seen["findings"]
    requests = max(1, seen["requests"])
    systematic = seen["long_requests"] >= math.ceil(requests / 2)
    sampled = any(f["cause_id"] not in DRIVER_CAUSES + ("unknown", "paused") for f in findings)
    counted = [f for f in findings if f["cause_id"] in DRIVER_CAUSES or (
        systematic and f["cause_id"] != "paused"
        and not (f["cause_id"] == "unknown" and sampled))]
    blocks = bool(counted)
    top = max(counted, key=lambda f: (f["cause_id"] != "unknown", f["ms"])) if counted else None
    result = {"blocks": blocks, "blocked_ms": round(sum(f["ms"] for f in counted), 2),
              "held_ms": seen["held_ms"], "probe_late_ms": seen["probe_late_ms"],
              "long_requests": seen["long_requests"], "worker_requests": seen["requests"],
              "cause": None, "cause_id": None, "where": None, "fix": None, "link": None,
              "findings": []}
    for found in findings:
        function = found["where"].rsplit(" in ", 1)[-1] if " in " in found["where"] else None
        title, fix, link = fix_for(found["cause_id"], function)
        result["findings"].append(dict(found, cause=title, fix=fix, link=link,
                                       counted=found in counted))
    if top is not None:
        function = top["where"].rsplit(" in ", 1)[-1] if " in " in top["where"] else None
        title, fix, link = fix_for(top["cause_id"], function)
        result.update(cause=title, cause_id=top["cause_id"], where=top["where"], fix=fix,
                      link=link)
    return result


def to_login(location: str, login_path: str | None) -> bool:
    """Does a redirect go to a login page (the --login path, or one that looks like it)?"""
    from urllib.parse import urlsplit

    path = urlsplit(location).path.lower()
    return bool(login_path and path == login_path.lower()) or any(
        word in path for word in ("login", "signin", "sign-in", "sign_in", "auth"))


def not_reached_why(status: int, headers) -> str:
    """Where a 3xx, 401 or 403 sent the audit, and the flag that gets past it."""
    if 300 <= status < 400:
        where = headers.get("Location", "?") if headers is not None else "?"
        return (f"redirected ({status}) to {where}: none of its code ran; --login PATH --data "
                f"'field=value&...' (or --cookie 'name=value') gets past it")
    if status == 401:
        scheme = (headers.get("WWW-Authenticate") or "") if headers is not None else ""
        said = f" (WWW-Authenticate: {scheme})" if scheme else ""
        return (f"answered 401{said}: --header 'Authorization: Bearer TOKEN' (or --login) "
                f"gets past it")
    return f"answered {status}: the credentials given are not enough (--header, --cookie, --login)"


def exit_status(routes: list[dict]) -> int:
    """1 when a route blocks; else 2 when one could not be audited (404, 500...); else 3
    when one was not reached; else 0."""
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
    text = (f"audit: {len(blocking)} of {len(audited)} audited routes block the loop"
            + (f" ({causes})" if causes else ""))
    missed = sum(r.get("reached") is False for r in routes)
    failed = sum(bool(r.get("error")) for r in routes)
    if missed:
        text += f"; {missed} routes not reached"
    if failed:
        text += f"; {failed} not audited"
    return text + f" ({n} requests at once each, threshold {threshold:g} ms, {took:.1f} s)"


# -- the run ------------------------------------------------------------------------------------


class Context:
    """The app under audit: its server, what to send with every request, the loader."""

    def __init__(self, args, load, server: Server, token: str):
        self.args, self.load, self.server, self.token = args, load, server, token
        self.headers, self.cookies = parse_headers(args.header, args.cookie)
        self.pid = None
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
           "PYTHONUNBUFFERED": "1"}
    argv = gunicorn_argv(args.python, shim_path, extra, worker, workers, port, args.app,
                         threads)
    server = Server(argv, args.chdir, env, os.path.join(tmp, f"gunicorn-{worker}.log"), port,
                    args.log)
    stack.callback(server.stop)
    print(f"audit: {' '.join(argv[1:])}  (pid {server.proc.pid}, in {args.chdir})",
          file=sys.stderr, flush=True)
    context = Context(args, load, server, token)
    hello = await context.control("hello", wait=args.start_timeout)
    context.pid = hello["pid"]
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
        result["error"] = f"no answer to the warm-up request: {exc}"
        return result
    result["status"] = answer.status
    moved = 300 <= answer.status < 400
    done_then_moved = moved and spec.method != "GET" and not to_login(
        answer.headers.get("Location") or "", context.login_path)  # POST, then redirect
    if (moved and not done_then_moved) or answer.status in (401, 403):
        result.update(reached=False, why=not_reached_why(answer.status, answer.headers))
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
    if report["pid"] != context.pid:
        result["error"] = (f"the worker was replaced during this route (pid {context.pid} -> "
                           f"{report['pid']}): gunicorn kills a worker whose loop is held past "
                           f"its --timeout; its log says WORKER TIMEOUT")
        result["blocks"] = True
        context.pid = report["pid"]
        return result
    result.update(judge(report["routes"].get(spec.label)))
    if report.get("sampling_errors"):
        result["sampling_errors"] = report["sampling_errors"]
    result["monitor"] = report.get("monitor")  # gevent's events so far, and what came of them
    return result


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
    import signal
    import tempfile

    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, me.cancel)
    started = time.perf_counter()
    specs, login_spec = pair_data(args.ordered)
    document = {"schema": f"audit.py/{VERSION}", "app": args.app,
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "settings": {"requests": args.requests, "threshold_ms": args.threshold,
                             "chdir": args.chdir, "python": args.python,
                             "gunicorn_args": args.gunicorn_args}}
    try:
        with contextlib.ExitStack() as stack:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="audit-"))
            url = os.environ.get("DATABASE_URL") or throwaway_database(stack, tmp)
            reachable(url)
            environment_found = app_environment(args.python, args.chdir, url)
            how = "sync, gthread and gevent workers" if args.compare else \
                "gunicorn -k gevent, 1 worker"
            print(f"audit.py {VERSION}: {args.app} under {how}, in {args.chdir}; database "
                  f"{shown_url(url)}")
            if args.compare:
                document.update(await compare_workers(args, load, stack, tmp, url, specs,
                                                      login_spec))
                document["total_s"] = round(time.perf_counter() - started, 2)
                return document, 0 if document["recommended"] else 1
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
        raise Usage(f"--threshold {args.threshold:g}: at least 2 ms (gevent's monitor checks "
                    f"every threshold / 2)")
    check_compare_arguments(args)
    return args


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


def recommend(table: list[dict], noise: float = NOISE) -> tuple[str | None, str]:
    """(the worker, why in one line). A worker that does not beat sync by more than noise is
    not worth its complexity: with CPU-bound routes, that is every worker."""
    rated = [w for w in table if w["sustained_rate"] is not None]
    if not rated:
        return None, ("no worker sustained even the lowest rate within the SLO: try lower "
                      "--rates or a larger --slo")
    best = max(rated, key=lambda w: w["sustained_rate"])
    sync = next((w for w in table if w["worker"] == "sync"), None)
    base = sync["sustained_rate"] if sync else None
    if base and best["sustained_rate"] <= noise * base:
        return "sync", (f"CPU-bound: no worker sustained more than {noise:g} x sync's "
                        f"{base:g}/s (best: {best['worker']} at {best['sustained_rate']:g}/s); "
                        f"more concurrency does not help CPU work, and sync is the simplest")
    ratio = "" if not base else f", {best['sustained_rate'] / base:.1f} x sync's {base:g}/s"
    if base is None and sync is not None:
        ratio = ", where sync sustained none of the rates"
    return best["worker"], (f"{best['worker']} sustained {best['sustained_rate']:g}/s{ratio}, "
                            f"each route's p99 within its SLO")


def parse_weights(spec: str | None, specs: list[Spec]) -> list[float]:
    if not spec:
        return [1.0] * len(specs)
    weights = {}
    for entry in spec.split(","):
        weight, sep, what = entry.strip().partition(":")
        try:
            share = float(weight)
        except ValueError:
            share = -1
        if not sep or not (math.isfinite(share) and share > 0):
            raise Usage(f"--mix {entry.strip()!r}: give WEIGHT:ROUTE, e.g. 9:/todos/")
        weights[what.strip()] = share
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
                      "sustained_rate": sustained_rate(steps), "rates": steps,
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
            "recommended": recommended, "why": why, "routes": []}


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
        rows.append([label, "-" if w["sustained_rate"] is None else f"{w['sustained_rate']:g}",
                     tried, str(w["peak_connections"]), f"{w['rss_mb']:.0f}",
                     ms(w["p99_at_common_ms"])])
    print()
    print("\n".join(aligned(rows)))
    print(f"\nSLO (p99): " + ", ".join(f"{k} {v:.0f} ms" for k, v in slo.items()))
    print(f"recommended: {recommended or 'none'}: {why}")


if __name__ == "__main__":
    sys.exit(main())
