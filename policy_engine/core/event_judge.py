"""One event plan's judgement of the common case, prepared once when a policy is installed.

The general walk (:mod:`policy_engine.core.events`) serves every case: recorded
explanations, a shared store, conditions that convert the payload, shedding, refusals.
Most events meet none of that, and for them the walk's generality is its cost: event-name
tests the plan already settled, a rule group's function per group, lists and contexts
built per event. So when a policy is installed the engine prepares a :class:`PlanJudge`
for every event plan whose state lives in this process and whose conditions convert
nothing (:func:`judges_for`): the name tests are dropped, the programs, keys and failure
modes read once, and the rule groups' steps laid out in the walk's order.

A judge decides exactly as the walk does (``tests/test_event_judge.py`` compares them on
generated policies and events). It hands an event back to the walk, by returning None,
whenever the uncommon happens before any state has changed: a size over the limit, an
armed shedding rule, a rate-limit key that fails to evaluate. After a limit was consumed,
the rarer outcomes (a refusal by a limit, by the schema, by an authorization rule, by a
breaker) are built by the walk's own functions. While a decision tap listens (the
decision log, the canary) the engine leaves every event to the walk, which tells it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from fastjsonschema import JsonSchemaValueException

from policy_engine.algorithms.breaker import Transition
from policy_engine.cel import evaluator_of
from policy_engine.core.authorization import authorize, forbidden
from policy_engine.core.breakers import NO_GUARD, BreakerGuard, Refused, hold
from policy_engine.core.decision import ALLOW, Decision
from policy_engine.core.evaluation import evaluate_value, matches
from policy_engine.core.payload import FORBIDDEN
from policy_engine.core.payload_checks import check_schema
from policy_engine.core.rate_limits import Check, RateLimits, conclude, refusal
from policy_engine.core.recorder import NULL_RECORDER
from policy_engine.errors import EvaluationError
from policy_engine.language.contexts import Hook
from policy_engine.language.model import (
    CircuitBreakerSpec,
    Effect,
    EvalFailureMode,
    EventPlan,
    Expression,
    Mode,
    PolicySet,
    RateLimitSpec,
)
from policy_engine.state.memory import MemoryStore

if TYPE_CHECKING:
    from policy_engine.core.shedding import Shedding


class EventVerdict(NamedTuple):
    """An event's decision and the breaker permits it holds (None: not asked for yet)."""

    decision: Decision
    guard: BreakerGuard | None


_ALLOWED: Final = EventVerdict(ALLOW, NO_GUARD)

_FAIL_CLOSED: Final = EvalFailureMode.FAIL_CLOSED

Evaluator = Callable[[Mapping[str, Any]], Any]
Condition = tuple[Evaluator, EvalFailureMode] | None
"""A condition as a plan leaves it: None when it holds for every event of the plan (there
is none, or it only tests the plan's own name), else what evaluates it (the fast path's
closure itself, when it has one) and how an evaluation that fails counts."""

Limit = tuple[
    RateLimitSpec,
    Condition,
    Expression,
    tuple[str, str] | None,
    tuple[str, str] | None,
    bool,
    str,
]
"""One rate limit as a plan judges it: the rule, its condition, its key, the key's plain
``variable.field`` (read as a dict lookup), the key's identity in the per-connection cache
(None: computed per event), whether it is in shadow mode, and the name a shadow refusal
is reported under."""


def _limit(rule: RateLimitSpec, name: str | None) -> Limit:
    key = rule.key
    # Keys fixed for the life of a connection are computed once for it, in the cache the
    # walk uses too (keyed as it keys them).
    cached = (key.source, key.context) if key.per_connection and key.path is None else None
    condition = _condition(rule.when, name, rule.on_eval_error)
    shadow = rule.mode is Mode.SHADOW
    return (rule, condition, key, key.path, cached, shadow, f"rate_limits/{rule.name}")


class PlanJudge:
    """The prepared judgement of one event plan (see the module docstring)."""

    __slots__ = (
        "_acquire",
        "_admits",
        "_all_breakers",
        "_authorization",
        "_breakers",
        "_check_one",
        "_check_together",
        "_connection_keys",
        "_default_deny",
        "_limits",
        "_max_bytes",
        "_plan",
        "_policy",
        "_priority",
        "_release",
        "_shadowed_allow",
        "_shedding_names",
        "_validate",
        "breakers",
    )

    def __init__(
        self,
        policy: PolicySet,
        plan: EventPlan,
        name: str | None,
        store: MemoryStore,
        rates: RateLimits,
    ) -> None:
        """``name``: the event name the plan is for; None for the plan of the others."""
        self._policy = policy
        self._plan = plan
        self._priority = plan.priority
        self._max_bytes = plan.spec.max_bytes
        self._shedding_names = plan.shedding_names if plan.shedding else None
        self._limits = tuple(_limit(rule, name) for rule in plan.rate_limits)
        self._admits = store.rate_admits_now
        self._check_one = store.check_rate_limit_now
        self._check_together = store.check_rate_limits_now
        self._connection_keys = rates._connection_keys  # the walk's cache, shared
        self._validate = plan.spec.validate
        self._authorization = tuple(
            _condition(rule.when, name, rule.on_eval_error) for rule in plan.authorization
        )
        # The walk applies the default only once some rule of the plan was looked at.
        self._default_deny = (
            bool(plan.authorization) and policy.authorization.default is Effect.DENY
        )
        self._breakers = tuple(
            (spec, _condition(spec.match, name, spec.on_eval_error) is None)
            for spec in plan.breakers
        )
        self._all_breakers = plan.breakers
        self.breakers = bool(plan.breakers)
        self._acquire = store.breaker_acquire_now
        self._release = store.breaker_release_now
        # The allowed decisions naming shadow refusals, one per combination met (at most
        # one per subset of the plan's shadow rules): a decision is immutable.
        self._shadowed_allow: dict[tuple[str, ...], Decision] = {}

    # -- the decision before the handler ---------------------------------------------------

    def verdict(  # noqa: PLR0917 (the event and the engine's state it reads)
        self,
        conn: Mapping[str, Any],
        claims: Mapping[str, Any],
        event: dict[str, Any],
        load: dict[str, Any],
        clock: Callable[[], float],
        shedding: Shedding,
    ) -> EventVerdict | None:
        """What :meth:`~policy_engine.core.events.EventHooks.judge_event_now` answers: the
        decision and, when allowed, the breakers' permits; None: the walk must judge it."""
        decided = self.decide(conn, claims, event, load, clock, shedding)
        if decided is None:
            return None
        if not self.breakers:
            return _ALLOWED if decided is ALLOW else EventVerdict(decided, NO_GUARD)
        if decided is not ALLOW and not decided.allowed:
            return EventVerdict(decided, NO_GUARD)
        permits = self.permits(conn, claims, event, load, clock())
        if isinstance(permits, BreakerGuard):
            return EventVerdict(decided, permits)
        for held in permits.held:
            self._release(held)
        return EventVerdict(permits.decision, NO_GUARD)

    def decide(  # noqa: PLR0917, PLR0915 (the event and the engine's state it reads)
        self,
        conn: Mapping[str, Any],
        claims: Mapping[str, Any],
        event: dict[str, Any],
        load: dict[str, Any],
        clock: Callable[[], float],
        shedding: Shedding,
    ) -> Decision | None:
        """The event's decision, before its breakers; None: the walk must judge it."""
        event["priority"] = self._priority
        max_bytes = self._max_bytes
        if max_bytes is not None and event["size_bytes"] > max_bytes:
            return None
        names = self._shedding_names
        if names is not None and not shedding.armed(self._policy, load).isdisjoint(names):
            return None
        activation = {"conn": conn, "claims": claims, "event": event, "load": load}
        shadowed: list[str] = []
        if self._limits:
            # As RateLimits.judge and conclude judge them: every condition and key first
            # (a key that fails goes back to the walk, nothing consumed yet), then each
            # shadow limit alone, then the enforced ones together.
            enforced: list[Check] = []
            shadow: list[tuple[RateLimitSpec, str, str]] = []
            for rule, condition, expression, path, cached, in_shadow, name in self._limits:
                if condition is not None:
                    run, failure = condition
                    try:
                        holds = run(activation) is True
                    except EvaluationError:
                        holds = failure is _FAIL_CLOSED
                    if not holds:
                        continue
                try:
                    if cached is not None:
                        sid = conn["sid"]
                        keys = self._connection_keys.get(sid)
                        if keys is None:
                            keys = self._connection_keys[sid] = {}
                        key = keys.get(cached)
                        if key is None:
                            key = keys[cached] = str(evaluate_value(expression, activation))
                    elif (
                        path is not None
                        and type(variable := activation.get(path[0])) is dict
                        and path[1] in variable
                    ):
                        key = str(variable[path[1]])
                    else:
                        key = str(evaluate_value(expression, activation))
                except EvaluationError:
                    return None
                if in_shadow:
                    shadow.append((rule, key, name))
                else:
                    enforced.append((rule, key))
            now = clock()
            admits = self._admits
            for rule, key, name in shadow:
                if not admits(rule, key, now):
                    shadowed.append(name)
            if enforced:
                refused = None
                if len(enforced) == 1:
                    rule, key = enforced[0]
                    if not admits(rule, key, now):
                        decided = self._check_one(rule, key, now)  # for the refusal's details
                        refused = refusal(self._policy, rule, decided.retry_after, key)
                else:
                    together = self._check_together(enforced, now)
                    if not together.allowed:
                        policy = self._policy
                        refused = conclude(policy, [], [], enforced, together, NULL_RECORDER, [])
                if refused is not None:
                    return _finish(refused, shadowed)
        validate = self._validate
        if validate is not None:
            try:
                validate(event["payload"])
            except JsonSchemaValueException:
                invalid = check_schema(self._plan.spec, event, NULL_RECORDER)
                if invalid is not None:
                    return _finish(invalid, shadowed)
        if self._authorization:
            refused = self._authorize(activation, shadowed)
            if refused is not None:
                return _finish(refused, shadowed)
        if not shadowed:
            return ALLOW
        names_ = tuple(shadowed)
        allowed = self._shadowed_allow.get(names_)
        if allowed is None:
            allowed = self._shadowed_allow[names_] = _finish(ALLOW, shadowed)
        return allowed

    def _authorize(self, activation: dict[str, Any], shadowed: list[str]) -> Decision | None:
        for condition in self._authorization:
            if condition is not None:
                run, failure = condition
                try:
                    holds = run(activation) is True
                except EvaluationError:
                    holds = failure is _FAIL_CLOSED
                if not holds:
                    continue
            # A rule applies: the walk's own function decides how (evaluating again).
            return authorize(
                self._policy,
                self._plan.authorization,
                Hook.EVENT,
                activation,
                NULL_RECORDER,
                shadowed,
            )
        if self._default_deny:
            return forbidden("default", FORBIDDEN.code, FORBIDDEN.message, Hook.EVENT)
        return None

    # -- the breakers' permits ---------------------------------------------------------------

    def permits(
        self,
        conn: Mapping[str, Any],
        claims: Mapping[str, Any],
        event: Mapping[str, Any],
        load: dict[str, Any],
        now: float,
    ) -> BreakerGuard | Refused:
        """A permit from every breaker guarding the event, taken as
        :func:`~policy_engine.core.breakers.take_permits` takes them from this process."""
        acquire = self._acquire
        activation: dict[str, Any] | None = None
        taken: list[CircuitBreakerSpec] = []
        transitions: list[tuple[str, Transition]] = []
        for spec, always in self._breakers:
            if not always:
                if activation is None:
                    activation = {"conn": conn, "claims": claims, "event": event, "load": load}
                if not matches(spec.match, activation, spec.on_eval_error):
                    continue
            permit = acquire(spec, now)
            if permit.permitted:
                taken.append(spec)
                if permit.transition is not None:
                    transitions.append((spec.name, permit.transition))
                continue
            refused = hold(self._policy, spec, permit, taken, transitions, NULL_RECORDER)
            if refused is not None:
                return Refused(refused, tuple(taken))
        if not taken:
            return NO_GUARD
        every = self._all_breakers
        held = every if len(taken) == len(every) else tuple(taken)
        return BreakerGuard(held, now, tuple(transitions) if transitions else ())


def _finish(decision: Decision, shadowed: list[str]) -> Decision:
    """:func:`~policy_engine.core.events.finish` without a recorder."""
    if not shadowed:
        return decision
    return Decision(
        decision.outcome,
        decision.rule,
        decision.payload,
        decision.delay,
        tuple(shadowed),
        (),
        decision.key,
    )


class UnpreparedPlanError(Exception):
    """A rule the plan should not hold for its name: the walk judges the plan's events."""


def _condition(
    expression: Expression | None, name: str | None, failure: EvalFailureMode
) -> Condition:
    """What is left to evaluate of ``expression`` for the events of a plan (see
    :func:`~policy_engine.core.evaluation.matches`, which tests the names per event)."""
    if expression is None:
        return None
    names = expression.event_names
    if names is None:
        return (evaluator_of(expression.program), failure)
    if name is None or name not in names:
        raise UnpreparedPlanError(name)
    if expression.is_name_test:
        return None
    return (evaluator_of(expression.residual or expression.program), failure)


def judges_for(
    policy: PolicySet,
    store: MemoryStore | None,
    rates: RateLimits,
    converting: Mapping[str, object | None],
) -> tuple[dict[str, PlanJudge | None], PlanJudge | None]:
    """A judge per event name the policy names, and one for every other name; None for a
    plan the walk must judge: a shared ``store`` (None), conditions that convert the
    event (``converting``: the payload views, by name, ``""`` for the others), or a plan
    with nothing to judge but its size and shedding (the walk answers those in one test).
    """
    plans = policy.event_plans

    def judge(plan: EventPlan, name: str | None) -> PlanJudge | None:
        if store is None or (plan.plain and not plan.rate_limits):
            return None
        if converting and converting.get(name if name is not None else "") is not None:
            return None
        try:
            return PlanJudge(policy, plan, name, store, rates)
        except UnpreparedPlanError:
            return None

    return {name: judge(plan, name) for name, plan in plans.named.items()}, judge(plans.other, None)
