"""``explain`` is the trace of the decision the server makes, never a second evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from policy_engine.cli.policytest import discover, run_file
from policy_engine.compiler.pipeline import compile_text
from policy_engine.core.engine import Engine, conn_context, event_context
from policy_engine.core.explain import run_hook
from policy_engine.language.contexts import Hook

ROOT = Path(__file__).resolve().parent.parent
POLICY_TESTS = discover([ROOT / "policies" / "tests"])


def _comparable(decision: dict[str, Any]) -> dict[str, Any]:
    """A decision without what differs by design: the trace and the correlation id."""
    payload = decision.get("payload")
    if payload is not None:
        payload = {k: v for k, v in payload.items() if k != "correlation_id"}
    return {**decision, "trace": None, "payload": payload}


@pytest.mark.parametrize("path", POLICY_TESTS, ids=lambda p: p.name)
def test_every_shipped_policy_case_decides_the_same_explained_or_not(path: Path) -> None:
    explained = run_file(path, explain=True)
    plain = run_file(path, explain=False)

    assert len(explained) == len(plain) > 0
    for traced, untraced in zip(explained, plain, strict=True):
        assert traced.name == untraced.name
        assert traced.passed == untraced.passed, traced.name
        assert _comparable(dict(traced.decision)) == _comparable(dict(untraced.decision))
        assert untraced.decision["trace"] == []
    assert any(case.decision["trace"] for case in explained)


async def test_an_explained_refusal_traces_the_rules_the_decision_visited() -> None:
    policy = compile_text(
        "version: 1\n"
        "authorization:\n"
        "  rules:\n"
        "    - {name: viewers, hook: event, when: 'claims.role == \"viewer\"', effect: deny}\n"
        "rate_limits:\n"
        "  - {name: l, hook: event, key: conn.sid, limit: 1/second, burst: 1}\n"
    ).policy
    engine = Engine(policy, clock=lambda: 100.0)
    contexts = {
        "conn": conn_context(sid="s1", ip="192.0.2.1"),
        "claims": {"role": "editor"},
        "event": event_context("x"),
    }
    await run_hook(engine, Hook.EVENT, contexts, explain=False)

    decision = await run_hook(engine, Hook.EVENT, contexts, explain=True)

    assert decision.rule == "rate_limits/l"
    # Refused by its limit, the event is not validated and no condition reads it.
    assert [(t.section, t.rule, t.outcome) for t in decision.trace] == [
        ("rate_limits", "l", "reject"),
    ]
