"""The plan stage: which rules each decision visits, worked out once from the sections."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from policy_engine.compiler.pipeline import compile_text
from policy_engine.compiler.planner import plan
from policy_engine.compiler.sections import Sections
from policy_engine.language.contexts import Hook
from policy_engine.language.model import (
    AuthorizationSpec,
    AuthzRuleSpec,
    Effect,
    EventSpec,
    Expression,
    Mode,
    Priority,
    RateLimitSpec,
    Scope,
    ShedAction,
    SheddingRuleSpec,
)
from policy_engine.language.units import Rate


class _Never:
    def evaluate(self, activation: Any) -> Any:
        return False


def condition(source: str, names: frozenset[str] | None = None) -> Expression:
    return Expression(source, "event", _Never(), event_names=names)


def limit(name: str, names: frozenset[str] | None) -> RateLimitSpec:
    return RateLimitSpec(
        name=name,
        hook=Hook.EVENT,
        key=condition("conn.sid"),
        rate=Rate(5, 1.0),
        burst=5,
        mode=Mode.ENFORCE,
        scope=Scope.LOCAL,
        when=None if names is None else condition(f"event.name in {sorted(names)}", names),
    )


def names(rules: Any) -> list[str]:
    return [rule.name for rule in rules]


def test_a_policy_can_be_planned_from_the_sections_a_test_is_about() -> None:
    policy = plan(
        Sections(rate_limits=(limit("all", None), limit("chat", frozenset({"chat"})))),
        version="v",
        source="<test>",
    )
    assert names(policy.by_hook.rate_limits[Hook.EVENT]) == ["all", "chat"]
    assert names(policy.event_plans["chat"].rate_limits) == ["all", "chat"]
    assert names(policy.event_plans["other"].rate_limits) == ["all"]
    assert policy.by_hook.rate_limits[Hook.CONNECT] == ()
    assert not policy.reads_connection_age


def test_plans_follow_priorities_and_the_default_effect() -> None:
    shed = SheddingRuleSpec(
        name="drop-low",
        hook=Hook.EVENT,
        when=condition("load.loop_lag_ms > 500"),
        action=ShedAction.DROP,
        mode=Mode.ENFORCE,
        max_priority=Priority.LOW,
    )
    deny = AuthzRuleSpec(
        "admins", Hook.EVENT, condition("x", frozenset({"admin"})), Effect.DENY, Mode.ENFORCE
    )
    sections = Sections(
        shedding=(shed,),
        events=MappingProxyType({"telemetry": EventSpec("telemetry", priority=Priority.LOW)}),
        authorization=AuthorizationSpec(rules=(deny,)),
    )
    plans = plan(sections, version="v", source="<test>").event_plans
    assert names(plans["telemetry"].shedding) == ["drop-low"]
    assert names(plans["chat"].shedding) == []  # normal priority is above max_priority
    assert plans["telemetry"].plain
    assert not plans["admin"].plain
    assert names(plans["admin"].authorization) == ["admins"]
    denying = plan(
        Sections(authorization=AuthorizationSpec(Effect.DENY)), version="v", source="<test>"
    )
    assert not denying.event_plans["telemetry"].plain


def test_only_a_policy_that_reads_the_connection_age_keeps_it_current() -> None:
    reads = (
        "version: 1\nauthorization:\n  rules:\n"
        "    - {{name: a, hook: event, when: '{}', effect: deny}}\n"
    )
    assert compile_text(reads.format("conn.connected_ms < 300")).policy.reads_connection_age
    assert not compile_text(reads.format('conn.ip == "x"')).policy.reads_connection_age
