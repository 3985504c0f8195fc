"""Authorization rules: the first matching rule decides, else the policy's default.

An ``allow`` rule that matches ends the search; a ``deny`` rule in shadow mode is only
named in ``Decision.shadowed`` and the search goes on, as if it were not there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from policy_engine.core.decision import Decision, Outcome
from policy_engine.core.evaluation import matches
from policy_engine.core.payload import FORBIDDEN, client_payload
from policy_engine.core.recorder import Recorder
from policy_engine.language.contexts import Hook
from policy_engine.language.model import AuthzRuleSpec, Category, Effect, Mode, PolicySet


def authorize(  # noqa: PLR0917 (every caller passes all six)
    policy: PolicySet,
    rules: tuple[AuthzRuleSpec, ...],
    hook: Hook,
    activation: Mapping[str, Any],
    recorder: Recorder,
    shadowed: list[str],
) -> Decision | None:
    for rule in rules:
        hit = matches(rule.when, activation, rule.on_eval_error)
        if recorder.enabled:
            recorder.note("authorization", rule.name, hit, rule.effect.value if hit else "skip")
        if not hit:
            continue
        if rule.effect is Effect.ALLOW:
            return None
        if rule.mode is Mode.SHADOW:
            shadowed.append(f"authorization/{rule.name}")
            continue
        return forbidden(rule.name, rule.code, rule.message, hook)
    if policy.authorization.default is Effect.DENY:
        return forbidden("default", FORBIDDEN.code, FORBIDDEN.message, hook)
    return None


def forbidden(name: str, code: str, message: str, hook: Hook) -> Decision:
    """A refusal by authorization: of the connection at connect, of the event after."""
    payload = client_payload(
        code=code,
        category=Category.CONNECTION if hook is Hook.CONNECT else Category.CLIENT,
        message=message,
        retryable=False,
        retry_after=None,
        backoff=None,
        policy=f"authorization/{name}",
    )
    return Decision(Outcome.REJECT, f"authorization/{name}", payload)
