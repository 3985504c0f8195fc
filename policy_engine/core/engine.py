"""The decision engine: one compiled policy, the guarded state, and a verdict per hook.

The engine knows nothing of Socket.IO. The adapter hands it plain-dict contexts (``conn``,
``claims``, ``event``, ``load``) and turns its :class:`Decision` into protocol actions.
Rules are judged in an order that refuses cheaply first: shedding (the server is
overloaded: do as little as possible), then payload checks, authorization, rate limits,
and finally the counters that a successful connect increments. Each rule group lives in
its own module; this class holds the per-process state they share and walks them.

A rule in shadow mode is judged exactly like an enforced one, but only named in
``Decision.shadowed``: it refuses nothing. Every method takes an optional
:class:`~policy_engine.core.recorder.Recorder`: ``explain`` is this same walk, recorded.

An event is judged synchronously as far as the state allows (:meth:`judge_event_now`);
what needs the shared store is awaited and then concluded by the same code.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

from policy_engine.core import auth_throttle, breakers
from policy_engine.core.authorization import authorize
from policy_engine.core.breakers import NO_GUARD, BreakerGuard, Refused, Waiting
from policy_engine.core.classify import Classification, classify, error_context
from policy_engine.core.connections import count_connection, priority
from policy_engine.core.contexts import conn_context, event_context
from policy_engine.core.decision import ALLOW, Decision, Outcome
from policy_engine.core.payload import ClientPayload, new_correlation_id
from policy_engine.core.payload_checks import check_payload
from policy_engine.core.rate_limits import RateCheck, RateLimits, conclude
from policy_engine.core.recorder import NULL_RECORDER, Recorder, TraceRecorder
from policy_engine.core.shedding import Shedding
from policy_engine.language.contexts import CONN, EVENT, LOAD, Hook
from policy_engine.language.model import EventPlan, PolicySet, RateLimitSpec
from policy_engine.state.guarded import ASK, GuardedStore
from policy_engine.state.health import StoreHealth
from policy_engine.state.memory import MemoryStore, StateStore

__all__ = [
    "NO_GUARD",
    "BreakerGuard",
    "Engine",
    "EventVerdict",
    "PendingEvent",
    "conn_context",
    "event_context",
    "new_correlation_id",
]

Clock = Callable[[], float]


class EventVerdict(NamedTuple):
    """An event's decision and the breaker permits it holds (None: not asked for yet)."""

    decision: Decision
    guard: BreakerGuard | None


class PendingEvent(NamedTuple):
    """An event judged up to its rate limits, which the shared store must answer."""

    rates: RateCheck
    refusal: Decision | None  # a delay decided before the rate limits
    shadowed: list[str]
    recorder: Recorder


_ALLOWED = EventVerdict(ALLOW, NO_GUARD)
_DELAY = Outcome.DELAY


class Engine:
    """Applies one :class:`PolicySet` at a time; ``swap`` replaces it atomically."""

    def __init__(
        self,
        policy: PolicySet,
        store: StateStore | None = None,
        *,
        clock: Clock | None = None,
        rand: Callable[[], float] = random.random,
        local: MemoryStore | None = None,
    ) -> None:
        self.state = GuardedStore(store, local)
        self.clock = clock or self.state.default_clock()
        self.rand = rand
        # Replaced by each load sample, never changed in place: the shedding rules armed
        # under it are worked out once per sample.
        self.load: dict[str, Any] = LOAD.defaults()
        self._shedding = Shedding()
        self._rates = RateLimits()
        self.swap(policy)

    @property
    def store(self) -> StateStore:
        return self.state.store

    @property
    def local(self) -> MemoryStore:
        return self.state.local

    @property
    def store_health(self) -> StoreHealth:
        return self.state.health

    def swap(self, policy: PolicySet) -> None:
        """Install a new policy; state is keyed by rule name, so unchanged rules keep theirs."""
        self.policy = policy
        self.state.configure(policy.defaults.store_timeout, policy.defaults.on_store_error)
        self._shedding.keep_clocks_of(policy)

    # -- connect -----------------------------------------------------------------------------

    async def on_connect(
        self,
        conn: dict[str, Any],
        claims: Mapping[str, Any],
        *,
        explain: bool = False,
        recorder: Recorder | None = None,
    ) -> Decision:
        """Judge a handshake; when allowed, the connection is counted until on_disconnect."""
        policy, state = self.policy, self.state
        recorder = _recorder(explain, recorder)
        shadowed: list[str] = []
        activation = {"conn": conn, "claims": claims, "load": self.load}
        index = policy.by_hook
        refusal = (
            self._shedding.shed(
                policy,
                index.shedding[Hook.CONNECT],
                activation,
                None,
                self.clock,
                recorder,
                shadowed,
            )
            or await auth_throttle.throttle(policy, state, conn, self.clock(), recorder)
            or authorize(
                policy,
                index.authorization[Hook.CONNECT],
                Hook.CONNECT,
                activation,
                recorder,
                shadowed,
            )
            or await self._rate_limits(
                index.rate_limits[Hook.CONNECT], activation, recorder, shadowed
            )
        )
        if refusal is None:
            conn["priority"] = priority(policy, activation)
            refusal = await count_connection(policy, state, conn, recorder)
        return _finish(refusal or ALLOW, shadowed, recorder)

    async def on_disconnect(self, conn: Mapping[str, Any]) -> None:
        self._rates.forget(conn["sid"])
        await self.state.close_connection(conn["sid"], conn["user_id"], conn["ip"])

    async def record_auth_failure(self, conn: Mapping[str, Any]) -> int:
        """Count a failed authentication against the client's IP and user."""
        return await auth_throttle.record_auth_failure(self.policy, self.state, conn, self.clock())

    async def clear_auth_failures(self, conn: Mapping[str, Any]) -> None:
        await auth_throttle.clear_auth_failures(self.policy, self.state, conn)

    def counts_as_auth_failure(self, classification: Classification) -> bool:
        return auth_throttle.counts_as_auth_failure(self.policy, classification)

    # -- events ------------------------------------------------------------------------------

    def judge_event_now(
        self, conn: Mapping[str, Any], claims: Mapping[str, Any], event: dict[str, Any]
    ) -> EventVerdict | PendingEvent:
        """:meth:`on_event` and :meth:`before_call` in one plain call, as far as the state
        answers without I/O: the whole verdict on the memory store.

        A :class:`PendingEvent` is settled by :meth:`settle_event`. The guard is None when
        the permits are still to be asked for through :meth:`before_call`: after a delay
        (a delayed call does not hold one while it waits), or from the shared store.
        """
        plan = self.policy.event_plans[event["name"]]
        decided = self._decide_event(plan, conn, claims, event, NULL_RECORDER)
        if isinstance(decided, PendingEvent):
            return decided
        if decided is ALLOW and not plan.breakers:
            return _ALLOWED
        if decided.outcome is _DELAY:
            return EventVerdict(decided, None)
        if not decided.allowed or not plan.breakers:
            return EventVerdict(decided, NO_GUARD)
        variables = (conn, claims, event, self.load)
        permits = breakers.take_permits(
            self.policy, self.state, plan.breakers, None, variables, self.clock(), NULL_RECORDER
        )
        if isinstance(permits, BreakerGuard):
            return EventVerdict(decided, permits)
        if isinstance(permits, Refused):
            for held in permits.held:
                self.state.release_now(held)
            return EventVerdict(permits.decision, NO_GUARD)
        return EventVerdict(decided, None)  # the shared store holds the breakers' state

    async def on_event(
        self,
        conn: Mapping[str, Any],
        claims: Mapping[str, Any],
        event: dict[str, Any],
        *,
        explain: bool = False,
        recorder: Recorder | None = None,
    ) -> Decision:
        """Judge one incoming event before its handler runs."""
        plan = self.policy.event_plans[event["name"]]
        if recorder is None:
            recorder = TraceRecorder() if explain else NULL_RECORDER
        decided = self._decide_event(plan, conn, claims, event, recorder)
        if isinstance(decided, PendingEvent):
            return await self.settle_event(decided)
        return decided

    async def settle_event(self, pending: PendingEvent) -> Decision:
        """Finish a judgement that waited for the shared store's rate-limit answers."""
        await pending.rates.answer(self.state)
        refusal = conclude(self.policy, pending.rates, pending.recorder, pending.shadowed)
        return _finish(refusal or pending.refusal or ALLOW, pending.shadowed, pending.recorder)

    def _decide_event(
        self,
        plan: EventPlan,
        conn: Mapping[str, Any],
        claims: Mapping[str, Any],
        event: dict[str, Any],
        recorder: Recorder,
    ) -> Decision | PendingEvent:
        """Payload, shedding, authorization and rate limits, as far as needs no I/O."""
        policy = self.policy
        spec = plan.spec
        event["priority"] = plan.priority
        if plan.plain and not plan.rate_limits and not recorder.enabled:
            # The common case, answered without building a context: only the size and the
            # shedding rules armed under the current load sample can refuse this event
            # (a plain plan says nothing of rate limits).
            max_bytes = spec.max_bytes
            if (max_bytes is None or event["size_bytes"] <= max_bytes) and (
                not plan.shedding
                or self._shedding.armed(policy, self.load).isdisjoint(plan.shedding_names)
            ):
                return ALLOW
        refusal = check_payload(spec, event, recorder)
        if refusal is not None:
            return _finish(refusal, [], recorder)
        shadowed: list[str] = []
        activation = {"conn": conn, "claims": claims, "event": event, "load": self.load}
        refusal = self._shedding.shed(
            policy, plan.shedding, activation, spec.priority, self.clock, recorder, shadowed
        )
        if refusal is None or refusal.outcome is _DELAY:
            # A delay only postpones the event: what would refuse it still does.
            refusal = (
                authorize(policy, plan.authorization, Hook.EVENT, activation, recorder, shadowed)
                or refusal
            )
        if plan.rate_limits and (refusal is None or refusal.outcome is _DELAY):
            check = self._rates.plan(policy, plan.rate_limits, activation, self.clock(), recorder)
            if not isinstance(check, RateCheck):
                return _finish(check, shadowed, recorder)
            if not check.answer_now(self.state):
                return PendingEvent(check, refusal, shadowed, recorder)
            refusal = conclude(policy, check, recorder, shadowed) or refusal
        if refusal is None and not shadowed and not recorder.enabled:
            return ALLOW
        return _finish(refusal or ALLOW, shadowed, recorder)

    async def on_emit(
        self,
        conn: Mapping[str, Any],
        claims: Mapping[str, Any],
        event: dict[str, Any],
        *,
        recorder: Recorder | None = None,
    ) -> Decision:
        """Judge one outgoing event: shedding and emit-hook rate limits."""
        policy = self.policy
        recorder = recorder or NULL_RECORDER
        spec = policy.events.get(event["name"]) or policy.default_event
        event["priority"] = spec.priority.value
        index = policy.by_hook
        if not index.limits_or_sheds(Hook.EMIT):
            return _finish(ALLOW, [], recorder)
        shadowed: list[str] = []
        activation = {"conn": conn, "claims": claims, "event": event, "load": self.load}
        sheds = index.shedding[Hook.EMIT]
        refusal = self._shedding.shed(
            policy, sheds, activation, spec.priority, self.clock, recorder, shadowed
        )
        if refusal is None or refusal.outcome is _DELAY:
            limits = index.rate_limits_for(Hook.EMIT, event["name"])
            refusal = await self._rate_limits(limits, activation, recorder, shadowed) or refusal
        return _finish(refusal or ALLOW, shadowed, recorder)

    async def _rate_limits(
        self,
        rules: tuple[RateLimitSpec, ...],
        activation: Mapping[str, Any],
        recorder: Recorder,
        shadowed: list[str],
    ) -> Decision | None:
        if not rules:
            return None
        check = self._rates.plan(self.policy, rules, activation, self.clock(), recorder)
        if not isinstance(check, RateCheck):
            return check
        if not check.answer_now(self.state):
            await check.answer(self.state)
        return conclude(self.policy, check, recorder, shadowed)

    # -- circuit breakers --------------------------------------------------------------------

    async def before_call(
        self,
        conn: Mapping[str, Any],
        claims: Mapping[str, Any],
        event: Mapping[str, Any],
        *,
        recorder: Recorder | None = None,
    ) -> BreakerGuard | Decision:
        """Ask every breaker guarding this event for a permit; refuse at once if one is open."""
        specs = self.policy.event_plans[event["name"]].breakers
        if not specs:
            return NO_GUARD
        policy, state, now = self.policy, self.state, self.clock()
        recorder = recorder or NULL_RECORDER
        variables = (conn, claims, event, self.load)
        permits = breakers.take_permits(policy, state, specs, None, variables, now, recorder)
        while isinstance(permits, Waiting):
            answer = await state.permit(specs[permits.at], now)
            permits = breakers.take_permits(
                policy, state, specs, None, variables, now, recorder, permits, answer
            )
        if isinstance(permits, Refused):
            for held in permits.held:
                await state.release(held)
            return _finish(permits.decision, [], recorder)
        return permits

    async def after_call(
        self,
        guard: BreakerGuard,
        conn: Mapping[str, Any],
        event: Mapping[str, Any],
        classification: Classification | None,
        error: Mapping[str, Any] | None,
    ) -> list[tuple[str, Any]]:
        """Report the handler's outcome to the breakers it held; returns their transitions."""
        if not guard.permits:
            return []
        now = self.clock()
        duration = now - guard.started
        failed = (
            ()
            if classification is None
            else breakers.recorded_failures(
                self.policy, guard, duration, conn, event, classification, error
            )
        )
        state = self.state
        transitions: list[tuple[str, Any]] = []
        for at, spec in enumerate(guard.permits):
            failure = failed[at] if failed else False
            transition = state.record_now(spec, now, failed=failure, duration=duration)
            if transition is ASK:
                transition = await state.record(spec, now, failed=failure, duration=duration)
            if transition is not None:
                transitions.append((spec.name, transition))
        return transitions

    # -- errors ------------------------------------------------------------------------------

    def on_error(
        self,
        exc: BaseException,
        hook: Hook,
        conn: Mapping[str, Any] | None = None,
        claims: Mapping[str, Any] | None = None,
        event: Mapping[str, Any] | None = None,
        *,
        recorder: Recorder | None = None,
    ) -> tuple[Classification, ClientPayload, dict[str, Any]]:
        """Classify an exception: the classification, its client payload, the error context."""
        error = error_context(exc, hook.value)
        activation = {
            "conn": conn if conn is not None else CONN.defaults(),
            "claims": claims if claims is not None else {},
            "event": event if event is not None else EVENT.defaults(),
            "error": error,
            "hook": hook.value,
        }
        classification = classify(self.policy, activation, recorder or NULL_RECORDER)
        return classification, classification.payload(), error

    # -- load shedding of connections --------------------------------------------------------

    def connections_to_shed(
        self, connections: Iterable[Mapping[str, Any]]
    ) -> list[tuple[str, ClientPayload]]:
        """On a sampler tick: the connections to disconnect now, lowest priority first."""
        return self._shedding.connections_to_shed(self.policy, self.load, connections, self.clock)


def _recorder(explain: bool, recorder: Recorder | None) -> Recorder:
    if recorder is not None:
        return recorder
    return TraceRecorder() if explain else NULL_RECORDER


def _finish(decision: Decision, shadowed: list[str], recorder: Recorder) -> Decision:
    if not shadowed and not recorder.enabled:
        return decision
    # Built field by field: NamedTuple._replace is much slower.
    return Decision(
        decision.outcome,
        decision.rule,
        decision.payload,
        decision.delay,
        tuple(shadowed),
        recorder.entries(),
        decision.key,
    )
