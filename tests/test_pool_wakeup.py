"""The lost wake-up in QueuePool, forced in milliseconds, and the patch proposal that keeps it."""

import threading
import time

from sqlalchemy.pool import QueuePool

from bench.pool_wakeup import HandoffQueuePool


class Connection:
    """Enough of a DB-API connection for the pool: nothing to talk to."""

    closed = 0

    def rollback(self):
        pass

    def close(self):
        Connection.closed += 1


TIMEOUT = 1.0


def two_returns_while_two_wait(kind) -> tuple[list[float], int, list]:
    """pool_size 1 + max_overflow 1, both out; two checkouts asleep in the queue. Both
    connections come back while the queue's lock is held, as when returns run back to back
    before a woken waiter gets to run. How long did each waiter wait after the returns, how
    many connections were closed, and what is still checked out?"""
    pool = kind(Connection, pool_size=1, max_overflow=1, timeout=TIMEOUT)
    first, second = pool.connect(), pool.connect()
    waited: list[float] = []
    held = [first, second]  # a connection let go of goes back to the pool and wakes a waiter

    def wait():
        held.append(pool.connect())
        waited.append(time.perf_counter() - returned)

    waiters = [threading.Thread(target=wait) for _ in range(2)]
    for thread in waiters:
        thread.start()
    deadline = time.monotonic() + 5
    while len(pool._pool.not_empty._waiters) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    closed = Connection.closed
    with pool._pool.mutex:  # the first woken waiter cannot take its connection yet
        returned = time.perf_counter()
        first.close()
        second.close()  # the queue (size 1) is full: stock QueuePool closes this one
    for thread in waiters:
        thread.join(5)
    return sorted(waited), Connection.closed - closed, held[2:]


def test_the_stock_pool_closes_a_connection_a_waiter_needed_and_leaves_it_asleep():
    waited, closed, held = two_returns_while_two_wait(QueuePool)
    assert waited[0] < 0.2  # the woken one
    assert waited[1] > 0.8 * TIMEOUT  # slept on until its timeout, though a slot was free
    assert closed == 1  # ... and opened a new one then


def test_the_patch_hands_the_returned_connection_to_the_waiter():
    waited, closed, held = two_returns_while_two_wait(HandoffQueuePool)
    assert waited[1] < 0.2
    assert closed == 0  # handed over, not closed and reopened
    pool = held[0]._pool
    assert pool.checkedout() == 2 and pool.overflow() == 1  # never over 1 + 1
