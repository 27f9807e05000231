"""The audit's stalling app: routes that hold the loop past gunicorn's --timeout.

    python audit.py audit_stall_app:app --chdir tests --gunicorn-args '--timeout 1'

/stall/ sleeps STALL_SECONDS (3) with the unpatched time.sleep, so its first request gets no
answer; /later/ does so from its second call on (the burst, after a good warm-up).
"""

import os

from flask import Flask, jsonify
from gevent.monkey import get_original

app = Flask(__name__)
sleep = get_original("time", "sleep")
SECONDS = float(os.environ.get("STALL_SECONDS", "3"))
calls = {"later": 0}


@app.get("/ok/")
def ok():
    return jsonify(ok=True)


@app.get("/stall/")
def stall():
    sleep(SECONDS)
    return jsonify(ok=True)


@app.get("/later/")
def later():
    calls["later"] += 1
    if calls["later"] > 1:
        sleep(SECONDS)
    return jsonify(ok=True)
