"""--compare's test app: a route that waits (time.sleep, which gevent patches) and one that
computes in pure Python (it holds the GIL).

    python audit.py compare_app:app --chdir tests --compare --route /sleep/ --rates 2,8,32
"""

import os
import time

from flask import Flask, jsonify

app = Flask(__name__)
ROUNDS = int(os.environ.get("CPU_ROUNDS", "150000"))


@app.get("/sleep/")
def sleep():
    time.sleep(float(os.environ.get("SLEEP_SECONDS", "0.3")))
    return jsonify(slept=True)


@app.get("/cpu/")
def cpu():
    total = 0
    for i in range(ROUNDS):
        total += i * i % 7
    return jsonify(total=total)
