"""Retry delays: the formulas of AWS's "Exponential Backoff and Jitter", as pure functions.

Clients that all retry after the same delay reconnect in waves and knock a recovering server
over again; jitter spreads them. The server never sleeps on these delays itself: it computes
them for explanations and sends the parameters to the client (:func:`to_client`), which runs
the same formulas.

Attempts are 1-based: attempt 1 is the wait before the first retry, after the first failure,
and its un-jittered delay is ``base``. With ``max_attempts = n`` there are n retries; any
attempt above n returns ``None`` (give up), so ``max_attempts = 0`` means never retry.

For attempt ``a`` let ``exp = min(max, base * multiplier ** (a - 1))``; with ``r`` drawn
uniformly from [0, 1):

* ``exponential``: ``exp`` (no jitter);
* ``full_jitter``: ``r * exp``, in [0, exp);
* ``equal_jitter``: ``exp / 2 + r * exp / 2``, in [exp/2, exp);
* ``decorrelated_jitter``: ``min(max, base + r * (3 * prev - base))`` with ``prev`` the previous
  delay (``base`` for the first attempt, and never less than ``base``), in [base, min(max, 3 prev));
* ``constant``: ``min(max, base)``.

The compiler guarantees ``0 <= base``, ``0 <= max`` and ``multiplier >= 1``; with those, every
delay is within [0, max] and ``exponential`` never decreases from one attempt to the next.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from policy_engine.language.model import BackoffSpec, BackoffStrategy

Random = Callable[[], float]
"""A source of uniform floats in [0, 1), such as ``random.Random(seed).random``."""


def compute_delay(
    spec: BackoffSpec, attempt: int, rand: Random, previous: float | None = None
) -> float | None:
    """Seconds to wait before retry number ``attempt`` (1-based), or ``None`` to give up.

    ``rand`` is called at most once, and only by the jittered strategies, so a seeded source
    replays the same delays. ``previous`` only matters to ``decorrelated_jitter``, whose next
    delay grows from the last one rather than from the attempt number.
    """
    if attempt < 1:
        raise ValueError(f"attempts are counted from 1, got {attempt}")
    if attempt > spec.max_attempts:
        return None
    strategy = spec.strategy
    cap = spec.max
    base = spec.base
    if strategy is BackoffStrategy.CONSTANT:
        return min(cap, base)
    if strategy is BackoffStrategy.DECORRELATED_JITTER:
        prev = base if previous is None or previous < base else previous
        return min(cap, base + rand() * (3.0 * prev - base))
    ceiling = exponential(base, spec.multiplier, attempt, cap)
    if strategy is BackoffStrategy.FULL_JITTER:
        return rand() * ceiling
    if strategy is BackoffStrategy.EQUAL_JITTER:
        half = ceiling / 2.0
        return half + rand() * half
    return ceiling


def schedule(spec: BackoffSpec, rand: Random) -> tuple[float, ...]:
    """Every delay of one retry sequence, for explanations and ``policy-engine explain``."""
    delays: list[float] = []
    previous: float | None = None
    while (delay := compute_delay(spec, len(delays) + 1, rand, previous)) is not None:
        delays.append(delay)
        previous = delay
    return tuple(delays)


def to_client(spec: BackoffSpec) -> dict[str, Any]:
    """The ``backoff`` object of the client contract; durations in whole milliseconds.

    Milliseconds as integers because JavaScript clients and ``retry_after_ms`` already speak
    them, and an integer survives every JSON implementation unchanged.
    """
    return {
        "strategy": spec.strategy.value,
        "base_ms": round(spec.base * 1000),
        "max_ms": round(spec.max * 1000),
        "max_attempts": spec.max_attempts,
        "multiplier": spec.multiplier,
    }


def exponential(base: float, multiplier: float, attempt: int, cap: float) -> float:
    """``min(cap, base * multiplier ** (attempt - 1))`` without overflowing on long runs."""
    if base <= 0.0:
        return 0.0
    try:
        value = base * multiplier ** (attempt - 1)
    except OverflowError:
        return cap
    return min(cap, value)
