"""The embedded in-memory store: this process's state, with nothing to start.

The memory store is the default and the fallback: ``on_store_error: local`` routes to it
when the shared store does not answer, and ``scope: local`` rules always use it. Besides
the :class:`~policy_engine.state.protocol.StateStore` coroutines it answers the rate-limit
and breaker calls synchronously (the ``*_now`` methods): the guarded store
(:mod:`policy_engine.state.guarded`) takes that shortcut on the request path, where a
coroutine per call would cost more than the answer.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Any

from policy_engine.algorithms import breaker, ratelimit
from policy_engine.algorithms.breaker import BreakerState, Permit, Transition
from policy_engine.algorithms.ratelimit import CombinedDecision, RateDecision, RateState
from policy_engine.language.model import CircuitBreakerSpec, RateLimitSpec
from policy_engine.state.protocol import FOREVER, ConnectionLimits, ReplayedEvent, StateStore
from policy_engine.state.replay_buffers import Bounds, ReplayBuffers

__all__ = ["ConnectionLimits", "MemoryStore", "ReplayedEvent", "StateStore"]


_EXPIRED_PER_INSERT = 2
"""Emptied states dropped each time a new key is stored: age-based eviction as it goes."""

_SWEEP_INTERVAL = 10.0
"""Seconds between sweeps of every rule's table, made when a new key is stored."""


class _KeyedStates:
    """One rule's states by key, least recently written first.

    Bounded twice, so that neither a key-spraying client nor clients long gone can hold
    memory: by count (``max_keys``, the least recently written dropped) and by age (a
    state that has emptied again is dropped, as Redis drops it by its TTL). ``spec`` is the
    rule as last used, which says when a state empties even after a reload removed it.
    """

    __slots__ = ("limit", "spec", "states")

    def __init__(self, spec: RateLimitSpec) -> None:
        self.spec = spec
        self.limit = spec.max_keys
        self.states: OrderedDict[str, Any] = OrderedDict()

    def get(self, key: str) -> Any:
        return self.states.get(key)

    def put(self, key: str, state: Any, now: float) -> bool:
        """Store and mark as most recently used (only writes count as use); True for a new key."""
        states = self.states
        if key in states:
            states[key] = state
            states.move_to_end(key)
            return False
        states[key] = state
        if len(states) > self.limit:
            states.popitem(last=False)
        else:
            self.expire(now, _EXPIRED_PER_INSERT)
        return True

    def expire(self, now: float, at_most: int | None = None) -> None:
        """Drop emptied states from the front (the least recently written)."""
        states, spec = self.states, self.spec
        dropped = 0
        while states and (at_most is None or dropped < at_most):
            key = next(iter(states))
            if ratelimit.expires_at(spec, states[key]) > now:
                return
            del states[key]
            dropped += 1


class MemoryStore:
    """The embedded store: this process's state, in dicts, bounded per rule."""

    def __init__(self) -> None:
        self._rates: dict[str, _KeyedStates] = {}
        self._next_sweep = -FOREVER
        self._breakers: dict[str, BreakerState] = {}
        self._connections_total = 0
        self._per_user: dict[str, int] = {}
        self._per_ip: dict[str, int] = {}
        self._auth: OrderedDict[str, deque[float]] = OrderedDict()
        self._replay = ReplayBuffers()

    # -- rate limits -----------------------------------------------------------------------

    def check_rate_limits_now(
        self, checks: Sequence[tuple[RateLimitSpec, str]], now: float
    ) -> CombinedDecision:
        """The synchronous core, so the engine can skip a coroutine on the hot path."""
        if len(checks) == 1:
            return self._check_one(*checks[0], now)
        prior: list[tuple[RateLimitSpec, RateState | None]] = []
        tables: list[_KeyedStates] = []
        for spec, key in checks:
            table = self._rates.get(spec.name)
            if table is None or table.spec is not spec:
                table = self._table(spec)
            state = table.get(key)
            if state is not None and ratelimit.expires_at(spec, state) <= now:
                state = None
            prior.append((spec, state))
            tables.append(table)
        combined, states = ratelimit.check_all(prior, now)
        if combined.allowed:
            inserted = False
            for (_, key), table, state in zip(checks, tables, states, strict=True):
                if state is not None:
                    inserted = table.put(key, state, now) or inserted
            if inserted and now >= self._next_sweep:
                self.sweep(now)
        return combined

    def check_rate_limit_now(self, spec: RateLimitSpec, key: str, now: float) -> RateDecision:
        """One limit alone: the common case, without the bookkeeping of a joint check.

        Returns the limit's own decision, so a caller that judges it alone (a shadow rule)
        need not wrap it in a :class:`CombinedDecision`.
        """
        table = self._rates.get(spec.name)
        if table is None or table.spec is not spec:
            table = self._table(spec)
        # An expired state behaves exactly like none (each algorithm guarantees it), so
        # there is no need to ask expires_at on the hot path.
        decision, new_state = ratelimit.check(spec, table.states.get(key), now)
        if decision.allowed and table.put(key, new_state, now) and now >= self._next_sweep:
            self.sweep(now)
        return decision

    def rate_admits_now(self, spec: RateLimitSpec, key: str, now: float) -> bool:
        """:meth:`check_rate_limit_now`'s verdict alone, for a caller that needs no more:
        whether one limit admitted (and was charged) one request.

        The same state results; the decision is not built (a refusal changes nothing, so
        its details can still be asked of :meth:`check_rate_limit_now` right after).
        """
        table = self._rates.get(spec.name)
        if table is None or table.spec is not spec:
            table = self._table(spec)
        new_state = ratelimit.admit(spec, table.states.get(key), now)
        if new_state is None:
            return False
        if table.put(key, new_state, now) and now >= self._next_sweep:
            self.sweep(now)
        return True

    def _table(self, spec: RateLimitSpec) -> _KeyedStates:
        """The rule's table under ``spec``: created, or carried over a reload (resized)."""
        old = self._rates.get(spec.name)
        if old is not None and old.limit == spec.max_keys:
            old.spec = spec
            return old
        table = _KeyedStates(spec)
        if old is not None:
            for key, state in list(old.states.items())[-spec.max_keys :]:
                table.states[key] = state
        self._rates[spec.name] = table
        return table

    def sweep(self, now: float) -> None:
        """Evict by age: every rule's emptied states, and the tables left empty (among them
        those of rules a reload removed, which nothing else would visit again)."""
        self._next_sweep = now + _SWEEP_INTERVAL
        for name, table in list(self._rates.items()):
            table.expire(now)
            if not table.states:
                del self._rates[name]

    def _check_one(self, spec: RateLimitSpec, key: str, now: float) -> CombinedDecision:
        decision = self.check_rate_limit_now(spec, key, now)
        return CombinedDecision(decision.allowed, decision.retry_after, spec.name, decision)

    async def check_rate_limits(
        self, checks: Sequence[tuple[RateLimitSpec, str]], now: float
    ) -> CombinedDecision:
        return self.check_rate_limits_now(checks, now)

    def rate_keys(self, rule: str) -> int:
        table = self._rates.get(rule)
        return 0 if table is None else len(table.states)

    # -- circuit breakers ------------------------------------------------------------------

    def breaker_state(self, name: str) -> BreakerState:
        return self._breakers.get(name) or BreakerState()

    def breaker_acquire_now(self, spec: CircuitBreakerSpec, now: float) -> Permit:
        name = spec.name
        prior = self._breakers.get(name) or _CLOSED
        permit, state = breaker.acquire(spec, prior, now)
        if state is not prior:
            self._breakers[name] = state
        return permit

    def breaker_record_now(
        self, spec: CircuitBreakerSpec, now: float, *, failed: bool, duration: float
    ) -> Transition | None:
        name = spec.name
        prior = self._breakers.get(name) or _CLOSED
        state, transition = breaker.record(spec, prior, now, failed=failed, duration=duration)
        if state is not prior:
            self._breakers[name] = state
        return transition

    async def breaker_acquire(self, spec: CircuitBreakerSpec, now: float) -> Permit:
        return self.breaker_acquire_now(spec, now)

    async def breaker_record(
        self, spec: CircuitBreakerSpec, now: float, *, failed: bool, duration: float
    ) -> Transition | None:
        return self.breaker_record_now(spec, now, failed=failed, duration=duration)

    def breaker_release_now(self, spec: CircuitBreakerSpec) -> None:
        self._breakers[spec.name] = breaker.release(self.breaker_state(spec.name))

    async def breaker_release(self, spec: CircuitBreakerSpec) -> None:
        self.breaker_release_now(spec)

    # -- connections -----------------------------------------------------------------------

    async def open_connection(self, limits: ConnectionLimits) -> str | None:
        if limits.max_total is not None and self._connections_total >= limits.max_total:
            return "max_total"
        if (
            limits.user
            and limits.max_per_user is not None
            and self._per_user.get(limits.user, 0) >= limits.max_per_user
        ):
            return "max_per_user"
        if limits.max_per_ip is not None and self._per_ip.get(limits.ip, 0) >= limits.max_per_ip:
            return "max_per_ip"
        self._connections_total += 1
        if limits.user:
            self._per_user[limits.user] = self._per_user.get(limits.user, 0) + 1
        self._per_ip[limits.ip] = self._per_ip.get(limits.ip, 0) + 1
        return None

    async def close_connection(self, user: str, ip: str) -> None:
        self._connections_total = max(0, self._connections_total - 1)
        _decrement(self._per_user, user)
        _decrement(self._per_ip, ip)

    def connection_counts(self) -> tuple[int, int, int]:
        """Total, distinct users and distinct IPs currently counted: for status and tests."""
        return self._connections_total, len(self._per_user), len(self._per_ip)

    # -- authentication failures -----------------------------------------------------------

    async def record_auth_failure(self, key: str, window: float, now: float) -> int:
        auth = self._auth
        failures = auth.pop(key, None) or deque(maxlen=1000)
        _expire(failures, now - window)
        failures.append(now)
        auth[key] = failures  # re-inserted last: the front has the oldest failures
        # Keys whose last failure has left the window are dropped by age, not only when
        # read again: failed sign-ins come from addresses and names of the clients' choice.
        while auth:
            oldest = next(iter(auth.values()))
            if oldest and oldest[-1] > now - window:
                break
            auth.popitem(last=False)
        return len(failures)

    def auth_failure_keys(self) -> int:
        """Keys with failed sign-ins currently remembered: for tests."""
        return len(self._auth)

    async def auth_failures(self, key: str, window: float, now: float) -> tuple[int, float]:
        failures = self._auth.get(key)
        if failures is not None:
            _expire(failures, now - window)
        if not failures:
            self._auth.pop(key, None)
            return 0, 0.0
        return len(failures), failures[-1]

    async def clear_auth_failures(self, key: str) -> None:
        self._auth.pop(key, None)

    # -- replay buffers --------------------------------------------------------------------

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
        bounds = Bounds(limit, retain, max_bytes, max_total_bytes)
        return self._replay.append(stream, event, data, now, bounds)

    async def replay_since(
        self, stream: str, after_id: int, max_age: float, now: float
    ) -> list[ReplayedEvent] | None:
        return self._replay.since(stream, after_id, max_age, now)

    def replay_counts(self) -> tuple[int, int, int]:
        """Streams buffered, dropped streams remembered and bytes buffered: for tests."""
        return self._replay.counts()

    async def close(self) -> None:
        return None


_CLOSED = BreakerState()
"""The state of a breaker never used: closed, with an empty window (it is immutable)."""


def _decrement(counts: dict[str, int], key: str) -> None:
    value = counts.get(key, 0) - 1
    if value > 0:
        counts[key] = value
    else:
        counts.pop(key, None)


def _expire(times: deque[float], before: float) -> None:
    while times and times[0] <= before:
        times.popleft()
