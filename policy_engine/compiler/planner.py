"""The plan stage: what a decision needs to know in advance, derived once from the sections.

A decision should visit only the rules that can apply to it. Grouping rules by hook and by
the event names their conditions require, cutting each shedding condition down to the part
that reads only ``load``, and noting whether any expression reads the connection's age are
all facts of the compiled sections; working them out here keeps the model plain data and
the request path free of that work.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, Generic, TypeVar

from policy_engine import cel
from policy_engine.cel.analysis import conjuncts, names_read, reads_field
from policy_engine.compiler.sections import Sections
from policy_engine.language.contexts import LOAD_VARIABLES, Hook
from policy_engine.language.model import (
    AuthzRuleSpec,
    CircuitBreakerSpec,
    Effect,
    EventPlan,
    EventPlans,
    Expression,
    HookIndex,
    PolicySet,
    Program,
    RateLimitSpec,
    SheddingRuleSpec,
)

R = TypeVar("R")

_LOAD_ONLY = frozenset(LOAD_VARIABLES)


def plan(
    sections: Sections, *, version: str, source: str, backend: cel.CelBackend | None = None
) -> PolicySet:
    """The policy set of ``sections``, planned: the one way a PolicySet is made.

    ``backend`` compiles the load gates (the default backend when None).
    """
    backend = backend or cel.get_backend()
    shedding = tuple(_with_load_gate(rule, backend) for rule in sections.shedding)
    index = hook_index(sections.rate_limits, shedding, sections.authorization.rules)
    return PolicySet(
        version=version,
        source=source,
        defaults=sections.defaults,
        identity=sections.identity,
        errors=sections.errors,
        backoff=sections.backoff,
        rate_limits=sections.rate_limits,
        circuit_breakers=sections.circuit_breakers,
        shedding=shedding,
        connections=sections.connections,
        recovery=sections.recovery,
        drain=sections.drain,
        events=sections.events,
        authorization=sections.authorization,
        authentication=sections.authentication,
        load=sections.load,
        decision_log=sections.decision_log,
        default_event=sections.default_event,
        by_hook=index,
        event_plans=event_plans(sections, index),
        reads_connection_age=any(_reads_connection_age(e) for e in _expressions(sections)),
    )


# -- load gates ----------------------------------------------------------------------------


def _with_load_gate(rule: SheddingRuleSpec, backend: cel.CelBackend) -> SheddingRuleSpec:
    gate = load_gate(rule.when, backend)
    return rule if gate is None else dataclasses.replace(rule, load_gate=gate)


def load_gate(when: Expression, backend: cel.CelBackend) -> Program | None:
    """The operands of a shedding condition that read only ``load``, as one program.

    While they are false the whole condition is false (``&&`` needs every operand, and
    CEL's ``false && error`` is false), so the engine evaluates them once per load sample
    rather than the whole condition once per event. A condition that reads only ``load`` is
    its own gate. The operands come from a condition that passed the checker, so the gate
    is not checked again where the fast path can run it.
    """
    parts = conjuncts(when.source) or [when.source]
    gate = [part for part in parts if names_read(part) <= _LOAD_ONLY]
    if not gate:
        return None
    if len(gate) == len(parts):
        return when.program
    source = " && ".join(f"({part})" for part in gate)
    fast = cel.checked_fast_program(source, LOAD_VARIABLES, _LOAD_ONLY, backend)
    if fast is not None:
        return fast
    try:
        return backend.compile(source, LOAD_VARIABLES, expect="bool")
    except cel.CelCompileError:
        return None


# -- the hook index ------------------------------------------------------------------------


def hook_index(
    rate_limits: tuple[RateLimitSpec, ...],
    shedding: tuple[SheddingRuleSpec, ...],
    authorization: tuple[AuthzRuleSpec, ...],
) -> HookIndex:
    hooks: list[Hook | None] = [*Hook, None]
    limits = {h: tuple(r for r in rate_limits if r.hook is h) for h in Hook}
    return HookIndex(
        limits,
        {h: tuple(r for r in shedding if r.hook is h) for h in hooks},
        {h: tuple(r for r in authorization if r.hook is h) for h in Hook},
        {h: _by_event_name(rules) for h, rules in limits.items()},
    )


class _RulesByName(Generic[R]):
    """Rules grouped by the event names their condition requires, in policy order.

    A rule whose condition starts with an event-name test can only apply to those names;
    one without a condition, or without such a test, applies to every event. Built in one
    pass, so a policy with a thousand rules naming their events stays linear.
    """

    __slots__ = ("_everyone", "_for_everyone", "_named")

    def __init__(self, rules: tuple[R, ...], condition: Callable[[R], Expression | None]) -> None:
        self._everyone: list[tuple[int, R]] = []
        self._named: dict[str, list[tuple[int, R]]] = {}
        for position, rule in enumerate(rules):
            expression = condition(rule)
            names = expression.event_names if expression is not None else None
            if names is None:
                self._everyone.append((position, rule))
            else:
                for name in names:
                    self._named.setdefault(name, []).append((position, rule))
        self._for_everyone = tuple(rule for _, rule in self._everyone)

    @property
    def names(self) -> frozenset[str]:
        """The names some rule requires."""
        return frozenset(self._named)

    def __call__(self, name: str | None) -> tuple[R, ...]:
        """The rules that can apply to ``name`` (None: a name no rule requires)."""
        own = self._named.get(name) if name is not None else None
        if not own:
            return self._for_everyone
        return tuple(rule for _, rule in sorted([*self._everyone, *own], key=_position))


def _position(entry: tuple[int, Any]) -> int:
    return entry[0]


def _by_event_name(
    rules: tuple[RateLimitSpec, ...],
) -> tuple[Mapping[str, tuple[RateLimitSpec, ...]], tuple[RateLimitSpec, ...]]:
    """Each named event's limits, in policy order, and the limits every event meets."""
    by_name = _RulesByName(rules, lambda rule: rule.when)
    return MappingProxyType({name: by_name(name) for name in by_name.names}), by_name(None)


# -- event plans ---------------------------------------------------------------------------


def event_plans(sections: Sections, index: HookIndex) -> EventPlans:
    """A plan for every event name the policy mentions, and one for every other name."""
    events = sections.events
    shed_by_name = _RulesByName(index.shedding[Hook.EVENT], lambda rule: rule.when)
    authorize_by_name = _RulesByName(index.authorization[Hook.EVENT], lambda rule: rule.when)
    guard_by_name = _RulesByName(sections.circuit_breakers, lambda rule: rule.match)
    limited, unnamed_limits = index.rate_limits_by_event[Hook.EVENT]
    allow_by_default = sections.authorization.default is Effect.ALLOW

    def plan_for(name: str | None) -> EventPlan:
        spec = (events.get(name) if name is not None else None) or sections.default_event
        rank = spec.priority.rank
        sheds = tuple(r for r in shed_by_name(name) if rank <= r.max_priority.rank)
        authorizes = authorize_by_name(name)
        guards: tuple[CircuitBreakerSpec, ...] = guard_by_name(name)
        return EventPlan(
            spec=spec,
            priority=spec.priority.value,
            shedding=sheds,
            authorization=authorizes,
            rate_limits=limited.get(name, unnamed_limits) if name is not None else unnamed_limits,
            breakers=guards,
            plain=spec.validate is None and not authorizes and allow_by_default and not guards,
            shedding_names=frozenset(r.name for r in sheds),
        )

    names = set(events).union(
        shed_by_name.names, authorize_by_name.names, guard_by_name.names, limited
    )
    return EventPlans(MappingProxyType({name: plan_for(name) for name in names}), plan_for(None))


# -- facts about every expression ----------------------------------------------------------


def _expressions(sections: Sections) -> Iterator[Expression]:
    for error_rule in sections.errors:
        yield error_rule.when
    for limit in sections.rate_limits:
        yield limit.key
        if limit.when is not None:
            yield limit.when
    for breaker in sections.circuit_breakers:
        yield breaker.match
        if breaker.record_when is not None:
            yield breaker.record_when
    for shed in sections.shedding:
        yield shed.when
    for rule in sections.authorization.rules:
        yield rule.when
    if sections.connections.priority is not None:
        yield sections.connections.priority


def _reads_connection_age(expression: Expression) -> bool:
    """Whether ``expression`` may read ``conn.connected_ms`` (never wrongly False)."""
    return bool(expression.source) and reads_field(expression.source, "conn", "connected_ms")
