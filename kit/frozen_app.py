"""app_green with two freezes at exact points, for kit.frozen only: never deploy this module.

    gunicorn -k gevent kit.frozen_app:app      (DB_DRIVER=psycopg for psycopg 3)

GET /kit/freeze-commit/   an UPDATE, then the request's own backend is stopped (SIGSTOP), then
                          COMMIT: the commit waits on a server that answers nothing.
GET /todos/?freeze=teardown   the todos as usual; after the answer is made, the backend is
                          stopped, so the teardown's ROLLBACK waits on it.
kit.frozen thaws every backend (SIGCONT) once it has the answer. A freeze needs the right to
signal the server's processes: root, or the user that runs the throwaway server.
"""

import os
import signal

from flask import jsonify, request
from sqlalchemy import text

from app_green import app, db


def freeze_own_backend() -> None:
    os.kill(db().execute(text("SELECT pg_backend_pid()")).scalar_one(), signal.SIGSTOP)


@app.get("/kit/freeze-commit/")
def freeze_commit():
    session = db()
    session.execute(text("UPDATE todos SET priority = priority WHERE id = 1"))
    freeze_own_backend()
    session.commit()
    return jsonify(todos=[])


@app.after_request
def freeze_before_teardown(response):
    if request.args.get("freeze") == "teardown":
        freeze_own_backend()
    return response
