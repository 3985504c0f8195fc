"""Shared state under contention, as the engine uses it: four processes, each with 100
decisions in flight on one key, against one redis-server."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from uuid import uuid4

from redis.asyncio import Redis
from redis_server import RedisServer
from store_contention import decide

from policy_engine.state.redis_breakers import RedisBreakers

PROCESSES = 4
IN_FLIGHT = 100


def test_four_processes_on_one_key_get_exactly_the_allowance_and_lose_no_outcome(
    own_redis_server: RedisServer,
) -> None:
    prefix = f"t-{uuid4().hex}"
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    start_at = time.time() + 2.0
    workers = [
        context.Process(
            target=decide, args=(own_redis_server.url, prefix, IN_FLIGHT, start_at, out)
        )
        for _ in range(PROCESSES)
    ]
    for worker in workers:
        worker.start()
    reports = [out.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=10)

    async def window_calls() -> int:
        client = Redis.from_url(own_redis_server.url)
        try:
            state = await RedisBreakers(client, prefix).fetch_state("agent")
        finally:
            await client.aclose()
        assert state.window is not None
        return state.window.calls

    # 100 an hour with a burst of 100: exactly 100 of the 400, whatever the interleaving.
    assert sum(report["admitted"] for report in reports) == 100
    assert [report["failures"] for report in reports] == [0] * PROCESSES
    assert [report["unavailable"] for report in reports] == [0] * PROCESSES
    assert asyncio.run(window_calls()) == PROCESSES * IN_FLIGHT  # no outcome lost
