from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from policy_engine.algorithms.breaker import (
    BreakerState,
    Circuit,
    CircuitBreaker,
    CircuitOpenError,
    CountWindow,
    Reason,
    TimeWindow,
    Transition,
    acquire,
    record,
    release,
    steady,
)
from policy_engine.algorithms.breaker import _record_closed as record_closed
from policy_engine.errors import PolicyEngineError
from policy_engine.language.model import (
    CircuitBreakerSpec,
    Expression,
    Mode,
    SlowCallSpec,
    WindowSpec,
)


class _Always:
    def evaluate(self, activation: Any) -> Any:
        return True


def breaker_spec(
    *,
    failure_rate: float = 0.5,
    calls: int | None = 10,
    time: float | None = None,
    minimum_calls: int = 10,
    open_for: float = 30.0,
    half_open_calls: int = 3,
    slow_call: SlowCallSpec | None = None,
) -> CircuitBreakerSpec:
    return CircuitBreakerSpec(
        name="agent-runtime",
        match=Expression("true", "error", _Always()),
        failure_rate=failure_rate,
        window=WindowSpec(calls=calls) if time is None else WindowSpec(time=time),
        minimum_calls=minimum_calls,
        open_for=open_for,
        half_open_calls=half_open_calls,
        mode=Mode.ENFORCE,
        slow_call=slow_call,
    )


def feed(
    spec: CircuitBreakerSpec,
    outcomes: str,
    state: BreakerState | None = None,
    now: float = 0.0,
    duration: float = 0.0,
) -> tuple[BreakerState, list[Transition]]:
    """Run calls through acquire and record: ``F`` fails, ``S`` succeeds, ``W`` is slow."""
    state = state or BreakerState()
    transitions: list[Transition] = []
    for outcome in outcomes:
        permit, state = acquire(spec, state, now)
        assert permit.permitted, f"call {outcome} refused in {state.circuit}"
        if permit.transition:
            transitions.append(permit.transition)
        took = spec.slow_call.over * 2 if spec.slow_call and outcome == "W" else duration
        state, transition = record(spec, state, now, failed=outcome == "F", duration=took)
        if transition:
            transitions.append(transition)
    return state, transitions


def opened(spec: CircuitBreakerSpec, at: float = 0.0) -> BreakerState:
    state, _ = feed(spec, "F" * (spec.window.calls or spec.minimum_calls), now=at)
    assert state.circuit is Circuit.OPEN
    return state


# -- CLOSED -> OPEN --------------------------------------------------------------------------


def test_failures_below_minimum_calls_keep_the_circuit_closed() -> None:
    state, transitions = feed(breaker_spec(minimum_calls=5), "FFFF")
    assert state.circuit is Circuit.CLOSED
    assert transitions == []


def test_the_circuit_opens_on_the_call_that_reaches_minimum_calls_at_the_threshold() -> None:
    spec = breaker_spec(failure_rate=0.5, minimum_calls=10)
    state, transitions = feed(spec, "SSSSSFFFF")  # 9 calls: not judged yet
    assert state.circuit is Circuit.CLOSED
    state, transitions = feed(spec, "F", state, now=7.0)  # 5 of 10: 50% >= 50%
    assert state.circuit is Circuit.OPEN
    assert transitions == [Transition(Circuit.CLOSED, Circuit.OPEN, Reason.FAILURE_RATE, 7.0)]


def test_a_failure_rate_below_the_threshold_keeps_the_circuit_closed() -> None:
    state, _ = feed(breaker_spec(failure_rate=0.5), "SSSSSSFFFF" + "S" * 20)
    assert state.circuit is Circuit.CLOSED


def test_minimum_calls_above_the_window_size_is_capped_at_the_size() -> None:
    state, _ = feed(breaker_spec(calls=4, minimum_calls=100, failure_rate=1.0), "FFFF")
    assert state.circuit is Circuit.OPEN


def test_the_count_window_remembers_only_the_last_calls() -> None:
    spec = breaker_spec(calls=3, minimum_calls=3, failure_rate=1.0)
    state, _ = feed(spec, "FSFF")  # the window is S F F
    assert state.circuit is Circuit.CLOSED
    assert state.window == CountWindow(calls=3, failed=0b011, slow=0)
    state, _ = feed(spec, "F", state)
    assert state.circuit is Circuit.OPEN


def test_the_slow_call_rate_opens_the_circuit() -> None:
    spec = breaker_spec(
        failure_rate=1.0, minimum_calls=4, calls=4, slow_call=SlowCallSpec(over=2.0, rate=0.5)
    )
    state, transitions = feed(spec, "SWSW")
    assert state.circuit is Circuit.OPEN
    assert transitions[-1].reason is Reason.SLOW_CALL_RATE


def test_a_call_lasting_exactly_the_slow_threshold_is_not_slow() -> None:
    spec = breaker_spec(
        failure_rate=1.0, minimum_calls=1, calls=1, slow_call=SlowCallSpec(over=2.0, rate=1.0)
    )
    state, _ = feed(spec, "S", duration=2.0)
    assert state.circuit is Circuit.CLOSED
    state, _ = feed(spec, "S", duration=math.nextafter(2.0, 3.0))
    assert state.circuit is Circuit.OPEN


def test_a_slow_failure_counts_as_failed_and_as_slow() -> None:
    spec = breaker_spec(calls=2, minimum_calls=2, slow_call=SlowCallSpec(over=1.0, rate=1.0))
    state, _ = feed(spec, "S", duration=0.5)
    _, transition = record(spec, state, 0.0, failed=True, duration=5.0)
    assert transition is not None
    assert transition.reason is Reason.FAILURE_RATE  # 1 of 2 failed: 50%; 1 of 2 slow: 50%
    spec_slow_only = breaker_spec(
        failure_rate=1.0, calls=1, minimum_calls=1, slow_call=SlowCallSpec(over=1.0, rate=1.0)
    )
    _, transition = record(spec_slow_only, BreakerState(), 0.0, failed=True, duration=5.0)
    assert transition is not None
    assert transition.reason is Reason.FAILURE_RATE


# -- time-based window -----------------------------------------------------------------------


def test_the_time_window_counts_calls_of_the_last_seconds() -> None:
    spec = breaker_spec(time=10.0, minimum_calls=4, failure_rate=0.5)
    state, _ = feed(spec, "FFF", now=0.5)
    state, transitions = feed(spec, "S", state, now=9.99)  # second 9: second 0 still inside
    assert state.circuit is Circuit.OPEN
    assert transitions[0].reason is Reason.FAILURE_RATE


def test_calls_older_than_the_time_window_age_out() -> None:
    spec = breaker_spec(time=10.0, minimum_calls=4, failure_rate=0.5)
    state, _ = feed(spec, "FFF", now=0.5)
    state, _ = feed(spec, "S", state, now=10.0)  # second 10: second 0 has left
    assert state.circuit is Circuit.CLOSED
    assert state.window == TimeWindow(((10, 1, 0, 0),), calls=1, failed=0, slow=0)


def test_the_time_window_aggregates_each_second_into_one_bucket() -> None:
    spec = breaker_spec(time=5.0, minimum_calls=100)
    state, _ = feed(spec, "FS", now=1.2)
    state, _ = feed(spec, "F", state, now=1.9)
    state, _ = feed(spec, "S", state, now=3.0)
    assert state.window == TimeWindow(((1, 3, 2, 0), (3, 1, 0, 0)), calls=4, failed=2, slow=0)


# -- OPEN ------------------------------------------------------------------------------------


def test_an_open_circuit_refuses_until_open_for_has_passed() -> None:
    spec = breaker_spec(open_for=30.0)
    state = opened(spec, at=100.0)
    for now in (100.0, 110.0, 129.999):
        permit, after = acquire(spec, state, now)
        assert not permit.permitted
        assert permit.retry_after == pytest.approx(130.0 - now)
        assert after is state


def test_the_first_call_after_open_for_is_a_half_open_probe() -> None:
    spec = breaker_spec(open_for=30.0)
    state = opened(spec, at=100.0)
    refused, state = acquire(spec, state, 101.25)
    permit, state = acquire(spec, state, 101.25 + refused.retry_after)
    assert permit.permitted
    assert permit.transition == Transition(
        Circuit.OPEN, Circuit.HALF_OPEN, Reason.OPEN_FOR_ELAPSED, 130.0
    )
    assert (state.circuit, state.permits) == (Circuit.HALF_OPEN, 1)


def test_outcomes_reported_while_open_change_nothing() -> None:
    spec = breaker_spec()
    state = opened(spec)
    assert record(spec, state, 1.0, failed=False, duration=0.0) == (state, None)


# -- HALF_OPEN -------------------------------------------------------------------------------


def test_half_open_permits_exactly_half_open_calls() -> None:
    spec = breaker_spec(half_open_calls=3)
    state = opened(spec)
    permits = []
    for _ in range(5):
        permit, state = acquire(spec, state, spec.open_for)
        permits.append(permit.permitted)
    assert permits == [True, True, True, False, False]
    refused, _ = acquire(spec, state, spec.open_for)
    assert refused.circuit is Circuit.HALF_OPEN
    assert refused.retry_after == spec.open_for


def test_probes_without_a_verdict_for_open_for_are_lost_and_a_new_round_begins() -> None:
    spec = breaker_spec(half_open_calls=1)
    state = opened(spec)
    probe, state = acquire(spec, state, spec.open_for)  # its process dies: no verdict ever
    waiting, state = acquire(spec, state, spec.open_for + 1)
    again, state = acquire(spec, state, 2 * spec.open_for)

    assert probe.permitted
    assert not waiting.permitted
    assert waiting.retry_after == spec.open_for - 1  # until the lost probe's lease ends
    assert again.permitted
    assert (state.circuit, state.since, state.permits) == (Circuit.HALF_OPEN, 2 * spec.open_for, 1)


def test_half_open_decides_only_when_every_probe_has_reported() -> None:
    spec = breaker_spec(half_open_calls=3)
    state = opened(spec)
    for _ in range(3):
        _, state = acquire(spec, state, 30.0)
    state, transition = record(spec, state, 31.0, failed=False, duration=0.1)
    state, transition = record(spec, state, 31.0, failed=False, duration=0.1)
    assert (state.circuit, transition) == (Circuit.HALF_OPEN, None)
    state, transition = record(spec, state, 32.0, failed=True, duration=0.1)
    assert state.circuit is Circuit.CLOSED  # 1 of 3 below 50%
    assert transition == Transition(
        Circuit.HALF_OPEN, Circuit.CLOSED, Reason.PROBES_SUCCEEDED, 32.0
    )


def test_failing_probes_open_the_circuit_again_for_open_for() -> None:
    spec = breaker_spec(half_open_calls=2, open_for=30.0)
    state = opened(spec)
    state, transitions = feed(spec, "SF", state, now=40.0)
    assert state.circuit is Circuit.OPEN
    assert transitions[-1] == Transition(Circuit.HALF_OPEN, Circuit.OPEN, Reason.FAILURE_RATE, 40.0)
    permit, _ = acquire(spec, state, 69.0)
    assert not permit.permitted
    assert permit.retry_after == pytest.approx(1.0)


def test_closing_after_probes_starts_with_an_empty_window() -> None:
    spec = breaker_spec(calls=4, minimum_calls=4, half_open_calls=1)
    state = opened(spec)
    state, _ = feed(spec, "S", state, now=30.0)
    assert state == BreakerState(Circuit.CLOSED, 30.0, None, 0)
    state, _ = feed(spec, "FFF", state, now=31.0)
    assert state.circuit is Circuit.CLOSED


def test_a_released_probe_can_be_handed_out_again() -> None:
    spec = breaker_spec(half_open_calls=1)
    _, state = acquire(spec, opened(spec), 30.0)
    assert not acquire(spec, state, 30.0)[0].permitted
    state = release(state)
    assert acquire(spec, state, 30.0)[0].permitted


def test_releasing_outside_half_open_changes_nothing() -> None:
    state = BreakerState()
    assert release(state) is state


def test_a_window_of_another_kind_starts_over_after_a_reload() -> None:
    spec = breaker_spec(calls=2, minimum_calls=2, failure_rate=1.0)
    stale = BreakerState(window=TimeWindow(((0, 50, 50, 0),), 50, 50, 0))
    state, transition = record(spec, stale, 0.5, failed=True, duration=0.0)
    assert transition is None
    assert state.window == CountWindow(1, 1, 0)


# -- the state machine against a plain model -------------------------------------------------


@dataclass
class Model:
    """Resilience4j's rules over plain lists, to hold the compact implementation to."""

    spec: CircuitBreakerSpec
    circuit: Circuit = Circuit.CLOSED
    since: float = 0.0
    outcomes: list[tuple[float, bool, bool]] = field(default_factory=list)
    probes: list[tuple[bool, bool]] = field(default_factory=list)
    permits: int = 0

    def window(self, now: float) -> list[tuple[float, bool, bool]]:
        if self.spec.window.calls is not None:
            return self.outcomes[-self.spec.window.calls :]
        seconds = math.ceil(self.spec.window.time or 0)
        return [o for o in self.outcomes if math.floor(o[0]) > math.floor(now) - seconds]

    def above(self, calls: list[tuple[bool, bool]], minimum: int) -> bool:
        if not calls or len(calls) < minimum:
            return False
        failed = sum(f for f, _ in calls) / len(calls)
        slow = sum(s for _, s in calls) / len(calls)
        spec = self.spec
        return failed >= spec.failure_rate or (
            spec.slow_call is not None and slow >= spec.slow_call.rate
        )

    def acquire(self, now: float) -> bool:
        if self.circuit is Circuit.OPEN and now >= self.since + self.spec.open_for:
            self.circuit, self.since, self.probes, self.permits = Circuit.HALF_OPEN, now, [], 0
        probes_lost = self.permits >= self.spec.half_open_calls and (
            now >= self.since + self.spec.open_for
        )
        if self.circuit is Circuit.HALF_OPEN and probes_lost:
            self.since, self.probes, self.permits = now, [], 0  # a new round of probes
        if self.circuit is Circuit.HALF_OPEN and self.permits < self.spec.half_open_calls:
            self.permits += 1
            return True
        return self.circuit is Circuit.CLOSED

    def record(self, now: float, failed: bool, slow: bool) -> None:
        if self.circuit is Circuit.CLOSED:
            self.outcomes.append((now, failed, slow))
            window = self.window(now)
            minimum = self.spec.minimum_calls
            if self.spec.window.calls is not None:
                minimum = min(minimum, self.spec.window.calls)
            if self.above([(f, s) for _, f, s in window], minimum):
                self.circuit, self.since, self.outcomes = Circuit.OPEN, now, []
        elif self.circuit is Circuit.HALF_OPEN:
            self.probes.append((failed, slow))
            if len(self.probes) == self.spec.half_open_calls:
                reopen = self.above(self.probes, len(self.probes))
                self.circuit = Circuit.OPEN if reopen else Circuit.CLOSED
                self.since, self.outcomes = now, []


ALLOWED = {
    (Circuit.CLOSED, Circuit.OPEN),
    (Circuit.OPEN, Circuit.HALF_OPEN),
    (Circuit.HALF_OPEN, Circuit.CLOSED),
    (Circuit.HALF_OPEN, Circuit.OPEN),
}


class BreakerMachine(RuleBasedStateMachine):
    @initialize(
        window=st.one_of(
            st.builds(lambda n: (n, None), st.integers(1, 6)),
            st.builds(lambda t: (None, float(t)), st.integers(1, 5)),
        ),
        failure_rate=st.sampled_from([0.2, 0.5, 1.0]),
        minimum_calls=st.integers(1, 6),
        half_open_calls=st.integers(1, 3),
        slow=st.none() | st.sampled_from([0.3, 0.6, 1.0]),
    )
    def setup(
        self,
        window: tuple[int | None, float | None],
        failure_rate: float,
        minimum_calls: int,
        half_open_calls: int,
        slow: float | None,
    ) -> None:
        self.spec = breaker_spec(
            calls=window[0],
            time=window[1],
            failure_rate=failure_rate,
            minimum_calls=minimum_calls,
            open_for=5.0,
            half_open_calls=half_open_calls,
            slow_call=None if slow is None else SlowCallSpec(over=1.0, rate=slow),
        )
        self.model = Model(self.spec)
        self.state = BreakerState()
        self.now = 0.0
        self.in_flight = 0
        self.opened_at = -math.inf

    @rule(seconds=st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.5, 4.999, 5.0, 7.0]))
    def wait(self, seconds: float) -> None:
        self.now += seconds

    @rule()
    def call(self) -> None:
        before = self.state.circuit
        permit, self.state = acquire(self.spec, self.state, self.now)
        assert permit.permitted == self.model.acquire(self.now)
        if before is Circuit.OPEN and self.now < self.opened_at + self.spec.open_for:
            assert not permit.permitted
        self.check_transition(before, permit.transition)
        if permit.permitted:
            self.in_flight += 1

    @precondition(lambda self: self.in_flight > 0)
    @rule(failed=st.booleans(), slow=st.booleans())
    def finish(self, failed: bool, slow: bool) -> None:
        before = self.state.circuit
        self.in_flight -= 1
        duration = 2.0 if slow else 0.5
        self.state, transition = record(
            self.spec, self.state, self.now, failed=failed, duration=duration
        )
        self.model.record(self.now, failed, slow and self.spec.slow_call is not None)
        self.check_transition(before, transition)

    def check_transition(self, before: Circuit, transition: Transition | None) -> None:
        if transition is None:
            assert self.state.circuit is before
            return
        assert (transition.from_state, transition.to_state) in ALLOWED
        assert (before, self.state.circuit) == (transition.from_state, transition.to_state)
        assert transition.at == self.now
        if transition.to_state is Circuit.OPEN:
            self.opened_at = self.now
        if transition.from_state is Circuit.OPEN:
            assert self.now >= self.opened_at + self.spec.open_for

    @invariant()
    def agrees_with_the_model(self) -> None:
        if hasattr(self, "model"):
            assert self.state.circuit is self.model.circuit
            if self.state.circuit is Circuit.HALF_OPEN:
                assert self.state.permits == self.model.permits
                assert self.state.permits <= self.spec.half_open_calls


BreakerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
test_breaker_follows_the_resilience4j_state_machine = BreakerMachine.TestCase


# -- the context manager ---------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class BoomError(Exception):
    pass


async def test_the_context_manager_records_failures_and_then_refuses() -> None:
    clock = FakeClock()
    seen: list[Transition] = []
    breaker = CircuitBreaker(
        breaker_spec(calls=2, minimum_calls=2, open_for=10.0),
        clock=clock,
        on_transition=[seen.append],
    )
    for _ in range(2):
        with pytest.raises(BoomError):
            async with breaker:
                raise BoomError
    assert breaker.circuit is Circuit.OPEN
    clock.now = 4.0
    with pytest.raises(CircuitOpenError) as refused:
        async with breaker:
            pytest.fail("an open circuit must not run the block")
    assert refused.value.retry_after == pytest.approx(6.0)
    assert isinstance(refused.value, PolicyEngineError)
    assert [t.to_state for t in seen] == [Circuit.OPEN]


async def test_the_context_manager_measures_durations_with_its_clock() -> None:
    clock = FakeClock()
    spec = breaker_spec(
        calls=1, minimum_calls=1, failure_rate=1.0, slow_call=SlowCallSpec(over=2.0, rate=1.0)
    )
    breaker = CircuitBreaker(spec, clock=clock)
    async with breaker:
        clock.now += 1.0
    assert breaker.circuit is Circuit.CLOSED
    async with breaker:
        clock.now += 3.0
    assert breaker.state.circuit is Circuit.OPEN


async def test_a_probe_that_succeeds_closes_the_circuit_and_notifies_listeners() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(
        breaker_spec(calls=1, minimum_calls=1, open_for=5.0, half_open_calls=1), clock=clock
    )
    seen: list[Transition] = []
    breaker.on_transition(seen.append)
    with pytest.raises(BoomError):
        async with breaker:
            raise BoomError
    clock.now = 5.0
    async with breaker:
        pass
    assert breaker.circuit is Circuit.CLOSED
    assert [(t.from_state, t.to_state) for t in seen] == [
        (Circuit.CLOSED, Circuit.OPEN),
        (Circuit.OPEN, Circuit.HALF_OPEN),
        (Circuit.HALF_OPEN, Circuit.CLOSED),
    ]


async def test_cancellation_and_ignored_errors_hand_back_the_probe() -> None:
    clock = FakeClock()
    spec = breaker_spec(calls=1, minimum_calls=1, open_for=5.0, half_open_calls=1)
    breaker = CircuitBreaker(
        spec, clock=clock, is_failure=lambda error: not isinstance(error, KeyError)
    )
    with pytest.raises(BoomError):
        async with breaker:
            raise BoomError
    clock.now = 5.0
    with pytest.raises(asyncio.CancelledError):
        async with breaker:
            raise asyncio.CancelledError
    with pytest.raises(KeyError):
        async with breaker:
            raise KeyError("not the dependency's fault")
    assert (breaker.circuit, breaker.state.permits) == (Circuit.HALF_OPEN, 0)
    async with breaker:
        pass
    assert breaker.circuit is Circuit.CLOSED


async def test_concurrent_calls_each_time_their_own_duration() -> None:
    clock = FakeClock()
    spec = breaker_spec(
        calls=3, minimum_calls=3, failure_rate=1.0, slow_call=SlowCallSpec(over=2.0, rate=1.0)
    )
    breaker = CircuitBreaker(spec, clock=clock)
    slow_started = asyncio.Event()
    fast_done = asyncio.Event()

    async def slow_call() -> None:
        async with breaker:
            slow_started.set()
            await fast_done.wait()
            clock.now = 10.0  # started at 0: slow

    async def fast_call() -> None:
        await slow_started.wait()
        clock.now = 9.0
        async with breaker:
            clock.now = 9.5  # started at 9: fast
        fast_done.set()

    await asyncio.gather(slow_call(), fast_call())
    window = breaker.state.window
    assert isinstance(window, CountWindow)
    assert window.calls == 2
    assert window.slow == 0b01  # the newest, the call that started first, was slow


@settings(max_examples=300)
@given(
    size=st.integers(1, 8),
    failed=st.sampled_from([0, 0, 1, 6, 255]),
    slow=st.sampled_from([0, 0, 2, 255]),
    calls=st.none() | st.integers(0, 8),
    permits=st.sampled_from([0, 0, 1]),
    failure_rate=st.sampled_from([0.0, 0.2, 0.5, 1.0]),
    slow_rate=st.none() | st.sampled_from([0.0, 0.5, 1.0]),
    minimum_calls=st.integers(1, 10),
    circuit=st.sampled_from([Circuit.CLOSED, Circuit.CLOSED, Circuit.HALF_OPEN]),
)
def test_a_steady_breaker_is_left_as_the_windows_arithmetic_would_leave_it(
    *,
    size: int,
    failed: int,
    slow: int,
    calls: int | None,
    permits: int,
    failure_rate: float,
    slow_rate: float | None,
    minimum_calls: int,
    circuit: Circuit,
) -> None:
    """``record`` skips the window for a fast success in a steady state: only where the
    general step gives back the very same window and no reason to open."""
    spec = breaker_spec(
        failure_rate=failure_rate,
        calls=size,
        minimum_calls=minimum_calls,
        slow_call=None if slow_rate is None else SlowCallSpec(over=1.0, rate=slow_rate),
    )
    mask = (1 << size) - 1
    window = CountWindow(size if calls is None else min(calls, size), failed & mask, slow & mask)
    state = BreakerState(circuit, 3.0, window, permits)
    if steady(spec, state):
        assert record_closed(spec, window, 10.0, False, False) == (window, None)
        assert record(spec, state, 10.0, failed=False, duration=0.5) == (state, None)


def test_a_closed_breaker_fed_only_fast_successes_becomes_steady() -> None:
    spec = breaker_spec(calls=4, minimum_calls=2)
    state, _ = feed(spec, "SSS")
    assert not steady(spec, state)  # the window is not full yet
    state, _ = feed(spec, "S", state)
    assert steady(spec, state)
    assert record(spec, state, 1.0, failed=False, duration=0.0) == (state, None)
    failing, _ = feed(spec, "F", state)
    assert not steady(spec, failing)
    assert not steady(breaker_spec(calls=4, failure_rate=0.0), state)
