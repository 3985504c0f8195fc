from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from fractions import Fraction
from types import SimpleNamespace
from typing import Any
from unittest import mock

import limits.storage.memory
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from limits import RateLimitItemPerSecond
from limits.storage import MemoryStorage
from limits.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter

from policy_engine.algorithms.ratelimit import (
    FixedWindowState,
    GcraState,
    RateDecision,
    RateState,
    SlidingLogState,
    admit,
    capacity,
    check,
    check_all,
    combine,
    expires_at,
)
from policy_engine.language.contexts import Hook
from policy_engine.language.model import Expression, Mode, RateAlgorithm, RateLimitSpec, Scope
from policy_engine.language.units import Rate

EPSILON = 1e-6


class _Constant:
    def evaluate(self, activation: Any) -> Any:
        return "key"


def limit_spec(
    algorithm: RateAlgorithm, limit: int, period: float, burst: int = 0, name: str = "rule"
) -> RateLimitSpec:
    return RateLimitSpec(
        name=name,
        hook=Hook.EVENT,
        key=Expression("'key'", "event", _Constant()),
        rate=Rate(limit, period),
        burst=burst,
        algorithm=algorithm,
        scope=Scope.LOCAL,
        mode=Mode.ENFORCE,
    )


def largest_cost(spec: RateLimitSpec) -> int:
    return capacity(spec) if spec.algorithm is RateAlgorithm.GCRA else spec.rate.limit


Step = tuple[float, int, RateDecision, RateState | None, RateState]
"""(now, cost, decision, state before, state after)"""


def run(spec: RateLimitSpec, arrivals: Sequence[tuple[float, int]]) -> list[Step]:
    steps: list[Step] = []
    state: RateState | None = None
    for now, cost in arrivals:
        decision, new = check(spec, state, now, cost)
        steps.append((now, cost, decision, state, new))
        state = new
    return steps


@st.composite
def arrivals(
    draw: st.DrawFn, max_cost: int = 3, grid: bool = True, max_size: int = 60
) -> list[tuple[float, int]]:
    """Sorted arrival times with costs; on a millisecond grid, so boundaries are hit exactly."""
    gaps = draw(
        st.lists(
            st.integers(min_value=0, max_value=1500)
            if grid
            else st.floats(min_value=0.0, max_value=1.5, allow_nan=False),
            min_size=1,
            max_size=max_size,
        )
    )
    costs = draw(st.lists(st.integers(1, max_cost), min_size=len(gaps), max_size=len(gaps)))
    times: list[float] = []
    total = 0.0
    for gap in gaps:
        total += gap / 1000 if grid else gap
        times.append(round(total, 3) if grid else total)
    return list(zip(times, costs, strict=True))


@st.composite
def specs(draw: st.DrawFn, algorithm: RateAlgorithm) -> RateLimitSpec:
    limit = draw(st.integers(min_value=1, max_value=8))
    period = draw(st.sampled_from([0.1, 0.25, 1.0, 1.5, 2.0, 3.0]))
    burst = draw(st.integers(min_value=1, max_value=8)) if algorithm is RateAlgorithm.GCRA else 0
    return limit_spec(algorithm, limit, period, burst)


all_specs = st.sampled_from(RateAlgorithm).flatmap(specs)


# -- the bounds each algorithm promises ------------------------------------------------------


@given(specs(RateAlgorithm.GCRA), arrivals())
def test_gcra_admits_at_most_burst_plus_one_per_interval_in_any_window(
    spec: RateLimitSpec, trace: list[tuple[float, int]]
) -> None:
    interval = spec.rate.period / spec.rate.limit
    admitted = [(now, cost) for now, cost, decision, _, _ in run(spec, trace) if decision.allowed]
    for i, (start, _) in enumerate(admitted):
        total = 0
        for end, cost in admitted[i:]:
            total += cost
            # 1e-9 absorbs the rounding of this measurement, not of the algorithm
            assert total <= math.floor((end - start) / interval + 1e-9) + spec.burst


@given(specs(RateAlgorithm.SLIDING_WINDOW), arrivals())
def test_sliding_window_admits_at_most_limit_in_any_window_of_one_period(
    spec: RateLimitSpec, trace: list[tuple[float, int]]
) -> None:
    admitted = [(now, cost) for now, cost, decision, _, _ in run(spec, trace) if decision.allowed]
    for end, _ in admitted:
        # t is inside the window ending at `end` while end < t + period, as documented
        inside = sum(cost for t, cost in admitted if t <= end < t + spec.rate.period)
        assert inside <= spec.rate.limit


@given(specs(RateAlgorithm.FIXED_WINDOW), arrivals())
def test_fixed_window_admits_at_most_limit_per_aligned_window(
    spec: RateLimitSpec, trace: list[tuple[float, int]]
) -> None:
    per_window: dict[int, int] = {}
    for now, cost, decision, _, _ in run(spec, trace):
        if decision.allowed:
            window = math.floor(now / spec.rate.period)
            per_window[window] = per_window.get(window, 0) + cost
    assert all(total <= spec.rate.limit for total in per_window.values())


# -- retry_after, remaining, expiry ----------------------------------------------------------


@given(all_specs, arrivals())
def test_a_refused_request_passes_exactly_after_retry_after(
    spec: RateLimitSpec, trace: list[tuple[float, int]]
) -> None:
    for now, cost, decision, before, after in run(spec, trace):
        if decision.allowed:
            assert decision.retry_after == 0.0
            continue
        assert after is before or before is None
        if cost > largest_cost(spec):
            assert decision.retry_after == math.inf
            continue
        retry = decision.retry_after
        assert retry > 0
        assert check(spec, before, now + retry, cost)[0].allowed
        if retry > EPSILON:
            assert not check(spec, before, now + retry - EPSILON, cost)[0].allowed


@given(all_specs, arrivals(), st.floats(min_value=0.0, max_value=5.0))
def test_a_state_past_its_expiry_behaves_as_no_state(
    spec: RateLimitSpec, trace: list[tuple[float, int]], later: float
) -> None:
    for now, cost, _, _, after in run(spec, trace):
        moment = max(now, expires_at(spec, after)) + later
        assert check(spec, after, moment, cost)[0] == check(spec, None, moment, cost)[0]


@given(all_specs, arrivals())
def test_remaining_counts_exactly_the_requests_that_would_still_pass(
    spec: RateLimitSpec, trace: list[tuple[float, int]]
) -> None:
    for now, _, decision, _, after in run(spec, trace):
        for cost in range(1, decision.remaining + 2):
            passes = check(spec, after, now, cost)[0].allowed
            assert passes == (cost <= decision.remaining)


@given(all_specs, arrivals())
def test_reset_after_is_the_time_until_the_state_expires(
    spec: RateLimitSpec, trace: list[tuple[float, int]]
) -> None:
    for now, _, decision, _, after in run(spec, trace):
        if decision.allowed:
            assert decision.reset_after == pytest.approx(expires_at(spec, after) - now)


# -- worked examples -------------------------------------------------------------------------


def test_gcra_admits_the_burst_at_once_then_one_per_interval() -> None:
    spec = limit_spec(RateAlgorithm.GCRA, limit=10, period=1.0, burst=5)
    steps = run(spec, [(0.0, 1)] * 6)
    assert [step[2].allowed for step in steps] == [True] * 5 + [False]
    assert [step[2].remaining for step in steps] == [4, 3, 2, 1, 0, 0]
    refused = steps[-1][2]
    assert refused.retry_after == pytest.approx(0.1)
    assert check(spec, steps[-1][4], 0.1, 1)[0].allowed


def test_gcra_without_burst_uses_the_limit_as_bucket_size() -> None:
    spec = limit_spec(RateAlgorithm.GCRA, limit=3, period=1.0, burst=0)
    assert [step[2].allowed for step in run(spec, [(0.0, 1)] * 4)] == [True] * 3 + [False]


def test_gcra_state_is_the_theoretical_arrival_time() -> None:
    spec = limit_spec(RateAlgorithm.GCRA, limit=4, period=1.0, burst=2)
    decision, state = check(spec, None, 10.0, 2)
    assert state == GcraState(10.5)
    assert decision.reset_after == 0.5
    assert expires_at(spec, state) == 10.5


def test_a_cost_above_the_capacity_is_refused_for_ever() -> None:
    for algorithm in RateAlgorithm:
        spec = limit_spec(algorithm, limit=3, period=1.0, burst=3)
        decision, state = check(spec, None, 0.0, 4)
        assert not decision.allowed
        assert decision.retry_after == math.inf
        assert expires_at(spec, state) <= 0.0


def test_a_cost_below_one_is_a_programming_error() -> None:
    for algorithm in RateAlgorithm:
        with pytest.raises(ValueError, match="at least 1"):
            check(limit_spec(algorithm, 3, 1.0, 3), None, 0.0, 0)


def test_sliding_window_frees_a_slot_exactly_one_period_after_each_admission() -> None:
    spec = limit_spec(RateAlgorithm.SLIDING_WINDOW, limit=2, period=1.0)
    steps = run(spec, [(0.0, 1), (0.4, 1), (0.9, 1), (1.0, 1), (1.0, 1), (1.4, 1)])
    assert [step[2].allowed for step in steps] == [True, True, False, True, False, True]
    assert steps[2][2].retry_after == pytest.approx(0.1)
    assert steps[4][2].retry_after == pytest.approx(0.4)
    assert steps[-1][4] == SlidingLogState((1.0, 1.4))


@settings(max_examples=200)
@given(specs(RateAlgorithm.SLIDING_WINDOW), arrivals(max_size=120), st.data())
def test_sliding_log_states_stay_values_when_checked_from_any_earlier_state(
    spec: RateLimitSpec, trace: list[tuple[float, int]], data: st.DataObject
) -> None:
    """Successive states share one list; checking from an older state (a refused joint
    check keeps the prior one) must neither change it nor be misled by later appends."""
    states = [SlidingLogState(())]
    logs = [()]
    for now, cost in trace:
        index = data.draw(st.integers(0, len(states) - 1))
        decision, state = check(spec, states[index], now, cost)
        rebuilt, expected = check(spec, SlidingLogState(logs[index]), now, cost)
        assert decision == rebuilt
        assert state == expected
        assert state.log == expected.log
        assert all(old.log == log for old, log in zip(states, logs, strict=True))
        states.append(state)
        logs.append(state.log)
    assert len(states[-1]) <= spec.rate.limit


def _logged(state: RateState | None) -> Any:
    return state.log if isinstance(state, SlidingLogState) else state


@settings(max_examples=300)
@given(all_specs, st.booleans().flatmap(lambda grid: arrivals(grid=grid, max_size=80)), st.data())
def test_admit_gives_checks_verdict_and_state_from_any_earlier_state(
    spec: RateLimitSpec, trace: list[tuple[float, int]], data: st.DataObject
) -> None:
    """``admit`` is ``check`` at cost 1 without the decision: two chains, one checked and
    one admitted, walked through the same earlier states (a refused joint check keeps an
    older state, and sliding logs share their lists), must agree at every step. A state of
    another algorithm (a reload changed it) counts as none in both."""
    strangers: list[RateState] = [GcraState(0.5), SlidingLogState((0.2,)), FixedWindowState(0.0, 1)]
    checked: list[RateState | None] = [None, *strangers]
    admitted: list[RateState | None] = [None, *strangers]
    for now, _ in trace:
        index = data.draw(st.integers(0, len(checked) - 1))
        decision, state = check(spec, checked[index], now)
        answer = admit(spec, admitted[index], now)
        assert (answer is not None) == decision.allowed
        if answer is None:
            continue
        assert _logged(answer) == _logged(state)
        checked.append(state)
        admitted.append(answer)
    assert [_logged(s) for s in checked] == [_logged(s) for s in admitted]


def test_sliding_log_admission_appends_to_the_shared_log_rather_than_copying_it() -> None:
    spec = limit_spec(RateAlgorithm.SLIDING_WINDOW, limit=10_000, period=100_000.0)
    state = SlidingLogState(())
    for step in range(5_000):
        state = check(spec, state, float(step))[1]
    _, after = check(spec, state, 5_000.0)
    assert after._buffer is state._buffer  # what makes an admission O(1)
    assert len(after) == 5_001
    assert after.log[-2:] == (4_999.0, 5_000.0)
    assert len(state) == 5_000


def test_sliding_log_keeps_only_the_newest_limit_entries_after_the_limit_is_lowered() -> None:
    lowered = limit_spec(RateAlgorithm.SLIDING_WINDOW, limit=2, period=10.0)
    state = SlidingLogState((1.0, 2.0, 3.0, 4.0))
    decision, _ = check(lowered, state, 5.0)
    assert not decision.allowed
    assert decision.retry_after == pytest.approx(8.0)  # 3.0 and 4.0 decide; 3.0 leaves at 13


def test_retry_after_is_rounded_up_where_float_subtraction_falls_short() -> None:
    # 3.4 - 0.518 is 2.8819999999999997, and 0.518 + that is just below 3.4
    spec = limit_spec(RateAlgorithm.SLIDING_WINDOW, limit=1, period=3.0)
    state = SlidingLogState((0.4,))
    retry = check(spec, state, 0.518)[0].retry_after
    assert 0.518 + (3.4 - 0.518) < 3.4
    assert check(spec, state, 0.518 + retry)[0].allowed


def test_fixed_window_resets_at_each_multiple_of_the_period() -> None:
    spec = limit_spec(RateAlgorithm.FIXED_WINDOW, limit=2, period=10.0)
    steps = run(spec, [(7.0, 1), (9.0, 1), (9.5, 1), (10.0, 1), (19.9, 1), (19.95, 1)])
    assert [step[2].allowed for step in steps] == [True, True, False, True, True, False]
    assert steps[2][2].retry_after == pytest.approx(0.5)
    assert steps[3][4] == FixedWindowState(10.0, 1)
    assert expires_at(spec, steps[3][4]) == 20.0


def test_a_state_of_another_algorithm_counts_as_no_state() -> None:
    spec = limit_spec(RateAlgorithm.GCRA, limit=1, period=1.0, burst=1)
    decision, state = check(spec, SlidingLogState((0.0,)), 0.0)
    assert decision.allowed
    assert isinstance(state, GcraState)


def test_an_empty_log_has_already_expired() -> None:
    spec = limit_spec(RateAlgorithm.SLIDING_WINDOW, limit=1, period=1.0)
    assert expires_at(spec, SlidingLogState(())) == -math.inf


# -- several limits together -----------------------------------------------------------------


def test_a_refusal_by_one_limit_consumes_nothing_from_the_others() -> None:
    tight = limit_spec(RateAlgorithm.FIXED_WINDOW, limit=2, period=1.0, name="tight")
    loose = limit_spec(RateAlgorithm.GCRA, limit=10, period=1.0, burst=10, name="loose")
    states: tuple[RateState | None, ...] = (None, None)
    outcomes = []
    for _ in range(5):
        before = states
        combined, states = check_all(list(zip((tight, loose), states, strict=True)), 0.0)
        outcomes.append(combined.allowed)
        if not combined.allowed:
            assert all(new is old for new, old in zip(states, before, strict=True))
    assert outcomes == [True, True, False, False, False]
    assert check(loose, states[1], 0.0)[0].remaining == 7  # two consumed, not five


def test_combined_wait_is_the_longest_among_the_refusing_limits() -> None:
    second = limit_spec(RateAlgorithm.GCRA, limit=1, period=1.0, burst=1, name="per-second")
    minute = limit_spec(RateAlgorithm.GCRA, limit=1, period=60.0, burst=1, name="per-minute")
    pairs = [(second, None), (minute, None)]
    combined, states = check_all(pairs, 0.0)
    assert combined.allowed
    assert combined.rule == "per-second"  # both at 0 remaining: the first one
    refused, _ = check_all(list(zip((second, minute), states, strict=True)), 0.5)
    assert not refused.allowed
    assert refused.rule == "per-minute"
    assert refused.retry_after == pytest.approx(59.5)
    admitted, _ = check_all(list(zip((second, minute), states, strict=True)), 60.0)
    assert admitted.allowed


@given(st.lists(all_specs, min_size=1, max_size=4), arrivals(max_size=25))
def test_requests_pass_several_limits_only_when_each_would_pass_alone(
    limits_: list[RateLimitSpec], trace: list[tuple[float, int]]
) -> None:
    states: list[RateState | None] = [None] * len(limits_)
    for now, cost in trace:
        alone = [check(spec, state, now, cost) for spec, state in zip(limits_, states, strict=True)]
        combined, new_states = check_all(list(zip(limits_, states, strict=True)), now, cost)
        assert combined.allowed == all(decision.allowed for decision, _ in alone)
        if combined.allowed:
            assert list(new_states) == [state for _, state in alone]
            assert combined.retry_after == 0.0
        else:
            assert combined.retry_after == max(d.retry_after for d, _ in alone if not d.allowed)
            if combined.retry_after < math.inf:
                later = check_all(
                    list(zip(limits_, states, strict=True)), now + combined.retry_after, cost
                )
                assert later[0].allowed
        states = list(new_states)


def test_combine_reports_the_closest_limit_when_all_admit() -> None:
    roomy = RateDecision(True, 9, 0.0, 1.0)
    close = RateDecision(True, 1, 0.0, 1.0)
    combined = combine([("roomy", roomy), ("close", close)])
    assert (combined.allowed, combined.rule, combined.decision) == (True, "close", close)


def test_combine_without_limits_admits() -> None:
    combined = combine([])
    assert combined.allowed
    assert combined.rule is None


# -- differential: the limits library --------------------------------------------------------


@contextmanager
def limits_clock() -> Iterator[SimpleNamespace]:
    """Drive ``limits``' memory storage from a fake clock: it calls ``time.time()`` itself."""
    clock = SimpleNamespace(now=0.0)
    fake_time = SimpleNamespace(time=lambda: clock.now)
    with mock.patch.object(limits.storage.memory, "time", fake_time):
        yield clock


@st.composite
def untied_arrivals(draw: st.DrawFn) -> list[tuple[float, int]]:
    """Millisecond arrivals nudged apart by 0.1 us each: no two ever lie exactly a period apart.

    That keeps the comparison off the one documented difference: ``limits`` still counts an
    entry exactly one period old, this sliding window does not.
    """
    trace = draw(arrivals(max_cost=3))
    return [(now + i * 1e-7, cost) for i, (now, cost) in enumerate(trace)]


@settings(max_examples=60)
@given(st.integers(1, 6), st.integers(1, 3), untied_arrivals())
def test_sliding_window_agrees_with_limits_moving_window(
    limit: int, period: int, trace: list[tuple[float, int]]
) -> None:
    spec = limit_spec(RateAlgorithm.SLIDING_WINDOW, limit, float(period))
    ours = [step[2].allowed for step in run(spec, trace)]
    item = RateLimitItemPerSecond(limit, period)
    with limits_clock() as clock:
        limiter = MovingWindowRateLimiter(MemoryStorage())
        theirs = []
        for now, cost in trace:
            clock.now = now
            theirs.append(limiter.hit(item, "key", cost=cost))
    assert ours == theirs


@settings(max_examples=60)
@given(st.integers(1, 6), st.integers(1, 3), arrivals(max_cost=1))
def test_fixed_window_agrees_with_limits_when_its_windows_start_on_the_boundaries(
    limit: int, period: int, trace: list[tuple[float, int]]
) -> None:
    # limits opens a window at the first hit after the last one ended; a hit on every
    # multiple of the period makes its windows the aligned ones compared here. Costs stay 1:
    # limits also counts the cost of refused hits, which only differs once costs vary.
    last = math.floor(trace[-1][0] / period)
    ticks = [(float(k * period), 1) for k in range(last + 1)]
    merged = sorted(trace + ticks, key=lambda arrival: arrival[0])
    spec = limit_spec(RateAlgorithm.FIXED_WINDOW, limit, float(period))
    ours = [step[2].allowed for step in run(spec, merged)]
    item = RateLimitItemPerSecond(limit, period)
    with limits_clock() as clock:
        limiter = FixedWindowRateLimiter(MemoryStorage())
        theirs = []
        for now, cost in merged:
            clock.now = now
            theirs.append(limiter.hit(item, "key", cost=cost))
    assert ours == theirs


def test_limits_still_counts_an_entry_exactly_one_period_old_and_this_window_does_not() -> None:
    spec = limit_spec(RateAlgorithm.SLIDING_WINDOW, limit=1, period=1.0)
    ours = [step[2].allowed for step in run(spec, [(0.0, 1), (1.0, 1)])]
    with limits_clock() as clock:
        limiter = MovingWindowRateLimiter(MemoryStorage())
        item = RateLimitItemPerSecond(1, 1)
        theirs = []
        for now in (0.0, 1.0):
            clock.now = now
            theirs.append(limiter.hit(item, "key"))
    assert ours == [True, True]  # retry_after of the refusal would be exactly 1.0: exact
    assert theirs == [True, False]


# -- differential: an exact token bucket -----------------------------------------------------


class TokenBucket:
    """The token bucket GCRA stands for, in exact rational arithmetic."""

    def __init__(self, size: int, interval: Fraction) -> None:
        self.size = size
        self.interval = interval
        self.tokens = Fraction(size)
        self.last: Fraction | None = None

    def margin(self, now: Fraction, cost: int) -> Fraction:
        """Tokens left after taking ``cost`` now (negative: refused), in seconds of refill."""
        tokens = self.tokens
        if self.last is not None:
            tokens = min(Fraction(self.size), tokens + (now - self.last) / self.interval)
        return (tokens - cost) * self.interval

    def take(self, now: Fraction, cost: int, admit: bool) -> None:
        if self.last is not None:
            self.tokens = min(Fraction(self.size), self.tokens + (now - self.last) / self.interval)
        self.last = now
        if admit:
            self.tokens -= cost


@settings(max_examples=300)
@given(specs(RateAlgorithm.GCRA), st.data())
def test_gcra_agrees_with_an_exact_token_bucket(spec: RateLimitSpec, data: st.DataObject) -> None:
    # gaps drawn in units of the emission interval, so arrivals land near the boundaries
    interval = spec.rate.period / spec.rate.limit
    scaled = st.floats(min_value=0.0, max_value=2.5).map(lambda gap: gap * interval)
    gaps = data.draw(st.lists(st.tuples(scaled, st.integers(1, 3)), min_size=1, max_size=60))
    times = itertools.accumulate(gap for gap, _ in gaps)
    trace = list(zip(times, (cost for _, cost in gaps), strict=True))
    bucket = TokenBucket(spec.burst, Fraction(spec.rate.period) / spec.rate.limit)
    for now, cost, decision, _, _ in run(spec, trace):
        margin = bucket.margin(Fraction(now), cost)
        if abs(margin) > Fraction(1, 10**9):  # off the knife edge, where floats may round
            assert decision.allowed == (margin >= 0)
        bucket.take(Fraction(now), cost, decision.allowed)
