"""The state the engine and the adapter use: the store behind a timeout, a health record and
the policy's ``on_store_error``.

Everything that asks "is the state shared with other processes?" asks it here. The
memory store answers at once and never fails; a shared store (Redis) answers within
``store_timeout`` or not at all, and then the policy decides: let the call through
(``fail_open``), refuse it (``fail_closed``), or answer from this process's own state
(``local``). Every answer and failure of the shared store is told to :attr:`health`.

The request path asks the ``*_now`` methods first: they answer synchronously when no I/O is
needed (the memory store, or a ``scope: local`` rule) and return :data:`ASK` otherwise;
the caller then awaits the coroutine of the same name, which answers for any store.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from enum import Enum
from typing import Any, Final, Literal, Protocol, TypeVar

from policy_engine.algorithms.breaker import Circuit, Permit, Transition
from policy_engine.algorithms.ratelimit import CombinedDecision, RateDecision
from policy_engine.errors import StoreError
from policy_engine.language.model import (
    CircuitBreakerSpec,
    RateLimitSpec,
    Scope,
    StoreFailureMode,
)
from policy_engine.state.health import StoreHealth
from policy_engine.state.memory import MemoryStore
from policy_engine.state.protocol import FOREVER, ConnectionLimits, ReplayedEvent, StateStore
from policy_engine.state.store_breaker import StoreBreaker

T = TypeVar("T")
Checks = Sequence[tuple[RateLimitSpec, str]]
CheckThenAcquire = Callable[
    [Sequence[Checks], CircuitBreakerSpec, float],
    Awaitable[tuple[list[CombinedDecision], Permit | None]],
]
ALL_ADMIT: Final = CombinedDecision(True, 0.0, None, None)
"""What no limits at all decide."""

_log = logging.getLogger("policy_engine.state.guarded")


class _Ask(Enum):
    ASK = "ask"


ASK: Final = _Ask.ASK
"""A ``*_now`` answer meaning "this needs the shared store: await the coroutine instead"."""
Ask = Literal[_Ask.ASK]

STORE_UNAVAILABLE = "store_unavailable"
"""The ceiling reported for a connection that could not be counted under ``fail_closed``."""

STORE_RETRY_AFTER = 1.0
"""The retry advice of a refusal because the shared store is down."""

STORE_REFUSED = Permit(False, STORE_RETRY_AFTER, Circuit.OPEN)
"""The permit refused under ``fail_closed`` because the store did not answer: no breaker
judged the call, and the refusal says so (:func:`store_refused` for rate limits)."""


def store_refused(decision: CombinedDecision) -> bool:
    """Whether a refusal came from the store failing (``fail_closed``), not from a limit:
    only then does it carry no limit's own decision."""
    return not decision.allowed and decision.decision is None


class RateNow(Protocol):
    def __call__(self, spec: RateLimitSpec, key: str, now: float, /) -> RateDecision | Ask: ...


class PermitNow(Protocol):
    def __call__(self, spec: CircuitBreakerSpec, now: float, /) -> Permit | Ask: ...


class RecordNow(Protocol):
    def __call__(
        self, spec: CircuitBreakerSpec, now: float, /, *, failed: bool, duration: float
    ) -> Transition | Ask | None: ...


class GuardedStore:
    """One state store as the engine sees it; ``configure`` applies a policy's defaults."""

    def __init__(self, store: StateStore | None = None, local: MemoryStore | None = None) -> None:
        self.local = local or (store if isinstance(store, MemoryStore) else MemoryStore())
        self.store: StateStore = store or self.local
        self.shared = self.store is not self.local
        self.health = StoreHealth()
        # A store that can be probed gets a breaker: during an outage, no call waits.
        # Its breaker, not each late call, tells health the store is down.
        ping = getattr(self.store, "ping", None)
        self.breaker = (
            StoreBreaker(ping, on_open=self.health.down, on_close=self.health.answered)
            if self.shared and ping is not None
            else None
        )
        self.timeout = 0.05
        self.on_error = StoreFailureMode.FAIL_OPEN
        self._store_times_calls = False
        # Where each open connection was counted, so its disconnect releases that count.
        self._counted_in: dict[str, StateStore] = {}
        # The synchronous answers (ASK: await the coroutine of the same name instead), chosen
        # once: alone, the memory store's own methods, so the request path pays no call in
        # between.
        self.rate_now: RateNow = (
            self._shared_rate_now if self.shared else self.local.check_rate_limit_now
        )
        self.permit_now: PermitNow = self._ask if self.shared else self.local.breaker_acquire_now
        # A shared store's one call for an event's limits and its breaker's permit, if it
        # has one (the Redis store's ``check_rate_limits_then_acquire``).
        self._check_then_acquire: CheckThenAcquire | None = (
            getattr(store, "check_rate_limits_then_acquire", None) if self.shared else None
        )
        self.record_now: RecordNow = self._ask if self.shared else self.local.breaker_record_now

    def configure(self, timeout: float, on_error: StoreFailureMode) -> None:
        self.timeout, self.on_error = timeout, on_error
        # A store that bounds its own calls (one timer per connection, not one per call)
        # is told the timeout; the calls it bounds are then awaited with no timer here.
        answer_within = getattr(type(self.store), "answer_within", None)  # its own method
        self._store_times_calls = (
            bool(answer_within(self.store, timeout)) if answer_within else False
        )

    def default_clock(self) -> Callable[[], float]:
        """Processes sharing a store compare each other's times, so they read the wall
        clock; alone, this process's monotonic clock is immune to the wall clock's jumps."""
        return time.time if self.shared else time.monotonic

    # -- rate limits -------------------------------------------------------------------------

    def _shared_rate_now(self, spec: RateLimitSpec, key: str, now: float) -> RateDecision | Ask:
        """One limit alone, answered now when it is this process's (``scope: local``)."""
        if spec.scope is not Scope.LOCAL:
            return ASK
        return self.local.check_rate_limit_now(spec, key, now)

    @staticmethod
    def _ask(*_: Any, **__: Any) -> Ask:
        return ASK

    def rates_now(self, checks: Checks, now: float) -> CombinedDecision | Ask:
        """The checks judged together, when each of them lives in this process."""
        if self.shared:
            for spec, _ in checks:
                if spec.scope is not Scope.LOCAL:
                    return ASK
        return self.local.check_rate_limits_now(checks, now)

    async def rates(self, checks: Checks, now: float) -> CombinedDecision:
        """The checks judged together: this process's first, the shared ones if they pass."""
        if not self.shared:
            return self.local.check_rate_limits_now(checks, now)
        decided, shared = self._split(checks, now)
        if not shared:
            return decided or self.local.check_rate_limits_now((), now)
        try:
            answer = await self._call(self.store.check_rate_limits(shared, now), timed=True)
        except StoreError:
            answer = self._unanswered(shared, now)
        return _joined(decided, answer)

    async def rates_then_permit(
        self,
        enforced: Checks,
        shadows: Sequence[Checks],
        spec: CircuitBreakerSpec,
        now: float,
    ) -> tuple[CombinedDecision, list[CombinedDecision], Permit | None]:
        """``enforced`` and each of ``shadows`` judged as :meth:`rates` judges them and, when
        ``enforced`` admits, a permit from ``spec`` as :meth:`permit` gives it (None when
        it refuses: none was taken).

        One call to a shared store that can ask them all at once, instead of one each.
        """
        combined = self._check_then_acquire
        if combined is None:
            decision = await self.rates(enforced, now)
            answers = [await self.rates(checks, now) for checks in shadows]
            return decision, answers, (await self.permit(spec, now)) if decision.allowed else None
        decided, shared = self._split(enforced, now)
        if decided is not None and not decided.allowed:
            return decided, [await self.rates(checks, now) for checks in shadows], None
        own = [self._split(checks, now) for checks in shadows]
        groups = [shared, *(asked for _, asked in own)]
        try:
            decisions, permit = await self._call(combined(groups, spec, now), timed=True)
        except StoreError:
            decisions = [
                self._unanswered(checks, now) if checks else ALL_ADMIT for checks in groups
            ]
            permit = STORE_REFUSED if self.on_error is StoreFailureMode.FAIL_CLOSED else None
        answer, *answers = decisions
        shadowed = [_joined(mine, got) for (mine, _), got in zip(own, answers, strict=True)]
        if not answer.allowed:
            return answer, shadowed, None
        return _joined(decided, answer), shadowed, permit

    def _split(self, checks: Checks, now: float) -> tuple[CombinedDecision | None, Checks]:
        """This process's own checks judged now (None: it has none), and the shared ones
        left to ask: none when its own refused already, so that they are not charged."""
        local = [check for check in checks if check[0].scope is Scope.LOCAL]
        decided = self.local.check_rate_limits_now(local, now) if local else None
        if decided is not None and not decided.allowed:
            return decided, ()
        return decided, [check for check in checks if check[0].scope is not Scope.LOCAL]

    def _unanswered(self, shared: Checks, now: float) -> CombinedDecision:
        """What the policy's ``on_store_error`` decides for limits the store did not judge."""
        mode = self.on_error
        if mode is StoreFailureMode.LOCAL:
            return self.local.check_rate_limits_now(shared, now)
        allowed = mode is StoreFailureMode.FAIL_OPEN
        retry_after = 0.0 if allowed else STORE_RETRY_AFTER
        return CombinedDecision(allowed, retry_after, shared[0][0].name, None)

    def refused_locally(self, checks: Checks, now: float) -> bool:
        """Whether the shared store refuses these checks without a round trip (its near
        cache of keys over their limit): then nothing else need be asked of it."""
        peek = getattr(self.store, "refused_nearby", None)
        return peek is not None and bool(peek(checks, now))

    # -- circuit breakers --------------------------------------------------------------------

    async def permit(self, spec: CircuitBreakerSpec, now: float) -> Permit | None:
        """A permit; None when the store did not answer and the policy lets the call go on
        unguarded (``fail_open``, ``local``); a refusal under ``fail_closed``."""
        if not self.shared:
            return self.local.breaker_acquire_now(spec, now)
        try:
            return await self._call(self.store.breaker_acquire(spec, now), timed=True)
        except StoreError:
            if self.on_error is StoreFailureMode.FAIL_CLOSED:
                return STORE_REFUSED
            return None

    def release_now(self, spec: CircuitBreakerSpec) -> Ask | None:
        if self.shared:
            return ASK
        self.local.breaker_release_now(spec)
        return None

    async def release(self, spec: CircuitBreakerSpec) -> None:
        if self.release_now(spec) is ASK:
            await self._answer(self.store.breaker_release(spec), None, timed=True)

    async def record(
        self, spec: CircuitBreakerSpec, now: float, *, failed: bool, duration: float
    ) -> Transition | None:
        answer = self.record_now(spec, now, failed=failed, duration=duration)
        if answer is not ASK:
            return answer
        call = self.store.breaker_record(spec, now, failed=failed, duration=duration)
        return await self._answer(call, None, timed=True)

    async def circuit(self, name: str) -> str:
        """A breaker's circuit for status pages; "unknown" when the store cannot tell."""
        if not self.shared:
            return self.local.breaker_state(name).circuit.value
        fetch = getattr(self.store, "fetch_breaker_state", None)
        if fetch is None:
            return "unknown"
        try:
            stored = await self._call(fetch(name), catch=Exception)
        except StoreError:
            return "unknown"
        return str(stored.circuit.value)

    # -- connections -------------------------------------------------------------------------

    async def open_connection(self, sid: str, limits: ConnectionLimits) -> str | None:
        """Count a new connection unless a ceiling is reached; the ceiling hit, if any.

        Where it was counted is remembered, so that :meth:`close_connection` releases
        exactly that count: nothing when it was let in uncounted (``fail_open``), the local
        count when the shared store did not answer under ``local``.
        """
        store: StateStore = self.store
        try:
            if self.shared:
                ceiling = await self._call(store.open_connection(limits), timed=True)
            else:
                ceiling = await store.open_connection(limits)
        except StoreError:
            mode = self.on_error
            if mode is StoreFailureMode.FAIL_CLOSED:
                return STORE_UNAVAILABLE
            if mode is StoreFailureMode.FAIL_OPEN:
                return None
            store = self.local
            ceiling = await store.open_connection(limits)
        if ceiling is None:
            self._counted_in[sid] = store
        return ceiling

    async def close_connection(self, sid: str, user: str, ip: str) -> None:
        store = self._counted_in.pop(sid, None)
        if store is not None:
            await self._answer(store.close_connection(user, ip), None, store, timed=True)

    # -- authentication failures -------------------------------------------------------------

    async def record_auth_failure(self, key: str, window: float, now: float) -> int:
        return await self._answer(self.store.record_auth_failure(key, window, now), 0)

    async def auth_failures(self, key: str, window: float, now: float) -> tuple[int, float]:
        return await self._answer(self.store.auth_failures(key, window, now), (0, 0.0))

    async def clear_auth_failures(self, key: str) -> None:
        await self._answer(self.store.clear_auth_failures(key), None)

    # -- replay buffers ----------------------------------------------------------------------
    # A failing replay buffer costs recovery, never the emit: any failure reads as None.

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
    ) -> int | None:
        call = self.store.append_replay(
            stream,
            event,
            data,
            limit,
            now,
            retain=retain,
            max_bytes=max_bytes,
            max_total_bytes=max_total_bytes,
        )
        return await self._replay_call(call)

    async def replay_since(
        self, stream: str, after_id: int, max_age: float, now: float
    ) -> list[ReplayedEvent] | None:
        return await self._replay_call(self.store.replay_since(stream, after_id, max_age, now))

    async def _replay_call(self, awaitable: Awaitable[T]) -> T | None:
        if not self.shared:
            return await awaitable
        try:
            return await self._call(awaitable, catch=Exception)
        except StoreError:
            _log.debug("replay buffer unavailable", exc_info=True)
            return None

    # -- status and lifecycle ----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        if not self.shared:
            return {"kind": "memory"}
        return {
            "kind": type(self.store).__name__,
            "available": self.health.available,
            "failures": self.health.failures,
            "on_store_error": self.on_error.value,
        }

    async def close(self) -> None:
        if self.breaker is not None:
            await self.breaker.close()
        await self.store.close()

    # -- plumbing ----------------------------------------------------------------------------

    async def _call(
        self,
        awaitable: Awaitable[T],
        *,
        catch: type[BaseException] | tuple[type[BaseException], ...] = (
            TimeoutError,
            OSError,
            ConnectionError,
        ),
        timed: bool = False,
    ) -> T:
        """A shared-store call within ``timeout``, told to :attr:`health` and the breaker;
        StoreError when it fails or is late, and at once while the breaker is open.

        ``timed``: a call the store bounds by ``timeout`` itself when it said it would
        (:meth:`configure`), so no timer is set for it here.
        """
        breaker = self.breaker
        if breaker is not None and breaker.is_open:
            if inspect.iscoroutine(awaitable):
                awaitable.close()  # never started: nothing to wait for
            self.health.failures += 1
            raise StoreError("state store unavailable (its breaker is open)")
        try:
            if timed and self._store_times_calls:
                answer = await awaitable
            else:
                async with asyncio.timeout(self.timeout):  # no task per call, as wait_for
                    answer = await awaitable
        except StoreError as exc:
            self._failed(exc)
            raise
        except catch as exc:
            self._failed(exc)
            raise StoreError(f"state store did not answer: {exc!r}") from exc
        if breaker is not None:
            breaker.answered()
        else:
            self.health.answered()
        return answer

    def _failed(self, error: BaseException) -> None:
        if self.breaker is None:
            self.health.failed(error)
        else:
            self.health.failures += 1
            self.breaker.failed(error)

    async def _answer(
        self,
        awaitable: Awaitable[T],
        fallback: T,
        store: StateStore | None = None,
        *,
        timed: bool = False,
    ) -> T:
        """A call's answer, or ``fallback`` when the shared store fails (memory never does)."""
        if (store or self.store) is self.local:
            return await awaitable
        try:
            return await self._call(awaitable, timed=timed)
        except StoreError:
            return fallback


def _joined(decided: CombinedDecision | None, answer: CombinedDecision) -> CombinedDecision:
    """Limits judged in two parts, this process's (``decided``) and the store's: a refusal
    of the store's part stands; otherwise this process's decision is the answer (the
    store's, when this process had no limits of its own)."""
    return answer if decided is None or not answer.allowed else decided
