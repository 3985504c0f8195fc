"""A rule whose expression fails at run time fails safe by kind, unless the policy says."""

from __future__ import annotations

from typing import Any

import pytest

from policy_engine.compiler.pipeline import compile_text
from policy_engine.core.engine import Engine, conn_context, event_context
from policy_engine.language.model import EvalFailureMode

# claims has no "role": each condition fails at run time instead of being false.
FAILING = 'claims.role != "admin"'


def engine_for(text: str) -> Engine:
    return Engine(compile_text("version: 1\n" + text).policy, clock=lambda: 100.0)


def conn() -> dict[str, Any]:
    return conn_context(sid="s1", ip="192.0.2.1", conversation_id="c1")


def deny_rule(extra: str = "") -> str:
    return (
        "authorization:\n  rules:\n"
        f"    - {{name: admins-only, hook: event, when: '{FAILING}', effect: deny{extra}}}\n"
    )


async def test_a_deny_rule_that_fails_refuses_by_default() -> None:
    decision = await engine_for(deny_rule()).on_event(conn(), {}, event_context("x"))
    assert decision.rule == "authorization/admins-only"


async def test_an_allow_rule_that_fails_allows_nothing_by_default() -> None:
    engine = engine_for(
        "authorization:\n  default: deny\n  rules:\n"
        f"    - {{name: admins, hook: event, when: '{FAILING}', effect: allow}}\n"
    )
    decision = await engine.on_event(conn(), {}, event_context("x"))
    assert decision.rule == "authorization/default"


async def test_a_rule_of_its_own_overrides_the_defaults_override() -> None:
    engine = engine_for(
        "defaults: {on_eval_error: fail_closed}\n" + deny_rule(", on_eval_error: fail_open")
    )
    assert (await engine.on_event(conn(), {}, event_context("x"))).allowed


async def test_the_defaults_override_applies_to_rules_that_set_nothing() -> None:
    engine = engine_for("defaults: {on_eval_error: fail_open}\n" + deny_rule())
    assert (await engine.on_event(conn(), {}, event_context("x"))).allowed


async def test_a_rate_limit_whose_condition_fails_counts() -> None:
    engine = engine_for(
        "rate_limits:\n"
        f"  - {{name: l, hook: event, when: '{FAILING}', key: conn.sid, limit: 1/minute}}\n"
    )
    first = await engine.on_event(conn(), {}, event_context("x"))
    second = await engine.on_event(conn(), {}, event_context("x"))
    assert (first.allowed, second.rule) == (True, "rate_limits/l")


async def test_a_shedding_rule_whose_condition_fails_sheds() -> None:
    engine = engine_for(
        "shedding:\n"
        f"  - {{name: s, hook: event, when: '{FAILING}', action: drop, max_priority: critical}}\n"
    )
    decision = await engine.on_event(conn(), {}, event_context("x"))
    assert decision.rule == "shedding/s"


@pytest.mark.parametrize("section", ["rate_limits", "shedding", "circuit_breakers"])
def test_each_kind_compiles_to_fail_closed_unless_told(section: str) -> None:
    rules = {
        "rate_limits": "[{name: r, hook: event, key: conn.sid, limit: 1/s}]",
        "shedding": "[{name: r, hook: event, when: 'true', action: drop}]",
        "circuit_breakers": "[{name: r, match: 'true'}]",
    }
    told = compile_text(
        f"version: 1\n{section}: {rules[section][:-2]}, on_eval_error: fail_open}}]\n"
    ).policy
    untold = compile_text(f"version: 1\n{section}: {rules[section]}\n").policy
    assert getattr(untold, section)[0].on_eval_error is EvalFailureMode.FAIL_CLOSED
    assert getattr(told, section)[0].on_eval_error is EvalFailureMode.FAIL_OPEN
