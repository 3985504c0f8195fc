"""The one script for an event's limits and permit against the scripts it stands for.

Random rules and random sequences of events, each meeting enforced limits, shadow limits
and a breaker, are judged twice in one Redis on the caller's clock: by
``check_rate_limits_then_acquire`` (one script) and by ``check_rate_limits`` per group
then ``breaker_acquire`` when the enforced group admits (the scripts
``tests/test_redis_limits.py`` and ``tests/test_redis_breakers.py`` hold to the Python
algorithms). Every decision, every permit and the breaker's state must be the same.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any
from uuid import uuid4

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis_server import RedisServer

from policy_engine.compiler.pipeline import compile_text
from policy_engine.language.model import CircuitBreakerSpec, RateLimitSpec
from policy_engine.state.redis_store import RedisStore


@functools.cache
def spec_of(name: str, algorithm: str, limit: int, period: str) -> RateLimitSpec:
    text = (
        f"version: 1\nrate_limits:\n  - {{name: {name}, hook: connect, key: conn.ip, "
        f"limit: {limit}/{period}, algorithm: {algorithm}}}\n"
    )
    return compile_text(text).policy.rate_limits[0]


BREAKER = """
version: 1
circuit_breakers:
  - {name: backend, match: 'event.name == "call"', failure_rate: 50%,
     window: {calls: 4}, minimum_calls: 2, open_for: 1500ms, half_open_calls: 1}
"""


def breaker() -> CircuitBreakerSpec:
    return compile_text(BREAKER).policy.circuit_breakers[0]


rules = st.builds(
    spec_of,
    name=st.sampled_from(["a", "b", "c", "d"]),
    algorithm=st.sampled_from(["gcra", "sliding_window", "fixed_window"]),
    limit=st.integers(1, 5),
    period=st.sampled_from(["1s", "700ms", "3s"]),
)
events = st.lists(
    st.tuples(
        st.floats(0.0, 1.5),  # time since the previous event
        st.lists(st.integers(0, 3), max_size=2, unique=True),  # enforced limits it meets
        st.lists(st.integers(0, 3), max_size=2, unique=True),  # shadow limits it meets
        st.sampled_from(["k1", "k2"]),
        st.booleans(),  # whether a permitted call fails
    ),
    min_size=1,
    max_size=30,
)


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(specs=st.lists(rules, min_size=4, max_size=4, unique_by=lambda s: s.name), plan=events)
def test_one_script_decides_as_the_scripts_it_stands_for(
    redis_server: RedisServer, specs: list[RateLimitSpec], plan: list[Any]
) -> None:
    guard = breaker()

    async def compare() -> None:
        def store() -> RedisStore:
            prefix = f"t-{uuid4().hex}"
            return RedisStore(redis_server.url, prefix=prefix, server_clock=False, near_cache=False)

        together, apart = store(), store()
        now = 1_700_000_000.123
        try:
            for elapsed, enforced_at, shadow_at, key, fails in plan:
                now += elapsed
                enforced = [(specs[i], key) for i in enforced_at]
                shadows = [[(specs[i], key)] for i in shadow_at]
                groups = [enforced, *shadows]
                decisions, permit = await together.check_rate_limits_then_acquire(
                    groups, guard, now
                )
                expected = [await apart.check_rate_limits(checks, now) for checks in groups]
                expected_permit = (
                    await apart.breaker_acquire(guard, now) if expected[0].allowed else None
                )
                assert decisions == expected
                assert permit == expected_permit
                if permit is not None and permit.permitted:
                    for side in (together, apart):
                        await side.breaker_record(guard, now, failed=fails, duration=0.01)
            assert await together.fetch_breaker_state("backend") == await apart.fetch_breaker_state(
                "backend"
            )
        finally:
            await together.close()
            await apart.close()

    asyncio.run(compare())


def test_a_refused_event_takes_no_permit_even_from_a_half_open_breaker(
    redis_server: RedisServer,
) -> None:
    """The one probe a half-open breaker lets through is not spent on an event the limits
    refuse: the next admitted event takes it."""
    guard = breaker()
    limit = spec_of("only-one", "fixed_window", 1, "3s")

    async def probe() -> list[Any]:
        store = RedisStore(
            redis_server.url, prefix=f"t-{uuid4().hex}", server_clock=False, near_cache=False
        )
        now = 1_700_000_000.0
        try:
            for _ in range(2):  # two failures: the breaker opens
                permit = await store.breaker_acquire(guard, now)
                assert permit.permitted
                await store.breaker_record(guard, now, failed=True, duration=0.01)
            now += 2.0  # open_for is over: the next permit is the half-open probe
            answers = []
            await store.check_rate_limits([(limit, "k")], now)  # spends the window's one
            refused = await store.check_rate_limits_then_acquire([[(limit, "k")]], guard, now)
            answers.append(refused)
            admitted = await store.check_rate_limits_then_acquire([[]], guard, now)
            answers.append(admitted)
            return answers
        finally:
            await store.close()

    (refused_decisions, refused_permit), (_, probe_permit) = asyncio.run(probe())
    assert not refused_decisions[0].allowed
    assert refused_permit is None
    assert probe_permit is not None
    assert probe_permit.permitted
