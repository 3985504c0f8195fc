"""Circuit breakers run as Lua in Redis: the same answers as the pure algorithm, no outcome lost.

The differential property test runs random specs and random sequences of calls through
:mod:`policy_engine.algorithms.breaker` and through the scripts of
:class:`~policy_engine.state.redis_breakers.RedisBreakers` on a real redis-server (a free
loopback port), comparing every answer and the state after every step. The contention tests
record from several clients and from several processes at once and count what the window
holds. Times are the explicit ``now`` of each call, except in the tests of Redis's own
clock, which compare its readings with each other and never with a duration.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import math
import multiprocessing
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar
from uuid import uuid4

import pytest
from breaker_contention import FAST, SLOW, Job, outcome, roomy_breaker, run_worker
from hypothesis import event, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis_server import RedisServer

from policy_engine.algorithms import breaker
from policy_engine.algorithms.breaker import (
    BreakerState,
    Circuit,
    CountWindow,
    Permit,
    Reason,
    TimeWindow,
    Transition,
)
from policy_engine.compiler.pipeline import compile_text
from policy_engine.language.model import CircuitBreakerSpec, WindowSpec
from policy_engine.state.redis_breakers import RedisBreakers
from policy_engine.state.redis_pipeline import Call, Pipeline

T = TypeVar("T")

WAIT = 10.0  # a ceiling against hangs, never a measure of speed

# -- fixtures and helpers ------------------------------------------------------------------------


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    redis = Redis.from_url(redis_server.url)
    yield redis
    await redis.aclose()


@pytest.fixture
def breakers(client: Redis) -> RedisBreakers:
    return RedisBreakers(client, f"test-{uuid4().hex}")


async def run(operation: tuple[Call, Callable[[Any], T]]) -> T:
    """Run one call on its own and parse its reply."""
    call, parse = operation
    return parse(await call.script(keys=call.keys, args=call.plain_args))


@functools.cache
def compiled(text: str) -> CircuitBreakerSpec:
    return compile_text("version: 1\ncircuit_breakers:\n" + text).policy.circuit_breakers[0]


def circuit_breaker(
    window: str = "{calls: 2}",
    *,
    minimum_calls: int = 2,
    failure_rate: int = 50,
    open_for: str = "30s",
    half_open_calls: int = 1,
    slow_call: str | None = None,
) -> CircuitBreakerSpec:
    text = f"""
  - name: agent-runtime
    match: event.name == "call"
    failure_rate: {failure_rate}%
    window: {window}
    minimum_calls: {minimum_calls}
    open_for: {open_for}
    half_open_calls: {half_open_calls}
"""
    if slow_call is not None:
        text += f"    slow_call: {slow_call}\n"
    return compiled(text)


async def server_time(client: Redis) -> float:
    """Redis's clock as the scripts read it."""
    seconds, microseconds = await client.time()
    return seconds + microseconds / 1000000


# -- the differential property test --------------------------------------------------------------


@st.composite
def breaker_specs(draw: st.DrawFn) -> CircuitBreakerSpec:
    """Count- and time-based windows, with and without slow_call, small enough to fill."""
    if draw(st.booleans()):
        calls = draw(st.integers(1, 8))
        window = f"{{calls: {calls}}}"
        minimum_calls = draw(st.integers(1, calls))
    else:
        window = f"{{time: {draw(st.sampled_from(['1s', '2s', '2500ms', '4s']))}}}"
        minimum_calls = draw(st.integers(1, 6))
    slow_call = None
    if draw(st.booleans()):
        over = draw(st.sampled_from(["100ms", "1s"]))
        slow_call = f"{{over: {over}, rate: {draw(st.integers(1, 100))}%}}"
    return circuit_breaker(
        window,
        minimum_calls=minimum_calls,
        failure_rate=draw(st.integers(1, 100)),
        open_for=draw(st.sampled_from(["1s", "2s", "3500ms", "10s"])),
        half_open_calls=draw(st.integers(1, 3)),
        slow_call=slow_call,
    )


_STEPS = st.floats(0.0, 12.0) | st.sampled_from([0.0, 0.1, 0.5, 1.0, 2.0, 3.5, 10.0])
_DURATIONS = st.sampled_from([0.0, 0.05, 0.1, 0.5, 1.0, 1.5])

Operation = tuple[str, float, bool, float]
"""(what, how much later than the previous operation, failed, duration)."""

_OPERATIONS = st.tuples(
    st.sampled_from(["acquire", "acquire", "record", "record", "record", "release", "reload"]),
    _STEPS,
    st.booleans(),
    _DURATIONS,
)


@settings(max_examples=100, derandomize=True, deadline=None)
@given(
    specs=st.lists(breaker_specs(), min_size=1, max_size=2),
    start=st.sampled_from([0.0, 1000.0, 1_700_000_000.123456]),
    operations=st.lists(_OPERATIONS, min_size=10, max_size=60),
)
def test_the_scripts_answer_as_the_algorithm(
    redis_server: RedisServer,
    specs: list[CircuitBreakerSpec],
    start: float,
    operations: list[Operation],
) -> None:
    """Every Permit, Transition and state of the scripts equals the pure algorithm's.

    "reload" switches to the other spec, as a hot reload does: the same key, new parameters.
    """
    asyncio.run(_compare(redis_server.url, specs, start, operations))


async def _compare(
    url: str, specs: list[CircuitBreakerSpec], start: float, operations: list[Operation]
) -> None:
    client = Redis.from_url(url)
    try:
        breakers = RedisBreakers(client, f"test-{uuid4().hex}")
        state = BreakerState()
        now = start
        current = 0
        for what, step, failed, duration in operations:
            now += step
            spec = specs[current]
            if what == "acquire":
                prior = state
                permit, state = breaker.acquire(spec, state, now)
                assert await run(breakers.acquire(spec, now)) == permit
                _note(permit.transition)
                if prior.circuit is Circuit.HALF_OPEN and state.since != prior.since:
                    event("lost probes: a new round")
                if not permit.permitted:
                    event(f"refused while {permit.circuit}")
            elif what == "record":
                state, transition = breaker.record(
                    spec, state, now, failed=failed, duration=duration
                )
                assert (
                    await run(breakers.record(spec, now, failed=failed, duration=duration))
                    == transition
                )
                _note(transition)
            elif what == "release":
                state = breaker.release(state)
                await run(breakers.release(spec))
            else:
                current = (current + 1) % len(specs)
                if (spec.window.calls is None) != (specs[current].window.calls is None):
                    event("reloaded to the other kind of window")
            assert await run(breakers.fetch_state(spec.name)) == state
    finally:
        await client.aclose()


def _note(transition: Transition | None) -> None:
    """Tell hypothesis's statistics which transitions the examples reached."""
    if transition is not None:
        event(f"{transition.from_state} -> {transition.to_state}: {transition.reason}")


_OUTCOMES = st.lists(st.tuples(_STEPS, st.booleans(), _DURATIONS), min_size=1, max_size=12)


@settings(max_examples=60, derandomize=True, deadline=None)
@given(
    spec=breaker_specs(),
    start=st.sampled_from([0.0, 1_700_000_000.123456]),
    batches=st.lists(st.tuples(_STEPS, _OUTCOMES), min_size=1, max_size=6),
)
def test_outcomes_recorded_together_answer_as_the_algorithm_in_turn(
    redis_server: RedisServer,
    spec: CircuitBreakerSpec,
    start: float,
    batches: list[tuple[float, list[tuple[float, bool, float]]]],
) -> None:
    """``record_many`` (one script for a batch of outcomes) gives each outcome the
    transition, and the breaker the state, that recording them one by one does. Between
    batches a permit is asked for, so that open circuits go half-open and probes record."""

    async def compare() -> None:
        client = Redis.from_url(redis_server.url)
        try:
            breakers = RedisBreakers(client, f"test-{uuid4().hex}")
            state = BreakerState()
            now = start
            for pause, outcomes in batches:
                now += pause
                permit, state = breaker.acquire(spec, state, now)
                assert await run(breakers.acquire(spec, now)) == permit
                expected, timed = [], []
                for step, failed, duration in outcomes:
                    now += step
                    state, transition = breaker.record(
                        spec, state, now, failed=failed, duration=duration
                    )
                    expected.append(transition)
                    timed.append((now, failed, duration))
                    _note(transition)
                assert await run(breakers.record_many(spec, timed)) == expected
                assert await run(breakers.fetch_state(spec.name)) == state
        finally:
            await client.aclose()

    asyncio.run(compare())


# -- no outcome lost -----------------------------------------------------------------------------

_ROOMY = 10_000  # the largest count window a policy may have


def expected_window(workers: int, calls: int) -> tuple[int, int, int]:
    """(calls, failed, slow) that ``calls`` outcomes of each of ``workers`` add up to."""
    outcomes = [outcome(worker, index) for worker in range(workers) for index in range(calls)]
    failed = sum(1 for failure, _ in outcomes if failure)
    slow = sum(1 for _, duration in outcomes if duration == SLOW)
    return len(outcomes), failed, slow


def window_counts(state: BreakerState) -> tuple[int, int, int]:
    assert state.circuit is Circuit.CLOSED
    assert isinstance(state.window, CountWindow)
    window = state.window
    return window.calls, window.failed.bit_count(), window.slow.bit_count()


async def test_concurrent_clients_lose_no_outcome(redis_server: RedisServer) -> None:
    """Four clients, a hundred recordings in flight each, batched by their pipelines."""
    prefix = f"test-{uuid4().hex}"
    spec = roomy_breaker("shared", _ROOMY)
    clients = [Redis.from_url(redis_server.url) for _ in range(4)]
    try:
        pipelines = [Pipeline(client) for client in clients]
        breakers = [RedisBreakers(client, prefix) for client in clients]

        async def record(worker: int, index: int) -> Transition | None:
            failed, duration = outcome(worker, index)
            call, parse = breakers[worker].record(spec, 1000.0, failed=failed, duration=duration)
            return parse(await pipelines[worker].run(call))

        transitions = await asyncio.wait_for(
            asyncio.gather(*(record(worker, i) for i in range(100) for worker in range(4))), WAIT
        )
        assert transitions == [None] * 400
        assert window_counts(await run(breakers[0].fetch_state("shared"))) == expected_window(
            4, 100
        )
        assert all(pipeline.batches < pipeline.calls for pipeline in pipelines)  # batched
    finally:
        for client in clients:
            await client.aclose()


def test_concurrent_processes_lose_no_outcome(redis_server: RedisServer) -> None:
    """Four processes, each with its own event loop and client, a hundred in flight each."""
    prefix = f"test-{uuid4().hex}"
    workers, rounds, in_flight = 4, 2, 100
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(workers)
    results = context.Queue()
    processes = [
        context.Process(
            target=run_worker,
            args=(
                Job(redis_server.url, prefix, _ROOMY, worker, rounds, in_flight),
                barrier,
                results,
            ),
        )
        for worker in range(workers)
    ]
    for process in processes:
        process.start()
    try:
        reports = sorted(results.get(timeout=WAIT * 3) for _ in processes)
    finally:
        for process in processes:
            process.join(WAIT)
            if process.is_alive():
                process.kill()
                process.join(WAIT)
    assert reports == [(worker, 0) for worker in range(workers)]  # nobody saw a transition
    assert all(process.exitcode == 0 for process in processes)

    async def stored() -> BreakerState:
        client = Redis.from_url(redis_server.url)
        try:
            return await run(RedisBreakers(client, prefix).fetch_state("shared"))
        finally:
            await client.aclose()

    expected = expected_window(workers, rounds * in_flight)
    assert window_counts(asyncio.run(stored())) == expected
    assert expected[1] > 0  # failures and slow calls were among them
    assert expected[2] > 0


# -- Redis's own clock ---------------------------------------------------------------------------


async def test_the_server_clock_opens_the_breaker_and_times_its_reopening(
    breakers: RedisBreakers, client: Redis
) -> None:
    spec = circuit_breaker(open_for="30s")
    before = await server_time(client)
    assert await run(breakers.acquire(spec, None)) == Permit(True, 0.0, Circuit.CLOSED)
    assert await run(breakers.record(spec, None, failed=True, duration=FAST)) is None
    opened = await run(breakers.record(spec, None, failed=True, duration=FAST))
    assert opened is not None
    assert (opened.from_state, opened.to_state, opened.reason) == (
        Circuit.CLOSED,
        Circuit.OPEN,
        Reason.FAILURE_RATE,
    )
    refused = await run(breakers.acquire(spec, None))
    after = await server_time(client)

    assert before <= opened.at <= after
    assert (await run(breakers.fetch_state(spec.name))).since == opened.at
    assert not refused.permitted
    assert refused.circuit is Circuit.OPEN
    # Asked between opening and ``after``: the rest of open_for from then.
    assert 30.0 - (after - opened.at) <= refused.retry_after <= 30.0
    # The server's clock and a caller's wall clock agree on when it reopens.
    assert not (await run(breakers.acquire(spec, opened.at + 29.5))).permitted
    probe = await run(breakers.acquire(spec, opened.at + 30.0))
    assert probe.transition == Transition(
        Circuit.OPEN, Circuit.HALF_OPEN, Reason.OPEN_FOR_ELAPSED, opened.at + 30.0
    )


async def test_the_server_clock_fills_a_time_window(breakers: RedisBreakers, client: Redis) -> None:
    spec = circuit_breaker("{time: 60s}", minimum_calls=3, slow_call="{over: 1s, rate: 100%}")
    before = await server_time(client)
    for failed, duration in [(False, FAST), (True, SLOW), (False, SLOW)]:
        assert (await run(breakers.acquire(spec, None))).permitted
        assert await run(breakers.record(spec, None, failed=failed, duration=duration)) is None
    after = await server_time(client)

    state = await run(breakers.fetch_state(spec.name))
    assert isinstance(state.window, TimeWindow)
    assert (state.window.calls, state.window.failed, state.window.slow) == (3, 1, 2)
    seconds = [second for second, *_ in state.window.buckets]
    assert all(math.floor(before) <= second <= math.floor(after) for second in seconds)
    assert sum(calls for _, calls, _, _ in state.window.buckets) == 3


# -- what is stored ------------------------------------------------------------------------------


async def test_an_endless_open_for_and_awkward_floats_round_trip(breakers: RedisBreakers) -> None:
    spec = dataclasses.replace(circuit_breaker(), open_for=math.inf)
    now = 1_700_000_000.1 + 0.2  # not the double nearest any short decimal
    await run(breakers.record(spec, now, failed=True, duration=FAST))
    opened = await run(breakers.record(spec, now, failed=True, duration=FAST))
    assert opened is not None
    assert opened.at == now
    refused = await run(breakers.acquire(spec, now + 1e9))
    assert refused == Permit(False, math.inf, Circuit.OPEN)
    assert await run(breakers.fetch_state(spec.name)) == BreakerState(Circuit.OPEN, now, None, 0)


async def test_a_refusal_waits_exactly_until_the_circuit_reopens(
    breakers: RedisBreakers,
) -> None:
    spec = dataclasses.replace(circuit_breaker(), open_for=0.7)
    await run(breakers.record(spec, 0.1, failed=True, duration=FAST))
    await run(breakers.record(spec, 0.1, failed=True, duration=FAST))
    refused = await run(breakers.acquire(spec, 0.2))
    # 0.2 + (0.1 + 0.7 - 0.2) rounds below 0.1 + 0.7: the wait is one step longer.
    assert 0.2 + (0.1 + 0.7 - 0.2) < 0.1 + 0.7
    assert refused.retry_after == math.nextafter(0.1 + 0.7 - 0.2, math.inf)
    assert not (await run(breakers.acquire(spec, 0.2 + (0.1 + 0.7 - 0.2)))).permitted
    assert (await run(breakers.acquire(spec, 0.2 + refused.retry_after))).permitted


async def test_a_key_holding_something_else_counts_as_a_closed_breaker(
    breakers: RedisBreakers, client: Redis
) -> None:
    spec = circuit_breaker()
    key = breakers.key(spec.name)
    # What the JSON store kept under the same key: another type, replaced on the next write.
    await client.set(key, '{"t":"breaker","circuit":"open","since":100.0,"permits":0}')
    assert await run(breakers.fetch_state(spec.name)) == BreakerState()
    assert await run(breakers.acquire(spec, 110.0)) == Permit(True, 0.0, Circuit.CLOSED)
    assert await run(breakers.record(spec, 110.0, failed=True, duration=FAST)) is None
    assert await run(breakers.fetch_state(spec.name)) == BreakerState(
        Circuit.CLOSED, 0.0, CountWindow(1, 0b1, 0), 0
    )
    # A hash these scripts did not write.
    await client.delete(key)
    await client.hset(key, mapping={"circuit": "ajar", "since": "1"})
    assert await run(breakers.fetch_state(spec.name)) == BreakerState()
    assert await run(breakers.record(spec, 120.0, failed=False, duration=FAST)) is None
    assert await run(breakers.fetch_state(spec.name)) == BreakerState(
        Circuit.CLOSED, 0.0, CountWindow(1, 0, 0), 0
    )


async def test_release_hands_a_probe_back(breakers: RedisBreakers) -> None:
    spec = circuit_breaker(half_open_calls=1, open_for="1s")
    for _ in range(2):
        await run(breakers.record(spec, 10.0, failed=True, duration=FAST))
    assert (await run(breakers.acquire(spec, 11.0))).permitted  # the probe
    assert not (await run(breakers.acquire(spec, 11.5))).permitted
    assert await run(breakers.release(spec)) is None
    assert (await run(breakers.acquire(spec, 11.5))).permitted
    assert (await run(breakers.fetch_state(spec.name))).permits == 1


async def test_a_spec_without_a_window_is_refused_before_reaching_redis(
    breakers: RedisBreakers,
) -> None:
    spec = dataclasses.replace(circuit_breaker(), window=WindowSpec())
    with pytest.raises(ValueError, match=r"neither window\.calls nor window\.time"):
        breakers.record(spec, 1.0, failed=True, duration=FAST)
