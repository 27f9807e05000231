"""A fix for QueuePool's lost wake-up that keeps its invariants, and the old patch that did not.
SQLAlchemy only (no database): tests/test_pool_wakeup.py and bench/pool_wakeup.py use it.

    from pool_fix import FixedQueuePool   # QueuePool with WaiterQueue
    create_engine(url, poolclass=FixedQueuePool)

The loss: QueuePool._do_return_conn puts a returned connection with put(block=False); when
the queue (pool_size) is full it closes the connection and lowers the overflow count, and
wakes nobody. A checkout asleep in Queue.get() then sleeps on until the next successful put,
or pool_timeout, though there is room to open a connection.

The fix: the queue counts the getters asleep in get(), and takes a put past maxsize only when
more getters sleep than items wait for them, i.e. only for a getter that will take it. So a
waiter is never stranded, nothing is closed and reopened for it, the queue returns below
maxsize as soon as the sleepers run (at most pool_size idle after any burst, overflow() back
to 0), and never more than pool_size + max_overflow are open.
"""

from __future__ import annotations

import asyncio

from sqlalchemy.pool import AsyncAdaptedQueuePool, QueuePool
from sqlalchemy.util import queue as sqla_queue


class WaiterQueue(sqla_queue.Queue):
    """sqlalchemy.util.queue.Queue that counts its sleeping getters."""

    def __init__(self, maxsize: int = 0, use_lifo: bool = False):
        super().__init__(maxsize, use_lifo)
        self.sleeping = 0  # getters in get() that found it empty: woken or not, not yet run

    def get(self, block: bool = True, timeout: float | None = None):
        with self.mutex:  # re-entrant: Queue.get takes it again, its wait releases both
            if not block or not self._empty():
                return super().get(block, timeout)
            self.sleeping += 1
            try:
                return super().get(block, timeout)
            finally:
                self.sleeping -= 1

    def _full(self) -> bool:
        """At or past maxsize: Queue._full() tests `==`, so a queue pushed past maxsize would
        count as not full and keep every later return (what the old patch did)."""
        return self.maxsize > 0 and len(self.queue) >= self.maxsize

    def put_for_sleeper(self, item) -> bool:
        """Put ITEM, past maxsize if need be, when a sleeping getter has no item coming."""
        with self.mutex:
            if self.sleeping <= self._qsize():
                return False
            self._put(item)
            self.not_empty.notify()
            return True


class WaiterAsyncQueue(sqla_queue.AsyncAdaptedQueue):
    """The same for asyncio (AsyncAdaptedQueuePool loses the wake-up too): the asyncio queue
    is unbounded, maxsize is kept here, so a put for a sleeping getter can pass it."""

    def __init__(self, maxsize: int = 0, use_lifo: bool = False):
        super().__init__(maxsize, use_lifo)
        self.sleeping = 0

    @sqla_queue.memoized_property
    def _queue(self) -> asyncio.Queue:  # made on first use, on the running loop
        return asyncio.LifoQueue() if self.use_lifo else asyncio.Queue()

    def full(self) -> bool:
        return self.maxsize > 0 and self._queue.qsize() >= self.maxsize

    def put_nowait(self, item) -> None:
        if self.full():
            raise sqla_queue.Full()
        self._queue.put_nowait(item)

    def put(self, item, block: bool = True, timeout: float | None = None) -> None:
        self.put_nowait(item)  # QueuePool only ever puts without blocking

    def get(self, block: bool = True, timeout: float | None = None):
        if not block or not self._queue.empty():
            return super().get(block, timeout)
        self.sleeping += 1
        try:
            return super().get(block, timeout)
        finally:
            self.sleeping -= 1

    def put_for_sleeper(self, item) -> bool:
        if self.sleeping <= self._queue.qsize():
            return False
        self._queue.put_nowait(item)  # wakes the next sleeping getter
        return True


class HandsOver:
    """_do_return_conn for both pools: a return that finds the queue full goes to a sleeping
    checkout if one has nothing coming, else is closed as before."""

    def _do_return_conn(self, record) -> None:
        try:
            self._pool.put(record, False)
        except sqla_queue.Full:
            if self._pool.put_for_sleeper(record):
                return  # handed over: not closed, the overflow count unchanged
            try:
                record.close()
            finally:
                self._dec_overflow()


class FixedQueuePool(HandsOver, QueuePool):
    """QueuePool whose returns reach a sleeping checkout instead of being closed."""

    _queue_class = WaiterQueue


class FixedAsyncAdaptedQueuePool(HandsOver, AsyncAdaptedQueuePool):
    """AsyncAdaptedQueuePool, the same."""

    _queue_class = WaiterAsyncQueue


class HandoffQueuePool(QueuePool):
    """The earlier patch, kept as the measured counter-example: it hands a return to any
    waiter it finds in Condition._waiters, so after a burst with waiters it keeps every
    returned connection (15 idle on a pool of 5, overflow() stuck at 10)."""

    def _do_return_conn(self, record) -> None:
        queue = self._pool
        with queue.mutex:
            if queue._full() and queue.not_empty._waiters:
                queue._put(record)
                queue.not_empty.notify()
                return
        super()._do_return_conn(record)
