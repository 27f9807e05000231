"""QueuePool strands a sleeping checkout when a connect in progress fails and frees its slot.
SQLAlchemy alone, no database; public API only:    python bench/pool_repro_failed_connect.py"""
import argparse
import contextlib
import threading
import time

from sqlalchemy.pool import QueuePool

argparse.ArgumentParser(description=__doc__).parse_args()
failed, waited, held = [], [], []


class Connection:  # all that the pool asks of a DB-API connection
    def __init__(self):  # the second connect takes 0.2 s, then fails
        if len(held) == 1 and not failed:
            time.sleep(0.2)
            failed.append(time.perf_counter())
            raise ConnectionError("connection refused")
    def rollback(self): pass
    def close(self): pass


def checkout():
    with contextlib.suppress(ConnectionError):  # the first of the two fails
        held.append(pool.connect())
        waited.append(time.perf_counter() - failed[0])


pool = QueuePool(Connection, pool_size=1, max_overflow=1, timeout=2)
held.append(pool.connect())
threads = [threading.Thread(target=checkout) for _ in range(2)]
for thread in threads:
    thread.start()
    time.sleep(0.05)  # the first connects (the overflow slot is its), then A sleeps in the queue
for thread in threads:
    thread.join()
print(f"A got a connection {waited[0]:.3f} s after the other connect failed (pool timeout 2 s;"
      " expected: at once, a slot was free)")
