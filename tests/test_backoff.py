from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policy_engine.algorithms.backoff import compute_delay, schedule, to_client
from policy_engine.language.model import BackoffSpec, BackoffStrategy

durations = st.floats(min_value=0.0, max_value=120.0, allow_nan=False)


@st.composite
def backoff_specs(draw: st.DrawFn, strategy: BackoffStrategy | None = None) -> BackoffSpec:
    return BackoffSpec(
        name="test",
        strategy=draw(st.sampled_from(BackoffStrategy)) if strategy is None else strategy,
        base=draw(durations),
        max=draw(durations),
        max_attempts=draw(st.integers(min_value=0, max_value=30)),
        multiplier=draw(st.floats(min_value=1.0, max_value=10.0)),
    )


def exponential(spec: BackoffSpec, attempt: int) -> float:
    exact = BackoffSpec(
        "exact", BackoffStrategy.EXPONENTIAL, spec.base, spec.max, attempt, spec.multiplier
    )
    delay = compute_delay(exact, attempt, random.random)
    assert delay is not None
    return delay


def never() -> float:
    raise AssertionError("this strategy must not draw a random number")


@given(backoff_specs(), st.integers(min_value=1, max_value=40), st.randoms(), durations)
def test_every_delay_lies_between_zero_and_the_cap(
    spec: BackoffSpec, attempt: int, rng: random.Random, previous: float
) -> None:
    delay = compute_delay(spec, attempt, rng.random, previous)
    if attempt > spec.max_attempts:
        assert delay is None
    else:
        assert delay is not None
        assert 0.0 <= delay <= spec.max


@given(backoff_specs(BackoffStrategy.FULL_JITTER), st.integers(1, 30), st.randoms())
def test_full_jitter_lies_between_zero_and_the_capped_exponential(
    spec: BackoffSpec, attempt: int, rng: random.Random
) -> None:
    delay = compute_delay(spec, attempt, rng.random)
    if delay is not None:
        assert 0.0 <= delay <= exponential(spec, attempt)


@given(backoff_specs(BackoffStrategy.EQUAL_JITTER), st.integers(1, 30), st.randoms())
def test_equal_jitter_lies_between_half_and_whole_capped_exponential(
    spec: BackoffSpec, attempt: int, rng: random.Random
) -> None:
    delay = compute_delay(spec, attempt, rng.random)
    if delay is not None:
        ceiling = exponential(spec, attempt)
        assert ceiling / 2 <= delay <= ceiling


@given(backoff_specs(BackoffStrategy.DECORRELATED_JITTER), st.randoms(), st.none() | durations)
def test_decorrelated_jitter_lies_between_base_and_three_times_the_previous_delay(
    spec: BackoffSpec, rng: random.Random, previous: float | None
) -> None:
    delay = compute_delay(spec, 1, rng.random, previous)
    if delay is not None:
        grown = 3 * max(spec.base, spec.base if previous is None else previous)
        assert min(spec.base, spec.max) <= delay <= min(spec.max, grown)


@given(backoff_specs(BackoffStrategy.DECORRELATED_JITTER), st.randoms())
def test_a_decorrelated_schedule_grows_each_delay_from_the_one_before(
    spec: BackoffSpec, rng: random.Random
) -> None:
    previous = spec.base
    for delay in schedule(spec, rng.random):
        assert min(spec.base, spec.max) <= delay <= min(spec.max, 3 * max(spec.base, previous))
        previous = delay


@given(backoff_specs(BackoffStrategy.EXPONENTIAL), st.integers(1, 60))
def test_exponential_never_decreases_from_one_attempt_to_the_next(
    spec: BackoffSpec, attempt: int
) -> None:
    assert exponential(spec, attempt) <= exponential(spec, attempt + 1)


@given(backoff_specs(), st.integers(min_value=0, max_value=2**32))
def test_the_same_random_source_replays_the_same_schedule(spec: BackoffSpec, seed: int) -> None:
    first = schedule(spec, random.Random(seed).random)
    assert first == schedule(spec, random.Random(seed).random)
    assert len(first) == spec.max_attempts


@given(backoff_specs(), st.integers(min_value=1, max_value=10))
def test_no_delay_is_given_after_max_attempts(spec: BackoffSpec, beyond: int) -> None:
    assert compute_delay(spec, spec.max_attempts + beyond, never) is None


def test_exponential_doubles_from_base_until_the_cap() -> None:
    spec = BackoffSpec("default", BackoffStrategy.EXPONENTIAL, base=0.5, max=30.0)
    assert schedule(spec, never) == (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0)


def test_constant_waits_base_every_time_without_drawing() -> None:
    spec = BackoffSpec("steady", BackoffStrategy.CONSTANT, base=2.0, max=30.0, max_attempts=3)
    assert schedule(spec, never) == (2.0, 2.0, 2.0)


def test_jitter_scales_the_exponential_by_the_random_draw() -> None:
    full = BackoffSpec("full", BackoffStrategy.FULL_JITTER, base=1.0, max=30.0)
    equal = BackoffSpec("equal", BackoffStrategy.EQUAL_JITTER, base=1.0, max=30.0)
    decorrelated = BackoffSpec("dec", BackoffStrategy.DECORRELATED_JITTER, base=1.0, max=30.0)
    assert compute_delay(full, 3, lambda: 0.25) == 1.0
    assert compute_delay(equal, 3, lambda: 0.5) == 3.0
    assert compute_delay(decorrelated, 2, lambda: 0.5, previous=4.0) == 6.5


def test_max_attempts_zero_never_retries() -> None:
    spec = BackoffSpec("none", max_attempts=0)
    assert compute_delay(spec, 1, never) is None
    assert schedule(spec, never) == ()


def test_very_late_attempts_stay_at_the_cap_instead_of_overflowing() -> None:
    spec = BackoffSpec("long", BackoffStrategy.EXPONENTIAL, base=1.0, max=60.0, max_attempts=10**6)
    assert compute_delay(spec, 5000, never) == 60.0


def test_attempts_count_from_one() -> None:
    with pytest.raises(ValueError, match="from 1"):
        compute_delay(BackoffSpec("default"), 0, never)


def test_the_client_receives_the_reference_defaults_in_milliseconds() -> None:
    assert to_client(BackoffSpec("default")) == {
        "strategy": "full_jitter",
        "base_ms": 500,
        "max_ms": 30000,
        "max_attempts": 10,
        "multiplier": 2.0,
    }


@given(backoff_specs())
def test_client_durations_are_whole_milliseconds(spec: BackoffSpec) -> None:
    payload = to_client(spec)
    assert isinstance(payload["base_ms"], int)
    assert isinstance(payload["max_ms"], int)
    assert abs(payload["base_ms"] - spec.base * 1000) <= 0.5
    assert payload["strategy"] == spec.strategy.value
