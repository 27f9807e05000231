"""The 2013 claims, measured: which setups block on which route.

N requests of S seconds: concurrent means under 2·S in all; serial means over 0.7·N·S.
"""

import pytest

pytestmark = pytest.mark.slow

N, S = 6, 0.4
CONCURRENT = 2 * S
SERIAL = 0.7 * N * S


def totals(load, server) -> dict[str, float]:
    run = load(N, "--url", server.url, "--seconds", S)
    assert run.status == 0, run.stderr
    return {r["endpoint"]: r["total_s"] for r in run.document["results"]}


def test_sync_worker_serialises_both_routes(serve, load):
    took = totals(load, serve("sync", requests=N))
    assert took["python"] > SERIAL
    assert took["postgres"] > SERIAL


def test_gevent_worker_overlaps_sleep_but_not_unpatched_psycopg2(serve, load):
    server = serve("gevent", requests=N)
    took = totals(load, server)
    assert took["python"] < CONCURRENT
    assert took["postgres"] > SERIAL
    assert server.health()["psycopg2_green"] is False


def test_green_app_overlaps_both_routes(serve, load):
    server = serve("green", requests=N)
    took = totals(load, server)
    assert took["python"] < CONCURRENT
    assert took["postgres"] < CONCURRENT
    assert server.health()["psycopg2_green"] is True


def test_gthread_with_enough_threads_overlaps_both_routes(serve, load):
    took = totals(load, serve("gthread", requests=N, POOL_SIZE=N, MAX_OVERFLOW=0))
    assert took["python"] < CONCURRENT
    assert took["postgres"] < CONCURRENT


def test_psycopg3_overlaps_without_psycogreen(serve, load):
    server = serve("psycopg3", requests=N)
    took = totals(load, server)
    assert took["postgres"] < CONCURRENT
    assert server.health()["driver"] == "psycopg"
    assert server.blocked_reports() == 0


@pytest.mark.parametrize("scenario, blocked", [("gevent", True), ("green", False),
                                               ("psycopg3", False)])
def test_gevent_monitor_reports_blocking_only_when_psycopg2_is_unpatched(
        serve, load, scenario, blocked):
    server = serve(scenario, requests=4)
    run = load(4, "--url", server.url, "--endpoint", "postgres", "--seconds", S)
    assert run.status == 0, run.stderr
    assert (server.blocked_reports() > 0) is blocked


def test_two_sync_workers_overlap_pairs(serve, load):
    server = serve("sync", requests=6, workers=2)
    run = load(6, "--url", server.url, "--endpoint", "python", "--seconds", S)
    result = run.result("python")
    assert 0.7 * 3 * S < result["total_s"] < 2 * 3 * S  # ~⌈6/2⌉·S
    # Two at a time. Waves of 2 need the two workers in step; when one starts up to S after
    # the other, the answers come S/2 apart and read as one long wave (a fresh-clone suite
    # run saw "waves of 6"). The overlap, N x S / the last answer, does not depend on that:
    # about 2 for two workers (1.7 at the worst offset), 1 for one, 3 for three.
    assert 1.4 < result["overlap"] < 2.6, (result["overlap"], result["waves"])
