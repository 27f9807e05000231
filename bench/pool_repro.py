"""QueuePool strands a waiter with a slot free. SQLAlchemy only, no database:
    python bench/pool_repro.py [--fixed]      # --fixed: bench/pool_fix.py's FixedQueuePool"""
import sys
import threading
import time

from sqlalchemy.pool import QueuePool


class Connection:  # all the pool asks of a DB-API connection
    def rollback(self): pass
    def close(self): pass


kind = QueuePool
if "--fixed" in sys.argv:
    from pool_fix import FixedQueuePool as kind
pool = kind(Connection, pool_size=1, max_overflow=1, timeout=2)
first, second = pool.connect(), pool.connect()
print("both checked out:     ", pool.status())
waited, held, returned = {}, [], 0.0
def waiter(name):  # a checkout, asleep in Queue.get() until a return wakes it
    held.append(pool.connect())
    waited[name] = time.perf_counter() - returned
threads = [threading.Thread(target=waiter, args=(n,)) for n in ("A", "B")]
for thread in threads:
    thread.start()
while len(pool._pool.not_empty._waiters) < 2:  # both waiters asleep
    time.sleep(0.001)
with pool._pool.mutex:  # two returns back to back, before a woken waiter runs
    returned = time.perf_counter()
    first.close()
    second.close()  # the queue (size 1) is full: closed, overflow lowered, nobody woken
print("both returned:        ", pool.status())
for thread in threads:
    thread.join()
print("both waiters served:  ", pool.status())
for name, seconds in sorted(waited.items()):
    print(f"waiter {name} waited {seconds:.3f} s after the returns (pool timeout 2 s)")
