#!/usr/bin/env python3
"""Fire N requests at once and show whether, and where, a server blocks.

    python load.py 100                                     # both /sleep/ routes of this kit
    python load.py 30 --endpoint postgres --seconds 1 --json out.json
    python load.py 200 --url http://127.0.0.1:5000/report  # any endpoint of any server
    python load.py --endpoint todos --duration 10 --concurrency 50   # requests per second
    python load.py --rate 50 --duration 10 --mix "95:/todos/,5:/sleep/postgres/?seconds=0.2"

All N connections are opened first, then every request is written at once, so their dispatch
is as simultaneous as one process allows (the spread is reported as the dispatch skew). The
report groups completions into waves: one wave means the requests overlapped; waves of one
mean the server answers one at a time; waves of W mean a limit of W somewhere (workers,
threads, pool connections); answers smeared in no tight wave are a limit too, whose size the
overlap gives (N x S / the last answer). With --rate it sends a stream instead (open loop):
requests on a schedule, whether or not the server keeps up, each timed from when it was due,
p50 to p99.9 per entry of the mix. Standard library only: copy it anywhere.

Results go to stdout, progress to stderr. Exit status: 0 when every request got a 2xx, 1 when
some did not, 2 on bad usage or an unreachable server, 130 when interrupted (Ctrl-C or
SIGTERM; what was measured so far is still reported).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import selectors
import signal
import ssl
import sys
import time
from dataclasses import dataclass
from urllib.parse import parse_qs, urlencode, urlsplit

VERSION = "1"
ROUTES = {"python": "/sleep/python/", "postgres": "/sleep/postgres/", "todos": "/todos/"}
GROUPS = {"sleep": ["python", "postgres"], "all": ["python", "postgres", "todos"]}
MAX_REQUESTS = 10_000  # one process, one core: past this the client itself is the bottleneck
MAX_BODY = 8 * 1024 * 1024  # a larger answer is counted as a `too_large` error
MAX_HEAD = 64 * 1024
CONNECT_WAIT = 10.0  # s: a burst's connections not accepted by then are `not_accepted`


class Usage(Exception):
    """Bad input from the user: one line, exit 2."""


class Unreachable(Exception):
    """Not one connection could be made: one line, exit 2."""


class BadResponse(Exception):
    """The peer answered something that is not HTTP/1.x."""


class TooLarge(Exception):
    """The answer's body exceeds MAX_BODY."""


# ---------------------------------------------------------------------------- targets


@dataclass
class Target:
    endpoint: str  # `python`, `postgres`, `todos`, or the path of a URL sent as given
    host: str
    port: int
    tls: bool
    path: str  # path and query, as written on the request line
    seconds: float | None  # the sleep each request asks for (None: unknown)
    kit: bool  # one of this kit's routes: a 200 must carry JSON with "todos"

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.port}{self.path}"

    def request(self, keep_alive: bool) -> bytes:
        connection = "keep-alive" if keep_alive else "close"
        return (f"GET {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"User-Agent: load.py/{VERSION}\r\nAccept: application/json\r\n"
                f"Connection: {connection}\r\n\r\n").encode("latin-1")


def targets(url: str, endpoint: str, seconds: float | None) -> list[Target]:
    """A base URL gets this kit's routes; a URL with a path is one target, sent as given."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Usage(f"--url {url!r}: give an http:// or https:// URL with a host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise Usage(f"--url {url!r}: the port is not a number from 0 to 65535") from None
    host, tls = parts.hostname, parts.scheme == "https"
    if parts.path not in ("", "/"):
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        return [Target(parts.path, host, port, tls, path, seconds, kit=False)]
    names = GROUPS.get(endpoint, [endpoint])
    result = []
    for name in names:
        sleep = (seconds if seconds is not None else 1.0) if name != "todos" else None
        query = f"?{urlencode({'seconds': f'{sleep:g}'})}" if sleep is not None else ""
        result.append(Target(name, host, port, tls, ROUTES[name] + query, sleep, kit=True))
    return result


# ---------------------------------------------------------------------------- HTTP/1.1


async def connect(target: Target, timeout: float):
    context = ssl.create_default_context() if target.tls else None
    return await asyncio.wait_for(
        asyncio.open_connection(target.host, target.port, ssl=context, limit=MAX_HEAD),
        timeout)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool, str]:
    """(status, body, keep-alive?, content type) of one HTTP/1.x response. Interim answers
    (100 Continue, 103 Early Hints) are read past; 101 is final (the protocol changes)."""
    while True:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        version, _, rest = head[0].partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise BadResponse(head[0][:80])
        status = int(code)
        if not (100 <= status < 200) or status == 101:
            break
    headers = {}
    for line in head[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
    if status in (204, 304) or 100 <= status < 200:
        body = b""
    elif "chunked" in headers.get("transfer-encoding", "").lower():
        body = await read_chunked(reader)
    elif "content-length" in headers:
        length = int(headers["content-length"])
        if length > MAX_BODY:
            raise TooLarge(length)
        body = await reader.readexactly(length)
    else:
        body, keep = await read_to_eof(reader), False
    return status, body, keep, headers.get("content-type", "")


async def read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip() or b"0", 16)
        if size == 0:  # then optional trailers, then an empty line
            while (await reader.readline()).strip():
                pass
            return bytes(body)
        if len(body) + size > MAX_BODY:
            raise TooLarge(len(body) + size)
        body += await reader.readexactly(size)
        await reader.readexactly(2)


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while chunk := await reader.read(65536):
        body += chunk
        if len(body) > MAX_BODY:
            raise TooLarge(len(body))
    return bytes(body)


def error_kind(exc: BaseException) -> str:
    """The report's name for what went wrong with one request."""
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
        return "reset"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "closed"  # the server hung up before a whole answer
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(exc, TooLarge):
        return "too_large"
    if isinstance(exc, (BadResponse, asyncio.LimitOverrunError, ValueError)):
        return "bad_response"
    if isinstance(exc, OSError) and exc.errno:
        return f"os_error_{exc.errno}"
    return type(exc).__name__.lower()


def body_error(target: Target, status: int, body: bytes, content_type: str) -> str | None:
    """For this kit's routes, a 200 must be JSON with a todos list."""
    if not target.kit or status != 200:
        return None
    try:
        if "todos" not in json.loads(body):
            return "not_todos"
    except ValueError:
        return "not_json"
    return None


@dataclass
class Outcome:
    sent: float  # seconds after the start signal
    done: float
    status: int | None = None
    error: str | None = None


# ---------------------------------------------------------------------------- measuring


class Progress:
    """done/total and elapsed on stderr, once requests have been out for over a second."""

    def __init__(self, label: str, total: int):
        self.label, self.total, self.done = label, total, 0
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()
        self.shown = False

    async def run(self) -> None:
        every = 0.5 if self.tty else 5.0
        await asyncio.sleep(1.5)
        while True:
            elapsed = time.perf_counter() - self.start
            of = f"/{self.total}" if self.total else ""
            line = f"  {self.label}: {self.done}{of} done, {elapsed:.1f} s"
            print(f"\r{line}" if self.tty else line, end="" if self.tty else "\n",
                  file=sys.stderr, flush=True)
            self.shown = True
            await asyncio.sleep(every)

    def clear(self) -> None:
        if self.shown and self.tty:
            print("\r\033[K", end="", file=sys.stderr, flush=True)


async def until_stopped(stop: asyncio.Event, tasks: list[asyncio.Task]) -> bool:
    """Wait for every task, or for Ctrl-C/SIGTERM; True when interrupted."""
    if not tasks:
        return stop.is_set()
    stopper = asyncio.ensure_future(stop.wait())
    pending = set(tasks)
    while pending and not stop.is_set():
        _, pending = await asyncio.wait(pending | {stopper},
                                        return_when=asyncio.FIRST_COMPLETED)
        pending.discard(stopper)
    stopper.cancel()
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return stop.is_set()


async def burst(target: Target, n: int, timeout: float, lines: bool,
                stop: asyncio.Event) -> tuple[list[Outcome], float, float, bool]:
    """Open n connections, then write n requests at once; (outcomes, total, skew, stopped,
    seconds the connections took). A connection the server does not accept within
    CONNECT_WAIT (its listen backlog is full: the kernel drops the SYN, the client retries
    after 1, 3, 7 s...) is `not_accepted`, not a server timeout."""
    started = time.perf_counter()
    connecting = [asyncio.ensure_future(connect(target, min(timeout, CONNECT_WAIT)))
                  for _ in range(n)]
    if await until_stopped(stop, connecting):
        for task in connecting:
            if not task.cancelled() and task.exception() is None:
                task.result()[1].close()
        return [], 0.0, 0.0, True, time.perf_counter() - started
    connect_s = time.perf_counter() - started
    conns = [task.exception() or task.result() for task in connecting]
    failed = [c for c in conns if isinstance(c, BaseException)]
    if len(failed) == n:
        raise Unreachable(f"cannot connect to {target.host}:{target.port}: "
                          f"{describe(failed[0])} ({hint(target)})")
    outcomes: list[Outcome] = [
        Outcome(0.0, 0.0, error="not_accepted" if error_kind(c) == "timeout" else error_kind(c))
        for c in failed]
    request = target.request(keep_alive=False)
    progress = Progress(target.endpoint, n)

    async def answer(reader, writer, sent: float) -> None:
        try:
            status, body, _, ctype = await asyncio.wait_for(read_response(reader),
                                                            timeout - sent)
            done = time.perf_counter() - t0
            outcome = Outcome(sent, done, status, body_error(target, status, body, ctype))
        except Exception as exc:  # counted, never raised: one bad answer is a data point
            outcome = Outcome(sent, time.perf_counter() - t0, error=error_kind(exc))
        finally:
            writer.close()
        outcomes.append(outcome)
        progress.done += 1
        if lines:
            what = outcome.status if outcome.status is not None else outcome.error
            extra = f" ({outcome.error})" if outcome.status is not None and outcome.error else ""
            print(f"  @ {outcome.done:6.2f} s  {what}{extra}  {target.endpoint}", flush=True)

    # The start signal: every request is written in one pass, nothing awaited in between.
    t0 = time.perf_counter()
    sent_at, tasks = [], []
    for reader, writer in (c for c in conns if not isinstance(c, BaseException)):
        writer.write(request)
        sent_at.append(time.perf_counter() - t0)
        tasks.append(asyncio.ensure_future(answer(reader, writer, sent_at[-1])))
    skew = sent_at[-1] - sent_at[0]
    ticker = asyncio.ensure_future(progress.run())
    stopped = await until_stopped(stop, tasks)
    total = time.perf_counter() - t0
    ticker.cancel()
    progress.clear()
    return outcomes, total, skew, stopped, connect_s


async def throughput(target: Target, duration: float, concurrency: int, timeout: float,
                     stop: asyncio.Event) -> tuple[list[Outcome], float, bool]:
    """concurrency keep-alive connections, each asking again as soon as it is answered."""
    request = target.request(keep_alive=True)
    outcomes: list[Outcome] = []
    progress = Progress(f"{target.endpoint} for {duration:g} s", 0)
    t0 = time.perf_counter()
    end = t0 + duration

    async def client() -> None:
        conn = None
        while time.perf_counter() < end:
            sent = time.perf_counter()
            try:
                if conn is None:
                    conn = await connect(target, timeout)
                conn[1].write(request)
                status, body, keep, ctype = await asyncio.wait_for(read_response(conn[0]),
                                                                   timeout)
                outcome = Outcome(sent - t0, time.perf_counter() - t0, status,
                                  body_error(target, status, body, ctype))
                if not keep:
                    conn[1].close()
                    conn = None
            except Exception as exc:
                outcome = Outcome(sent - t0, time.perf_counter() - t0, error=error_kind(exc))
                if conn is not None:
                    conn[1].close()
                conn = None
                await asyncio.sleep(0.01)  # do not spin on a refusing server
            outcomes.append(outcome)
            progress.done += 1
        if conn is not None:
            conn[1].close()

    ticker = asyncio.ensure_future(progress.run())
    stopped = await until_stopped(stop, [asyncio.ensure_future(client())
                                         for _ in range(concurrency)])
    total = time.perf_counter() - t0
    ticker.cancel()
    progress.clear()
    refused_everywhere(outcomes, target)
    return outcomes, total, stopped


def refused_everywhere(outcomes: list[Outcome], target: Target) -> None:
    """Every request refused: the server is not there, which is one line and exit 2."""
    if outcomes and all(o.error == "refused" for o in outcomes):
        raise Unreachable(f"cannot connect to {target.host}:{target.port}: connection "
                          f"refused ({hint(target)})")


def hint(target: Target) -> str:
    if target.kit:
        return "is the server running? ./run_all.sh --serve green serves this kit's app"
    return "is the server running?"


def describe(exc: BaseException) -> str:
    kind = error_kind(exc)
    if kind == "refused":
        return "connection refused"
    if kind == "timeout":
        return "no answer to connect within --timeout"
    return str(exc) or kind


# ---------------------------------------------------------------------------- open loop


MAX_OPEN = 500  # connections at most in open-loop mode (its select() loop handles < 1024)
MAX_PLANNED = 1_000_000  # requests one open-loop run may plan (rate x duration)
BEHIND = 0.001  # s: a client lag p99 above this means load.py did not keep the schedule
SPIN = 0.0005  # s: the dispatcher sleeps until this long before a send, then spins
RACE = 0.05  # s: a reused connection closed this soon after the request went out was racing
RACE_IDLE = 0.9  # s: ... and only if it had idled this long: a keep-alive timeout (gunicorn's
# shortest is 1 s; its default 2, uvicorn's 5), less a margin for the two ends' timers
MIN_LATE = 5  # sends over BEHIND late: fewer, and "fell behind" would be a hiccup or two


def schedule(rate: float, duration: float, arrivals: str, rng: random.Random) -> list[float]:
    """Intended send times, seconds from the start: every 1/rate (constant), or with
    exponential gaps of mean 1/rate (poisson: independent users), up to duration."""
    if arrivals == "constant":
        return [i / rate for i in range(math.ceil(rate * duration - 1e-9))]
    times, t = [], rng.expovariate(rate)
    while t < duration:
        times.append(t)
        t += rng.expovariate(rate)
    return times


def assign(weights: list[float], n: int, rng: random.Random) -> list[int]:
    """Which mix entry each of n requests is: drawn by weight (seeded, so a rerun repeats)."""
    if len(weights) == 1:
        return [0] * n
    return rng.choices(range(len(weights)), weights=weights, k=n)


def parse_mix(spec: str, url: str, seconds: float | None) -> list[tuple[float, Target]]:
    """--mix "95:/todos/,5:/sleep/postgres/?seconds=0.2": WEIGHT:PATH (sent as given to
    --url's server) or WEIGHT:NAME (this kit's python, postgres or todos, with --seconds)."""
    base = urlsplit(url)
    root = f"{base.scheme}://{base.netloc}"
    mix = []
    for entry in spec.split(","):
        weight, sep, what = entry.strip().partition(":")
        try:
            share = float(weight)
        except ValueError:
            share = -1.0
        if not sep or not what or not (math.isfinite(share) and share > 0):
            raise Usage(f"--mix {entry.strip()!r}: give WEIGHT:PATH or WEIGHT:NAME, e.g. "
                        f"95:/todos/,5:/sleep/postgres/?seconds=0.2")
        if what.startswith("/"):
            target = targets(root + what, "todos", None)[0]
            route = urlsplit(what)
            target.kit = route.path in ROUTES.values()
            given = parse_qs(route.query).get("seconds", [""])[0]
            if target.kit and given:
                try:
                    target.seconds = float(given)
                except ValueError:
                    raise Usage(f"--mix {entry.strip()!r}: seconds={given!r} is not a "
                                f"number") from None
            target.endpoint = what
        elif what in ROUTES:
            target = targets(root, what, seconds)[0]
        else:
            raise Usage(f"--mix {entry.strip()!r}: {what!r} is neither a path (/...) nor one "
                        f"of {', '.join(ROUTES)}")
        mix.append((share, target))
    return mix


@dataclass
class Sent(Outcome):
    """An open-loop request: sent is its intended time; lag how late it started, the client's
    own delay (a busy loop, a late timer)."""
    lag: float = 0.0
    waited: bool = False  # every connection was busy: it waited for one


async def open_loop(mix: list[tuple[float, Target]], rate: float, duration: float,
                    arrivals: str, connections: int, timeout: float, seed: int,
                    stop: asyncio.Event) -> tuple[list[list[Sent]], dict, bool]:
    """Send on a schedule, whatever the server does; latency counts from the intended send
    time, so time spent queued (in the server, or for a connection) is never hidden.
    Keep-alive connections, at most `connections` open: a free slot is a token in `slots`,
    which holds an idle connection or None (open a new one). A connection is (reader, writer,
    its handshake's seconds, when it last went idle)."""
    rng = random.Random(seed)
    plan = schedule(rate, duration, arrivals, rng)
    picks = assign([w for w, _ in mix], len(plan), rng)
    outcomes: list[list[Sent]] = [[] for _ in mix]
    slots: asyncio.LifoQueue = asyncio.LifoQueue()  # the last idle connection first
    for _ in range(connections):
        slots.put_nowait(None)
    opened = [0, 0]  # open now, most open at once
    retried = [0]  # requests sent again after the keep-alive race
    progress = Progress(f"{rate:g}/s for {duration:g} s", len(plan))

    async def one(target: Target, due: float, index: int) -> None:
        outcome = Sent(due - t0, 0.0, lag=time.perf_counter() - due, waited=slots.empty())
        conn = await slots.get()
        try:
            for again in (True, False):
                if conn is not None and (conn[0].at_eof() or conn[1].is_closing()):
                    conn = close(conn, opened)  # the server closed it while idle: not reused
                reused = conn is not None
                if conn is None:
                    began = time.perf_counter()
                    conn = (*await connect(target, timeout), time.perf_counter() - began, None)
                    opened[0] += 1
                    opened[1] = max(opened)
                try:
                    conn[1].write(target.request(keep_alive=True))
                    written = time.perf_counter()
                    idle = written - conn[3] if reused else 0.0
                    left = timeout - (written - due)
                    status, body, keep, ctype = await asyncio.wait_for(
                        read_response(conn[0]), left)
                    break
                except (ConnectionResetError, BrokenPipeError,
                        asyncio.IncompleteReadError) as exc:
                    # the keep-alive race: the server's keep-alive timeout closed this idle
                    # connection just as it was reused (its close crossed the request), so
                    # nothing came back, and at once: within RACE, or two of the connection's
                    # handshakes on a slow link; and the connection had idled RACE_IDLE, as
                    # long as a keep-alive timeout. Once more on a new one, as HTTP clients do
                    # for a GET (idempotent); the time lost stays in its latency. A close after
                    # a shorter idle, a later one, or one after part of an answer, is a
                    # request the server took and lost: an error.
                    quick = time.perf_counter() - written <= max(RACE, 2 * conn[2])
                    if not (reused and again and idle >= RACE_IDLE and quick
                            and not getattr(exc, "partial", b"")):
                        raise
                    conn = close(conn, opened)
                    retried[0] += 1
            outcome.status, outcome.error = status, body_error(target, status, body, ctype)
            if not keep:
                conn = close(conn, opened)
        except Exception as exc:  # counted, never raised
            outcome.error = error_kind(exc)
            conn = close(conn, opened)
        finally:
            outcome.done = time.perf_counter() - t0
            slots.put_nowait(None if conn is None else (*conn[:3], time.perf_counter()))
        outcomes[index].append(outcome)
        progress.done += 1

    tasks: list[asyncio.Task] = []
    t0 = time.perf_counter() + 0.05  # the first send, after the plan is made
    ticker = asyncio.ensure_future(progress.run())
    for offset, index in zip(plan, picks):
        due = t0 + offset
        while (wait := due - time.perf_counter() - SPIN) > 0 and not stop.is_set():
            await asyncio.sleep(min(wait, 0.25))
        while time.perf_counter() < due:  # a timer alone wakes 0.3-1 ms late on a VM: poll,
            await asyncio.sleep(0)  # each pass a turn of the loop, so answers are read meanwhile
        if stop.is_set():
            break
        tasks.append(asyncio.ensure_future(one(mix[index][1], due, index)))
        await asyncio.sleep(0)  # let it start (and answers be read) before the next is due
    sending = time.perf_counter() - t0
    stopped = await until_stopped(stop, tasks)
    total = time.perf_counter() - t0
    ticker.cancel()
    progress.clear()
    while not slots.empty():
        close(slots.get_nowait(), opened)
    done = [o for per in outcomes for o in per]
    refused_everywhere(done, mix[0][1])
    run = {"rate": rate, "duration_s": duration, "arrivals": arrivals, "seed": seed,
           "planned": len(plan), "sent": len(tasks),
           "achieved_rate": round(len(tasks) / max(sending + 1 / rate, 1e-9), 2),
           "total_s": round(total, 4), "connections": connections,
           "connections_used": opened[1], "waited": sum(o.waited for o in done),
           "retried": retried[0]}
    run.update(lateness([o.lag for o in done]))
    return outcomes, run, stopped


def lateness(lags: list[float]) -> dict:
    """How late the sends went: lag p50, p99 and max; how many were over BEHIND late; and
    whether load.py fell behind its schedule: a p99 over BEHIND, from at least MIN_LATE sends
    (in a run of 20, the p99 is the slowest send: one hiccup)."""
    lag = {p: None if not lags else round(percentile(lags, q), 6)
           for p, q in (("p50", 50), ("p99", 99), ("max", 100))}
    late = sum(value > BEHIND for value in lags)
    return {"lag_s": lag, "late": late,
            "behind": (lag["p99"] or 0.0) > BEHIND and late >= MIN_LATE}


def close(conn, opened: list[int]) -> None:
    """Close a connection (if any) and count it gone; None, the free slot it leaves."""
    if conn is not None:
        conn[1].close()
        opened[0] -= 1
    return None


# ---------------------------------------------------------------------------- analysis


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile of values (None when there are none)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = math.ceil(round(p / 100 * len(ordered), 9))  # round: 99.9 % of 1000 is 999, not 1000
    return ordered[max(0, rank - 1)]


NOISE = 0.002  # s: gaps shorter than this are scheduling noise on a busy machine
FAST = 0.02  # s: a request this quick may be all CPU, which no server overlaps
SHORT = 0.1  # s: under this a wave, a pause of a busy machine or the server's CPU can decide it


def find_waves(finishes: list[float], latencies: list[float]) -> list[dict]:
    """Group finish times where a gap exceeds half the fastest request's latency (the
    service time: a server that answers one at a time spaces its answers by about that)."""
    if not finishes:
        return []
    gap = max(NOISE, 0.5 * min(latencies))
    waves, start = [], 0
    ordered = sorted(finishes)
    for i in range(1, len(ordered) + 1):
        if i == len(ordered) or ordered[i] - ordered[i - 1] > gap:
            waves.append({"size": i - start, "at_s": round(ordered[start], 4),
                          "end_s": round(ordered[i - 1], 4)})
            start = i
    return waves


def overlap(ok: list[Outcome], seconds: float | None) -> float:
    """Requests in flight together, on average. With the wait S known: N x S / the last
    answer, the waits' overlap, at most 1 for a server that answers one at a time (it spends
    at least N x S), however fast the requests. Else N x the fastest latency / the last."""
    if not ok:
        return 0.0
    last = max(o.done for o in ok)
    each = seconds if seconds else min(o.done - o.sent for o in ok)
    return len(ok) * each / last if last > 0 else float(len(ok))


def tight(wave: dict, wait: float) -> bool:
    """Did a wave's answers come together? Within one request's wait (the known S, else the
    fastest latency) of each other, or as fast as one core writes answers (NOISE apart). A
    limit makes a wave wider: when a request can start only after another ends, the last
    answer comes at least a whole wait after the first."""
    return wave["end_s"] - wave["at_s"] <= max(wait, wave["size"] * NOISE)


def limit_like(waves: list[dict], each: float, known: float | None) -> bool:
    """Waves as a limit makes them. Most of one size (within 1; a straggler or the remainder
    may differ) and none larger: a wave of 8 where most are 2 is waves merged by a pause. A
    request apart (EACH: the wait, or the fastest request when longer), as a wave's requests
    start when the last wave's end: the median gap between waves within 2 x EACH and NOISE
    (one pause among paced waves is a pause inside a limit), and, with the wait KNOWN, at
    least that wait (a wave cannot end sooner); with it unknown, at least 0.6 x the fastest
    (a cold first wave may take longer than the rest), and three or more waves: two, W and
    the rest, are what a pause makes of one."""
    sizes = [w["size"] for w in waves]
    common = max(set(sizes), key=lambda k: (sum(abs(size - k) <= 1 for size in sizes), k))
    even = (2 * sum(abs(size - common) <= 1 for size in sizes) >= len(sizes)
            and max(sizes) <= common + 1)
    gaps = sorted(b["at_s"] - a["at_s"] for a, b in zip(waves, waves[1:]))
    gap = gaps[(len(gaps) - 1) // 2] if gaps else None
    least = known - NOISE if known else 0.6 * each
    return even and (gap is None or least <= gap <= 2 * each + NOISE) and (
        bool(known) or len(waves) >= 3)


def singles(waves: list[dict]) -> bool:
    """A staircase: at least half the waves are single answers (two answers that land within
    the gap of each other on a busy machine do not make a wave of 2)."""
    sizes = sorted(w["size"] for w in waves)
    return len(sizes) > 1 and sizes[len(sizes) // 2] == 1


def one_at_a_time(ok: list[Outcome], seconds: float | None, together: float,
                  waves: list[dict]) -> bool:
    """Did the server answer one at a time, as far as the answers can tell? With the wait S
    known: the waits overlapped less than 1.5 times (a staircase: at most 1). Without it, only
    a tight wave shows overlap: answers spread over no longer than the fastest request took.
    Answers spread evenly instead are a staircase, or a server busy with CPU: both one at a
    time, and the verdict says it cannot tell which."""
    if seconds:
        return together < 1.5
    if len(waves) > 1 and not singles(waves):
        return False  # waves: a limit, not one at a time
    fastest = min(o.done - o.sent for o in ok)
    return max(o.done for o in ok) - min(o.done for o in ok) > fastest


def is_ok(o: Outcome) -> bool:
    """A 2xx answer with an acceptable body: what waves and latency are made of."""
    return o.status is not None and 200 <= o.status < 300 and not o.error


def analyse(target: Target, n: int, outcomes: list[Outcome], total: float, skew: float,
            expect: int | None, rate: float | None, connect_s: float = 0.0) -> dict:
    """The result object for one endpoint (the schema is in docs/load.md). Waves, latency and
    the pattern come from the 2xx answers; the others are counted beside them."""
    ok = [o for o in outcomes if is_ok(o)]
    others = [o for o in outcomes if not is_ok(o)]
    latencies = [o.done - o.sent for o in ok]
    waves = find_waves([o.done for o in ok], latencies)
    sizes = [w["size"] for w in waves]
    together = overlap(ok, target.seconds)
    fastest = min(latencies) if latencies else None
    ordered = sorted(o.done for o in ok)
    gaps = sorted(b - a for a, b in zip(ordered, ordered[1:]))
    spacing = gaps[len(gaps) // 2] if gaps else None  # median time between answers
    if not ok:
        pattern = "failed"
    elif len(ok) == 1:
        pattern = "single"
    elif target.seconds and together >= 1.5 and (
            singles(waves) or not all(tight(w, target.seconds) for w in waves)):
        pattern = "overlap"  # more than one at a time could give, yet not in tight waves
    elif singles(waves) or one_at_a_time(ok, target.seconds, together, waves):
        pattern = "serial"  # answers a whole request apart: never "concurrent"
    elif len(waves) == 1:
        pattern = "concurrent"
    else:
        pattern = "waves"
    observed = {"serial": 1, "failed": None, "overlap": round(together)}.get(
        pattern, max(sizes) if sizes else None)
    wait = target.seconds if target.seconds is not None else fastest
    # too fast to tell: each request waits (S, else its latency) under FAST, so the server's
    # own CPU per request can space the answers like a staircase; or, with no known wait, the
    # answers came far closer together than a request takes, which a staircase does only
    # behind a slow link or a slow first request, and overlapped requests do too; or, at
    # under SHORT a request, waves unlike a limit's, which a pause of a busy machine (tens of
    # ms) clumps one wave into
    too_fast = fastest is not None and (
        (pattern == "overlap" and wait < FAST) or (pattern == "serial" and (
            wait < FAST or (not target.seconds and (spacing or 0.0) < fastest / 2))) or (
            pattern == "waves" and wait < SHORT and not limit_like(
                waves, max(wait, fastest), target.seconds)))
    # no side picked: with no known wait, a width is not inferred from answers that cannot
    # tell one at a time from overlapped
    width = expect or (None if too_fast and not target.seconds else observed)
    per_wave = target.seconds if target.seconds is not None else (
        waves[0]["at_s"] if waves else None)
    expected = None
    if width and per_wave is not None and pattern != "failed":  # for the 2xx answers
        expected = math.ceil(len(ok) / width) * per_wave + (len(ok) / rate if rate else 0.0)
    # lock, or all CPU? limit, or all CPU? (with S known, one at a time is a measurement)
    undecided = bool(too_fast and width and width > 1 and (
        pattern in ("overlap", "waves") or not target.seconds))
    measured = max((o.done for o in ok), default=0.0) if others else total
    matches = None
    if expected is not None and not undecided:
        if not shape_matches(pattern, width, len(ok)):
            matches = False
        elif within(measured, expected):
            matches = True
        elif per_wave >= SHORT:
            matches = False
        # else None: under 0.1 s a wave, the server's CPU per request (left out of the
        # expectation unless --server-rate gives it) can decide the total, so neither
    statuses: dict[str, int] = {}
    errors: dict[str, int] = {}
    for o in outcomes:
        if o.status is not None:
            statuses[str(o.status)] = statuses.get(str(o.status), 0) + 1
        if o.error:
            errors[o.error] = errors.get(o.error, 0) + 1
    other_latency = [o.done - o.sent for o in others]
    return {
        "endpoint": target.endpoint,
        "url": target.url,
        "mode": "burst",
        "requests": n,
        "seconds": target.seconds,
        "total_s": round(total, 4),
        "dispatch_skew_s": round(skew, 6),
        "connect_s": round(connect_s, 4),
        "latency_s": {p: r(percentile(latencies, q))
                      for p, q in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))},
        "statuses": dict(sorted(statuses.items())),
        "errors": dict(sorted(errors.items())),
        "others": {"count": len(others),
                   "latency_s": {"p50": r(percentile(other_latency, 50)),
                                 "max": r(percentile(other_latency, 100))}},
        "waves": waves,
        "finishes_s": [round(t, 4) for t in sorted(o.done for o in ok)],
        "pattern": pattern,
        "concurrency": observed,
        "overlap": round(together, 2),
        "too_fast": too_fast,
        "expected_concurrency": width,
        "expected_s": r(expected),
        "matches_expectation": matches,
        "verdict": verdict(pattern, n, len(ok), sizes, expected, measured, matches,
                           inferred=expect is None, others=others, fastest=fastest,
                           too_fast=too_fast, together=together, spacing=spacing,
                           wait=wait, undecided=undecided)
        + backlog_note(connect_s, errors),
    }


def backlog_note(connect_s: float, errors: dict[str, int]) -> str:
    """A connect phase far longer than a round trip: the listen backlog overflowed."""
    if connect_s < 1.0 and not errors.get("not_accepted"):
        return ""
    never = errors.get("not_accepted", 0)
    return (f"; connecting took {connect_s:.1f} s, far longer than a round trip: the server's "
            f"listen backlog was full (the kernel dropped SYNs, the client retried)"
            + (f" and {never} connections were never accepted" if never else "")
            + "; not server timeouts: raise its backlog (gunicorn --backlog, "
              "net.core.somaxconn) or send fewer at once")


def shape_matches(pattern: str, width: int, ok: int) -> bool:
    """Does the pattern agree with an expected width? One at a time for W = 1, one wave when
    W covers every answer, waves (or one wave) in between; an overlap in no tight wave for any
    W > 1 (the total, N x S / the overlap, then decides)."""
    if pattern == "single":
        return True
    if width <= 1:
        return pattern == "serial"
    if pattern == "overlap":
        return True
    if width >= ok:
        return pattern == "concurrent"
    return pattern in ("waves", "concurrent")


def tolerance(fastest: float, slowest: float | None = None) -> tuple[float, float]:
    """The measured totals that match an expected one (or range): 0.8 x it - 0.05 s to
    1.25 x it + 0.25 s. Generous on purpose: a noisy machine must not turn 'concurrent' into
    'blocks'."""
    return max(0.0, fastest * 0.8 - 0.05), (slowest or fastest) * 1.25 + 0.25


def within(total: float, fastest: float, slowest: float | None = None) -> bool:
    """Does a measured total match an expected one (or range), within tolerance()?"""
    low, high = tolerance(fastest, slowest)
    return low <= total <= high


def r(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def verdict(pattern: str, n: int, answered: int, sizes: list[int], expected: float | None,
            total: float, matches: bool | None, inferred: bool, others: list = (),
            fastest: float | None = None, too_fast: bool = False,
            together: float | None = None, spacing: float | None = None,
            wait: float | None = None, undecided: bool = False) -> str:
    """What the waves say, in words a user can act on. total: the measured time the
    expectation is held against (the last 2xx answer)."""
    if pattern == "failed":
        return "no request was answered with a 2xx: see statuses and errors"
    if pattern == "single":
        text = "one request: nothing to compare"
    elif pattern == "concurrent":
        text = f"concurrent: all {answered} answered in one wave"
        if fastest < FAST and together is not None and together < answered / 2:
            text += (f" (about {together:.0f} in flight on average: at {fastest * 1000:.0f} ms "
                     f"a request the server's CPU spaces the answers, and a limit near that "
                     f"would not show; --seconds 0.05 tells)")
    elif pattern == "serial" and too_fast:
        text = (f"too fast to tell: the answers came one at a time, each about "
                f"{(spacing or 0) * 1000:.0f} ms after the last (the fastest request took "
                f"{fastest * 1000:.0f} ms); a server that lets one request through at a time (a "
                f"sync worker, a lock, a blocked event loop) answers so, and so does one that "
                f"overlaps quick requests whose answers its CPU spaces; make each request wait "
                f"longer than it computes (this kit's routes: --seconds 0.05)")
    elif pattern == "serial":
        text = (f"serial: answered one at a time, each about {(spacing or 0) * 1000:.0f} ms "
                f"after the last; something lets only one request through at a time (a sync "
                f"worker, a lock, a blocked event loop)")
    elif pattern == "overlap":
        text = (f"overlapped, but not in tight waves: about {together:.1f} requests in "
                f"flight on average (N × S / the last answer; one at a time gives at most 1), "
                f"the answers each about {(spacing or 0) * 1000:.0f} ms after the last: a "
                f"limit near {round(together)} whose slots free up one by one (workers out of "
                f"step, a pooler's server connections)")
        if too_fast:
            text += (f", or no limit at all: at {wait * 1000:.0f} ms a request the server's "
                     f"CPU alone spaces the answers; too fast to tell (--seconds 0.05 tells)")
    else:
        split = "+".join(map(str, sizes)) if len(sizes) <= 8 else f"{len(sizes)} waves"
        text = (f"waves of {max(sizes)} ({split}): a limit of {max(sizes)} somewhere "
                f"(workers, threads, pool connections)")
        if too_fast:
            text += (f", or no limit at all: at {wait * 1000:.0f} ms a request a pause of the "
                     f"machine clumps one wave so, and these are not a limit's (waves mostly "
                     f"of its size, a request apart, three or more when the wait is not known); "
                     f"too fast to tell (slower requests tell: --seconds 0.1 on this kit's "
                     f"routes)")
    if others:
        text += f"; {len(others)} of {n} not a 2xx ({kinds(others)}), left out of the waves"
    if expected is not None:
        source = "the overlap" if pattern == "overlap" else "the waves"
        basis = f" (concurrency inferred from {source})" if inferred else ""
        low, high = tolerance(expected)
        if matches:
            text += (f"; matches the expected ~{expected:.2f} s{basis}: {total:.2f} s is "
                     f"within {low:.2f}-{high:.2f} s")
        elif matches is False and within(total, expected):
            text += f"; does NOT match the expected ~{expected:.2f} s{basis}: not its shape"
        elif matches is False:
            text += (f"; does NOT match the expected ~{expected:.2f} s{basis}: {total:.2f} s is "
                     f"outside {low:.2f}-{high:.2f} s")
        elif undecided:
            text += f"; cannot be checked against the expected ~{expected:.2f} s{basis}"
        else:
            text += (f"; cannot be checked against the expected ~{expected:.2f} s{basis}: "
                     f"{total:.2f} s is outside {low:.2f}-{high:.2f} s, but under 0.1 s a "
                     f"request the server's own CPU per answer, left out of the expectation, "
                     f"can decide the total (--server-rate R adds N/R)")
    return text


def kinds(outcomes: list[Outcome]) -> str:
    """What the requests without a 2xx got: "503 × 45, reset × 2"."""
    counts: dict[str, int] = {}
    for o in outcomes:
        if is_ok(o):
            continue
        kind = str(o.status) if o.status is not None and not o.error else (o.error or "?")
        counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{k} × {v}" for k, v in sorted(counts.items()))


def analyse_throughput(target: Target, outcomes: list[Outcome], total: float,
                       duration: float, concurrency: int) -> dict:
    result = analyse(target, len(outcomes), outcomes, total, 0.0, None, None)
    ok = sum(1 for o in outcomes if o.status is not None and 200 <= o.status < 300)
    rate = ok / total if total else 0.0
    result.update(mode="throughput", duration_s=duration, concurrency=concurrency,
                  rps=round(rate, 1), dispatch_skew_s=None, waves=[], finishes_s=[],
                  pattern="throughput",
                  expected_concurrency=None, expected_s=None, matches_expectation=None,
                  verdict=f"{rate:.1f} requests/s answered with a 2xx over "
                          f"{concurrency} connections")
    return result


def analyse_open(target: Target, outcomes: list[Sent], run: dict, share: float) -> dict:
    """One mix entry's result: latency from the intended send time, per percentile."""
    result = analyse(target, len(outcomes), outcomes, run["total_s"], 0.0, None, None)
    ok = [o.done - o.sent for o in outcomes if is_ok(o)]
    latency = {p: r(percentile(ok, q)) for p, q in (("p50", 50), ("p90", 90), ("p99", 99),
                                                     ("p99_9", 99.9), ("max", 100))}
    p99 = latency["p99"]
    said = "no 2xx answer" if p99 is None else f"p99 {p99 * 1000:.1f} ms"
    failed = len(outcomes) - len(ok)
    if failed:  # a quick 503 storm has a fine p99: the share first says what it hides
        said = (f"{failed} of {len(outcomes)} requests ({failed / len(outcomes):.0%}) NOT "
                f"answered 2xx ({kinds(outcomes)}); {said}" + (" of the 2xx" if ok else ""))
    result.update(mode="open", pattern="open", dispatch_skew_s=None, waves=[], finishes_s=[],
                  concurrency=None, expected_concurrency=None, expected_s=None,
                  matches_expectation=None, latency_s=latency, share=round(share, 4),
                  rps=round(len(ok) / run["total_s"], 1) if run["total_s"] else 0.0,
                  open_loop=run,
                  verdict=f"{said} at {share * run['rate']:g}/s of {run['rate']:g}/s offered "
                          f"({run['arrivals']} arrivals), measured from each request's "
                          f"scheduled send")
    return result


def open_warnings(run: dict) -> list[str]:
    """One line each when the figures are not the server's alone."""
    lines = []
    if run["behind"]:
        lag = run["lag_s"]
        lines.append(f"load.py fell behind its schedule: {run['late']} of {run['sent']} sends "
                     f"over {BEHIND * 1000:g} ms late, p99 {lag['p99'] * 1000:.1f} ms (max "
                     f"{lag['max'] * 1000:.1f} ms), so these latencies include its own delay "
                     f"and {run['achieved_rate']:g}/s is not the server's limit; lower --rate "
                     f"or run load.py on another machine")
    if run["waited"]:
        lines.append(f"all {run['connections']} connections were busy for {run['waited']} "
                     f"requests, which waited for one (the wait is in their latency): the "
                     f"server was not keeping up, or raise --connections")
    return lines


# ---------------------------------------------------------------------------- report


def paint(text: str, colour: str) -> str:
    codes = {"green": "32", "red": "31", "yellow": "33", "dim": "2", "bold": "1"}
    return f"\033[{codes[colour]}m{text}\033[0m" if COLOUR else text


COLOUR = False


def timeline(finishes: list[float], total: float, width: int = 60, height: int = 6) -> list[str]:
    """Completions so far, over time: one step = concurrent, a staircase = serial."""
    if not finishes or total <= 0:
        return []
    span = max(total, max(finishes))
    counts = [0] * width
    for t in finishes:
        counts[min(width - 1, int(t / span * width))] += 1
    cumulative, running = [], 0
    for c in counts:
        running += c
        cumulative.append(running)
    top = cumulative[-1]
    rows = []
    eighths = " ▁▂▃▄▅▆▇█"
    for level in range(height, 0, -1):
        cells = []
        for value in cumulative:
            fill = value / top * height - (level - 1)
            cells.append(eighths[max(0, min(8, int(round(fill * 8))))])
        label = f"{top:>5}" if level == height else " " * 5
        rows.append(f"  {label} ┤{paint(''.join(cells), 'green')}")
    rows.append(f"  {'':5} └{'─' * width}")
    end = f"{span:.2f} s"
    rows.append(f"  {'':6}0 s{' ' * (width - 3 - len(end))}{end}")
    return rows


def render(result: dict, outcomes: list[Outcome]) -> list[str]:
    lat = result["latency_s"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    statuses = ", ".join(f"{k}×{v}" for k, v in result["statuses"].items()) or "none"
    errors = ", ".join(f"{k}×{v}" for k, v in result["errors"].items()) or "none"
    head = f"{result['endpoint']}  {result['url']}"
    out = [paint(head, "bold")]
    if result["mode"] == "open":
        ms = lambda v: "-" if v is None else f"{v * 1000:.1f}"  # noqa: E731
        out[0] += f"   {result['share'] * 100:g} % of the requests"
        out.append(f"  {result['requests']} requests; latency from the scheduled send, ms: "
                   + "  ".join(f"{k.replace('_', '.')} {ms(v)}" for k, v in lat.items()))
        out.append(f"  statuses {statuses}   errors {errors}")
        out.append(f"  verdict: {result['verdict']}")
        return out
    if result["mode"] == "throughput":
        out.append(f"  {result['requests']} requests in {result['total_s']:.2f} s over "
                   f"{result['concurrency']} connections = {result['rps']:.1f} requests/s")
    else:
        expect = ""
        if result["expected_s"] is not None:
            mark = {True: paint("✓", "green"), False: paint("✗", "red")}.get(
                result["matches_expectation"], paint("?", "yellow"))
            per_wave = "" if result["seconds"] is None else f" × {result['seconds']:g} s"
            answered = result["requests"] - result["others"]["count"]
            expect = (f"   expected ~{result['expected_s']:.2f} s (⌈{answered}/"
                      f"{result['expected_concurrency']}⌉ waves{per_wave}) {mark}")
        out.append(f"  {result['requests']} requests, total {result['total_s']:.2f} s{expect}")
    out.append(f"  latency p50 {fmt(lat['p50'])}  p90 {fmt(lat['p90'])}  p99 {fmt(lat['p99'])}"
               f"  max {fmt(lat['max'])} s"
               + ("" if result["dispatch_skew_s"] is None else
                  f"   dispatch skew {result['dispatch_skew_s'] * 1000:.1f} ms"))
    out.append(f"  statuses {statuses}   errors {errors}")
    if result["pattern"] == "overlap":
        out.append(f"  waves none tight (answers {result['finishes_s'][0]:.2f} to "
                   f"{result['finishes_s'][-1]:.2f} s): about {result['overlap']:g} in flight "
                   f"on average")
    elif result["waves"]:
        shown = ", ".join(f"{w['size']} @ {w['at_s']:.2f} s" for w in result["waves"][:8])
        more = f", … ({len(result['waves'])} waves)" if len(result["waves"]) > 8 else ""
        out.append(f"  waves {shown}{more}")
    out.append(f"  verdict: {result['verdict']}")
    if result["mode"] == "burst":
        out.extend(timeline([o.done for o in outcomes if o.status is not None],
                            result["total_s"]))
    return out


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("requests", nargs="?", type=int, default=5,
                        help="requests released at once, per endpoint")
    parser.add_argument("--url", default="http://127.0.0.1:8000",
                        help="base URL of this kit's app, or the full URL of any endpoint "
                             "(a URL with a path is sent as given)")
    parser.add_argument("--endpoint", default="sleep",
                        choices=["python", "postgres", "todos", "sleep", "all"],
                        help="with a base URL: which routes (sleep = python and postgres)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="sleep per request, sent as ?seconds= to this kit's routes "
                             "(default 1); with a full URL, only the expected time of one "
                             "request")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds a request may take, counted from the start signal")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--duration", type=float, default=None,
                        help="throughput mode: ask again as soon as answered, for D seconds")
    parser.add_argument("--concurrency", type=int, default=10,
                        help="throughput mode: connections kept busy")
    parser.add_argument("--rate", type=float, default=None, metavar="R",
                        help="open-loop mode: send R requests/s on a schedule for --duration "
                             "seconds, whether or not the answers keep up")
    parser.add_argument("--arrivals", choices=["constant", "poisson"], default="constant",
                        help="open-loop mode: requests 1/R apart, or at random (exponential) "
                             "gaps averaging 1/R")
    parser.add_argument("--mix", metavar="SPEC", default=None,
                        help="open-loop mode: weighted requests, e.g. "
                             "95:/todos/,5:/sleep/postgres/?seconds=0.2 (default: the "
                             "--endpoint routes, equally; sleep means todos)")
    parser.add_argument("--connections", type=int, default=100,
                        help=f"open-loop mode: keep-alive connections at most (1-{MAX_OPEN}); "
                             f"a request that finds all busy waits for one")
    parser.add_argument("--seed", type=int, default=1,
                        help="open-loop mode: seed of the random draws (poisson gaps, the "
                             "mix), so a rerun sends the same sequence")
    parser.add_argument("--expect-concurrency", type=int, default=None, metavar="W",
                        help="requests the server should overlap (default: inferred from "
                             "the waves)")
    parser.add_argument("--server-rate", type=float, default=None, metavar="R",
                        help="the server's requests/s on a fast endpoint; adds N/R to the "
                             "expected total")
    parser.add_argument("--lines", action=argparse.BooleanOptionalAction, default=None,
                        help="one line per response as it arrives (default: when N <= 50)")
    args = parser.parse_args(argv)
    n_max = min(MAX_REQUESTS, open_files() - 64)
    if args.duration is None and not 1 <= args.requests <= n_max:
        raise Usage(f"N={args.requests}: give from 1 to {n_max} requests"
                    + (" (raise `ulimit -n` for more)" if n_max < MAX_REQUESTS else ""))
    if args.seconds is not None and not (math.isfinite(args.seconds) and args.seconds >= 0):
        raise Usage(f"--seconds {args.seconds}: give a number >= 0")
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise Usage(f"--timeout {args.timeout}: give a number > 0")
    if args.duration is not None and not (math.isfinite(args.duration) and
                                          0 < args.duration <= 3600):
        raise Usage(f"--duration {args.duration}: give from 0 to 3600 seconds")
    if args.duration is not None and not 1 <= args.concurrency <= n_max:
        raise Usage(f"--concurrency {args.concurrency}: give from 1 to {n_max}")
    if args.rate is not None:
        if args.duration is None:
            raise Usage("--rate R needs --duration D: how long to send for")
        if not (math.isfinite(args.rate) and args.rate > 0):
            raise Usage(f"--rate {args.rate}: give a number > 0")
        if args.rate * args.duration > MAX_PLANNED:
            raise Usage(f"--rate {args.rate:g} x --duration {args.duration:g}: at most "
                        f"{MAX_PLANNED} requests in one run")
        if not 1 <= args.connections <= min(MAX_OPEN, n_max):
            raise Usage(f"--connections {args.connections}: give from 1 to "
                        f"{min(MAX_OPEN, n_max)}")
    elif args.mix is not None:
        raise Usage("--mix goes with --rate R --duration D (open-loop mode)")
    for name in ("expect_concurrency", "server_rate"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise Usage(f"--{name.replace('_', '-')} {value}: give a number > 0")
    return args


def open_files() -> int:
    """Raise the soft open-files limit to the hard one; return the limit in force."""
    try:
        import resource
    except ImportError:  # not on Unix: no such limit to raise
        return MAX_REQUESTS + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1_048_576
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


async def server_health(target: Target, timeout: float) -> dict | None:
    """This kit's /health (what the server runs), or None for another server."""
    if not target.kit:
        return None
    probe = Target("health", target.host, target.port, target.tls, "/health", None, False)
    try:
        reader, writer = await connect(probe, min(timeout, 5))
        writer.write(probe.request(keep_alive=False))
        status, body, _, _ = await asyncio.wait_for(read_response(reader), min(timeout, 5))
        writer.close()
        return json.loads(body) if status == 200 else None
    except (OSError, ValueError, asyncio.TimeoutError, asyncio.IncompleteReadError,
            BadResponse, TooLarge):
        return None


async def measure(args: argparse.Namespace) -> tuple[dict, int]:
    """Run every target; returns the JSON document and the exit status."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    chosen = targets(args.url, args.endpoint, args.seconds)
    if args.duration is not None and args.endpoint == "sleep" and chosen[0].kit:
        chosen = targets(args.url, "todos", None)  # throughput is for the fast route
    lines = args.lines if args.lines is not None else args.requests <= 50
    mix = None
    if args.rate is not None:
        mix = parse_mix(args.mix, args.url, args.seconds) if args.mix else [
            (1.0, target) for target in chosen]
        chosen = [target for _, target in mix]
    health = await server_health(chosen[0], args.timeout)
    results, interrupted = [], False
    overall = time.perf_counter()
    if mix is not None:
        print(f"open loop: {args.rate:g}/s for {args.duration:g} s, {args.arrivals} arrivals "
              f"-> {mix[0][1].host}:{mix[0][1].port}", file=sys.stderr)
        per_target, run, interrupted = await open_loop(
            mix, args.rate, args.duration, args.arrivals, args.connections, args.timeout,
            args.seed, stop)
        weight = sum(w for w, _ in mix)
        for (share, target), outcomes in zip(mix, per_target):
            results.append(analyse_open(target, outcomes, run, share / weight))
            print("\n".join(render(results[-1], outcomes)), flush=True)
        lag = run["lag_s"]
        ms = lambda v: "-" if v is None else f"{v * 1000:.2f}"  # noqa: E731
        print(f"open loop: {run['sent']} of {run['planned']} sent at {run['achieved_rate']:g}/s "
              f"(asked {args.rate:g}/s, {args.arrivals}); client lag p50 {ms(lag['p50'])} "
              f"p99 {ms(lag['p99'])} max {ms(lag['max'])} ms ({run['late']} sends over "
              f"{BEHIND * 1000:g} ms late); {run['connections_used']} of {run['connections']} "
              f"connections used; {run['retried']} retried (the keep-alive race)")
        for line in open_warnings(run):
            print(paint(f"warning: {line}", "yellow"))
        chosen = []
    for target in chosen:
        if args.duration is not None:
            outcomes, total, interrupted = await throughput(
                target, args.duration, args.concurrency, args.timeout, stop)
            result = analyse_throughput(target, outcomes, total, args.duration,
                                        args.concurrency)
        else:
            print(f"{target.endpoint}: {args.requests} requests at once -> {target.url}",
                  file=sys.stderr)
            outcomes, total, skew, interrupted, connect_s = await burst(
                target, args.requests, args.timeout, lines, stop)
            result = analyse(target, args.requests, outcomes, total, skew,
                             args.expect_concurrency, args.server_rate, connect_s)
        results.append(result)
        print("\n".join(render(result, outcomes)), flush=True)
        if interrupted:
            break
    took = time.perf_counter() - overall
    print(f"all endpoints: {took:.2f} s" + (" (interrupted)" if interrupted else ""))
    document = {
        "schema": f"load.py/{VERSION}",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "interrupted": interrupted,
        "total_s": round(took, 4),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "versions": {"load.py": VERSION, "python": platform.python_version(),
                     "platform": platform.platform()},
        "server": health,
        "results": results,
    }
    failed = any(sum(v for k, v in res["statuses"].items() if not k.startswith("2"))
                 or res["errors"] for res in results)
    return document, 130 if interrupted else (1 if failed else 0)


def main(argv: list[str] | None = None) -> int:
    global COLOUR
    COLOUR = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    try:
        args = parse_args(argv)
        # open loop: select(), whose timeouts are in microseconds (epoll's are whole
        # milliseconds, which would send every request up to 1 ms late)
        factory = (lambda: asyncio.SelectorEventLoop(selectors.SelectSelector())) \
            if args.rate is not None else None
        with asyncio.Runner(loop_factory=factory) as runner:
            document, status = runner.run(measure(args))
    except (Usage, Unreachable) as exc:
        print(f"load.py: {exc}", file=sys.stderr)
        return 2
    if args.json:
        try:
            with open(args.json, "w") as out:
                json.dump(document, out, indent=2)
                out.write("\n")
        except OSError as exc:
            print(f"load.py: cannot write {args.json}: {exc.strerror}", file=sys.stderr)
            return 2
    return status


if __name__ == "__main__":
    sys.exit(main())
