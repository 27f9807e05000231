"""QueuePool strands a woken checkout when another takes the connection that woke it, though
the return before freed a slot. SQLAlchemy alone, no database; public API only:
    python bench/pool_repro_newcomer.py"""
import argparse
import threading
import time

from sqlalchemy.pool import QueuePool

argparse.ArgumentParser(description=__doc__).parse_args()


class Connection:  # all that the pool asks of a DB-API connection
    def rollback(self): pass
    def close(self): pass


pool = QueuePool(Connection, pool_size=1, max_overflow=1, timeout=2)
first, second = pool.connect(), pool.connect()
waited, held = [], []


def checkout():
    asked = time.perf_counter()
    held.append(pool.connect())
    waited.append(time.perf_counter() - asked)


thread = threading.Thread(target=checkout)
thread.start()
time.sleep(0.2)  # A asleep in the pool's queue: both connections are out
first.close()  # the queue takes it and wakes A
second.close()  # the queue (pool_size 1) is full: closed, overflow lowered: a slot is free
third = pool.connect()  # this thread takes the first connection before A runs
thread.join()
print(f"A waited {waited[0]:.3f} s in pool.connect() (pool timeout 2 s)")
print("expected: about 0.2 s: after the returns a slot under max_overflow was free for it")
