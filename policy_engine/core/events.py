"""The event hooks: an incoming event judged before its handler, the breakers around the
handler, and an outgoing event judged before it is sent.

An incoming event is judged synchronously as far as the state answers without I/O
(:meth:`EventHooks.judge_event_now`): on the memory store, the whole verdict in one plain
call. What needs the shared store comes back as a :class:`PendingEvent`, whose answers
are awaited and then concluded by the same code (:meth:`EventHooks.settle_event`).
These are :class:`~policy_engine.core.engine.Engine`'s methods, kept in their own module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from policy_engine.cel import SharedContext
from policy_engine.core import breakers
from policy_engine.core.authorization import authorize
from policy_engine.core.breakers import NO_GUARD, BreakerGuard, Refused, Waiting, take_permits
from policy_engine.core.classify import Classification
from policy_engine.core.decision import ALLOW, Decision, Outcome
from policy_engine.core.event_judge import EventVerdict, PlanJudge
from policy_engine.core.payload_checks import check_schema, check_size
from policy_engine.core.payload_view import PayloadView, cel_event
from policy_engine.core.rate_limits import RateCheck, RateLimits
from policy_engine.core.recorder import NULL_RECORDER, Recorder, TraceRecorder
from policy_engine.core.shedding import Shedding
from policy_engine.core.tap import DecisionTap
from policy_engine.language.contexts import Hook
from policy_engine.language.model import (
    CircuitBreakerSpec,
    EventPlan,
    EventSpec,
    PolicySet,
    RateLimitSpec,
)
from policy_engine.state.guarded import ASK, GuardedStore

__all__ = ["EventHooks", "EventVerdict", "PendingEvent", "finish"]


class PendingEvent(NamedTuple):
    """An event judged up to its rate limits, which the shared store must answer; its
    schema and authorization are judged once they did."""

    rates: RateCheck
    refusal: Decision | None  # a delay decided before the rate limits
    shadowed: list[str]
    recorder: Recorder
    plan: EventPlan
    event: dict[str, Any]
    activation: dict[str, Any]


_ALLOWED = EventVerdict(ALLOW, NO_GUARD)
_DELAY = Outcome.DELAY


class EventHooks:
    """The event hooks of the engine, over the state it holds."""

    policy: PolicySet
    state: GuardedStore
    load: dict[str, Any]
    clock: Callable[[], float]
    tap: DecisionTap | None
    _shedding: Shedding
    _rates: RateLimits
    _payload_views: dict[str, PayloadView | None]
    _judges: dict[str, PlanJudge | None]
    _other_judge: PlanJudge | None

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
        judge = self._judges.get(event["name"], self._other_judge)
        if judge is not None and self.tap is None:
            verdict = judge.verdict(conn, claims, event, self.load, self.clock, self._shedding)
            if verdict is not None:
                return verdict
        plan = self.policy.event_plans[event["name"]]
        decided = self._decide_event(plan, conn, claims, event, NULL_RECORDER)
        tap = self.tap
        if tap is not None and type(decided) is Decision:
            tap.judged(Hook.EVENT, conn, claims, event, self.load, decided)
        if decided is ALLOW and not plan.breakers:
            return _ALLOWED
        if isinstance(decided, PendingEvent):
            return decided
        if decided.outcome is _DELAY:
            return EventVerdict(decided, None)
        if not decided.allowed or not plan.breakers:
            return EventVerdict(decided, NO_GUARD)
        seen: Mapping[str, Any] = event
        if self._payload_views:
            guarded = self._guarded_event(plan, event, NULL_RECORDER)
            if isinstance(guarded, Decision):
                return EventVerdict(guarded, NO_GUARD)
            seen = guarded
        variables = (conn, claims, seen, self.load)
        permits = take_permits(
            self.policy, self.state, plan.breakers, variables, self.clock(), NULL_RECORDER
        )
        if type(permits) is BreakerGuard:
            return EventVerdict(decided, permits)
        if isinstance(permits, Refused):
            for held in permits.held:
                self.state.release_now(held)
            if tap is not None:
                tap.judged(Hook.EVENT, conn, claims, event, self.load, permits.decision)
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
        if recorder is None and not explain and self.tap is None:
            judge = self._judges.get(event["name"], self._other_judge)
            if judge is not None:
                judged = judge.decide(conn, claims, event, self.load, self.clock, self._shedding)
                if judged is not None:
                    return judged
        plan = self.policy.event_plans[event["name"]]
        if recorder is None:
            recorder = TraceRecorder() if explain else NULL_RECORDER
        decided = self._decide_event(plan, conn, claims, event, recorder)
        if isinstance(decided, PendingEvent):
            return await self.settle_event(decided)
        tap = self.tap
        if tap is not None:
            tap.judged(Hook.EVENT, conn, claims, event, self.load, decided)
        return decided

    async def settle_event(self, pending: PendingEvent) -> Decision:
        """Finish a judgement that waited for the shared store's rate-limit answers."""
        await pending.rates.answer(self.state)
        refusal = pending.rates.conclude(self.policy, pending.recorder, pending.shadowed)
        decision = self._checks(
            pending.plan,
            pending.event,
            pending.activation,
            refusal or pending.refusal,
            pending.shadowed,
            pending.recorder,
        )
        tap = self.tap
        if tap is not None:
            activation = pending.activation
            tap.judged(
                Hook.EVENT,
                activation["conn"],
                activation["claims"],
                pending.event,
                activation["load"],
                decision,
            )
        return decision

    def _decide_event(
        self,
        plan: EventPlan,
        conn: Mapping[str, Any],
        claims: Mapping[str, Any],
        event: dict[str, Any],
        recorder: Recorder,
    ) -> Decision | PendingEvent:
        """Size, shedding and rate limits, then the checks that cost in proportion to the
        payload (schema, authorization), as far as needs no I/O.

        A client over its limit is refused before its payload is validated or read by any
        condition; a payload a condition must not read is refused before that condition.
        """
        event["priority"] = plan.priority
        if plan.plain and not plan.rate_limits and not recorder.enabled:
            # The common case, answered without building a context: only the size and the
            # shedding rules armed under the current load sample can refuse this event
            # (a plain plan says nothing of rate limits).
            max_bytes = plan.spec.max_bytes
            if (max_bytes is None or event["size_bytes"] <= max_bytes) and (
                not plan.shedding
                or self._shedding.armed(self.policy, self.load).isdisjoint(plan.shedding_names)
            ):
                return ALLOW
        policy = self.policy
        spec = plan.spec
        max_bytes = spec.max_bytes
        if max_bytes is not None and event["size_bytes"] > max_bytes:
            return finish(check_size(spec, event, recorder) or ALLOW, [], recorder)
        refusal: Decision | None = None
        shadowed: list[str] = []
        activation: dict[str, Any] = {
            "conn": conn,
            "claims": claims,
            "event": event,
            "load": self.load,
        }
        views = self._payload_views
        view = views.get(event["name"], views[""]) if views else None
        if view is not None:  # conditions that convert the event: convert it once
            activation = SharedContext(activation)
        if plan.shedding:
            if view is not None and view.sheds:
                refusal = self._cel_event(view, spec, activation, recorder)
                if refusal is not None:
                    return finish(refusal, [], recorder)
            refusal = self._shedding.shed(
                policy, plan.shedding, activation, spec.priority, self.clock, recorder, shadowed
            )
        if plan.rate_limits and (refusal is None or refusal.outcome is _DELAY):
            # A delay only postpones the event: what would refuse it still does.
            if view is not None and view.limits and activation["event"] is event:
                invalid = self._cel_event(view, spec, activation, recorder)
                if invalid is not None:
                    return finish(invalid, shadowed, recorder)
            judged = self._rates.judge(
                policy, plan.rate_limits, activation, self.clock(), self.state, recorder, shadowed
            )
            if isinstance(judged, RateCheck):
                return PendingEvent(judged, refusal, shadowed, recorder, plan, event, activation)
            refusal = judged or refusal
        return self._checks(plan, event, activation, refusal, shadowed, recorder)

    def _checks(  # noqa: PLR0917 (a judgement's state, passed along)
        self,
        plan: EventPlan,
        event: dict[str, Any],
        activation: dict[str, Any],
        refusal: Decision | None,
        shadowed: list[str],
        recorder: Recorder,
    ) -> Decision:
        """The payload's schema and the authorization rules, unless already refused."""
        if refusal is not None and refusal.outcome is not _DELAY:
            return finish(refusal, shadowed, recorder)
        spec = plan.spec
        if spec.validate is not None or recorder.enabled:
            invalid = check_schema(spec, event, recorder)
            if invalid is not None:
                return finish(invalid, shadowed, recorder)
        if plan.authorization:
            # A shared context means some condition converts the event: check it first.
            if type(activation) is SharedContext and activation["event"] is event:
                views = self._payload_views
                view = views.get(event["name"], views[""])
                invalid = (
                    None if view is None else self._cel_event(view, spec, activation, recorder)
                )
                if invalid is not None:
                    return finish(invalid, shadowed, recorder)
            refusal = (
                authorize(
                    self.policy, plan.authorization, Hook.EVENT, activation, recorder, shadowed
                )
                or refusal
            )
        if refusal is None and not shadowed and not recorder.enabled:
            return ALLOW
        return finish(refusal or ALLOW, shadowed, recorder)

    def _guarded_event(
        self, plan: EventPlan, event: Mapping[str, Any], recorder: Recorder
    ) -> Mapping[str, Any] | Decision:
        """The event as breaker conditions see it: checked when one runs in a converting
        engine (the rules before them may have read none of it). Asked only when some
        condition of the policy converts an event."""
        views = self._payload_views
        view = views.get(event["name"], views[""])
        if view is None or not view.guards:
            return event
        return cel_event(view, plan.spec, event, recorder)

    @staticmethod
    def _cel_event(
        view: PayloadView, spec: EventSpec, activation: dict[str, Any], recorder: Recorder
    ) -> Decision | None:
        """Hand the conditions the checked event; the refusal when it cannot be."""
        seen = cel_event(view, spec, activation["event"], recorder)
        if isinstance(seen, Decision):
            return seen
        activation["event"] = seen
        return None

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
        tap = self.tap
        if not index.limits_or_sheds(Hook.EMIT):
            if tap is not None:
                tap.judged(Hook.EMIT, conn, claims, event, self.load, ALLOW)
            return finish(ALLOW, [], recorder)
        shadowed: list[str] = []
        activation = {"conn": conn, "claims": claims, "event": event, "load": self.load}
        sheds = index.shedding[Hook.EMIT]
        refusal = self._shedding.shed(
            policy, sheds, activation, spec.priority, self.clock, recorder, shadowed
        )
        if refusal is None or refusal.outcome is _DELAY:
            limits = index.rate_limits_for(Hook.EMIT, event["name"])
            refusal = await self._rate_limits(limits, activation, recorder, shadowed) or refusal
        decision = finish(refusal or ALLOW, shadowed, recorder)
        if tap is not None:
            tap.judged(Hook.EMIT, conn, claims, event, self.load, decision)
        return decision

    async def _rate_limits(
        self,
        rules: tuple[RateLimitSpec, ...],
        activation: Mapping[str, Any],
        recorder: Recorder,
        shadowed: list[str],
    ) -> Decision | None:
        if not rules:
            return None
        policy, state = self.policy, self.state
        judged = self._rates.judge(
            policy, rules, activation, self.clock(), state, recorder, shadowed
        )
        if isinstance(judged, RateCheck):
            await judged.answer(state)
            return judged.conclude(policy, recorder, shadowed)
        return judged

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
        if recorder is None and self.tap is None:
            judge = self._judges.get(event["name"], self._other_judge)
            if judge is not None:
                if not judge.breakers:
                    return NO_GUARD
                prepared = judge.permits(conn, claims, event, self.load, self.clock())
                if isinstance(prepared, BreakerGuard):
                    return prepared
                for held in prepared.held:
                    await self.state.release(held)
                return prepared.decision
        policy = self.policy
        plan = policy.event_plans[event["name"]]
        specs = plan.breakers
        if not specs:
            return NO_GUARD
        seen: Mapping[str, Any] = event
        if self._payload_views:
            guarded = self._guarded_event(plan, event, recorder or NULL_RECORDER)
            if isinstance(guarded, Decision):
                return guarded
            seen = guarded
        state, now = self.state, self.clock()
        variables = (conn, claims, seen, self.load)
        permits = take_permits(policy, state, specs, variables, now, recorder or NULL_RECORDER)
        if type(permits) is BreakerGuard:
            return permits
        return await self._walk_permits(
            specs, variables, now, recorder or NULL_RECORDER, permits, event
        )

    async def _walk_permits(  # noqa: PLR0917 (a walk's state, passed along)
        self,
        specs: tuple[CircuitBreakerSpec, ...],
        variables: tuple[Mapping[str, Any], Mapping[str, Any], Mapping[str, Any], Any],
        now: float,
        recorder: Recorder,
        permits: BreakerGuard | Refused | Waiting,
        event: Mapping[str, Any],
    ) -> BreakerGuard | Decision:
        """Finish a walk of the breakers that stopped for the shared store's answers."""
        policy, state = self.policy, self.state
        while isinstance(permits, Waiting):
            answer = await state.permit(specs[permits.at], now)
            permits = take_permits(policy, state, specs, variables, now, recorder, permits, answer)
        if isinstance(permits, Refused):
            for held in permits.held:
                await state.release(held)
            tap = self.tap
            if tap is not None:
                conn, claims = variables[0], variables[1]
                tap.judged(Hook.EVENT, conn, claims, event, self.load, permits.decision)
            return finish(permits.decision, [], recorder)
        return permits

    async def settle_with_permits(
        self,
        pending: PendingEvent,
        conn: Mapping[str, Any],
        claims: Mapping[str, Any],
        event: dict[str, Any],
    ) -> tuple[Decision, BreakerGuard | Decision] | None:
        """A pending event's shared limits and its first breaker's permit asked of the store
        in one call (:meth:`GuardedStore.rates_then_permit`): the decision, and the permits
        held (or a breaker's refusal) when it admits the event.

        The permit is taken only when the enforced limits admit (none is asked for when
        this process's own limits refused already); one taken for an event its schema or
        authorization then refuses is handed back. None when the walk cannot be made so (a
        delay decided before the limits, a recorded judgement, conditions that convert the
        event, no breaker needing the store): then the caller asks for the limits and the
        permits as usual.
        """
        rates = pending.rates
        recorder = pending.recorder
        enforced_answer = rates.enforced_answer
        if pending.refusal is not None or recorder.enabled or self._payload_views:
            return None
        refused = (
            enforced_answer is not ASK
            and enforced_answer is not None
            and not enforced_answer.allowed
        )
        if refused:  # by this process's own limits already: no permit to ask for
            return await self.settle_event(pending), NO_GUARD
        specs = pending.plan.breakers
        now = rates.now
        variables = (conn, claims, event, self.load)
        permits = take_permits(self.policy, self.state, specs, variables, now, recorder)
        if type(permits) is not Waiting or permits.taken:
            # No breaker matched (or, on a store that answers permits without I/O, some
            # were taken, which a shared store never does): nothing to ask at once.
            return None
        spec = specs[permits.at]
        asked = [at for at, answer in enumerate(rates.shadow_answers) if answer is ASK]
        enforced = rates.enforced if enforced_answer is ASK else ()
        shadows = [(rates.shadow[at],) for at in asked]
        answer, shadowed, permit = await self.state.rates_then_permit(enforced, shadows, spec, now)
        if enforced_answer is ASK:
            rates.enforced_answer = answer
        for at, shadow_answer in zip(asked, shadowed, strict=True):
            rates.shadow_answers[at] = shadow_answer
        decision = await self.settle_event(pending)
        if decision.outcome is not Outcome.ALLOW:
            if permit is not None and permit.permitted:
                await self.state.release(spec)
            return decision, NO_GUARD
        walked = take_permits(
            self.policy, self.state, specs, variables, now, recorder, permits, permit
        )
        if type(walked) is BreakerGuard:
            return decision, walked
        return decision, await self._walk_permits(specs, variables, now, recorder, walked, event)

    async def release_permits(self, guard: BreakerGuard) -> None:
        """Hand back permits taken for a call that will not run (half-open probes go back)."""
        for spec in guard.permits:
            if self.state.release_now(spec) is ASK:
                await self.state.release(spec)

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
        if not self.state.shared:
            return self.after_call_now(guard, conn, event, classification, error)
        now = self.clock()
        duration = now - guard.started
        failed = (
            ()
            if classification is None
            else breakers.recorded_failures(guard, duration, conn, event, classification, error)
        )
        state = self.state
        transitions: list[tuple[str, Any]] = []
        for at, spec in enumerate(guard.permits):
            failure = failed[at] if failed else False
            if failure is None:  # an exception this breaker ignores
                if state.release_now(spec) is ASK:
                    await state.release(spec)
                continue
            transition = state.record_now(spec, now, failed=failure, duration=duration)
            if transition is ASK:
                transition = await state.record(spec, now, failed=failure, duration=duration)
            if transition is not None:
                transitions.append((spec.name, transition))
        return transitions

    def after_call_now(
        self,
        guard: BreakerGuard,
        conn: Mapping[str, Any],
        event: Mapping[str, Any],
        classification: Classification | None,
        error: Mapping[str, Any] | None,
    ) -> list[tuple[str, Any]]:
        """:meth:`after_call` where the state answers without I/O (this process's own: the
        caller checks ``state.shared`` is false), in one plain call rather than a coroutine."""
        if not guard.permits:
            return []
        now = self.clock()
        duration = now - guard.started
        failed = (
            ()
            if classification is None
            else breakers.recorded_failures(guard, duration, conn, event, classification, error)
        )
        local = self.state.local
        transitions: list[tuple[str, Any]] = []
        for at, spec in enumerate(guard.permits):
            failure = failed[at] if failed else False
            if failure is None:  # an exception this breaker ignores
                local.breaker_release_now(spec)
                continue
            transition = local.breaker_record_now(spec, now, failed=failure, duration=duration)
            if transition is not None:
                transitions.append((spec.name, transition))
        return transitions


def finish(decision: Decision, shadowed: list[str], recorder: Recorder) -> Decision:
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
