"""A Flask-SQLAlchemy app as people write them, made cooperative and bounded in two places.

    gunicorn -k gevent examples.flask_sqlalchemy_app:app
    gunicorn -k gevent --preload -w 2 examples.flask_sqlalchemy_app:app   # no config needed
    gunicorn -k gevent 'examples.flask_sqlalchemy_app:create_app()'       # the factory
    ./run_all.sh --scenario flask-sqlalchemy                              # beside the others

Everything it does against blocking is marked FIX: the preamble at the very top, and
harden() on every engine of db.engines in create_app(). The rest is an ordinary app: a
factory, `db = SQLAlchemy()`, a model, routes that query through db.session, and a query at
start-up.

Reads DATABASE_URL (required), DB_DRIVER (psycopg2), POOL_SIZE (5), MAX_OVERFLOW (10),
POOL_TIMEOUT (30), CONNECT_TIMEOUT (5), SLEEP_MAX (10), STATEMENT_TIMEOUT (SLEEP_MAX + 5):
the names and defaults of the kit's models.py.
"""

# ---- FIX 1: the cooperative preamble, before anything else is imported ----
from gevent import monkey

monkey.patch_all()

from psycogreen.gevent import patch_psycopg  # noqa: E402

patch_psycopg()
# ---- end of FIX 1 ----

import math  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

from flask import Flask, jsonify, request  # noqa: E402
from flask_sqlalchemy import SQLAlchemy  # noqa: E402
from sqlalchemy import exc, func, select, text  # noqa: E402
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column  # noqa: E402
from werkzeug.exceptions import BadRequest, HTTPException  # noqa: E402

from harden import harden  # noqa: E402


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)


class Todo(db.Model):
    __tablename__ = "todos"

    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str]
    done: Mapped[bool]
    priority: Mapped[int]

    def as_dict(self) -> dict:
        return {"id": self.id, "title": self.title, "done": self.done,
                "priority": self.priority}


def database_uri(url: str) -> str:
    """Name the driver: SQLAlchemy 2.1 sends a plain postgresql:// URL to psycopg 3, and the
    preamble above patches psycopg2."""
    driver = os.environ.get("DB_DRIVER", "psycopg2")
    for plain in ("postgres://", "postgresql://"):
        if url.startswith(plain):
            return f"postgresql+{driver}://" + url[len(plain):]
    return url


def create_app() -> Flask:
    env = os.environ
    sleep_max = float(env.get("SLEEP_MAX", "10"))
    statement_timeout = float(env.get("STATEMENT_TIMEOUT", sleep_max + 5))
    app = Flask(__name__)
    app.config["SLEEP_MAX"] = sleep_max
    app.config["SQLALCHEMY_DATABASE_URI"] = database_uri(env["DATABASE_URL"])
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {
        "pool_size": int(env.get("POOL_SIZE", "5")),
        "max_overflow": int(env.get("MAX_OVERFLOW", "10")),
        "pool_timeout": float(env.get("POOL_TIMEOUT", "30")),
        "pool_pre_ping": True,
        "connect_args": {
            "application_name": "flask-sqlalchemy-example",
            "options": f"-c statement_timeout={int(statement_timeout * 1000)}",
        },
    }
    db.init_app(app)
    with app.app_context():
        # ---- FIX 2: fork-safe pool; under gevent every wait bounded (statement_timeout + 2 s),
        # on every bind (SQLALCHEMY_BINDS): db.engine alone is the default one
        for engine in db.engines.values():
            harden(engine, connect_timeout=float(env.get("CONNECT_TIMEOUT", "5")))
        try:  # the start-up check real apps make (under --preload: in the master)
            db.session.execute(text("SELECT 1"))
        except exc.OperationalError as error:
            app.logger.warning("database not reachable at start-up: %s", error.orig)
        finally:
            db.session.remove()

    @app.teardown_appcontext
    def close_session(_error=None):
        """Runs before Flask-SQLAlchemy's own teardown (registered earlier): a rollback that
        fails after the answer is made is logged and its connection dropped, not a 500."""
        try:
            db.session.close()
        except exc.DBAPIError as error:
            app.logger.warning("closing the session failed, connection discarded: %s",
                               type(error.orig).__name__)
            db.session.invalidate()

    def seconds() -> float:
        raw = request.args.getlist("seconds") or ["1"]
        try:
            value = float(raw[0]) if len(raw) == 1 else math.nan
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and 0 <= value <= sleep_max):
            raise BadRequest(f"seconds must be one number from 0 to {sleep_max:g}")
        return value

    def todos_response():
        todos = db.session.scalars(select(Todo).order_by(Todo.id)).all()
        return jsonify(todos=[todo.as_dict() for todo in todos])

    @app.get("/sleep/postgres/")
    def sleep_postgres():
        db.session.execute(select(func.pg_sleep(seconds())))
        return todos_response()

    @app.get("/sleep/python/")
    def sleep_python():
        time.sleep(seconds())
        return todos_response()

    @app.get("/todos/")
    def todos():
        return todos_response()

    @app.get("/health")
    def health():
        import psycopg2.extensions
        from gevent import monkey

        return jsonify(status="ok", pid=os.getpid(), app=__name__,
                       gevent_patched=monkey.is_module_patched("socket"),
                       psycopg2_green=psycopg2.extensions.get_wait_callback() is not None)

    @app.errorhandler(exc.TimeoutError)  # no pooled connection within pool_timeout
    @app.errorhandler(exc.OperationalError)  # down, refused, cancelled or not answering
    @app.errorhandler(exc.InterfaceError)
    def unavailable(_error):
        return jsonify(error="database unavailable"), 503, {"Retry-After": "1"}

    @app.errorhandler(HTTPException)
    def http_error(error):
        headers = [(k, v) for k, v in error.get_headers() if k.lower() != "content-type"]
        return jsonify(error=error.description, status=error.code), error.code, headers

    return app


app = create_app()
