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
breaker) are built by the walk's own functions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

from fastjsonschema import JsonSchemaValueException

from policy_engine.algorithms.breaker import Transition
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
    Program,
    RateLimitSpec,
)
from policy_engine.state.memory import MemoryStore

if TYPE_CHECKING:
    from policy_engine.core.shedding import Shedding

_FAIL_CLOSED: Final = EvalFailureMode.FAIL_CLOSED

Condition = tuple[Program, EvalFailureMode] | None
"""A condition as a plan leaves it: None when it holds for every event of the plan (there
is none, or it only tests the plan's own name), else what to evaluate and how an
evaluation that fails counts."""


class _Limit:
    """One rate limit as a plan judges it."""

    __slots__ = ("condition", "identity", "key", "rule", "shadow_name", "shadowed")

    def __init__(self, rule: RateLimitSpec, name: str | None) -> None:
        self.rule = rule
        self.condition = _condition(rule.when, name, rule.on_eval_error)
        self.key = rule.key
        # Keys fixed for the life of a connection are computed once for it, in the cache
        # the walk uses too (keyed as it keys them).
        per_connection = rule.key.per_connection and rule.key.path is None
        self.identity = (rule.key.source, rule.key.context) if per_connection else None
        self.shadowed = rule.mode is Mode.SHADOW
        self.shadow_name = f"rate_limits/{rule.name}"


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
        "_shadowed_allow",
        "_shedding_names",
        "_validate",
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
        self._limits = tuple(_Limit(rule, name) for rule in plan.rate_limits)
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
        self._acquire = store.breaker_acquire_now
        # The allowed decisions naming shadow refusals, one per combination met (at most
        # one per subset of the plan's shadow rules): a decision is immutable.
        self._shadowed_allow: dict[tuple[str, ...], Decision] = {}

    @property
    def plan(self) -> EventPlan:
        return self._plan

    # -- the decision before the handler ---------------------------------------------------

    def decide(  # noqa: PLR0917 (the event and the engine's state it reads)
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
            limited = self._rate_limits(activation, clock, shadowed)
            if limited is not None:
                return None if limited is _WALK else _finish(limited, shadowed)
        validate = self._validate
        if validate is not None:
            try:
                validate(event["payload"])
            except JsonSchemaValueException:
                invalid = check_schema(self._plan.spec, event, NULL_RECORDER)
                if invalid is not None:
                    return _finish(invalid, shadowed)
        refused: Decision | None = None
        for condition in self._authorization:
            if condition is None or _holds(condition, activation):
                # A rule applies: the walk's own function decides how (evaluating again).
                refused = authorize(
                    self._policy,
                    self._plan.authorization,
                    Hook.EVENT,
                    activation,
                    NULL_RECORDER,
                    shadowed,
                )
                break
        else:
            if self._default_deny:
                refused = forbidden("default", FORBIDDEN.code, FORBIDDEN.message, Hook.EVENT)
        if refused is not None:
            return _finish(refused, shadowed)
        if not shadowed:
            return ALLOW
        names_ = tuple(shadowed)
        allowed = self._shadowed_allow.get(names_)
        if allowed is None:
            allowed = self._shadowed_allow[names_] = _finish(ALLOW, shadowed)
        return allowed

    def _rate_limits(
        self, activation: dict[str, Any], clock: Callable[[], float], shadowed: list[str]
    ) -> Any:
        """The limits judged as :meth:`RateLimits.judge` and :func:`conclude` judge them:
        the refusal, None, or ``_WALK`` when a key cannot be computed (nothing consumed)."""
        enforced: list[Check] = []
        shadow: list[tuple[_Limit, str]] = []
        for limit in self._limits:
            condition = limit.condition
            if condition is not None and not _holds(condition, activation):
                continue
            identity = limit.identity
            try:
                if identity is None:
                    key = str(evaluate_value(limit.key, activation))
                else:
                    sid = activation["conn"]["sid"]
                    keys = self._connection_keys.get(sid)
                    if keys is None:
                        keys = self._connection_keys[sid] = {}
                    cached = keys.get(identity)
                    if cached is None:
                        cached = keys[identity] = str(evaluate_value(limit.key, activation))
                    key = cached
            except EvaluationError:
                return _WALK
            if limit.shadowed:
                shadow.append((limit, key))
            else:
                enforced.append((limit.rule, key))
        now = clock()
        admits = self._admits
        for limit, key in shadow:
            if not admits(limit.rule, key, now):
                shadowed.append(limit.shadow_name)
        if not enforced:
            return None
        if len(enforced) == 1:
            rule, key = enforced[0]
            if admits(rule, key, now):
                return None
            decided = self._check_one(rule, key, now)  # refused again: for its details
            return refusal(self._policy, rule, decided.retry_after, key)
        together = self._check_together(enforced, now)
        if together.allowed:
            return None
        return conclude(self._policy, [], [], enforced, together, NULL_RECORDER, shadowed)

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


_WALK: Final = object()
"""What a step answers when the walk must judge the event instead (nothing changed yet)."""


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


def _holds(condition: tuple[Program, EvalFailureMode], activation: Mapping[str, Any]) -> bool:
    """:func:`~policy_engine.core.evaluation.matches` on a prepared condition."""
    program, failure = condition
    try:
        return program.evaluate(activation) is True
    except EvaluationError:
        return failure is _FAIL_CLOSED


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
        return (expression.program, failure)
    if name is None or name not in names:
        raise UnpreparedPlanError(name)
    if expression.is_name_test:
        return None
    return (expression.residual or expression.program, failure)


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
