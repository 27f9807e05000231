"""What one PostgreSQL connection costs: the memory of its backend process, measured.

    python bench/connections.py [--connections 20]

Starts its own throwaway PostgreSQL, opens N connections as the app does (each runs the
app's todo query once, so its caches are warm), and reads each backend's memory from
/proc/PID/smaps_rollup (Linux): RSS, PSS (shared pages split among the processes that share
them) and private memory (what closing the connection gives back).
"""

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kit.run import seeded  # noqa: E402


def memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0])
    return {"rss": fields["Rss"], "pss": fields["Pss"],
            "private": fields["Private_Clean"] + fields["Private_Dirty"]}


def main() -> int:
    import psycopg2

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=20)
    args = parser.parse_args()
    with seeded(own=True) as (url, server):
        conns = [psycopg2.connect(url) for _ in range(args.connections)]
        pids = []
        for conn in conns:
            with conn.cursor() as cur:
                cur.execute("SELECT id, title, done, priority FROM todos ORDER BY id")
                cur.fetchall()
                cur.execute("SELECT pg_backend_pid()")
                pids.append(cur.fetchone()[0])
            conn.rollback()
        measured = [memory_kib(pid) for pid in pids]
        for conn in conns:
            conn.close()
        version = server.version if server else "PostgreSQL"
        print(f"{args.connections} idle connections after one query each, {version}, "
              f"default settings (shared_buffers 128MB, work_mem 4MB):")
        for key, label in (("rss", "RSS"), ("pss", "PSS"), ("private", "private")):
            values = [m[key] / 1024 for m in measured]
            print(f"  {label:<8} per backend: median {statistics.median(values):.1f} MiB "
                  f"(min {min(values):.1f}, max {max(values):.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
