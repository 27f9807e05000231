"""The audit's test app: one route per cause audit.py must tell apart, and two it must not flag.

    python audit.py audit_app:app --chdir tests --gunicorn-args --preload

Reads DATABASE_URL, REMOTE_URL (an HTTP server the /remote/ route asks, some way off) and
CPU_ROUNDS. psycopg 3 is imported at the top, before anything patches: under --preload the
master imports this file before the gevent worker patches, so psycopg keeps its C wait.
psycopg2 is made cooperative with psycogreen, so only what libpq does before a wait (resolving
a host name) can hold the loop through it.
"""

import hashlib
import os
import urllib.request

import psycopg
import psycopg2
from flask import Flask, jsonify
from psycogreen.gevent import patch_psycopg

patch_psycopg()
app = Flask(__name__)
ROUNDS = int(os.environ.get("CPU_ROUNDS", "300000"))


def crunch(rounds: int) -> int:
    """Pure Python: holds the GIL and never yields."""
    total = 0
    for i in range(rounds):
        total += i * i % 7
    return total


@app.get("/health")
def health():
    return jsonify(status="ok")


@app.get("/cpu/")
def cpu():
    return jsonify(total=crunch(ROUNDS))


@app.get("/hash/")
def hash_password():
    """A C call that releases the GIL, but not the loop."""
    digest = hashlib.pbkdf2_hmac("sha256", b"password", b"salt", ROUNDS // 3)
    return jsonify(digest=digest.hex()[:16])


@app.get("/remote/")
def remote():
    """An HTTP call through urllib: gevent's patched socket yields while it waits."""
    with urllib.request.urlopen(os.environ["REMOTE_URL"], timeout=10) as answer:
        return jsonify(remote=answer.status)


@app.get("/pg3/")
def pg3():
    """psycopg 3, imported above: cooperative only if gevent patched before that import."""
    with psycopg.connect(os.environ["DATABASE_URL"]) as conn:
        return jsonify(one=conn.execute("SELECT 1").fetchone()[0])


@app.get("/connect/")
def connect():
    """A new psycopg2 connection per request (cooperative through psycogreen, but libpq
    resolves a host name in C first)."""
    conn = psycopg2.connect(os.environ["DATABASE_URL"])
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT 1")
            return jsonify(one=cursor.fetchone()[0])
    finally:
        conn.close()


@app.get("/boom/")
def boom():
    raise RuntimeError("a route that fails")
