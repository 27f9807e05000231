"""The audit's GIL app: CPU of each kind in the request, and CPU handed to gevent's threadpool.

    python audit.py audit_gil_app:app --chdir tests --requests 5

/python/ computes in pure Python; /held/ sorts a list in C, which keeps the GIL; /released/
hashes with pbkdf2_hmac, which releases it (the only one a thread can take off the loop);
/pool/ hands the sort to gevent's threadpool, as if the threadpool's fix had been applied to
/held/: its thread keeps the GIL, and the loop waits for it.
"""

import hashlib
import random

import gevent
from flask import Flask, jsonify

app = Flask(__name__)
DATA = [random.random() for _ in range(400_000)]  # sorted() holds the GIL 60 ms or more


def digests(n: int = 150_000) -> int:
    """Pure Python around small C calls (sha256 of a few bytes keeps the GIL)."""
    return sum(hashlib.sha256(str(i).encode()).digest()[0] for i in range(n))


@app.get("/python/")
def python():
    return jsonify(total=digests())


@app.get("/held/")
def held():
    return jsonify(n=len(sorted(DATA)))


@app.get("/released/")
def released():
    return jsonify(digest=hashlib.pbkdf2_hmac("sha256", b"pw", b"salt", 300_000).hex()[:8])


@app.get("/pool/")
def pool():
    return jsonify(n=len(gevent.get_hub().threadpool.apply(sorted, (DATA,))))
