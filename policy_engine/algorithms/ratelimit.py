"""Rate limits as pure functions: GCRA, an exact sliding log, and aligned fixed windows.

Every check takes the rule, the prior state (``None`` when the store has nothing for the
key), ``now`` (monotonic seconds) and a cost, and returns a :class:`RateDecision` with the
state to store. Nothing here reads a clock or touches a store, so the memory store calls
these functions directly and the Redis store runs a Lua transcription of the same steps,
written out in each function's docstring.

Conventions shared by the three algorithms:

* A denial never changes anything: the returned state is the prior state object itself
  (or the algorithm's empty state when there was none), so a store can skip the write.
* ``retry_after`` is exact: the smallest float ``r`` (found by rounding ``at - now`` up to
  the next representable value while ``now + r < at``) such that the same request checked
  against the same state at ``now + r`` is admitted; ``inf`` when ``cost`` exceeds what the
  limit can ever admit at once, and 0 when admitted. Each algorithm has a state-dependent
  instant ``at`` from which the request passes, and nothing else moves it.
* ``remaining`` is how many cost-1 requests would still pass at ``now``, after this decision.
* ``reset_after`` is the time until the state is empty again (``expires_at - now``): the
  quota is then whole and the store may drop the key.

Several limits on one hook must be judged together, and a request refused by one of them
must not consume the others. :func:`check_all` does it in one pure step: it checks every
limit, then returns all the new states if every limit admitted, and the prior states
(unchanged objects) otherwise. A store applies the returned states as one atomic write
(one Lua script over all keys in Redis), which is the ``peek then commit`` pair folded
into one call.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from policy_engine.language.model import RateAlgorithm, RateLimitSpec

_INF = math.inf


class RateDecision(NamedTuple):
    """One limit's verdict. A named tuple rather than a frozen dataclass: it is built on
    every checked event, and a tuple is the cheaper of the two to build."""

    allowed: bool
    remaining: int
    retry_after: float
    reset_after: float


@dataclass(frozen=True, slots=True)
class GcraState:
    """The theoretical arrival time: when the bucket would be full again at the steady rate."""

    tat: float


_new_object = object.__new__
_set_field = object.__setattr__


class SlidingLogState:
    """Admission times still inside the window, oldest first, at most ``rate.limit`` of them.

    A request of cost ``c`` is logged as ``c`` equal timestamps.

    A value, like the other states: ``log`` never changes once built, and two states with
    the same ``log`` are equal. It is kept as a view, ``[start, end)``, of a list that
    successive states of one key share, so that an admission appends one entry instead of
    copying the whole log (O(1) amortized rather than O(limit) per event): a newer state
    only ever appends past ``end`` of the state it came from, which therefore still reads
    the same entries. Only a state whose list already grew past its ``end`` (a check from
    an older state, such as the prior state a refused joint check kept) starts a list of
    its own, and a list whose expired head outgrows its live entries is compacted.
    """

    __slots__ = ("_buffer", "_end", "_start")

    _buffer: list[float]
    _start: int
    _end: int

    def __init__(self, log: Sequence[float] = ()) -> None:
        self._buffer = list(log)
        self._start = 0
        self._end = len(self._buffer)

    @classmethod
    def _view(cls, buffer: list[float], start: int, end: int) -> SlidingLogState:
        state = cls.__new__(cls)
        state._buffer = buffer
        state._start = start
        state._end = end
        return state

    @property
    def log(self) -> tuple[float, ...]:
        return tuple(self._buffer[self._start : self._end])

    def __len__(self) -> int:
        return self._end - self._start

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SlidingLogState):
            return NotImplemented
        return self.log == other.log

    def __hash__(self) -> int:
        return hash(self.log)

    def __repr__(self) -> str:
        return f"SlidingLogState(log={self.log!r})"


@dataclass(frozen=True, slots=True)
class FixedWindowState:
    """The aligned window's start (``floor(now / period) * period``) and the cost admitted in it."""

    start: float
    count: int


RateState = GcraState | SlidingLogState | FixedWindowState

_EMPTY_LOG = SlidingLogState(())
_COMPACT_AT = 64  # expired entries a shared log keeps before it may be compacted


class CombinedDecision(NamedTuple):
    """Several limits judged together, and the one that decided (a named tuple, as above).

    When refused, ``rule`` is the refusing limit with the longest wait, and ``retry_after``
    that wait: every limit must admit, so waiting for the slowest is the exact wait (a limit
    that admits now still admits later, since nothing was consumed). When admitted, ``rule``
    is the limit with the fewest ``remaining``, the one a client is closest to hitting.
    ``rule`` and ``decision`` are ``None`` only when there was no limit to check.
    """

    allowed: bool
    retry_after: float
    rule: str | None
    decision: RateDecision | None


_UNLIMITED = CombinedDecision(True, 0.0, None, None)


def capacity(spec: RateLimitSpec) -> int:
    """GCRA's bucket size: ``spec.burst``, or the rate's ``limit`` when no burst was given (0)."""
    return spec.burst if spec.burst > 0 else spec.rate.limit


def check(
    spec: RateLimitSpec, state: RateState | None, now: float, cost: int = 1
) -> tuple[RateDecision, RateState]:
    """Check one request against ``spec`` with the algorithm the rule names.

    A state of another algorithm's type (the rule changed algorithm across a reload and kept
    its identity) counts as no state: the limit starts empty rather than misreading it.
    """
    algorithm = spec.algorithm
    if algorithm is RateAlgorithm.GCRA:
        return check_gcra(spec, state if isinstance(state, GcraState) else None, now, cost)
    if algorithm is RateAlgorithm.SLIDING_WINDOW:
        log = state if isinstance(state, SlidingLogState) else None
        return check_sliding_window(spec, log, now, cost)
    window = state if isinstance(state, FixedWindowState) else None
    return check_fixed_window(spec, window, now, cost)


def admit(spec: RateLimitSpec, state: RateState | None, now: float) -> RateState | None:
    """One request of cost 1 against ``spec``: the state to store when admitted, None when
    refused (the state then stays as it was).

    Exactly :func:`check`'s verdict and new state, for a caller that needs no more of the
    decision (a refusal's details can be asked of :func:`check` after it, on the same
    unchanged state): building the decision, counting ``remaining`` and working out a
    refusal's wait are most of a check. The steps are those of :func:`check_gcra` and
    :func:`check_sliding_window` with cost 1 (``tests/test_ratelimit.py`` holds them equal).
    """
    algorithm = spec.algorithm
    rate = spec.rate
    if algorithm is RateAlgorithm.GCRA:
        interval = rate.period / rate.limit
        size = spec.burst if spec.burst > 0 else rate.limit
        if state is None or not isinstance(state, GcraState) or state.tat < now:
            tat = now
        else:
            tat = state.tat
        if size >= 1 and now >= tat - (size - 1) * interval:
            # GcraState(tat + cost * interval), built without the frozen dataclass's
            # __init__ (which does only this): half the cost of the one object made.
            admitted = _new_object(GcraState)
            _set_field(admitted, "tat", tat + interval)
            return admitted
        return None
    if algorithm is not RateAlgorithm.SLIDING_WINDOW:
        decision, new_state = check(spec, state, now)
        return new_state if decision.allowed else None
    limit = rate.limit
    period = rate.period
    if state is None or not isinstance(state, SlidingLogState):
        if limit < 1:
            return None
        return SlidingLogState._view([now], 0, 1)
    buffer, start, end = state._buffer, state._start, state._end
    first = start
    if end > start and buffer[start] + period <= now:
        first = _expired(buffer, start, end, period, now)
    if end - first > limit:
        first = end - limit
    count = end - first
    if count + 1 > limit:
        return None
    if count == 0:
        buffer, first, end = [], 0, 0
    elif len(buffer) != end or (first > _COMPACT_AT and first > count):
        buffer, first, end = buffer[first:end], 0, count
    buffer.append(now)
    return SlidingLogState._view(buffer, first, end + 1)


def check_gcra(
    spec: RateLimitSpec, state: GcraState | None, now: float, cost: int = 1
) -> tuple[RateDecision, GcraState]:
    """GCRA, the token bucket written as one timestamp.

    With ``T = period / limit`` (the emission interval) and ``B = capacity(spec)``:

    1. ``tat = max(state.tat, now)`` (``now`` without a state): an old ``tat`` means a full
       bucket.
    2. ``allow_at = tat - (B - cost) * T``: the earliest instant this request fits.
    3. If ``cost <= B`` and ``now >= allow_at``: admit and store ``tat + cost * T``.
    4. Otherwise refuse, state unchanged, ``retry_after = wait(now, allow_at)`` (``inf`` when
       ``cost > B``).

    Equivalently a bucket of ``B`` tokens refilled at one per ``T`` admits ``cost`` tokens when
    ``tat - now <= (B - cost) * T``. From empty it admits ``B`` at once, then one per ``T``:
    at most ``floor(t / T) + B`` in any window of length ``t``. The state is empty again at
    ``tat``.
    """
    if cost < 1:
        raise ValueError(f"a request costs at least 1, got {cost}")
    rate = spec.rate
    interval = rate.period / rate.limit
    size = spec.burst if spec.burst > 0 else rate.limit
    tat = now if state is None or state.tat < now else state.tat
    allow_at = tat - (size - cost) * interval
    if cost <= size and now >= allow_at:
        new_tat = tat + cost * interval
        remaining = _gcra_remaining(new_tat, now, interval, size)
        return RateDecision(True, remaining, 0.0, new_tat - now), GcraState(new_tat)
    retry_after = _INF if cost > size else _wait(now, allow_at)
    decision = RateDecision(
        False, _gcra_remaining(tat, now, interval, size), retry_after, tat - now
    )
    return decision, state if state is not None else GcraState(now)


def check_sliding_window(
    spec: RateLimitSpec, state: SlidingLogState | None, now: float, cost: int = 1
) -> tuple[RateDecision, SlidingLogState]:
    """An exact sliding log: at most ``limit`` admitted in any window of length ``period``.

    A timestamp ``t`` counts while ``now < t + period`` (the window ``(now - period, now]``):

    1. Drop from the front every ``t`` with ``t + period <= now``; keep at most the newest
       ``limit`` entries (only they can decide, even after the limit was lowered).
    2. With ``n`` entries left: if ``n + cost <= limit``, admit and append ``cost`` copies of
       ``now``.
    3. Otherwise refuse, state unchanged: the request fits once the ``n - (limit - cost)``
       oldest entries have left, so ``retry_after = wait(now, log[n - (limit - cost) - 1] +
       period)`` (0-based, oldest first), or ``inf`` when ``cost > limit``.

    ``burst`` does not apply: the log has no refill rate to exceed, only a count per window.
    The state is empty again at ``log[-1] + period``.
    """
    if cost < 1:
        raise ValueError(f"a request costs at least 1, got {cost}")
    rate = spec.rate
    limit = rate.limit
    period = rate.period
    if state is None:
        buffer: list[float] = []
        start = end = 0
    else:
        buffer, start, end = state._buffer, state._start, state._end
    first = start
    if end > start and buffer[start] + period <= now:
        first = _expired(buffer, start, end, period, now)
    if end - first > limit:
        first = end - limit
    count = end - first
    if count + cost <= limit:
        if count == 0:
            buffer, first, end = [], 0, 0
        elif len(buffer) != end or (first > _COMPACT_AT and first > count):
            # Another state already appended past this one's end, or the expired head
            # outweighs the live entries: the live entries move to a list of their own.
            buffer, first, end = buffer[first:end], 0, count
        buffer.extend((now,) * cost)
        new = SlidingLogState._view(buffer, first, end + cost)
        return RateDecision(True, limit - count - cost, 0.0, (now + period) - now), new
    if cost > limit:
        retry_after = _INF
    else:
        retry_after = _wait(now, buffer[first + count - (limit - cost) - 1] + period)
    reset_after = max(0.0, buffer[end - 1] + period - now) if end > start else 0.0
    decision = RateDecision(False, max(0, limit - count), retry_after, reset_after)
    return decision, state if state is not None else _EMPTY_LOG


def check_fixed_window(
    spec: RateLimitSpec, state: FixedWindowState | None, now: float, cost: int = 1
) -> tuple[RateDecision, FixedWindowState]:
    """A counter per aligned window ``[k * period, (k + 1) * period)``.

    1. ``k = floor(now / period)``, ``start = k * period``; the stored count applies only if
       the stored ``start`` equals this one (otherwise a new window: count 0).
    2. If ``count + cost <= limit``: admit and store ``(start, count + cost)``.
    3. Otherwise refuse, state unchanged; ``retry_after`` waits for the next window, the
       smallest float ``end`` with ``floor(end / period) > k`` (``inf`` when ``cost > limit``).

    Windows are aligned to multiples of the period, as envoyproxy/ratelimit aligns them, so
    every process and the Redis script agree on them without sharing a first-hit time. (The
    ``limits`` library instead starts a window at the first hit after the previous one
    expired.) The state is empty again at ``end``.
    """
    if cost < 1:
        raise ValueError(f"a request costs at least 1, got {cost}")
    rate = spec.rate
    limit = rate.limit
    period = rate.period
    index = math.floor(now / period)
    start = index * period
    count = state.count if state is not None and state.start == start else 0
    end = _window_end(index, period)
    if count + cost <= limit:
        decision = RateDecision(True, limit - count - cost, 0.0, end - now)
        return decision, FixedWindowState(start, count + cost)
    retry_after = _INF if cost > limit else _wait(now, end)
    decision = RateDecision(False, max(0, limit - count), retry_after, end - now)
    return decision, state if state is not None else FixedWindowState(start, 0)


def expires_at(spec: RateLimitSpec, state: RateState) -> float:
    """When ``state`` is empty again (a check then behaves as with no state): the store's TTL.

    ``-inf`` for a state that is already empty, such as an empty log.
    """
    if isinstance(state, GcraState):
        return state.tat
    period = spec.rate.period
    if isinstance(state, SlidingLogState):
        return state._buffer[state._end - 1] + period if state._end > state._start else -_INF
    if state.count <= 0:
        return -_INF
    return _window_end(round(state.start / period), period)


def combine(decisions: Sequence[tuple[str, RateDecision]]) -> CombinedDecision:
    """Judge several limits together: refused if any refuses; see :class:`CombinedDecision`."""
    rule: str | None = None
    chosen: RateDecision | None = None
    for name, decision in decisions:
        if chosen is None:
            rule, chosen = name, decision
        elif decision.allowed != chosen.allowed:
            if not decision.allowed:
                rule, chosen = name, decision
        elif decision.allowed:
            if decision.remaining < chosen.remaining:
                rule, chosen = name, decision
        elif decision.retry_after > chosen.retry_after:
            rule, chosen = name, decision
    if chosen is None:
        return _UNLIMITED
    return CombinedDecision(chosen.allowed, chosen.retry_after, rule, chosen)


def check_all(
    checks: Sequence[tuple[RateLimitSpec, RateState | None]], now: float, cost: int = 1
) -> tuple[CombinedDecision, tuple[RateState | None, ...]]:
    """Check every limit on one request; consume from all of them or from none.

    Returns the combined decision and, in the order of ``checks``, the states to store: the
    new ones when every limit admitted, otherwise the prior ones, the very objects passed in,
    so a refusal by one limit leaves the quota of the others untouched.
    """
    decisions: list[tuple[str, RateDecision]] = []
    states: list[RateState | None] = []
    allowed = True
    for spec, state in checks:
        decision, new_state = check(spec, state, now, cost)
        decisions.append((spec.name, decision))
        states.append(new_state)
        allowed = allowed and decision.allowed
    combined = combine(decisions)
    if allowed:
        return combined, tuple(states)
    return combined, tuple(state for _, state in checks)


def _gcra_remaining(tat: float, now: float, interval: float, size: int) -> int:
    """The largest ``k <= size`` with ``now >= tat - (size - k) * interval`` (GCRA's rule).

    The division gives the answer up to rounding; the two loops settle it against the very
    comparison :func:`check_gcra` makes, so ``remaining >= c`` exactly when cost ``c`` passes.
    """
    if tat <= now:
        return size
    k = max(int(size - (tat - now) / interval), 0)
    while k < size and now >= tat - (size - k - 1) * interval:
        k += 1
    while k > 0 and now < tat - (size - k) * interval:
        k -= 1
    return k


def _expired(log: list[float], start: int, end: int, period: float, now: float) -> int:
    """The index of the first timestamp in ``log[start:end]`` with ``t + period > now``.

    The same index as ``bisect_right(log, now, start, end, key=lambda t: t + period)``,
    found without a call per probe: bisecting on ``now - period`` lands within rounding of
    it, and since ``t + period`` never decreases as ``t`` grows, stepping by the exact test
    settles it.
    """
    first = bisect_right(log, now - period, start, end)
    while first > start and log[first - 1] + period > now:
        first -= 1
    while first < end and log[first] + period <= now:
        first += 1
    return first


def _window_end(index: int, period: float) -> float:
    """The smallest float ``t`` with ``floor(t / period) > index``: the next window's start.

    ``(index + 1) * period`` up to rounding, nudged by single ulps (a Lua port can step with
    ``t * 2^-52``), so a request retried at exactly this instant lands in the next window.
    """
    end = (index + 1) * period
    while math.floor(end / period) <= index:
        end = math.nextafter(end, _INF)
    below = math.nextafter(end, -_INF)
    while math.floor(below / period) > index:
        end = below
        below = math.nextafter(end, -_INF)
    return end


def _wait(now: float, at: float) -> float:
    """``at - now`` rounded up just enough that ``now + wait >= at`` holds in floats."""
    wait = at - now
    while now + wait < at:
        wait = math.nextafter(wait, _INF)
    return wait
