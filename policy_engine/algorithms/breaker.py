"""Circuit breakers in Resilience4j's model, as a pure state machine plus a direct-use wrapper.

A breaker stops calling a dependency that keeps failing, so the callers fail fast instead
of queueing behind timeouts, and it probes the dependency before trusting it again:

* ``CLOSED``: every call is permitted; outcomes go into a sliding window. Once the window
  holds at least ``minimum_calls`` outcomes (capped at the window's size for a count-based
  window), the circuit opens when the failure rate reaches ``failure_rate`` or the slow-call
  rate reaches ``slow_call.rate`` (both ``>=``). A call is slow when it took longer than
  ``slow_call.over`` (strictly, as Resilience4j compares); a slow failure counts in both.
* ``OPEN``: every call is refused until ``open_for`` has passed since it opened; the first
  :func:`acquire` after that moves to ``HALF_OPEN`` and is the first probe.
* ``HALF_OPEN``: exactly ``half_open_calls`` probes are permitted, everything else is refused.
  When all probes have reported, the circuit closes (fresh window) if the rates are below
  both thresholds and opens again otherwise.

Outcomes reported while ``OPEN`` (calls admitted before it opened) are ignored; outcomes
reported while ``HALF_OPEN`` count as probe results, as in Resilience4j.

Each function takes the spec, the prior :class:`BreakerState` and ``now`` (monotonic seconds)
and returns the new state; nothing reads a clock. The windows are small so a store can keep
them in one value and a Lua script can run the same steps:

* count-based, ``window.calls = N``: the last N outcomes as two N-bit sets, bit 0 the newest
  (``failed`` and ``slow``), plus how many calls are in it. Recording shifts both sets left by
  one, sets bit 0 and masks to N bits; the counts are the sets' population counts. (In Lua,
  where numbers hold 53 bits, the sets become strings of N flags: same steps.)
* time-based, ``window.time = W`` seconds: per-second buckets ``(second, calls, failed,
  slow)`` for the seconds that had calls, oldest first, plus the running totals. A call at
  ``now`` belongs to second ``floor(now)``; the window holds that second and the ``W - 1``
  before it. Recording first drops (and subtracts) buckets with ``second <= floor(now) - W``,
  then adds to the newest bucket or appends one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType

from policy_engine.errors import PolicyEngineError
from policy_engine.language.model import CircuitBreakerSpec


class Circuit(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Reason(StrEnum):
    """Why a transition happened, as logs and metrics label it."""

    FAILURE_RATE = "failure_rate"
    SLOW_CALL_RATE = "slow_call_rate"
    OPEN_FOR_ELAPSED = "open_for_elapsed"
    PROBES_SUCCEEDED = "probes_succeeded"


@dataclass(frozen=True, slots=True)
class Transition:
    from_state: Circuit
    to_state: Circuit
    reason: Reason
    at: float


@dataclass(frozen=True, slots=True)
class CountWindow:
    """The last outcomes as bit sets, bit 0 the newest; ``calls`` of them are real."""

    calls: int = 0
    failed: int = 0
    slow: int = 0


Bucket = tuple[int, int, int, int]
"""``(second, calls, failed, slow)`` for one second of a time-based window."""


@dataclass(frozen=True, slots=True)
class TimeWindow:
    """Per-second buckets, oldest first, and their totals (kept so nothing is summed per call)."""

    buckets: tuple[Bucket, ...] = ()
    calls: int = 0
    failed: int = 0
    slow: int = 0


@dataclass(frozen=True, slots=True)
class BreakerState:
    """What a store keeps per breaker.

    ``since`` is when ``circuit`` was entered. ``window`` is the closed-state window, or in
    ``HALF_OPEN`` the probes' outcomes (a count window of ``half_open_calls``); ``None`` is an
    empty window. ``permits`` counts the probes handed out in ``HALF_OPEN``.
    """

    circuit: Circuit = Circuit.CLOSED
    since: float = 0.0
    window: CountWindow | TimeWindow | None = None
    permits: int = 0


@dataclass(frozen=True, slots=True)
class Permit:
    """The answer to "may this call go ahead?"; ``transition`` is set if asking moved the state."""

    permitted: bool
    retry_after: float
    circuit: Circuit
    transition: Transition | None = None


_CLOSED_PERMIT = Permit(True, 0.0, Circuit.CLOSED)
_HALF_OPEN_PERMIT = Permit(True, 0.0, Circuit.HALF_OPEN)
_EMPTY_COUNT = CountWindow()
_EMPTY_TIME = TimeWindow()


class CircuitOpenError(PolicyEngineError):
    """A call was refused because the circuit is open (or its half-open probes are taken)."""

    def __init__(self, retry_after: float, name: str = "") -> None:
        self.retry_after = retry_after
        self.name = name
        super().__init__(f"circuit {name!r} is open; retry after {retry_after:.3f}s")


def acquire(
    spec: CircuitBreakerSpec, state: BreakerState, now: float
) -> tuple[Permit, BreakerState]:
    """Ask to make one call.

    ``OPEN`` refuses with ``retry_after`` the exact rest of ``open_for`` (a call at
    ``now + retry_after`` gets through). ``HALF_OPEN``, when every probe is out, refuses
    until their verdict, or until ``open_for`` after the round of probes began: probes
    without a verdict by then are taken as lost and a new round begins.
    """
    circuit = state.circuit
    if circuit is Circuit.CLOSED:
        return _CLOSED_PERMIT, state
    if circuit is Circuit.OPEN:
        reopen_at = state.since + spec.open_for
        if now < reopen_at:
            return Permit(False, _wait(now, reopen_at), Circuit.OPEN), state
        transition = Transition(Circuit.OPEN, Circuit.HALF_OPEN, Reason.OPEN_FOR_ELAPSED, now)
        permit = Permit(True, 0.0, Circuit.HALF_OPEN, transition)
        return permit, BreakerState(Circuit.HALF_OPEN, now, None, 1)
    if state.permits < _probes(spec):
        new = BreakerState(Circuit.HALF_OPEN, state.since, state.window, state.permits + 1)
        return _HALF_OPEN_PERMIT, new
    lease_ends = state.since + spec.open_for
    if now >= lease_ends:
        # Probes out for a whole ``open_for`` without a verdict are lost: their process
        # died, or their outcome never reached a shared store. A new round of probes
        # starts, rather than the breaker staying half-open, and refusing, for ever.
        return _HALF_OPEN_PERMIT, BreakerState(Circuit.HALF_OPEN, now, None, 1)
    return Permit(False, _wait(now, lease_ends), Circuit.HALF_OPEN), state


def release(state: BreakerState) -> BreakerState:
    """Give back a permit whose call never ran, or ended in an outcome that is not recorded.

    Only ``HALF_OPEN`` counts permits, so only there does this change anything: the probe
    can be handed to another caller.
    """
    if state.circuit is Circuit.HALF_OPEN and state.permits > 0:
        return BreakerState(Circuit.HALF_OPEN, state.since, state.window, state.permits - 1)
    return state


def record(
    spec: CircuitBreakerSpec, state: BreakerState, now: float, *, failed: bool, duration: float
) -> tuple[BreakerState, Transition | None]:
    """Report the outcome of a permitted call that took ``duration`` seconds."""
    circuit = state.circuit
    if circuit is Circuit.OPEN:
        return state, None
    slow_call = spec.slow_call
    slow = slow_call is not None and duration > slow_call.over
    if circuit is Circuit.CLOSED:
        if not failed and not slow and steady(spec, state):
            return state, None
        window, reason = _record_closed(spec, state.window, now, failed, slow)
        if reason is None:
            # A full window of steady outcomes comes back as the same object: so does the state.
            if window is state.window and state.permits == 0:
                return state, None
            return BreakerState(Circuit.CLOSED, state.since, window, 0), None
        return BreakerState(Circuit.OPEN, now, None, 0), Transition(
            Circuit.CLOSED, Circuit.OPEN, reason, now
        )
    probes = _probes(spec)
    prior = state.window if isinstance(state.window, CountWindow) else _EMPTY_COUNT
    counts = _push_count(prior, probes, failed, slow)
    if counts.calls < probes:
        return BreakerState(Circuit.HALF_OPEN, state.since, counts, state.permits), None
    reason = _verdict(
        spec, counts.calls, counts.failed.bit_count(), counts.slow.bit_count(), probes
    )
    if reason is None:
        return BreakerState(Circuit.CLOSED, now, None, 0), Transition(
            Circuit.HALF_OPEN, Circuit.CLOSED, Reason.PROBES_SUCCEEDED, now
        )
    return BreakerState(Circuit.OPEN, now, None, 0), Transition(
        Circuit.HALF_OPEN, Circuit.OPEN, reason, now
    )


def steady(spec: CircuitBreakerSpec, state: BreakerState) -> bool:
    """Whether a fast successful call leaves ``state`` as it is: a closed breaker whose
    full count window holds nothing but fast successes (most calls meet this state).

    Another success shifts the same empty bit sets, and rates of zero stay below any
    threshold above zero, so :func:`record` may skip the window's arithmetic.
    """
    window = state.window
    if type(window) is not CountWindow or window.failed or window.slow or state.permits:
        return False
    slow_call = spec.slow_call
    return (
        state.circuit is Circuit.CLOSED
        and window.calls == spec.window.calls
        and spec.failure_rate > 0
        and (slow_call is None or slow_call.rate > 0)
    )


def _record_closed(
    spec: CircuitBreakerSpec,
    prior: CountWindow | TimeWindow | None,
    now: float,
    failed: bool,
    slow: bool,
) -> tuple[CountWindow | TimeWindow, Reason | None]:
    """Add one outcome to the closed-state window; a window of the other kind starts over."""
    size = spec.window.calls
    if size is not None:
        counts = _push_count(
            prior if isinstance(prior, CountWindow) else _EMPTY_COUNT, size, failed, slow
        )
        minimum = min(spec.minimum_calls, size)
        failures = counts.failed.bit_count()
        return counts, _verdict(spec, counts.calls, failures, counts.slow.bit_count(), minimum)
    seconds = _window_seconds(spec)
    buckets = _push_time(
        prior if isinstance(prior, TimeWindow) else _EMPTY_TIME, seconds, now, failed, slow
    )
    return buckets, _verdict(spec, buckets.calls, buckets.failed, buckets.slow, spec.minimum_calls)


def _verdict(
    spec: CircuitBreakerSpec, calls: int, failed: int, slow: int, minimum: int
) -> Reason | None:
    """The reason to open, or ``None`` while below ``minimum`` calls or below both thresholds."""
    if calls == 0 or calls < minimum:
        return None
    if failed / calls >= spec.failure_rate:
        return Reason.FAILURE_RATE
    slow_call = spec.slow_call
    if slow_call is not None and slow / calls >= slow_call.rate:
        return Reason.SLOW_CALL_RATE
    return None


def _push_count(window: CountWindow, size: int, failed: bool, slow: bool) -> CountWindow:
    """The window with one more outcome; the very same object when that changes nothing."""
    mask = (1 << size) - 1
    calls = window.calls + 1 if window.calls < size else size
    failures = ((window.failed << 1) | failed) & mask
    slows = ((window.slow << 1) | slow) & mask
    if calls == window.calls and failures == window.failed and slows == window.slow:
        return window
    return CountWindow(calls, failures, slows)


def _push_time(
    window: TimeWindow, seconds: int, now: float, failed: bool, slow: bool
) -> TimeWindow:
    second = math.floor(now)
    horizon = second - seconds
    buckets = window.buckets
    calls = window.calls + 1
    failures = window.failed + failed
    slows = window.slow + slow
    first = 0
    size = len(buckets)
    while first < size and buckets[first][0] <= horizon:
        _, gone_calls, gone_failed, gone_slow = buckets[first]
        calls -= gone_calls
        failures -= gone_failed
        slows -= gone_slow
        first += 1
    if first < size and buckets[-1][0] >= second:
        last_second, last_calls, last_failed, last_slow = buckets[-1]
        newest = (last_second, last_calls + 1, last_failed + failed, last_slow + slow)
        kept = (*buckets[first:-1], newest)
    else:
        kept = (*buckets[first:], (second, 1, int(failed), int(slow)))
    return TimeWindow(kept, calls, failures, slows)


def _window_seconds(spec: CircuitBreakerSpec) -> int:
    """Whole seconds of a time-based window, rounded up; at least one."""
    span = spec.window.time
    if span is None:
        raise ValueError(f"circuit breaker {spec.name!r} has neither window.calls nor window.time")
    return max(1, math.ceil(span))


def _probes(spec: CircuitBreakerSpec) -> int:
    return spec.half_open_calls if spec.half_open_calls > 0 else 1


def _wait(now: float, at: float) -> float:
    """``at - now`` rounded up just enough that ``now + wait >= at`` holds in floats."""
    wait = at - now
    while now + wait < at:
        wait = math.nextafter(wait, math.inf)
    return wait


def _counts_as_failure(_error: Exception) -> bool:
    return True


TransitionListener = Callable[[Transition], None]

_CALLS: ContextVar[tuple[tuple[CircuitBreaker, float], ...]] = ContextVar(
    "policy_engine_breaker_calls", default=()
)
"""Start times of the calls in progress in this task, innermost last.

Kept in a context variable so concurrent tasks sharing one breaker each time their own call.
"""


class CircuitBreaker:
    """One breaker held in memory, for application code that calls a dependency directly::

        breaker = CircuitBreaker(spec)

        async with breaker:  # raises CircuitOpenError while open
            await call_the_agent_runtime()

    An :class:`Exception` leaving the block is a failure unless ``is_failure(exc)`` says
    otherwise; a block that ends without one is a success. Exceptions that are not failures,
    and cancellation (or any other ``BaseException``), record nothing and hand back the permit.
    Durations come from ``clock`` (``time.monotonic`` unless injected, as tests do). Listeners
    are called in order, synchronously, with every :class:`Transition`.
    """

    def __init__(
        self,
        spec: CircuitBreakerSpec,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_transition: Iterable[TransitionListener] = (),
        is_failure: Callable[[Exception], bool] = _counts_as_failure,
        state: BreakerState | None = None,
    ) -> None:
        self.spec = spec
        self._clock = clock
        self._listeners = list(on_transition)
        self._is_failure = is_failure
        self._state = state if state is not None else BreakerState()

    @property
    def state(self) -> BreakerState:
        return self._state

    @property
    def circuit(self) -> Circuit:
        return self._state.circuit

    def on_transition(self, listener: TransitionListener) -> TransitionListener:
        """Add a listener; returns it, so this works as a decorator."""
        self._listeners.append(listener)
        return listener

    async def __aenter__(self) -> CircuitBreaker:
        now = self._clock()
        permit, self._state = acquire(self.spec, self._state, now)
        if permit.transition is not None:
            self._emit(permit.transition)
        if not permit.permitted:
            raise CircuitOpenError(permit.retry_after, self.spec.name)
        _CALLS.set((*_CALLS.get(), (self, now)))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        started = self._pop_start()
        if exc is not None and (not isinstance(exc, Exception) or not self._is_failure(exc)):
            self._state = release(self._state)
            return
        now = self._clock()
        self._state, transition = record(
            self.spec, self._state, now, failed=exc is not None, duration=now - started
        )
        if transition is not None:
            self._emit(transition)

    def _pop_start(self) -> float:
        calls = _CALLS.get()
        for index in range(len(calls) - 1, -1, -1):
            owner, started = calls[index]
            if owner is self:
                _CALLS.set(calls[:index] + calls[index + 1 :])
                return started
        raise RuntimeError("CircuitBreaker exited without a matching enter in this task")

    def _emit(self, transition: Transition) -> None:
        for listener in self._listeners:
            listener(transition)
