"""Create the todos table and fill it with 50 todos; safe to run twice.

    DATABASE_URL=postgresql://user@127.0.0.1/db python seed.py           # create if missing
    DATABASE_URL=postgresql://user@127.0.0.1/db python seed.py --reset   # drop and recreate

Reads DATABASE_URL (and DB_DRIVER) like the apps, through models.py.
"""

import argparse
import sys

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

TODOS = 50


def seed(reset: bool = False) -> str:
    """Make sure the table holds exactly the seed todos; returns what was done."""
    from models import Base, Session, Todo, engine

    if reset:
        Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with Session.begin() as session:
        count = session.scalar(select(func.count()).select_from(Todo))
        if count:
            return f"todos table already holds {count} todos: left as it is"
        session.add_all(Todo(title=f"todo {i}", done=i % 2 == 0, priority=i % 5)
                        for i in range(1, TODOS + 1))
    return f"{'recreated' if reset else 'created'} the todos table with {TODOS} todos"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reset", action="store_true", help="drop the table first")
    args = parser.parse_args()
    try:
        from models import engine, masked
        print(f"seed: {seed(args.reset)} ({masked(engine.url)})")
    except ValueError as exc:  # models.ConfigError
        print(f"seed: {exc}", file=sys.stderr)
        return 1
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        print(f"seed: cannot reach the database: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
