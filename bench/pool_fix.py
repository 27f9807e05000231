"""A fix for QueuePool's lost wake-ups, and the old fix that covered one path of three.
SQLAlchemy only (no database): tests/test_pool_wakeup.py, bench/pool_paths.py and
bench/pool_wakeup.py use it; bench/sqlalchemy_harness.py applies the same change to
SQLAlchemy's own source.

    from pool_fix import FixedQueuePool   # or FixedAsyncAdaptedQueuePool
    create_engine(url, poolclass=FixedQueuePool)

The loss: a checkout that finds the overflow at max_overflow sleeps in Queue.get(), which only
a put wakes. Three paths leave it asleep with a connection slot free:
  - a connection returned to a full queue is closed (QueuePool._do_return_conn);
  - a connect that fails in _do_get calls _dec_overflow();
  - the checkout was woken by a put, but a newcomer took that connection first; it sleeps
    again inside Queue.get()'s loop, though the slot that a close freed is still free.
It sleeps on until the next put, or for the whole pool_timeout.

The fix: _dec_overflow() wakes one sleeping checkout (Queue.wake_getter()), and a checkout
woken to an empty queue goes back to _do_get() to re-check the overflow, then waits out the
rest of pool_timeout if another checkout took the slot. The queue counts its wake-ups; a
checkout reads the count before it reads the overflow and passes it to get(), which raises
Empty instead of sleeping once the count has moved: a slot freed between the check and the
sleep is not missed either. Nothing is put past pool_size, no connection is kept that stock
would close, and the asyncio queue keeps asyncio.Queue (and its blocking put) for storage.
One limit stays, as in stock: under gevent, a greenlet killed after a return woke it takes
that wake-up with it (threading.Condition does not pass a notify on; bench/pool_paths.py).
"""

from __future__ import annotations

import asyncio
import collections
import time

from sqlalchemy import exc, util
from sqlalchemy.pool import AsyncAdaptedQueuePool, QueuePool
from sqlalchemy.util import queue as sqla_queue
from sqlalchemy.util.concurrency import await_


class WakingQueue(sqla_queue.Queue):
    """sqlalchemy.util.queue.Queue whose getter can be woken without an item."""

    def __init__(self, maxsize: int = 0, use_lifo: bool = False):
        super().__init__(maxsize, use_lifo)
        self.wakeups = 0  # calls to wake_getter(), ever

    def wake_getter(self) -> None:
        """Wake one getter asleep in get(wakeups=...): it raises Empty if still empty."""
        with self.mutex:
            self.wakeups += 1
            self.not_empty.notify()

    def get(self, block: bool = True, timeout: float | None = None, wakeups: int | None = None):
        """Queue.get(); with WAKEUPS (the count read before deciding to wait), raise Empty
        rather than sleep on an empty queue once wake_getter() has been called since."""
        if wakeups is None or not block:
            return super().get(block, timeout)
        with self.not_empty:
            if timeout is not None and timeout < 0:
                raise ValueError("'timeout' must be a positive number")
            end = None if timeout is None else sqla_queue._time() + timeout
            while self._empty():
                if self.wakeups != wakeups:
                    raise sqla_queue.Empty
                remaining = None if end is None else end - sqla_queue._time()
                if remaining is not None and remaining <= 0.0:
                    raise sqla_queue.Empty
                self.not_empty.wait(remaining)
            item = self._get()
            self.not_full.notify()
            return item


class WakingAsyncQueue(sqla_queue.AsyncAdaptedQueue):
    """The same for asyncio. asyncio.Queue keeps the items (its blocking put is unchanged);
    the getters wait on futures of their own, so that one can be woken without an item."""

    def __init__(self, maxsize: int = 0, use_lifo: bool = False):
        super().__init__(maxsize, use_lifo)
        self.wakeups = 0
        self._getters: collections.deque[asyncio.Future] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None

    def _wake_one(self) -> None:
        while self._getters:
            getter = self._getters.popleft()
            if not getter.done():
                getter.set_result(None)
                return

    def wake_getter(self) -> None:
        self.wakeups += 1
        self._wake_one()

    def put_nowait(self, item) -> None:
        super().put_nowait(item)
        self._wake_one()

    def put(self, item, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)  # not blocking: our put_nowait, which wakes
        if block:
            self._wake_one()

    def _bound_loop(self) -> asyncio.AbstractEventLoop:
        """The running loop; the first to wait binds the queue, as asyncio.Queue does."""
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError(f"{self!r} is bound to a different event loop")
        return loop

    def get(self, block: bool = True, timeout: float | None = None, wakeups: int | None = None):
        if not block:
            return self.get_nowait()
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                return self._queue.get_nowait()  # an item there is taken without awaiting
            except asyncio.QueueEmpty:
                pass
            remaining = None if end is None else end - time.monotonic()
            if (wakeups is not None and self.wakeups != wakeups) or (
                    remaining is not None and remaining <= 0):
                raise sqla_queue.Empty()
            getter = self._bound_loop().create_future()
            self._getters.append(getter)
            try:
                if remaining is None:
                    await_(getter)
                else:  # compat.wait_for: asyncio.wait_for loses a cancellation on 3.11
                    await_(sqla_queue.compat.wait_for(remaining, lambda: getter))
            except BaseException as err:
                woken = getter.done() and not getter.cancelled()
                getter.cancel()
                if getter in self._getters:
                    self._getters.remove(getter)
                if woken:
                    self._wake_one()  # leaving anyway: the wake-up goes to the next getter
                if isinstance(err, asyncio.TimeoutError):
                    raise sqla_queue.Empty() from err
                raise


class RechecksOverflow:
    """_dec_overflow and _do_get for both pools: every lowering of the overflow wakes a
    sleeping checkout, and a checkout woken to an empty queue re-checks the overflow."""

    def _dec_overflow(self):
        if self._max_overflow == -1:
            self._overflow -= 1
            return True
        with self._overflow_lock:
            self._overflow -= 1
        self._pool.wake_getter()
        return True

    def _do_get(self):
        use_overflow = self._max_overflow > -1
        deadline = None  # set when this checkout first waits: pool_timeout in all
        while True:
            wakeups = self._pool.wakeups  # before the overflow: a later wake-up is seen
            wait = use_overflow and self._overflow >= self._max_overflow
            if wait and deadline is None and self._timeout is not None:
                deadline = time.monotonic() + self._timeout
                timeout = self._timeout
            else:
                timeout = self._timeout if deadline is None else max(
                    0.0, deadline - time.monotonic())
            try:
                return self._pool.get(wait, timeout, wakeups=wakeups)
            except sqla_queue.Empty:
                pass
            if use_overflow and self._overflow >= self._max_overflow:
                if not wait or self._pool.wakeups != wakeups:
                    continue  # woken, or raced, and the slot is gone: wait out the rest
                raise exc.TimeoutError(
                    "QueuePool limit of size %d overflow %d reached, "
                    "connection timed out, timeout %0.2f"
                    % (self.size(), self.overflow(), self._timeout), code="3o7r")
            if self._inc_overflow():
                try:
                    return self._create_connection()
                except BaseException:
                    with util.safe_reraise():
                        self._dec_overflow()
                    raise
            # another checkout took the slot first: go round


class FixedQueuePool(RechecksOverflow, QueuePool):
    """QueuePool that strands no checkout while a connection slot is free."""

    _queue_class = WakingQueue


class FixedAsyncAdaptedQueuePool(RechecksOverflow, AsyncAdaptedQueuePool):
    """AsyncAdaptedQueuePool, the same."""

    _queue_class = WakingAsyncQueue


# The old fix, kept to be measured against: it hands a return that finds the queue full to a
# sleeping checkout instead of closing it. It covers the first path only, and its asyncio
# queue drops asyncio.Queue's bound (so a blocking put no longer blocks).

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
        """At or past maxsize (Queue._full() tests `==`)."""
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
    """The same for asyncio, over an unbounded asyncio.Queue."""

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
    """_do_return_conn: a return that finds the queue full goes to a sleeping checkout if
    one has nothing coming, else is closed as before."""

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


class HandOverQueuePool(HandsOver, QueuePool):
    """The old fix: QueuePool whose returns reach a sleeping checkout instead of being closed."""

    _queue_class = WaiterQueue


class HandOverAsyncAdaptedQueuePool(HandsOver, AsyncAdaptedQueuePool):
    """The old fix for asyncio."""

    _queue_class = WaiterAsyncQueue
