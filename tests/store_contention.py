"""One process deciding on a shared Redis store, for tests/test_store_contention.py.

Run by multiprocessing's ``spawn`` (a module of its own, importing little). Each process
builds the store as the engine does (a ``GuardedStore`` over a ``RedisStore``, its policy's
``store_timeout`` and ``on_store_error: fail_open``), waits for the common start, then keeps
``in_flight`` rate-limit checks of one key and as many breaker outcomes in flight at once.
``together``: each check asks for the breaker's permit in the same call, as an event that
meets both does, and only the permitted calls record an outcome. It reports what it was
answered and what its store health saw.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from typing import Any

from policy_engine.compiler.pipeline import compile_text
from policy_engine.language.model import StoreFailureMode
from policy_engine.state.guarded import GuardedStore
from policy_engine.state.redis_breakers import RedisBreakers
from policy_engine.state.redis_clients import connect
from policy_engine.state.redis_store import RedisStore

POLICY = """
version: 1
rate_limits:
  - {name: per-conversation, hook: connect, key: conn.ip, limit: 100/hour, burst: 100}
circuit_breakers:
  - {name: agent, match: 'event.name == "call"', failure_rate: 100%,
     window: {calls: 10000}, minimum_calls: 10000, open_for: 30s, half_open_calls: 2}
"""


def decide(  # noqa: PLR0917 (a spawned process's arguments)
    url: str, prefix: str, in_flight: int, start_at: float, out: Any, together: bool
) -> None:
    policy = compile_text(POLICY).policy
    limit, breaker = policy.rate_limits[0], policy.circuit_breakers[0]

    async def main() -> dict[str, int]:
        state = GuardedStore(RedisStore(url, prefix=prefix))
        state.configure(timeout=2.0, on_error=StoreFailureMode.FAIL_OPEN)
        while time.time() < start_at:
            await asyncio.sleep(0.001)

        permits = 0

        async def check() -> bool:
            nonlocal permits
            if not together:
                return (await state.rates([(limit, "one-conversation")], time.time())).allowed
            checks = [(limit, "one-conversation")]
            decision, _, permit = await state.rates_then_permit(checks, [], breaker, time.time())
            if permit is not None and permit.permitted:
                permits += 1
                if not decision.allowed:
                    raise AssertionError("a permit taken for a refused check")
            return decision.allowed

        async def record(index: int) -> None:
            await state.record(breaker, time.time(), failed=index % 2 == 0, duration=0.01)

        try:
            answers = await asyncio.gather(*(check() for _ in range(in_flight)))
            recorded = permits if together else in_flight
            await asyncio.gather(*(record(i) for i in range(recorded)))
        finally:
            await state.close()
        return {
            "admitted": sum(answers),
            "permits": permits,
            "failures": state.health.failures,
            "unavailable": int(not state.health.available),
        }

    out.put(asyncio.run(main()))


def contend(
    url: str, prefix: str, processes: int, in_flight: int, *, together: bool = False
) -> list[dict[str, int]]:
    """Run :func:`decide` in ``processes`` spawned processes at once; their reports."""
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    start_at = time.time() + 2.0  # every process started and waiting by then
    workers = [
        context.Process(target=decide, args=(url, prefix, in_flight, start_at, out, together))
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    reports = [out.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=10)
    return reports


def recorded_outcomes(url: str, prefix: str) -> int:
    """The calls the shared breaker's window holds."""

    async def read() -> int:
        client = connect(url, socket_timeout=10.0).client
        try:
            call, read_state = RedisBreakers(client, prefix).fetch_state("agent")
            state = read_state(await call.script(keys=call.keys, args=call.plain_args))
        finally:
            await client.aclose()
        assert state.window is not None
        return state.window.calls

    return asyncio.run(read())
