"""QueuePool's lost wake-ups in SQLAlchemy's own test harness: new tests, each fix option.

    python bench/sqlalchemy_harness.py [--git REPO [--rev main]] [--keep DIR] [--diff FILE]

The tree is the sdist of the installed SQLAlchemy (pip download: it ships test/), or with
--git a commit of a SQLAlchemy repository (git archive). The harness
1. adds seven tests to test/engine/test_pool.py in the style of its neighbours: a return to a
   full queue, a failed connect, and a woken checkout that a newcomer beats, each for
   QueuePool under threads (QueuePoolTest) and for AsyncAdaptedQueuePool under asyncio
   (AsyncAdaptedQueuePoolWakeupTest), and an asyncio checkout cancelled after its wake-up;
2. runs test/engine/test_pool.py and test/base/test_concurrency.py as shipped, and the new
   tests on the shipped library, where each must fail on its own assertion (the message
   "a checkout slept with a slot free"), not on an error;
3. applies each fix option to a copy of lib/ and runs the new tests: `hand-over` (a return
   that finds the queue full goes to a sleeping checkout), `notify` (_dec_overflow wakes a
   sleeper, nothing re-checks) and `wake-recheck` (the proposed fix: _dec_overflow wakes a
   sleeper, a woken checkout re-checks the overflow); then both files with the proposed fix;
4. runs bench/pool_repro*.py (public API) on the shipped library and on the proposed fix.
It prints the version or commit of the tree, and each run's counts; --diff writes the proposed
fix and the new tests as one unified diff (docs/sqlalchemy-report.diff is its output on
2.1.9). Exit 0 when every new test fails as shipped on its own assertion and passes with the
proposed fix, and both files pass with it.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path

MARK = "a checkout slept with a slot free"
FILES = ("test/engine/test_pool.py", "test/base/test_concurrency.py")

THREAD_TESTS = '''
    def _checkouts_asleep(self, p, count):
        """start COUNT threads that each check out a connection from p and
        keep it, and let them fall asleep in the pool's queue."""
        released, waited, held = [], [], []

        def checkout():
            held.append(p.connect())
            waited.append(time.time() - released[0])

        threads = [threading.Thread(target=checkout) for i in range(count)]
        for t in threads:
            t.start()
        time.sleep(0.2)
        return released, waited, held, threads

    def _assert_served(self, p, asleep, count, *others):
        released, waited, held, threads = asleep
        for t in threads:
            t.join(join_timeout)
        eq_(len(waited), count)
        assert max(waited) < 1, "%s: %r" % (
            MARK,
            [round(w, 2) for w in waited],
        )
        for c in held + list(others):
            c.close()
        eq_(p.checkedin(), 1)
        eq_(p.overflow(), 0)

    @testing.requires.threading_with_mock
    @testing.requires.timing_intensive
    def test_return_to_full_queue_wakes_sleeping_checkout(self):
        """a connection returned to a full queue is closed; a checkout
        asleep in the queue that no put woke opens one in the slot that
        freed, rather than sleeping until pool_timeout."""
        p = self._queuepool_fixture(pool_size=1, max_overflow=1, timeout=2)
        c1, c2 = p.connect(), p.connect()
        asleep = self._checkouts_asleep(p, 2)

        # both returns land before a woken checkout gets to run
        with p._pool.mutex:
            asleep[0].append(time.time())
            c1.close()
            c2.close()
        self._assert_served(p, asleep, 2)

    @testing.requires.threading_with_mock
    @testing.requires.timing_intensive
    def test_failed_connect_wakes_sleeping_checkout(self):
        """a connect that fails lowers the overflow; a checkout asleep in
        the queue opens a connection in that slot."""
        dbapi = MockDBAPI()
        attempts, connecting, fail = [], threading.Event(), threading.Event()

        def creator():
            attempts.append(True)
            if len(attempts) == 2:
                connecting.set()
                fail.wait(join_timeout)
                raise Exception("connect failed")
            return dbapi.connect()

        p = pool.QueuePool(
            creator=creator, pool_size=1, max_overflow=1, timeout=2
        )
        c1 = p.connect()
        failing = threading.Thread(
            target=assert_raises, args=(Exception, p.connect)
        )
        failing.start()
        connecting.wait(join_timeout)
        asleep = self._checkouts_asleep(p, 1)

        asleep[0].append(time.time())
        fail.set()
        failing.join(join_timeout)
        self._assert_served(p, asleep, 1, c1)

    @testing.requires.threading_with_mock
    @testing.requires.timing_intensive
    def test_woken_checkout_rechecks_overflow(self):
        """a checkout woken by a return whose connection a newcomer takes
        first finds the slot that the next return freed."""
        p = self._queuepool_fixture(pool_size=1, max_overflow=1, timeout=2)
        c1, c2 = p.connect(), p.connect()
        asleep = self._checkouts_asleep(p, 1)

        # one thread returns both and checks out again, before the
        # checkout that the first return woke gets to run
        with p._pool.mutex:
            asleep[0].append(time.time())
            c1.close()
            c2.close()
            c3 = p.connect()
        self._assert_served(p, asleep, 1, c3)
'''

ASYNC_TESTS = '''

class AsyncAdaptedQueuePoolWakeupTest(PoolTestBase):
    __requires__ = ("greenlet",)

    def _pool(self, creator=None, **kw):
        dbapi = MockDBAPI()
        return pool.AsyncAdaptedQueuePool(
            creator=creator or (lambda: dbapi.connect("foo.db")), **kw
        )

    async def _checkouts_asleep(self, p, count):
        released, waited = [], []

        def checkout():
            c = p.connect()
            waited.append(time.time() - released[0])
            return c

        tasks = [
            asyncio.ensure_future(greenlet_spawn(checkout))
            for i in range(count)
        ]
        await asyncio.sleep(0.2)
        return released, waited, tasks

    async def _assert_served(self, p, asleep, count, *others):
        released, waited, tasks = asleep
        await asyncio.wait(tasks, timeout=join_timeout)
        held = [t.result() for t in tasks if not t.cancelled()]
        eq_(len(waited), count)
        assert max(waited) < 1, "%s: %r" % (
            MARK,
            [round(w, 2) for w in waited],
        )
        for c in held + list(others):
            await greenlet_spawn(c.close)
        eq_(p.checkedin(), 1)
        eq_(p.overflow(), 0)

    async def _failing_connect_fixture(self):
        dbapi = MockDBAPI()
        attempts, connecting, fail = [], asyncio.Event(), asyncio.Event()

        def creator():
            attempts.append(True)
            if len(attempts) == 2:
                connecting.set()
                await_(fail.wait())
                raise Exception("connect failed")
            return dbapi.connect()

        p = self._pool(creator=creator, pool_size=1, max_overflow=1, timeout=2)
        c1 = await greenlet_spawn(p.connect)
        failing = asyncio.ensure_future(greenlet_spawn(p.connect))
        await connecting.wait()
        return p, c1, failing, fail

    @testing.requires.timing_intensive
    @async_test
    async def test_return_to_full_queue_wakes_sleeping_checkout(self):
        p = self._pool(pool_size=1, max_overflow=1, timeout=2)
        c1 = await greenlet_spawn(p.connect)
        c2 = await greenlet_spawn(p.connect)
        asleep = await self._checkouts_asleep(p, 2)

        def return_both():
            # back to back: no woken checkout runs in between
            asleep[0].append(time.time())
            c1.close()
            c2.close()

        await greenlet_spawn(return_both)
        await self._assert_served(p, asleep, 2)

    @testing.requires.timing_intensive
    @async_test
    async def test_failed_connect_wakes_sleeping_checkout(self):
        p, c1, failing, fail = await self._failing_connect_fixture()
        asleep = await self._checkouts_asleep(p, 1)

        asleep[0].append(time.time())
        fail.set()
        with expect_raises_message(Exception, "connect failed"):
            await failing
        await self._assert_served(p, asleep, 1, c1)

    @testing.requires.timing_intensive
    @async_test
    async def test_woken_checkout_rechecks_overflow(self):
        p = self._pool(pool_size=1, max_overflow=1, timeout=2)
        c1 = await greenlet_spawn(p.connect)
        c2 = await greenlet_spawn(p.connect)
        asleep = await self._checkouts_asleep(p, 1)

        def return_both_and_check_out():
            asleep[0].append(time.time())
            c1.close()
            c2.close()
            return p.connect()

        c3 = await greenlet_spawn(return_both_and_check_out)
        await self._assert_served(p, asleep, 1, c3)

    @testing.requires.timing_intensive
    @async_test
    async def test_cancelled_checkout_passes_wakeup_on(self):
        """a checkout woken by a failed connect and cancelled before it
        runs passes the wake-up to the next sleeping checkout."""
        p, c1, failing, fail = await self._failing_connect_fixture()
        asleep = await self._checkouts_asleep(p, 2)

        asleep[0].append(time.time())
        fail.set()
        await asyncio.sleep(0)  # the connect fails, waking the first
        asleep[2][0].cancel()
        with expect_raises_message(Exception, "connect failed"):
            await failing
        await self._assert_served(p, asleep, 1, c1)
'''

TEST_EDITS = [  # test/engine/test_pool.py: (old, new), the imports first
    ("from sqlalchemy.testing import assert_warns_message\n",
     "from sqlalchemy.testing import assert_warns_message\n"
     "from sqlalchemy.testing import async_test\n"),
    ("from sqlalchemy.testing.util import lazy_gc\n",
     "from sqlalchemy.testing.util import lazy_gc\nfrom sqlalchemy.util import await_\n"
     "from sqlalchemy.util import greenlet_spawn\n"),
    ("join_timeout = 10\n", f"join_timeout = 10\nMARK = {MARK!r}\n"),
    ("class QueuePoolTest(PoolTestBase):\n",
     "class QueuePoolTest(PoolTestBase):" + THREAD_TESTS + "\n"),
]

# The fix options, as edits of lib/sqlalchemy/: (file, old, new).
WAKE_QUEUE = [  # Queue and AsyncAdaptedQueue: wake_getter(), and get(wakeups=...)
    ("util/queue.py",
     "    def get(self, block: bool = True, timeout: Optional[float] = None) -> _T:\n"
     "        raise NotImplementedError()\n",
     "    def get(\n        self,\n        block: bool = True,\n"
     "        timeout: Optional[float] = None,\n        wakeups: Optional[int] = None,\n"
     "    ) -> _T:\n        raise NotImplementedError()\n\n"
     "    def wake_getter(self) -> None:\n        raise NotImplementedError()\n"),
    ("util/queue.py",
     "class QueueCommon(Generic[_T]):\n    maxsize: int\n    use_lifo: bool\n",
     "class QueueCommon(Generic[_T]):\n    maxsize: int\n    use_lifo: bool\n"
     "    wakeups: int\n"),
    ("util/queue.py",
     "        # If this queue uses LIFO or FIFO\n        self.use_lifo = use_lifo\n",
     "        # If this queue uses LIFO or FIFO\n        self.use_lifo = use_lifo\n"
     "        # calls to wake_getter(): a getter that read another count before\n"
     "        # it decided to wait raises Empty rather than sleep (see get())\n"
     "        self.wakeups = 0\n"),
    ("util/queue.py",
     "    def get(self, block: bool = True, timeout: Optional[float] = None) -> _T:\n"
     "        \"\"\"Remove and return an item from the queue.\n",
     "    def wake_getter(self) -> None:\n"
     "        \"\"\"Wake one getter asleep in get(); if the queue is still empty\n"
     "        when it runs, it raises ``Empty`` if it passed ``wakeups``.\"\"\"\n"
     "        with self.mutex:\n            self.wakeups += 1\n"
     "            self.not_empty.notify()\n\n"
     "    def get(\n        self,\n        block: bool = True,\n"
     "        timeout: Optional[float] = None,\n        wakeups: Optional[int] = None,\n"
     "    ) -> _T:\n        \"\"\"Remove and return an item from the queue.\n"),
    ("util/queue.py",
     "        ``Empty`` exception (`timeout` is ignored in that case).\n\n        \"\"\"\n",
     "        ``Empty`` exception (`timeout` is ignored in that case).\n\n"
     "        If `wakeups` is given (the value of ``self.wakeups`` that the\n"
     "        caller read before it decided to wait), raise ``Empty`` rather\n"
     "        than wait on an empty queue once :meth:`.wake_getter` has been\n"
     "        called since.\n        \"\"\"\n"),
    ("util/queue.py",
     "                while self._empty():\n                    self.not_empty.wait()\n",
     "                while self._empty():\n"
     "                    if wakeups is not None and wakeups != self.wakeups:\n"
     "                        raise Empty\n                    self.not_empty.wait()\n"),
    ("util/queue.py",
     "                while self._empty():\n                    remaining = endtime - _time()\n",
     "                while self._empty():\n"
     "                    if wakeups is not None and wakeups != self.wakeups:\n"
     "                        raise Empty\n                    remaining = endtime - _time()\n"),
    ("util/queue.py",
     "        self.use_lifo = use_lifo\n        self.maxsize = maxsize\n",
     "        self.use_lifo = use_lifo\n        self.maxsize = maxsize\n"
     "        self.wakeups = 0\n"
     "        # getters wait on futures of their own, so that one can be woken\n"
     "        # without an item; the asyncio queue keeps the items and its\n"
     "        # blocking put\n"
     "        self._getters: Deque[asyncio.Future[None]] = deque()\n"
     "        self._loop: Optional[asyncio.AbstractEventLoop] = None\n"),
    ("util/queue.py",
     "        except asyncio.QueueFull as err:\n            raise Full() from err\n\n"
     "    def put(\n",
     "        except asyncio.QueueFull as err:\n            raise Full() from err\n"
     "        self._wake_one()\n\n    def put(\n"),
    ("util/queue.py",
     "            raise Full() from err\n\n    def get_nowait(self) -> _T:\n",
     "            raise Full() from err\n        self._wake_one()\n\n"
     "    def get_nowait(self) -> _T:\n"),
]

ASYNC_GET = '''    def _wake_one(self) -> None:
        while self._getters:
            getter = self._getters.popleft()
            if not getter.done():
                getter.set_result(None)
                return

    def wake_getter(self) -> None:
        self.wakeups += 1
        self._wake_one()

    def _bound_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError(f"{self!r} is bound to a different event loop")
        return loop

    def get(
        self,
        block: bool = True,
        timeout: Optional[float] = None,
        wakeups: Optional[int] = None,
    ) -> _T:
        if not block:
            return self.get_nowait()

        endtime = None if timeout is None else _time() + timeout
        while True:
            try:
                # an item that's already available is taken without awaiting
                return self._queue.get_nowait()
            except asyncio.QueueEmpty:
                pass
            remaining = None if endtime is None else endtime - _time()
            if (wakeups is not None and wakeups != self.wakeups) or (
                remaining is not None and remaining <= 0
            ):
                raise Empty()
            getter = self._bound_loop().create_future()
            self._getters.append(getter)
            try:
                if remaining is None:
                    await_(getter)
                else:
                    await_(WAIT_FOR)
            except BaseException as err:
                woken = getter.done() and not getter.cancelled()
                getter.cancel()
                if getter in self._getters:
                    self._getters.remove(getter)
                if woken:
                    # leaving anyway: the wake-up goes to the next getter
                    self._wake_one()
                if isinstance(err, asyncio.TimeoutError):
                    raise Empty() from err
                raise
'''

WAKE_DEC = [  # _dec_overflow() wakes a sleeping checkout
    ("pool/impl.py",
     "        with self._overflow_lock:\n            self._overflow -= 1\n"
     "            return True\n",
     "        with self._overflow_lock:\n            self._overflow -= 1\n"
     "        # a checkout asleep in the queue can use the slot: wake it\n"
     "        self._pool.wake_getter()\n        return True\n"),
]

RECHECK = [  # _do_get(): a woken checkout re-checks the overflow
    ("pool/impl.py", "import threading\nimport traceback\n",
     "import threading\nimport time\nimport traceback\n"),
    ("pool/impl.py", '''    def _do_get(self) -> ConnectionPoolEntry:
        use_overflow = self._max_overflow > -1

        wait = use_overflow and self._overflow >= self._max_overflow
        try:
            return self._pool.get(wait, self._timeout)
        except sqla_queue.Empty:
            # don't do things inside of "except Empty", because when we say
            # we timed out or can't connect and raise, Python 3 tells
            # people the real error is queue.Empty which it isn't.
            pass
        if use_overflow and self._overflow >= self._max_overflow:
            if not wait:
                return self._do_get()
            else:
                raise exc.TimeoutError(''', '''    def _do_get(self) -> ConnectionPoolEntry:
        use_overflow = self._max_overflow > -1
        deadline: Optional[float] = None

        while True:
            # read before the overflow: a slot freed after this is seen
            wakeups = self._pool.wakeups
            wait = use_overflow and self._overflow >= self._max_overflow
            timeout = self._timeout
            if deadline is None:
                if wait and timeout is not None:
                    deadline = time.monotonic() + timeout
            else:
                timeout = max(0.0, deadline - time.monotonic())
            try:
                return self._pool.get(wait, timeout, wakeups=wakeups)
            except sqla_queue.Empty:
                # don't do things inside of "except Empty", because when we
                # say we timed out or can't connect and raise, Python 3
                # tells people the real error is queue.Empty which it isn't.
                pass
            if use_overflow and self._overflow >= self._max_overflow:
                if not wait or wakeups != self._pool.wakeups:
                    # raced, or woken and another checkout took the slot:
                    # wait out the rest of the timeout
                    continue
                raise exc.TimeoutError('''),
    ("pool/impl.py", '''                    "QueuePool limit of size %d overflow %d reached, "
                    "connection timed out, timeout %0.2f"
                    % (self.size(), self.overflow(), self._timeout),
                    code="3o7r",
                )

        if self._inc_overflow():
            try:
                return self._create_connection()
            except:
                with util.safe_reraise():
                    self._dec_overflow()
                raise
        else:
            return self._do_get()
''', '''                    "QueuePool limit of size %d overflow %d reached, "
                    "connection timed out, timeout %0.2f"
                    % (self.size(), self.overflow(), self._timeout),
                    code="3o7r",
                )

            if self._inc_overflow():
                try:
                    return self._create_connection()
                except:
                    with util.safe_reraise():
                        self._dec_overflow()
                    raise
            # else another checkout took the slot first: go round
'''),
]

HAND_OVER = [  # a return that finds the queue full goes to a sleeping checkout
    ("util/queue.py",
     "    def put_nowait(self, item: _T) -> None:\n        raise NotImplementedError()\n",
     "    def put_nowait(self, item: _T) -> None:\n        raise NotImplementedError()\n\n"
     "    def put_for_sleeper(self, item: _T) -> bool:\n        raise NotImplementedError()\n"),
    ("util/queue.py",
     "        # If this queue uses LIFO or FIFO\n        self.use_lifo = use_lifo\n",
     "        # If this queue uses LIFO or FIFO\n        self.use_lifo = use_lifo\n"
     "        # getters asleep in get(), woken or not, that have not run yet\n"
     "        self.sleeping = 0\n"),
    ("util/queue.py",
     "            elif timeout is None:\n                while self._empty():\n"
     "                    self.not_empty.wait()\n",
     "            elif timeout is None:\n                self.sleeping += 1\n"
     "                try:\n                    while self._empty():\n"
     "                        self.not_empty.wait()\n                finally:\n"
     "                    self.sleeping -= 1\n"),
    ("util/queue.py",
     "                endtime = _time() + timeout\n                while self._empty():\n"
     "                    remaining = endtime - _time()\n"
     "                    if remaining <= 0.0:\n                        raise Empty\n"
     "                    self.not_empty.wait(remaining)\n",
     "                endtime = _time() + timeout\n                self.sleeping += 1\n"
     "                try:\n                    while self._empty():\n"
     "                        remaining = endtime - _time()\n"
     "                        if remaining <= 0.0:\n                            raise Empty\n"
     "                        self.not_empty.wait(remaining)\n                finally:\n"
     "                    self.sleeping -= 1\n"),
    ("util/queue.py",
     "        return self.maxsize > 0 and len(self.queue) == self.maxsize\n",
     "        return self.maxsize > 0 and len(self.queue) >= self.maxsize\n"),
    ("util/queue.py",
     "    def _init(self, maxsize: int) -> None:\n",
     "    def put_for_sleeper(self, item: _T) -> bool:\n"
     "        \"\"\"Put an item, past maxsize if need be, when a getter asleep in\n"
     "        get() has no item coming; else put nothing and return False.\"\"\"\n"
     "        with self.mutex:\n            if self.sleeping <= self._qsize():\n"
     "                return False\n            self._put(item)\n"
     "            self.not_empty.notify()\n            return True\n\n"
     "    def _init(self, maxsize: int) -> None:\n"),
    ("util/queue.py",
     "        self.use_lifo = use_lifo\n        self.maxsize = maxsize\n",
     "        self.use_lifo = use_lifo\n        self.maxsize = maxsize\n"
     "        self.sleeping = 0\n\n"
     "    def put_for_sleeper(self, item: _T) -> bool:\n"
     "        if self.sleeping <= self._queue.qsize():\n            return False\n"
     "        # past maxsize for this put only: asyncio.Queue stays bounded\n"
     "        self._queue.full = lambda: False  # type: ignore[method-assign]\n"
     "        try:\n            self._queue.put_nowait(item)\n        finally:\n"
     "            del self._queue.full\n        return True\n"),
    ("pool/impl.py",
     "        except sqla_queue.Full:\n            try:\n                record.close()\n",
     "        except sqla_queue.Full:\n            if self._pool.put_for_sleeper(record):\n"
     "                return  # a sleeping checkout takes it\n"
     "            try:\n                record.close()\n"),
]


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    if text.count(old) != 1:
        raise SystemExit(f"sqlalchemy_harness: {path} is not as expected here "
                         f"({text.count(old)} matches): {old.strip().splitlines()[0]!r}")
    path.write_text(text.replace(old, new))


def async_get_edit(lib: Path, option: str) -> None:
    """AsyncAdaptedQueue.get differs between releases: it is replaced whole (the proposed fix)
    or wrapped in the count of sleeping getters (the hand-over)."""
    path = lib / "util/queue.py"
    text = path.read_text()
    start = text.rindex("    def get(self, block: bool = True, timeout: Optional[float] = None)")
    if option == "hand-over":
        last = text.rindex("        try:\n", start)
        body = "".join("    " + line if line.strip() else line
                       for line in text[last:].splitlines(True))
        path.write_text(text[:last] + "        self.sleeping += 1\n        try:\n" + body
                        + "        finally:\n            self.sleeping -= 1\n")
        return
    wait = ("compat.wait_for(remaining, lambda: getter)" if "compat.wait_for" in text
            else "asyncio.wait_for(getter, remaining)")
    path.write_text(text[:start] + ASYNC_GET.replace("WAIT_FOR", wait))


def apply(lib: Path, option: str) -> None:
    edits = {"hand-over": HAND_OVER, "notify": WAKE_QUEUE + WAKE_DEC,
             "wake-recheck": WAKE_QUEUE + WAKE_DEC + RECHECK}[option]
    for file, old, new in edits:
        edit(lib / file, old, new)
    async_get_edit(lib, option)


def pytest(tree: Path, *args: str) -> dict:
    """Run pytest in TREE (its conftest puts its lib/ first); the outcome of each test."""
    report = tree / "report.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                    f"--junitxml={report}", *args], cwd=tree, capture_output=True, text=True)
    outcomes = {}
    for case in ET.parse(report).iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}.{case.get('name')}"
        failure = case.find("failure")
        error = case.find("error")
        if failure is not None:
            outcomes[name] = ("failed", failure.get("message", ""))
        elif error is not None:
            outcomes[name] = ("error", error.get("message", ""))
        elif case.find("skipped") is not None:
            outcomes[name] = ("skipped", "")
        else:
            outcomes[name] = ("passed", "")
    return outcomes


def counts(outcomes: dict) -> str:
    found = {}
    for state, _ in outcomes.values():
        found[state] = found.get(state, 0) + 1
    return ", ".join(f"{n} {state}" for state, n in sorted(found.items())) or "nothing ran"


def unpack(args, work: Path) -> tuple[Path, str]:
    """The source tree and what it is."""
    if args.git:
        repo = Path(args.git)
        show = ["git", f"--git-dir={repo / '.git' if (repo / '.git').exists() else repo}"]
        commit, date = subprocess.run([*show, "log", "-1", "--format=%H %cs", args.rev],
                                      capture_output=True, text=True, check=True
                                      ).stdout.split()
        tree = work / f"sqlalchemy-{commit[:10]}"
        tree.mkdir()
        archive = subprocess.run([*show, "archive", commit], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
        return tree, f"SQLAlchemy {args.rev} at {commit[:12]} ({date})"
    version = metadata.version("SQLAlchemy")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                    "--no-binary", ":all:", f"SQLAlchemy=={version}", "-d", str(work)],
                   check=True, capture_output=True)
    [sdist] = work.glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        archive.extractall(work, filter="data")
    return next(p for p in work.iterdir() if p.is_dir()), f"SQLAlchemy {version} (sdist)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--git", metavar="REPO", help="a SQLAlchemy repository (or git dir)")
    parser.add_argument("--rev", default="HEAD", help="with --git: the commit (default HEAD)")
    parser.add_argument("--keep", metavar="DIR", help="work here and keep it")
    parser.add_argument("--diff", metavar="FILE", help="write the proposed fix as a diff")
    args = parser.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="sa-harness-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        shipped, what = unpack(args, work)
        print(what)
        if "compat.wait_for" not in (shipped / "lib/sqlalchemy/util/queue.py").read_text():
            print("  (no compat.wait_for here: this tree predates 2.1.7's fix for #13749, where "
                  "asyncio.wait_for() on Python 3.11\n   swallows a cancellation; the "
                  "cancelled-checkout test needs that fix)")
        return run(shipped, args)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def run(shipped: Path, args) -> int:
    ok = True
    for file in FILES:
        print(f"  as shipped, {file}: {counts(pytest(shipped, file))}")
    test_pool = shipped / FILES[0]
    pristine = test_pool.read_text()  # for --diff: the tests are part of the patch
    for old, new in TEST_EDITS:
        edit(test_pool, old, new)
    if "import asyncio\n" not in test_pool.read_text():
        test_pool.write_text("import asyncio\n" + test_pool.read_text())
    test_pool.write_text(test_pool.read_text() + ASYNC_TESTS)
    new_tests = re.findall(r"    (?:async )?def (test_\w+)", THREAD_TESTS + ASYNC_TESTS)
    selected = ["-k", " or ".join(sorted(set(new_tests))), FILES[0]]
    found = pytest(shipped, *selected)
    own = [name for name, (state, message) in found.items()
           if state == "failed" and MARK in message]
    print(f"  the {len(found)} new tests on the shipped library: {counts(found)}; "
          f"{len(own)} of them on their own assertion")
    for name, (state, message) in sorted(found.items()):
        if name in own:  # the seconds each checkout waited after the slot came free
            waited = re.search(re.escape(MARK) + r": (\[[^\]]*\])", message)
            print(f"    {name}: waited {waited.group(1) if waited else '?'} s")
        else:
            ok = False
            print(f"    NOT on its own assertion: {name}: {state} {message[:200]}")
    for option in ("hand-over", "notify", "wake-recheck"):
        tree = shipped.parent / f"{shipped.name}-{option}"
        shutil.copytree(shipped, tree)
        apply(tree / "lib/sqlalchemy", option)
        found = pytest(tree, *selected)
        passed = sorted(name for name, (state, _) in found.items() if state == "passed")
        print(f"  with {option}, the new tests: {counts(found)}"
              + "".join(f"\n    passes {name}" for name in passed))
        if option == "wake-recheck":
            ok = ok and len(passed) == len(found) == len(own)
            for file in FILES:
                result = pytest(tree, file)
                ok = ok and all(state in ("passed", "skipped") for state, _ in result.values())
                print(f"  with {option}, {file}: {counts(result)}")
                for name, (state, message) in sorted(result.items()):
                    if state not in ("passed", "skipped"):
                        print(f"    {state}: {name}: {message[:200]}")
            if args.diff:
                write_diff(shipped, tree, Path(args.diff), pristine)
            reproducers(shipped, tree)
    return 0 if ok else 1


def reproducers(shipped: Path, fixed: Path) -> None:
    """bench/pool_repro*.py (public API, SQLAlchemy alone) on each library: first line."""
    for script in sorted(Path(__file__).resolve().parent.glob("pool_repro*.py")):
        for label, tree in (("shipped", shipped), ("fixed", fixed)):
            done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(tree / "lib")})
            line = (done.stdout or done.stderr).strip().splitlines()[0]
            print(f"  {script.name}, {label}: {line}")


def write_diff(old: Path, new: Path, out: Path, pristine_tests: str) -> None:
    """The proposed fix and the seven new tests, as one patch against OLD's tree."""
    lines = []
    for file in ("lib/sqlalchemy/util/queue.py", "lib/sqlalchemy/pool/impl.py"):
        lines += difflib.unified_diff((old / file).read_text().splitlines(True),
                                      (new / file).read_text().splitlines(True),
                                      f"a/{file}", f"b/{file}")
    lines += difflib.unified_diff(pristine_tests.splitlines(True),
                                  (old / FILES[0]).read_text().splitlines(True),
                                  f"a/{FILES[0]}", f"b/{FILES[0]}")
    out.write_text("".join(lines))
    print(f"  the proposed fix and its tests: {out} ({len(lines)} lines)")


if __name__ == "__main__":
    sys.exit(main())
