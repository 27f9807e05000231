"""The pool fix in SQLAlchemy's own test harness, on the sdist of the installed release.

    python bench/sqlalchemy_harness.py [--keep DIR]      # needs PyPI (pip download)

1. pip download --no-binary the installed SQLAlchemy's sdist (it ships test/) and unpack it;
2. add one test, in the style of test/engine/test_pool.py's QueuePoolTest, built on its
   _queuepool_dbapi_fixture: pool 1 + 1, both out, two checkouts asleep, both returned back
   to back; the second waiter must not sleep until pool_timeout;
3. run it with the sdist's own pytest setup (test/conftest.py puts its lib/ first): it fails;
4. apply the fix to lib/ (the queue counts its sleeping getters, takes a put past maxsize
   only for one of them and counts such a queue as full; QueuePool hands a return that finds
   the queue full to a sleeper before closing it), then run that test and the whole of
   test/engine/test_pool.py: everything passes.
The asyncio queue's half of the fix is in bench/pool_fix.py (WaiterAsyncQueue).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

TEST = '''
    @testing.requires.threading_with_mock
    @testing.requires.timing_intensive
    def test_return_to_full_queue_wakes_sleeping_checkout(self):
        """a connection returned to a full queue while checkouts sleep in
        Queue.get() goes to one of them; it is not closed while that
        checkout sleeps on until pool_timeout with a slot free."""
        dbapi, p = self._queuepool_dbapi_fixture(
            pool_size=1, max_overflow=1, timeout=2
        )
        c1, c2 = p.connect(), p.connect()
        waited, held, returned = [], [], []

        def waiter():
            held.append(p.connect())
            waited.append(time.time() - returned[0])

        threads = [threading.Thread(target=waiter) for i in range(2)]
        for t in threads:
            t.start()
        time.sleep(0.2)  # both asleep inside the queue

        # both returns land before a woken checkout gets to run
        with p._pool.mutex:
            returned.append(time.time())
            c1.close()
            c2.close()
        for t in threads:
            t.join(join_timeout)

        eq_(len(waited), 2)
        assert max(waited) < 1, waited
        for c in held:
            c.close()
        eq_(p.checkedin(), 1)
        eq_(p.overflow(), 0)
'''

# (file, text as shipped, text with the fix): the whole change, applied to lib/sqlalchemy/
FIX = [
    ("util/queue.py",
     "        # If this queue uses LIFO or FIFO\n        self.use_lifo = use_lifo\n",
     "        # If this queue uses LIFO or FIFO\n        self.use_lifo = use_lifo\n"
     "        # getters asleep in get(), woken or not, that have not run yet\n"
     "        self._sleeping = 0\n"),
    ("util/queue.py",
     "            elif timeout is None:\n                while self._empty():\n"
     "                    self.not_empty.wait()\n",
     "            elif timeout is None:\n                self._sleeping += 1\n"
     "                try:\n                    while self._empty():\n"
     "                        self.not_empty.wait()\n                finally:\n"
     "                    self._sleeping -= 1\n"),
    ("util/queue.py",
     "                endtime = _time() + timeout\n                while self._empty():\n"
     "                    remaining = endtime - _time()\n"
     "                    if remaining <= 0.0:\n                        raise Empty\n"
     "                    self.not_empty.wait(remaining)\n",
     "                endtime = _time() + timeout\n                self._sleeping += 1\n"
     "                try:\n                    while self._empty():\n"
     "                        remaining = endtime - _time()\n"
     "                        if remaining <= 0.0:\n                            raise Empty\n"
     "                        self.not_empty.wait(remaining)\n                finally:\n"
     "                    self._sleeping -= 1\n"),
    ("util/queue.py",
     "        return self.maxsize > 0 and len(self.queue) == self.maxsize\n",
     "        return self.maxsize > 0 and len(self.queue) >= self.maxsize\n"),
    ("util/queue.py",
     "    def _init(self, maxsize: int) -> None:\n",
     "    def put_for_waiter(self, item: _T) -> bool:\n"
     "        \"\"\"Put an item, past maxsize if need be, when a getter asleep in\n"
     "        get() has no item coming; else put nothing and return False.\"\"\"\n"
     "        with self.mutex:\n            if self._sleeping <= self._qsize():\n"
     "                return False\n            self._put(item)\n"
     "            self.not_empty.notify()\n            return True\n\n"
     "    def _init(self, maxsize: int) -> None:\n"),
    ("util/queue.py",
     "    def put_nowait(self, item: _T) -> None:\n        raise NotImplementedError()\n",
     "    def put_nowait(self, item: _T) -> None:\n        raise NotImplementedError()\n\n"
     "    def put_for_waiter(self, item: _T) -> bool:\n        return False\n"),
    ("pool/impl.py",
     "        except sqla_queue.Full:\n            try:\n                record.close()\n",
     "        except sqla_queue.Full:\n            if self._pool.put_for_waiter(record):\n"
     "                return  # a sleeping checkout takes it\n"
     "            try:\n                record.close()\n"),
]


def replace_once(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    if text.count(old) < 1:
        raise SystemExit(f"sqlalchemy_harness: {path.name} is not as expected here: "
                         f"{old.strip().splitlines()[0]!r}")
    path.write_text(text.replace(old, new, 1))


def pytest(tree: Path, *args: str) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                           "test/engine/test_pool.py", *args], cwd=tree, capture_output=True,
                          text=True)
    return done.returncode, done.stdout.strip().splitlines()[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", metavar="DIR", help="unpack here and keep it")
    args = parser.parse_args()
    version = metadata.version("SQLAlchemy")
    work = Path(args.keep or tempfile.mkdtemp(prefix="sa-harness-"))
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                    "--no-binary", ":all:", f"SQLAlchemy=={version}", "-d", str(work)],
                   check=True)
    [sdist] = work.glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        archive.extractall(work, filter="data")
    tree = next(p for p in work.iterdir() if p.is_dir())
    replace_once(tree / "test/engine/test_pool.py",
                 "class QueuePoolTest(PoolTestBase):\n",
                 "class QueuePoolTest(PoolTestBase):" + TEST + "\n")
    name = "test_return_to_full_queue_wakes_sleeping_checkout"
    status, line = pytest(tree, "-k", name)
    print(f"SQLAlchemy {version} as shipped, {name}: {line} (exit {status})")
    for file, old, new in FIX:
        replace_once(tree / "lib/sqlalchemy" / file, old, new)
    status_new, line_new = pytest(tree, "-k", name)
    print(f"with the fix, {name}: {line_new} (exit {status_new})")
    status_all, line_all = pytest(tree)
    print(f"with the fix, all of test/engine/test_pool.py: {line_all} (exit {status_all})")
    print(f"(tree: {tree})")
    return 0 if status != 0 and status_new == 0 and status_all == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
