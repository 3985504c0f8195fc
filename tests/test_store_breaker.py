"""The breaker on the shared store: during an outage no decision waits for Redis, and the
first answer after it closes the breaker by itself."""

from __future__ import annotations

import asyncio

from redis_server import RedisServer
from servers import eventually

from policy_engine.compiler.pipeline import compile_text
from policy_engine.errors import StoreError
from policy_engine.language.model import StoreFailureMode
from policy_engine.state.guarded import STORE_REFUSED, GuardedStore, store_refused
from policy_engine.state.redis_store import RedisStore
from policy_engine.state.store_breaker import StoreBreaker

LIMITS = compile_text(
    """
version: 1
rate_limits:
  - {name: shared, hook: connect, key: conn.ip, limit: 100/minute}
circuit_breakers:
  - {name: agent, match: 'event.name == "call"', failure_rate: 50%, window: {calls: 4},
     minimum_calls: 4, open_for: 30s, half_open_calls: 2}
"""
).policy


async def test_a_hung_redis_opens_the_breaker_and_decisions_stop_reaching_it(
    own_redis_server: RedisServer,
) -> None:
    store = RedisStore(own_redis_server.url, prefix="breaker", socket_timeout=0.2)
    state = GuardedStore(store)
    state.configure(timeout=0.1, on_error=StoreFailureMode.FAIL_CLOSED)
    limit, breaker_spec = LIMITS.rate_limits[0], LIMITS.circuit_breakers[0]
    checks = [(limit, "ip1")]
    try:
        assert (await state.rates(checks, 0.0)).allowed
        own_redis_server.pause()  # SIGSTOP: connections stay open, nothing answers
        failed = [await state.rates(checks, 0.0) for _ in range(3)]
        assert state.breaker is not None
        await eventually(lambda: state.breaker is not None and state.breaker.is_open)
        assert state.breaker.is_open
        sent = store._pipeline.calls
        during = [await state.rates(checks, 0.0) for _ in range(20)]
        permit = await state.permit(breaker_spec, 0.0)
        assert store._pipeline.calls == sent
        own_redis_server.resume()
        await eventually(lambda: state.breaker is not None and not state.breaker.is_open)
        after = await state.rates(checks, 0.0)
    finally:
        own_redis_server.resume()
        await state.close()

    assert all(store_refused(decision) for decision in failed + during)
    assert permit is STORE_REFUSED
    assert after.allowed
    assert not store_refused(after)
    assert state.health.available


async def test_late_calls_with_redis_answering_the_probe_leave_it_closed() -> None:
    """Three failures make the store suspect; a probe that answers clears it, so a busy
    moment of this process's own loop is not an outage."""
    probes: list[bool] = []

    async def probe() -> None:
        probes.append(True)

    breaker = StoreBreaker(probe, threshold=3, probe_interval=0.01)
    late = TimeoutError("late")
    breaker.failed(late)
    breaker.failed(late)
    breaker.answered()  # a success in between starts the count again
    breaker.failed(late)
    breaker.failed(late)
    assert probes == []
    breaker.failed(late)
    await eventually(lambda: probes == [True])
    await asyncio.sleep(0.05)
    assert not breaker.is_open
    assert breaker.opened == 0
    await breaker.close()


async def test_it_opens_when_the_probe_fails_too_and_closes_when_one_answers() -> None:
    down = [True]
    told: list[str] = []

    async def probe() -> None:
        if down[0]:
            raise StoreError("still down")

    breaker = StoreBreaker(
        probe,
        threshold=1,
        probe_interval=0.01,
        on_open=lambda error: told.append(f"open: {error}"),
        on_close=lambda: told.append("closed"),
    )
    breaker.failed(ConnectionError("refused"))
    await eventually(lambda: breaker.is_open)
    await asyncio.sleep(0.05)  # several probes, all failing
    assert breaker.is_open
    down[0] = False
    await eventually(lambda: not breaker.is_open)
    assert told == ["open: refused", "closed"]
    await breaker.close()


async def test_limits_and_permit_asked_together_follow_each_failure_mode_of_the_policy(
    own_redis_server: RedisServer,
) -> None:
    """The one call for an event's limits and permit, Redis hung: ``fail_closed`` refuses as
    the store being unavailable (and no permit); ``fail_open`` admits, unguarded;
    ``local`` judges the limits in this process, unguarded; answers again once it is back."""
    limit, breaker_spec = LIMITS.rate_limits[0], LIMITS.circuit_breakers[0]
    checks = [(limit, "ip1")]
    answers = {}
    guarded_only = {}  # the permit when only shadow limits were asked beside it
    for mode in StoreFailureMode:
        store = RedisStore(
            own_redis_server.url, prefix=f"together-{mode.value}", socket_timeout=0.2
        )
        state = GuardedStore(store)
        state.configure(timeout=0.1, on_error=mode)
        try:
            healthy = await state.rates_then_permit(checks, [checks], breaker_spec, 0.0)
            own_redis_server.pause()
            try:
                hung = await state.rates_then_permit(checks, [checks], breaker_spec, 0.0)
                shadow_only = await state.rates_then_permit([], [checks], breaker_spec, 0.0)
            finally:
                own_redis_server.resume()
            await eventually(lambda s=state: s.breaker is not None and not s.breaker.is_open)
            again = await state.rates_then_permit(checks, [checks], breaker_spec, 0.0)
        finally:
            await state.close()
        answers[mode] = (healthy, hung, again)
        guarded_only[mode] = shadow_only[2]

    for healthy, _, again in answers.values():
        for decision, shadows, permit in (healthy, again):
            assert decision.allowed
            assert shadows[0].allowed
            assert not store_refused(decision)
            assert permit is not None
            assert permit.permitted
    closed_decision, closed_shadows, closed_permit = answers[StoreFailureMode.FAIL_CLOSED][1]
    assert store_refused(closed_decision)
    assert not closed_decision.allowed
    assert store_refused(closed_shadows[0])
    assert closed_permit is None  # refused: no permit to hold
    open_decision, _, open_permit = answers[StoreFailureMode.FAIL_OPEN][1]
    assert open_decision.allowed
    assert open_permit is None
    local_decision, local_shadows, local_permit = answers[StoreFailureMode.LOCAL][1]
    assert local_decision.allowed
    assert not store_refused(local_decision)
    assert local_decision.decision is not None  # judged here, by the local limit
    assert local_shadows[0].decision is not None
    assert local_permit is None
    # Nothing enforced to refuse the event: the breaker's permit follows the mode.
    assert guarded_only[StoreFailureMode.FAIL_CLOSED] is STORE_REFUSED
    assert guarded_only[StoreFailureMode.FAIL_OPEN] is None
    assert guarded_only[StoreFailureMode.LOCAL] is None


MIXED = compile_text(
    """
version: 1
rate_limits:
  - {name: own, hook: connect, key: conn.ip, limit: 1/minute, scope: local}
  - {name: own-watch, hook: connect, key: conn.ip, limit: 1/minute, scope: local, mode: shadow}
  - {name: shared-watch, hook: connect, key: conn.ip, limit: 100/minute, mode: shadow}
circuit_breakers:
  - {name: agent, match: 'event.name == "call"', failure_rate: 50%, window: {calls: 4},
     minimum_calls: 4, open_for: 30s, half_open_calls: 2}
"""
).policy


async def test_own_and_shared_limits_asked_together_are_each_judged_where_they_live(
    own_redis_server: RedisServer,
) -> None:
    """This process's own limits are judged here (a refusal of the enforced one asks the
    store for no permit), the shared shadow limit in Redis, in the same call as the permit."""
    own, own_watch, shared_watch = MIXED.rate_limits
    breaker_spec = MIXED.circuit_breakers[0]
    store = RedisStore(own_redis_server.url, prefix="mixed", socket_timeout=0.5)
    state = GuardedStore(store)
    state.configure(timeout=2.0, on_error=StoreFailureMode.FAIL_CLOSED)
    shadows = [[(own_watch, "ip1")], [(shared_watch, "ip1")]]
    try:
        first = await state.rates_then_permit([(own, "ip1")], shadows, breaker_spec, 0.0)
        await state.rates([(shared_watch, "other")], 0.0)  # its script loaded: no reload counted
        calls = store._pipeline.calls
        second = await state.rates_then_permit([(own, "ip1")], shadows, breaker_spec, 0.0)
        asked_again = store._pipeline.calls - calls
    finally:
        await state.close()

    decision, (mine, theirs), permit = first
    assert decision.allowed
    assert (mine.rule, theirs.rule) == ("own-watch", "shared-watch")
    assert mine.allowed
    assert theirs.allowed
    assert permit is not None
    assert permit.permitted
    decision, (mine, theirs), permit = second
    assert not decision.allowed  # this process's own limit: one a minute
    assert decision.rule == "own"
    assert not mine.allowed
    assert theirs.allowed  # the shared shadow limit was still asked, and admits
    assert theirs.decision is not None
    assert theirs.decision.remaining == 98
    assert permit is None
    assert asked_again == 1  # the shared shadow alone: no permit asked
