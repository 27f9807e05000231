"""A stream instead of a burst: ./run_all.sh --rate R [--duration D] for each picked scenario.

    python -m kit.run one NAME --parts DIR --rate R --duration D     (run_all.sh calls this)

Requests arrive on a schedule (load.py's open-loop mode, constant arrivals), as production
sends them. Each scenario is loaded twice at R per second for D seconds (kit.run.run_stream):
/todos/ alone, then the production mix MIX, where 5 % of the requests are a 200 ms query. This
module judges the two runs (kit.summary prints its rows): the fast requests' p99 in each, and
whether it grew as the setup predicts. A worker that serialises makes them wait behind the slow
ones; one that overlaps its waits does not.
"""

from __future__ import annotations

import random

import load

SLOW_S = 0.2
FAST, SLOW = "/todos/", f"/sleep/postgres/?seconds={SLOW_S:g}"
WEIGHTS = (95.0, 5.0)  # the mix: fast, slow
MIX = f"{WEIGHTS[0]:g}:{FAST},{WEIGHTS[1]:g}:{SLOW}"
DURATION = 10.0  # s, when --rate comes without --duration
MIN_SLOW = 5  # fewer slow requests than this in a run: too few to judge the fast p99 by
MIN_RISE = 0.01  # s: a p99 rise below this, or below the p99 alone, is not told from noise


def serialised_rise(run: dict, workers: int, service: float) -> float:
    """How much a setup that serialises would raise the fast requests' p99 in this run: the
    run's own schedule (load.py's seeded draw: the same send times, the same slow requests)
    replayed through WORKERS workers that each serve one request at a time, every request to
    the first worker free, a fast one in SERVICE seconds, a slow one in SLOW_S more. Under
    constant arrivals the request after a slow one waits about SLOW_S - 1/rate; with a second
    worker free, it does not wait at all."""
    rng = random.Random(run.get("seed", 1))
    plan = load.schedule(run["rate"], run["duration_s"], run["arrivals"], rng)
    picks = load.assign(list(WEIGHTS), len(plan), rng)

    def fast_p99(slow: list[int]) -> float:
        free, waits = [0.0] * workers, []
        for due, pick in zip(plan, slow):
            worker = min(range(workers), key=free.__getitem__)
            free[worker] = max(due, free[worker]) + service + (SLOW_S if pick else 0.0)
            if not pick:
                waits.append(free[worker] - due)
        return load.percentile(waits, 99) or 0.0
    return fast_p99(picks) - fast_p99([0] * len(plan))


def judge(scenario, part: dict) -> dict:
    """The row: fast p99 alone and mixed; stalls or not, against what the setup predicts at
    this rate with this many workers."""
    alone, (fast, slow) = part["alone"]["results"][0], part["mixed"]["results"]
    run, workers = fast["open_loop"], scenario.workers or part.get("workers", 1)
    before, after = alone["latency_s"]["p99"], fast["latency_s"]["p99"]
    serialises = scenario.postgres == "one"  # one pg_sleep at a time per worker
    slow_count = sum(slow["statuses"].values())
    results = (alone, fast, slow)
    clean = all(set(r["statuses"]) <= {"200"} and not r["errors"] for r in results)
    service = alone["latency_s"]["p50"] or 0.0
    rise = serialised_rise(run, workers, service)
    # a gevent or gthread worker keeps connections alive, and a request on a connection whose
    # worker is blocked waits even when another worker is free: anything up to one worker's
    # rise (sync workers close every connection, so the next goes to a free worker)
    most = rise if workers == 1 or scenario.worker == "sync" else serialised_rise(run, 1,
                                                                                  service)
    floor = max(MIN_RISE, before or 0.0)
    threshold = max(rise / 2, floor)  # what counts as "stalls", for every setup alike
    if not serialises or most < floor:
        expected = "unaffected"  # overlaps its waits, or another worker is free
    else:  # either: within the noise, or anywhere from unaffected to stalls
        expected = "stalls" if rise >= 2 * floor else "either"
    stalls = None if before is None or after is None else after - before >= threshold
    # latency counts from the scheduled send, so load.py's own lateness is in it: late sends
    # in the run with slow queries raise the p99 after (they can fake a stall), late sends in
    # the run alone the p99 before (they can hide one); 1 % of the sends late by half the
    # threshold, with the bunch of requests each late spell sends at once, and the row cannot
    # tell the server's doing from a busy machine's
    lag_alone, lag_mixed = ((r.get("lag_s") or {}).get("p99") or 0.0
                            for r in (alone["open_loop"], run))
    # a late run alone also raises the floor, and when that is what made "unaffected" of a
    # setup that serialises (without the lag the floor would be under its rise), a stall
    # then reads NOT as expected: that row cannot tell either
    half = threshold / 2
    unlagged_floor = max(MIN_RISE, (before or 0.0) - lag_alone)
    floor_made_it = (serialises and unlagged_floor <= most < floor
                     and bool(alone["open_loop"].get("behind")))  # a lag that counts
    if stalls and (lag_mixed >= half or not floor_made_it):
        lag_run, lag = "mixed", lag_mixed  # the run whose lag could have turned the verdict
        disturbed = lag_mixed >= half
    else:
        lag_run, lag = "alone", lag_alone
        disturbed = stalls is not None and (lag_alone >= half or bool(stalls))
    if slow_count < MIN_SLOW or stalls is None or expected == "either":
        as_expected = None
    elif not clean:
        as_expected = False  # answers other than 200 are the server's, however late load.py
    elif disturbed:
        as_expected = None
    else:
        as_expected = stalls == (expected == "stalls")
    requests = sum(sum(r["statuses"].values()) + sum(r["errors"].values()) for r in results)
    answered = sum(v for r in results for k, v in r["statuses"].items() if k.startswith("2"))
    return {"scenario": scenario.name, "mode": "open", "rate": run["rate"],
            "duration_s": run["duration_s"], "workers": workers, "rtt_ms": part.get("rtt_ms"),
            "fast_alone": alone["latency_s"], "fast_mixed": fast["latency_s"],
            "slow_mixed": slow["latency_s"], "slow_requests": slow_count,
            "statuses": sum_counts(r["statuses"] for r in results),
            "errors": sum_counts(r["errors"] for r in results),
            "requests": requests, "not_2xx": requests - answered,
            "serialised_rise_s": round(rise, 4), "serialised_rise_max_s": round(most, 4),
            "floor_s": round(floor, 4),
            "threshold_s": round(threshold, 4),
            "expected": expected, "stalls": stalls,
            "client_behind": run["behind"] or alone["open_loop"]["behind"],
            "client_late": run.get("late", 0) + alone["open_loop"].get("late", 0),
            "client_sent": run["sent"] + alone["open_loop"]["sent"],
            "client_lag_p99_s": round(lag, 4), "client_lag_run": lag_run,
            "client_disturbed": disturbed,
            "as_expected": as_expected}


def sum_counts(counts) -> dict[str, int]:
    total: dict[str, int] = {}
    for each in counts:
        for key, value in each.items():
            total[key] = total.get(key, 0) + value
    return dict(sorted(total.items()))


def verdict(row: dict) -> str:
    ms = lambda v: "-" if v is None else f"{v * 1000:.0f} ms"  # noqa: E731
    before, after = row["fast_alone"]["p99"], row["fast_mixed"]["p99"]
    said = ("the slow queries stall the fast requests" if row["stalls"] else
            "the fast requests do not wait for the slow ones")
    if row.get("client_disturbed"):  # the rise is measured, whose it is is not
        said = (f"the fast p99 rose by {'at least' if row['stalls'] else 'less than'} the "
                f"+{ms(row['threshold_s'])} that counts as a stall")
    rise, most = row["serialised_rise_s"], row.get("serialised_rise_max_s", row[
        "serialised_rise_s"])
    workers = f"{row['workers']} worker{'s' if row['workers'] > 1 else ''}"
    span = f"+{ms(rise)}" if most == rise else (f"+{ms(rise)} to +{ms(most)}, as its kept "
                                                f"connections find their worker free or not,")
    text = (f"{said} (p99 {ms(before)} -> {ms(after)}; a setup that serialises: {span} "
            f"at {row['rate']:g}/s on {workers})")
    if row["not_2xx"]:  # a quick 503 storm keeps a fine p99: the share goes in the line
        kinds = ", ".join(f"{k} × {v}" for k, v in {**{k: v for k, v in row["statuses"].items()
                                                      if not k.startswith("2")},
                                                   **row["errors"]}.items())
        text += (f"; {row['not_2xx']} of {row['requests']} requests "
                 f"({row['not_2xx'] / row['requests']:.0%}) NOT answered 2xx ({kinds})")
    if row["expected"] == "either" and most == rise:
        text += (f", cannot tell ? (the +{ms(rise)} a setup that serialises would show is "
                 f"within the noise: raise --rate)")
        return text + behind(row)
    if row["expected"] == "either":
        return text + ", cannot tell ? (either is what it should do)" + behind(row)
    if most < row["floor_s"]:
        fewer = " or use fewer --workers" if row["workers"] > 1 else ""
        text += f"; at this rate no setup shows the difference, raise --rate{fewer}"
    if row["as_expected"] is not None:
        text += ", as expected ✓" if row["as_expected"] else ", NOT as expected ✗"
    elif row["stalls"] is None:
        text += ", cannot tell ? (a run with no fast request answered: no p99 to compare)"
    elif row.get("client_disturbed") and row["slow_requests"] >= MIN_SLOW:
        lag = ms(row["client_lag_p99_s"])
        if row["stalls"] and row.get("client_lag_run") == "alone":  # it lifted the floor
            why = (f"load.py's lag p99 in the run alone was {lag}, and lifted the p99 it "
                   f"starts from to {ms(row['floor_s'])}, past the +{ms(most)} a setup that "
                   f"serialises would add: without it this row would not expect unaffected")
        else:
            which = "with slow queries" if row.get("client_lag_run") == "mixed" else "alone"
            why = (f"load.py's lag p99 in the run {which} was {lag}, at least half of that "
                   f"+{ms(row['threshold_s'])}")
        text += (f", cannot tell ? ({why}: a busy machine's delay is in these latencies; run "
                 f"it again on a quieter machine)")
    else:
        text += (f", cannot tell ? ({row['slow_requests']} slow requests: raise --rate "
                 f"or --duration)")
    return text + behind(row)


def behind(row: dict) -> str:
    if not row["client_behind"]:
        return ""
    # a machine busy for the whole run slows the server as well as load.py: the lag rule sees
    # load.py's share only
    doubt = (": a busy machine slows the server too, run it again before believing this ✗"
             if row["as_expected"] is False and not row["not_2xx"] else "")
    return (f"; load.py fell behind its schedule ({row['client_late']} of {row['client_sent']} "
            f"sends over {load.BEHIND * 1000:g} ms late){doubt}")


HEAD = ["scenario", "rate", "fast p50/p99 alone", "fast p50/p99 with 5 % slow", "slow p50",
        "expected", "verdict"]


def cells(row: dict) -> list[str]:
    """A row of the summary's stream table, under HEAD (kit.summary aligns the columns)."""
    ms = lambda v: "-" if v is None else f"{v * 1000:.1f}"  # noqa: E731
    return [row["scenario"], f"{row['rate']:g}/s × {row['duration_s']:g} s",
            f"{ms(row['fast_alone']['p50'])} / {ms(row['fast_alone']['p99'])} ms",
            f"{ms(row['fast_mixed']['p50'])} / {ms(row['fast_mixed']['p99'])} ms",
            f"{ms(row['slow_mixed']['p50'])} ms", row["expected"], verdict(row)]
