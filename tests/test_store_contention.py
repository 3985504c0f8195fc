"""Shared state under contention, as the engine uses it: four processes, each with 100
decisions in flight on one key, against one redis-server."""

from __future__ import annotations

from uuid import uuid4

from redis_server import RedisServer
from store_contention import contend, recorded_outcomes

PROCESSES = 4
IN_FLIGHT = 100


def test_four_processes_on_one_key_get_exactly_the_allowance_and_lose_no_outcome(
    own_redis_server: RedisServer,
) -> None:
    prefix = f"t-{uuid4().hex}"
    reports = contend(own_redis_server.url, prefix, PROCESSES, IN_FLIGHT)

    # 100 an hour with a burst of 100: exactly 100 of the 400, whatever the interleaving.
    assert sum(report["admitted"] for report in reports) == 100
    assert [report["failures"] for report in reports] == [0] * PROCESSES
    assert [report["unavailable"] for report in reports] == [0] * PROCESSES
    assert recorded_outcomes(own_redis_server.url, prefix) == PROCESSES * IN_FLIGHT


def test_limits_and_permit_asked_together_on_one_key_admit_the_allowance_and_permit_only_it(
    own_redis_server: RedisServer,
) -> None:
    prefix = f"t-{uuid4().hex}"
    reports = contend(own_redis_server.url, prefix, PROCESSES, IN_FLIGHT, together=True)

    # Exactly the allowance admitted; a permit for each admitted call and for no other.
    assert sum(report["admitted"] for report in reports) == 100
    assert [report["permits"] for report in reports] == [r["admitted"] for r in reports]
    assert [report["failures"] for report in reports] == [0] * PROCESSES
    assert [report["unavailable"] for report in reports] == [0] * PROCESSES
    assert recorded_outcomes(own_redis_server.url, prefix) == 100
