"""QueuePool strands a sleeping checkout when a connection is returned to a full queue.
SQLAlchemy alone, no database; public API only:    python bench/pool_repro.py"""
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
waited, held = {}, []


def checkout(name):
    asked = time.perf_counter()
    held.append(pool.connect())
    waited[name] = time.perf_counter() - asked


threads = [threading.Thread(target=checkout, args=(name,)) for name in "AB"]
for thread in threads:
    thread.start()
time.sleep(0.2)  # A and B asleep in the pool's queue: both connections are out
first.close()  # the queue takes it and wakes A
second.close()  # the queue (pool_size 1) is full: closed, overflow lowered, no one woken
for thread in threads:
    thread.join()
print(f"A waited {waited['A']:.3f} s, B {waited['B']:.3f} s in pool.connect() (pool timeout 2 s)")
print("expected: both about 0.2 s (a connection, or a slot under max_overflow, was free for each)")
