"""What the engine needs from shared state: the store protocol and the values it passes.

Strategies decide; stores offer a few narrow, atomic primitives (the split ``limits``
makes). Each primitive takes everything one decision needs in one call, so a networked
store answers with one round trip (one Lua script) per hook rather than one per rule.
State is keyed by rule name and key, never by a rule's parameters: a hot reload that keeps
a rule keeps its counters and breaker state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from policy_engine.algorithms.breaker import Permit, Transition
from policy_engine.algorithms.ratelimit import CombinedDecision
from policy_engine.language.model import CircuitBreakerSpec, RateLimitSpec

FOREVER = math.inf


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """Which counters a new connection increments, and their ceilings (None: unlimited)."""

    user: str
    ip: str
    max_total: int | None
    max_per_user: int | None
    max_per_ip: int | None


@dataclass(frozen=True, slots=True)
class ReplayedEvent:
    event_id: int
    event: str
    data: Any


class StateStore(Protocol):
    """What the engine needs from shared state; every method is one atomic step."""

    async def check_rate_limits(
        self, checks: Sequence[tuple[RateLimitSpec, str]], now: float
    ) -> CombinedDecision:
        """Judge every (rule, key) together; consume from all or none."""
        ...

    async def breaker_acquire(self, spec: CircuitBreakerSpec, now: float) -> Permit: ...

    async def breaker_record(
        self, spec: CircuitBreakerSpec, now: float, *, failed: bool, duration: float
    ) -> Transition | None: ...

    async def breaker_release(self, spec: CircuitBreakerSpec) -> None: ...

    async def open_connection(self, limits: ConnectionLimits) -> str | None:
        """Count a new connection unless a ceiling is reached; returns the ceiling hit."""
        ...

    async def close_connection(self, user: str, ip: str) -> None: ...

    async def record_auth_failure(self, key: str, window: float, now: float) -> int:
        """Add one failure; returns the failures within ``window`` including this one."""
        ...

    async def auth_failures(self, key: str, window: float, now: float) -> tuple[int, float]:
        """Failures within ``window`` and when the last one happened (0.0 when none)."""
        ...

    async def clear_auth_failures(self, key: str) -> None: ...

    async def append_replay(
        self,
        stream: str,
        event: str,
        data: Any,
        limit: int,
        now: float,
        *,
        retain: float = FOREVER,
        max_bytes: int | None = None,
        max_total_bytes: int | None = None,
    ) -> int:
        """Buffer an outgoing event for replay; returns its id (increasing per stream).

        A stream's buffer keeps its newest ``limit`` events within ``max_bytes``; all the
        buffers together keep within ``max_total_bytes``, the oldest entries of the least
        recently active streams evicted first. Streams with no event for ``retain`` seconds
        may be dropped: nobody can still recover from them. Their ids keep counting where
        they stopped for twice ``retain``.
        """
        ...

    async def replay_since(
        self, stream: str, after_id: int, max_age: float, now: float
    ) -> list[ReplayedEvent] | None:
        """Events after ``after_id``, in order; None when they cannot all be replayed.

        None means the client missed more than is buffered, or was away longer than
        ``max_age`` (its first missed event is older), or names an id after the stream's
        last (ids that restarted, or were never the store's): it must reload instead.
        """
        ...

    async def close(self) -> None: ...
