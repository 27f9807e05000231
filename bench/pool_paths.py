"""QueuePool's lost wake-ups, forced in milliseconds with no database: every path, for the
stock pool, the old fix and the new one (bench/pool_fix.py), under threads, gevent and asyncio,
FIFO and LIFO, with the invariants checked after each case. SQLAlchemy only.

    python bench/pool_paths.py [--timeout 0.5] [--json FILE]

The paths (each case lowers the overflow while a checkout sleeps in the queue):
  full            pool 1 + 1, both out, two checkouts asleep, both returned back to back
  burst           pool 5 + 10, all 15 out, 6 checkouts asleep, all returned back to back
  failed-connect  pool 1 + 1, one out, a connect in progress fails while a checkout sleeps
  newcomer        pool 1 + 1, both out, a checkout asleep; one caller returns both and
                  checks out again at once (SQLAlchemy issue 7679's pattern)
  window          the failed connect lands between a checkout's overflow check and its
                  sleep (threads only: gevent and asyncio cannot switch there)
  cancelled       as failed-connect with two asleep: the first, woken, is cancelled before
                  it runs, and the second must get the wake-up (asyncio only: a task can be
                  cancelled at that point; a thread cannot, a greenlet's kill cannot be timed)
  killed          pool 1 + 1, both out, two asleep; the first is killed (gevent) or cancelled
                  (asyncio) and at once one connection returns: the second must get it. Not
                  one of the three paths: a limit of gevent's patched threading.Condition,
                  whose notify a killed greenlet takes with it; asyncio.Queue passes it on
"Back to back" under threads holds the queue's lock, so that the woken checkouts run after;
under gevent and asyncio nothing yields between the calls. Each cell: the longest wait from the
moment a connection or slot came free to the checkout that got it, and ✓ when no checkout
waited half of pool_timeout and every invariant held: after the case at most pool_size idle and
overflow() 0, never more than pool_size + max_overflow open, none left open after dispose().
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and sys.argv[1:3] == ["--child", "gevent"]:
    from gevent import monkey  # first, before anything imports threading

    monkey.patch_all()

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from sqlalchemy.pool import AsyncAdaptedQueuePool, QueuePool  # noqa: E402
from sqlalchemy.util.concurrency import await_, greenlet_spawn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # pool_fix, when imported as bench.*
from pool_fix import (FixedAsyncAdaptedQueuePool, FixedQueuePool,  # noqa: E402
                      HandOverAsyncAdaptedQueuePool, HandOverQueuePool)

POOLS = {"threads": {"stock": QueuePool, "old fix": HandOverQueuePool, "new fix": FixedQueuePool},
         "asyncio": {"stock": AsyncAdaptedQueuePool, "old fix": HandOverAsyncAdaptedQueuePool,
                     "new fix": FixedAsyncAdaptedQueuePool}}
POOLS["gevent"] = POOLS["threads"]
CONCURRENCY = ("threads", "gevent", "asyncio")
PATHS = ("full", "burst", "failed-connect", "newcomer", "window", "cancelled", "killed")
ONLY = {"window": ("threads",), "cancelled": ("asyncio",), "killed": ("gevent", "asyncio")}


class Threads:
    """How a case starts, waits and forces an order, under OS threads."""

    def spawn(self, fn):
        thread = threading.Thread(target=fn)
        thread.start()
        return thread

    def join(self, handle) -> None:
        handle.join(30)

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def event(self):
        return threading.Event()

    def back_to_back(self, pool):
        """Hold the queue's lock: a woken checkout cannot run until the block ends."""
        return pool._pool.mutex

    def cancel(self, handle) -> None:
        raise NotImplementedError("a thread cannot be cancelled")

    def run(self, bodies) -> None:
        """Run BODIES at once, each to its end."""
        handles = [self.spawn(body) for body in bodies]
        for handle in handles:
            self.join(handle)


class Gevent(Threads):
    """Greenlets (the process is patched): nothing switches until a greenlet blocks."""

    def spawn(self, fn):
        import gevent

        return gevent.spawn(fn)

    def back_to_back(self, pool):
        return contextlib.nullcontext()

    def cancel(self, handle) -> None:
        handle.kill(block=False)  # raised in it when it next runs


class AsyncioEvent:
    """threading.Event's set() and wait(), for code running in a greenlet on the loop."""

    def __init__(self):
        self.event = asyncio.Event()

    def set(self) -> None:
        self.event.set()

    def wait(self) -> None:
        await_(self.event.wait())


class Asyncio(Threads):
    """Tasks on one event loop, each running the pool in a greenlet as AsyncEngine does."""

    def spawn(self, fn):
        return asyncio.ensure_future(greenlet_spawn(fn))

    def join(self, handle) -> None:
        await_(asyncio.wait([handle]))

    def sleep(self, seconds: float) -> None:
        await_(asyncio.sleep(seconds))

    def event(self):
        return AsyncioEvent()

    def back_to_back(self, pool):
        return contextlib.nullcontext()

    def cancel(self, handle) -> None:
        handle.cancel()

    def run(self, bodies) -> None:
        async def main():
            await asyncio.gather(*(greenlet_spawn(body) for body in bodies))

        asyncio.run(main())


RUNTIMES = {"threads": Threads, "gevent": Gevent, "asyncio": Asyncio}


class Server:
    """Stands in for the database: counts the connections open; the FAIL_AT-th connect
    waits for `release` and then fails."""

    def __init__(self, rt, fail_at: int = 0):
        self.open = self.most = self.made = 0
        self.fail_at, self.entered, self.release = fail_at, rt.event(), rt.event()

    def connect(self):
        self.made += 1
        if self.made == self.fail_at:
            self.entered.set()
            self.release.wait()
            raise ConnectionError("connection refused")
        self.open += 1
        self.most = max(self.most, self.open)
        return Connection(self)


class Connection:
    """All the pool asks of a DB-API connection."""

    def __init__(self, server: Server):
        self.server = server

    def rollback(self) -> None:
        pass

    def close(self) -> None:
        self.server.open -= 1


def asleep(pool) -> int:
    """Checkouts asleep in the pool's queue (private attributes: a test's view only)."""
    queue = pool._pool
    if hasattr(queue, "not_empty"):
        return len(queue.not_empty._waiters)
    getters = getattr(queue, "_getters", None)  # pool_fix.WakingAsyncQueue's own
    if getters is None:
        getters = queue._queue._getters  # asyncio.Queue's
    return sum(1 for getter in getters if not getter.done())


SHAPES = {  # pool_size, max_overflow, connections out, checkouts asleep
    "full": (1, 1, 2, 2), "burst": (5, 10, 15, 6), "failed-connect": (1, 1, 1, 1),
    "newcomer": (1, 1, 2, 1), "window": (1, 1, 1, 1), "cancelled": (1, 1, 1, 2),
    "killed": (1, 1, 2, 2)}
FAILING = ("failed-connect", "window", "cancelled")  # a connect in progress fails


def case(rt, path: str, kind, lifo: bool, timeout: float) -> dict:
    """Run one path on a new pool of KIND; what each checkout waited, what is left."""
    size, overflow, out_n, sleepers = SHAPES[path]
    server = Server(rt, fail_at=out_n + 1 if path in FAILING else 0)
    pool = kind(server.connect, pool_size=size, max_overflow=overflow, timeout=timeout,
                use_lifo=lifo)
    out = [pool.connect() for _ in range(out_n)]
    freed, waits, got, errors, failed = [0.0], [], [], [], []

    def checkout():
        try:
            conn = pool.connect()
        except Exception as exc:  # counted: a checkout that was not served
            errors.append(repr(exc))
            return
        waits.append(time.perf_counter() - freed[0])
        got.append(conn)

    def doomed():  # the connect that fails
        try:
            pool.connect()
        except ConnectionError:
            failed.append(True)

    def wait_until(test, what: str) -> None:
        deadline = time.monotonic() + 10
        while not test():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{path}: {what} never happened")
            rt.sleep(0.002)

    failing = rt.spawn(doomed) if path in FAILING else None
    if failing:
        server.entered.wait()
    if path == "window":  # the failure lands after the overflow check, before the sleep
        real_get = pool._pool.get

        def get(block=True, timeout=None, **kw):
            if block and not failed:
                freed[0] = time.perf_counter()
                server.release.set()
                rt.join(failing)
            return real_get(block, timeout, **kw)
        pool._pool.get = get
    handles = []
    for n in range(1, sleepers + 1):  # one by one: they sleep in this order
        handles.append(rt.spawn(checkout))
        if path != "window":
            wait_until(lambda: asleep(pool) == n, f"{n} checkouts asleep")
    with rt.back_to_back(pool):
        if path in ("failed-connect", "cancelled"):
            freed[0] = time.perf_counter()
            server.release.set()
            if path == "cancelled":  # the failing connect runs, wakes the first sleeper,
                rt.sleep(0)          # which is cancelled before it runs
                if not failed or waits:
                    raise RuntimeError("cancelled: not in the order this case needs")
                rt.cancel(handles.pop(0))
                sleepers -= 1
        elif path == "killed":  # killed first, then the return that wakes it
            rt.cancel(handles.pop(0))
            sleepers -= 1
            freed[0] = time.perf_counter()
            out.pop(0).close()
        elif path != "window":
            freed[0] = time.perf_counter()
            for conn in out:
                conn.close()
            out = [pool.connect()] if path == "newcomer" else []
    for handle in [*handles, *([failing] if failing else [])]:
        rt.join(handle)
    for conn in [*out, *got]:
        conn.close()
    found = {"waited": round(max(waits, default=0.0), 4), "served": len(waits),
             "expected": sleepers, "errors": errors, "idle": pool.checkedin(),
             "overflow": pool.overflow(), "open": server.open, "most_open": server.most,
             "limit": size + overflow, "size": size}
    pool.dispose()
    found["left"] = server.open
    return found


def verdict(found: dict, timeout: float) -> str:
    """✓, or what broke: ✗ stranded, E a checkout failed, I idle > pool_size, O overflow()
    not 0, M past the limit, L left open (leaked)."""
    marks = "".join(mark for mark, bad in (
        ("E", found["served"] < found["expected"]),
        ("I", found["idle"] > found["size"]), ("O", found["overflow"] != 0),
        ("M", found["most_open"] > found["limit"]),
        ("L", found["left"] or found["open"] != found["idle"])) if bad)
    if found["waited"] >= timeout / 2:
        return "✗" + marks
    return marks or "✓"


def run(concurrency: str, timeout: float, paths=PATHS, pools=None) -> list[dict]:
    """Every case under one kind of concurrency, all at once (each on its own pool)."""
    rt = RUNTIMES[concurrency]()
    cases = [(path, name, lifo) for path in paths if concurrency in ONLY.get(path, CONCURRENCY)
             for name in (pools or POOLS[concurrency]) for lifo in (False, True)]
    rows: list = [None] * len(cases)

    def body(i, path, name, lifo):
        try:
            found = case(rt, path, POOLS[concurrency][name], lifo, timeout)
        except Exception as exc:  # a case that could not be forced: say which
            rows[i] = RuntimeError(f"{concurrency} {path} {name}: {exc!r}")
            return
        rows[i] = {"path": path, "pool": name, "concurrency": concurrency,
                   "order": "LIFO" if lifo else "FIFO", **found,
                   "verdict": verdict(found, timeout)}

    rt.run([lambda i=i, c=c: body(i, *c) for i, c in enumerate(cases)])
    for row in rows:
        if not isinstance(row, dict):
            raise row or RuntimeError(f"{concurrency}: a case did not finish")
    return rows


def run_gevent(timeout: float, paths=PATHS, pools=None) -> list[dict]:
    """run("gevent", ...) in a child process patched by gevent."""
    done = subprocess.run([sys.executable, __file__, "--child", "gevent", "--timeout",
                           str(timeout), "--paths", *paths, *(["--pools", *pools] if pools
                                                              else [])],
                          capture_output=True, text=True, timeout=120)
    if done.returncode:
        raise RuntimeError(f"pool_paths gevent child: {done.stderr[-2000:]}")
    return json.loads(done.stdout)


def shown(row: dict | None) -> str:
    return "-" if row is None else f"{row['waited']:.3f} s {row['verdict']}"


def table(rows: list[dict]) -> str:
    columns = [(c, o) for c in CONCURRENCY for o in ("FIFO", "LIFO")]
    cell = {(r["path"], r["pool"], r["concurrency"], r["order"]): r for r in rows}
    lines = [f"{'path':<15}{'pool':<9}" + "".join(f"{c + ' ' + o:>16}" for c, o in columns)]
    for path in PATHS:
        for name in POOLS["threads"]:
            found = [cell.get((path, name, c, o)) for c, o in columns]
            lines.append(f"{path:<15}{name:<9}" + "".join(f"{shown(r):>16}" for r in found))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=0.5, help="pool_timeout, seconds")
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--child", nargs=1, help=argparse.SUPPRESS)
    parser.add_argument("--paths", nargs="+", default=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--pools", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run("gevent", args.timeout, args.paths, args.pools)))
        return 0
    import sqlalchemy

    rows = run("threads", args.timeout) + run_gevent(args.timeout) + run("asyncio", args.timeout)
    print(f"SQLAlchemy {sqlalchemy.__version__}, Python {sys.version.split()[0]}; pool_timeout "
          f"{args.timeout:g} s; longest wait after the slot came free, then ✓ or what broke")
    print(table(rows))
    print("✗ a checkout stranded (waited at least half of pool_timeout); E a checkout failed;\n"
          "I more than pool_size idle after the case; O overflow() not 0 after it; M more than\n"
          "pool_size + max_overflow open; L a connection leaked; - not possible there")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
