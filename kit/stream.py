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

SLOW_S = 0.2
FAST, SLOW = "/todos/", f"/sleep/postgres/?seconds={SLOW_S:g}"
MIX = f"95:{FAST},5:{SLOW}"
DURATION = 10.0  # s, when --rate comes without --duration
MIN_SLOW = 5  # fewer slow requests than this in a run: too few to judge the fast p99 by


def judge(scenario, part: dict) -> dict:
    """The row: fast p99 alone and mixed; stalls or not, against what the setup predicts."""
    alone, (fast, slow) = part["alone"]["results"][0], part["mixed"]["results"]
    run = fast["open_loop"]
    before, after = alone["latency_s"]["p99"], fast["latency_s"]["p99"]
    serialises = scenario.postgres == "one"  # one pg_sleep at a time per worker
    slow_count = sum(slow["statuses"].values())
    clean = all(set(r["statuses"]) <= {"200"} and not r["errors"]
                for r in (alone, fast, slow))
    stalls = None if before is None or after is None else after >= before + SLOW_S / 2
    as_expected = None if slow_count < MIN_SLOW or stalls is None else (
        stalls == serialises and clean)
    behind = run["behind"] or alone["open_loop"]["behind"]
    return {"scenario": scenario.name, "mode": "open", "rate": run["rate"],
            "duration_s": run["duration_s"], "rtt_ms": part.get("rtt_ms"),
            "fast_alone": alone["latency_s"], "fast_mixed": fast["latency_s"],
            "slow_mixed": slow["latency_s"], "slow_requests": slow_count,
            "statuses": {k: v for r in (alone, fast, slow) for k, v in r["statuses"].items()},
            "errors": {k: v for r in (alone, fast, slow) for k, v in r["errors"].items()},
            "expected": "stalls" if serialises else "unaffected",
            "stalls": stalls, "client_behind": behind, "as_expected": as_expected}


def verdict(row: dict) -> str:
    ms = lambda v: "-" if v is None else f"{v * 1000:.0f} ms"  # noqa: E731
    before, after = row["fast_alone"]["p99"], row["fast_mixed"]["p99"]
    said = ("the slow queries stall the fast requests" if row["stalls"] else
            "the fast requests do not wait for the slow ones")
    text = f"{said} (p99 {ms(before)} -> {ms(after)})"
    if row["as_expected"] is None:
        return text + (f", cannot tell ? ({row['slow_requests']} slow requests: raise --rate "
                       f"or --duration)")
    text += ", as expected ✓" if row["as_expected"] else ", NOT as expected ✗"
    if row["client_behind"]:
        text += "; load.py fell behind its schedule (see its warning)"
    return text


HEAD = ["scenario", "rate", "fast p50/p99 alone", "fast p50/p99 with 5 % slow", "slow p50",
        "expected", "verdict"]


def cells(row: dict) -> list[str]:
    """A row of the summary's stream table, under HEAD (kit.summary aligns the columns)."""
    ms = lambda v: "-" if v is None else f"{v * 1000:.1f}"  # noqa: E731
    return [row["scenario"], f"{row['rate']:g}/s × {row['duration_s']:g} s",
            f"{ms(row['fast_alone']['p50'])} / {ms(row['fast_alone']['p99'])} ms",
            f"{ms(row['fast_mixed']['p50'])} / {ms(row['fast_mixed']['p99'])} ms",
            f"{ms(row['slow_mixed']['p50'])} ms", row["expected"], verdict(row)]
