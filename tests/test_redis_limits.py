"""The rate-limit script against the Python algorithms: same instants, same decisions.

Random rules (each algorithm, limits, periods that are not round in binary, bursts) and
random sequences of requests over several keys are judged by the Lua script (on the
caller's clock) and by :func:`policy_engine.algorithms.ratelimit.check_all` on states kept
in Python; every combined decision, remaining count and wait must be equal, float for
float. Then the script alone under contention: many processes on one key, the limit exact.
"""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
import time
from typing import Any
from uuid import uuid4

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis_server import RedisServer

from policy_engine.algorithms import ratelimit
from policy_engine.algorithms.ratelimit import RateState
from policy_engine.compiler.pipeline import compile_text
from policy_engine.language.model import RateLimitSpec
from policy_engine.state.redis_limits import RedisRateLimits


@functools.cache
def spec_of(name: str, algorithm: str, limit: int, period: str, burst: int) -> RateLimitSpec:
    burst_field = f", burst: {burst}" if burst else ""
    text = (
        f"version: 1\nrate_limits:\n  - {{name: {name}, hook: connect, key: conn.ip, "
        f"limit: {limit}/{period}, algorithm: {algorithm}{burst_field}}}\n"
    )
    return compile_text(text).policy.rate_limits[0]


rules = st.builds(
    spec_of,
    name=st.sampled_from(["a", "b", "c"]),
    algorithm=st.sampled_from(["gcra", "sliding_window", "fixed_window"]),
    limit=st.integers(1, 6),
    period=st.sampled_from(["1s", "700ms", "3s", "10s"]),
    burst=st.integers(0, 4),
)
steps = st.lists(
    st.tuples(
        st.floats(0.0, 2.5),  # time since the previous request
        st.lists(st.integers(0, 2), min_size=1, max_size=3, unique=True),  # limits it meets
        st.sampled_from(["k1", "k2"]),
    ),
    min_size=1,
    max_size=40,
)


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(specs=st.lists(rules, min_size=3, max_size=3, unique_by=lambda s: s.name), plan=steps)
def test_the_script_decides_as_the_python_algorithms(
    redis_server: RedisServer, specs: list[RateLimitSpec], plan: list[Any]
) -> None:
    async def compare() -> None:
        client = Redis.from_url(redis_server.url)
        limits = RedisRateLimits(client, f"t-{uuid4().hex}")
        states: dict[tuple[str, str], RateState] = {}
        now = 1_700_000_000.123
        try:
            for elapsed, which, key in plan:
                now += elapsed
                chosen = [specs[i] for i in which]
                prior = []
                for spec in chosen:
                    state = states.get((spec.name, key))
                    if state is not None and ratelimit.expires_at(spec, state) <= now:
                        state = None
                    prior.append((spec, state))
                expected, new_states = ratelimit.check_all(prior, now)
                for spec, state in zip(chosen, new_states, strict=True):
                    if state is not None:
                        states[(spec.name, key)] = state
                call, read = limits.check([(spec, key) for spec in chosen], now)
                got = read(await call.script(keys=call.keys, args=call.plain_args))
                assert got == expected, (now, [s.name for s in chosen], key)
        finally:
            await client.aclose()

    run(compare())


def _contend(url: str, prefix: str, algorithm: str, start_at: float, out: Any) -> None:
    """One process: 100 checks of one key, all in flight at once."""
    spec = spec_of("burst", algorithm, 100, "1h", 0)

    async def main() -> int:
        client = Redis.from_url(url, max_connections=200)
        limits = RedisRateLimits(client, prefix)
        while time.time() < start_at:
            await asyncio.sleep(0.001)

        async def one() -> bool:
            call, read = limits.check([(spec, "one-key")], None)
            return read(await call.script(keys=call.keys, args=call.plain_args)).allowed

        try:
            results = await asyncio.gather(*(one() for _ in range(100)))
        finally:
            await client.aclose()
        return sum(results)

    out.put(asyncio.run(main()))


@pytest.mark.parametrize("algorithm", ["gcra", "sliding_window", "fixed_window"])
def test_a_burst_from_four_processes_on_one_key_admits_exactly_the_limit(
    redis_server: RedisServer, algorithm: str
) -> None:
    """100 an hour: 4 processes x 100 requests in flight at once admit exactly 100 (an
    hour refills less than one request of GCRA in the seconds this takes), and every
    call answers: there is no optimistic retry left to run out of."""
    prefix = f"t-{uuid4().hex}"
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    start_at = time.time() + 1.5
    workers = [
        context.Process(target=_contend, args=(redis_server.url, prefix, algorithm, start_at, out))
        for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    admitted = [out.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=10)

    assert sum(admitted) == 100
