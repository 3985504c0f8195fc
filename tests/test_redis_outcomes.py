"""Breaker outcomes recorded together through the Redis store: one script per breaker per
pass of the loop, each caller its own transition, nothing lost."""

from __future__ import annotations

import asyncio
import contextlib
from uuid import uuid4

from redis_server import RedisServer

from policy_engine.algorithms.breaker import Circuit, CountWindow
from policy_engine.compiler.pipeline import compile_text
from policy_engine.language.model import CircuitBreakerSpec
from policy_engine.state.redis_store import RedisStore

POLICY = """
version: 1
circuit_breakers:
  - {name: backend, match: 'event.name == "call"', failure_rate: 50%,
     window: {calls: 100}, minimum_calls: 10, open_for: 30s, half_open_calls: 1}
"""


def backend() -> CircuitBreakerSpec:
    return compile_text(POLICY).policy.circuit_breakers[0]


def test_outcomes_of_one_pass_are_one_script_and_the_opening_one_gets_the_transition(
    redis_server: RedisServer,
) -> None:
    spec = backend()

    async def record() -> tuple[list[object], int, int, object]:
        store = RedisStore(redis_server.url, prefix=f"t-{uuid4().hex}")
        pipeline = store._pipeline
        try:
            await store.breaker_record(spec, 0.0, failed=False, duration=0.01)  # loads it
            calls = pipeline.calls
            # 9 more successes, then failures: the 20th outcome makes it 10 of 20, 50%.
            outcomes = [False] * 9 + [True] * 15
            transitions = await asyncio.gather(
                *(store.breaker_record(spec, 0.0, failed=f, duration=0.01) for f in outcomes)
            )
            sent = pipeline.calls - calls
            state = await store.fetch_breaker_state("backend")
            return transitions, sent, len(outcomes), state
        finally:
            await store.close()

    transitions, calls, recorded, state = asyncio.run(record())
    assert calls == 1  # 24 outcomes, one script
    opened = [at for at, transition in enumerate(transitions) if transition is not None]
    assert opened == [18]  # the 20th outcome in all (one before the batch)
    assert transitions[18].to_state is Circuit.OPEN  # type: ignore[union-attr]
    assert recorded == 24
    assert state.circuit is Circuit.OPEN  # type: ignore[attr-defined]


def test_an_outcome_whose_caller_stopped_waiting_is_recorded_all_the_same(
    redis_server: RedisServer,
) -> None:
    spec = backend()

    async def record() -> object:
        store = RedisStore(redis_server.url, prefix=f"t-{uuid4().hex}")
        try:
            for failed in (True, False, True):
                waiting = asyncio.ensure_future(
                    store.breaker_record(spec, 0.0, failed=failed, duration=0.01)
                )
                await asyncio.sleep(0)  # queued in this pass's batch
                waiting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiting
            for _ in range(100):
                state = await store.fetch_breaker_state("backend")
                if isinstance(state.window, CountWindow) and state.window.calls == 3:
                    break
                await asyncio.sleep(0.01)
            return state
        finally:
            await store.close()

    state = asyncio.run(record())
    assert isinstance(state.window, CountWindow)  # type: ignore[attr-defined]
    assert state.window.calls == 3  # type: ignore[attr-defined]
    assert state.window.failed.bit_count() == 2  # type: ignore[attr-defined]


def test_outcomes_recorded_just_before_a_close_are_kept(redis_server: RedisServer) -> None:
    """A close in the same pass as some outcomes sends them first (none is lost, and none
    goes out on a connection reopened after the close)."""
    spec = backend()
    prefix = f"t-{uuid4().hex}"
    reopened: list[bool] = []

    async def record_then_close() -> object:
        store = RedisStore(redis_server.url, prefix=prefix)
        await store.fetch_breaker_state("backend")  # connected
        waiting = [
            asyncio.ensure_future(store.breaker_record(spec, 0.0, failed=f, duration=0.01))
            for f in (True, False, False)
        ]
        await asyncio.sleep(0)  # queued for the next pass
        await store.close()
        await asyncio.gather(*waiting, return_exceptions=True)
        await asyncio.sleep(0.05)  # anything still to send would be on its way by now
        wire = store._wire
        assert wire is not None
        reopened.append(wire._protocol is not None or wire._connecting is not None)
        reader = RedisStore(redis_server.url, prefix=prefix)
        try:
            return await reader.fetch_breaker_state("backend")
        finally:
            await reader.close()

    state = asyncio.run(record_then_close())
    assert reopened == [False]  # nothing was sent after the close
    assert isinstance(state.window, CountWindow)  # type: ignore[attr-defined]
    assert state.window.calls == 3  # type: ignore[attr-defined]
