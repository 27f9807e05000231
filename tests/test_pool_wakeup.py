"""QueuePool's lost wake-up, forced in milliseconds with no database, and bench/pool_fix.py's
fix with every invariant: no stranded waiter, at most pool_size idle and overflow() back to 0
after a burst, never more than pool_size + max_overflow open. SQLAlchemy only."""

import threading
import time

import pytest
from sqlalchemy.pool import QueuePool

from bench.pool_fix import FixedQueuePool, HandoffQueuePool

TIMEOUT = 1.0


class Connection:
    """Enough of a DB-API connection for the pool: counts what is open."""

    open = 0
    most = 0

    def __init__(self):
        Connection.open += 1
        Connection.most = max(Connection.most, Connection.open)

    def rollback(self):
        pass

    def close(self):
        Connection.open -= 1


def burst(kind, size: int, overflow: int, sleepers: int) -> dict:
    """pool_size + max_overflow all out; SLEEPERS checkouts asleep in the queue; every
    connection returned back to back (under the queue's lock, as when returns outrun the
    woken waiters); then the sleepers return theirs. What did each wait, what is left?"""
    Connection.open = Connection.most = 0
    pool = kind(Connection, pool_size=size, max_overflow=overflow, timeout=TIMEOUT)
    out = [pool.connect() for _ in range(size + overflow)]
    waited, got, returned = [], [], [0.0]

    def sleeper():
        got.append(pool.connect())
        waited.append(time.perf_counter() - returned[0])

    threads = [threading.Thread(target=sleeper) for _ in range(sleepers)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 5
    while len(pool._pool.not_empty._waiters) < sleepers:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    with pool._pool.mutex:
        returned[0] = time.perf_counter()
        for conn in out:
            conn.close()
    for thread in threads:
        thread.join(5)
    for conn in got:
        conn.close()
    return {"waited": sorted(waited), "idle": pool.checkedin(), "overflow": pool.overflow(),
            "open": Connection.open, "most_open": Connection.most}


@pytest.mark.parametrize("size, overflow, sleepers", [(1, 1, 2), (5, 10, 6)])
def test_the_stock_pool_strands_a_waiter_until_pool_timeout(size, overflow, sleepers):
    found = burst(QueuePool, size, overflow, sleepers)
    assert found["waited"][0] < 0.2
    assert found["waited"][-1] > 0.8 * TIMEOUT  # asleep with a slot free, then reconnected
    assert found["idle"] <= size and found["overflow"] == 0  # its invariants do hold


@pytest.mark.parametrize("size, overflow, sleepers", [(1, 1, 2), (5, 10, 6), (5, 10, 15),
                                                      (5, 10, 1)])
def test_the_fix_strands_nobody_and_keeps_every_invariant(size, overflow, sleepers):
    found = burst(FixedQueuePool, size, overflow, sleepers)
    assert found["waited"][-1] < 0.2, found  # no stranded waiter
    assert found["idle"] <= size and found["overflow"] == 0, found  # after the burst
    assert found["open"] == found["idle"]  # nothing leaked
    assert found["most_open"] <= size + overflow  # never past the limit


def test_the_old_handoff_kept_every_returned_connection():
    """The counter-example: no stranded waiter, but 15 idle on a pool of 5 afterwards."""
    found = burst(HandoffQueuePool, 5, 10, 6)
    assert found["waited"][-1] < 0.2
    assert found["idle"] == 15 and found["overflow"] == 10


def async_burst(kind, size: int, overflow: int, sleepers: int) -> dict:
    """burst() on an asyncio pool: the returns run back to back in one greenlet, before any
    woken task runs."""
    import asyncio

    from sqlalchemy.util.concurrency import greenlet_spawn

    async def main() -> dict:
        pool = kind(Connection, pool_size=size, max_overflow=overflow, timeout=TIMEOUT)
        out = [await greenlet_spawn(pool.connect) for _ in range(size + overflow)]
        waited, returned = [], [0.0]

        async def sleeper():
            conn = await greenlet_spawn(pool.connect)
            waited.append(time.perf_counter() - returned[0])
            return conn

        tasks = [asyncio.create_task(sleeper()) for _ in range(sleepers)]
        await asyncio.sleep(0.05)  # every sleeper waiting in the queue

        def back_to_back():
            returned[0] = time.perf_counter()
            for conn in out:
                conn.close()
        await greenlet_spawn(back_to_back)
        got = await asyncio.gather(*tasks)
        await greenlet_spawn(lambda: [conn.close() for conn in got])
        return {"waited": sorted(waited), "idle": pool.checkedin(),
                "overflow": pool.overflow()}

    Connection.open = Connection.most = 0
    return asyncio.run(main())


def test_asyncio_pools_lose_the_wake_up_too_and_the_fix_keeps_it():
    from sqlalchemy.pool import AsyncAdaptedQueuePool

    from bench.pool_fix import FixedAsyncAdaptedQueuePool

    stock = async_burst(AsyncAdaptedQueuePool, 1, 1, 2)
    assert stock["waited"][-1] > 0.8 * TIMEOUT
    for size, overflow, sleepers in ((1, 1, 2), (5, 10, 6)):
        fixed = async_burst(FixedAsyncAdaptedQueuePool, size, overflow, sleepers)
        assert fixed["waited"][-1] < 0.2, fixed
        assert fixed["idle"] <= size and fixed["overflow"] == 0, fixed
        assert Connection.most <= size + overflow
