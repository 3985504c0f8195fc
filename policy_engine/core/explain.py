"""One decision from hand-written contexts, with its trace: ``explain`` and policy tests.

Operators reason about a policy with concrete cases ("what happens to a viewer who sends
oh_user_action while the loop lags 400 ms?"). This module turns such a case, given as
JSON or YAML, into complete typed contexts, runs the engine exactly as the server would,
and returns the decision with every rule considered.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from policy_engine.core.classify import Classification, classify, error_context
from policy_engine.core.decision import Decision, Outcome, TraceEntry
from policy_engine.core.engine import BreakerGuard, Engine, new_correlation_id
from policy_engine.core.evaluation import matches
from policy_engine.errors import PolicyEngineError
from policy_engine.language.contexts import CONN, EVENT, LOAD, RAW_ERROR, Hook, MessageType

_MESSAGES: Mapping[str, MessageType] = {
    "conn": CONN,
    "event": EVENT,
    "load": LOAD,
    "error": RAW_ERROR,
}


class ContextError(PolicyEngineError):
    """A hand-written context names a variable or field the hook does not have."""


def build_context(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Complete contexts: every declared field present, unknown names refused with a hint."""
    contexts: dict[str, Any] = {}
    for name, value in raw.items():
        if name == "claims":
            if not isinstance(value, Mapping):
                raise ContextError("claims must be a mapping")
            contexts["claims"] = dict(value)
            continue
        message = _MESSAGES.get(name)
        if message is None:
            known = ", ".join(sorted([*_MESSAGES, "claims"]))
            raise ContextError(f"unknown context variable {name!r}; expected one of: {known}")
        if not isinstance(value, Mapping):
            raise ContextError(f"{name} must be a mapping of fields")
        filled = message.defaults()
        for field_name, field_value in value.items():
            if field_name not in filled:
                fields = ", ".join(message.fields)
                raise ContextError(f"{name} has no field {field_name!r}; it has: {fields}")
            filled[field_name] = field_value
        contexts[name] = filled
    contexts.setdefault("conn", CONN.defaults())
    contexts.setdefault("claims", {})
    contexts.setdefault("event", EVENT.defaults())
    if "error" in contexts:
        error = contexts["error"]
        if not error["types"] and error["type"]:
            error["types"] = [error["type"]]
    return contexts


async def run_hook(
    engine: Engine, hook: Hook, contexts: dict[str, Any], *, explain: bool = True
) -> Decision:
    """Run ``hook`` as the server would; the error hook answers with its classification."""
    if "load" in contexts:
        engine.load = contexts["load"]
    conn, claims, event = contexts["conn"], contexts["claims"], contexts["event"]
    if hook is Hook.CONNECT:
        return await engine.on_connect(conn, claims, explain=explain)
    if hook is Hook.EVENT:
        decision = await engine.on_event(conn, claims, event, explain=explain)
        if not decision.allowed:
            return decision
        guard = await engine.before_call(conn, claims, event)
        if isinstance(guard, Decision):
            return _with_trace(guard, decision.trace, explain)
        await engine.after_call(guard, conn, event, None, None)
        return decision
    if hook is Hook.EMIT:
        return await engine.on_emit(conn, claims, event)
    if hook is Hook.DISCONNECT:
        await engine.on_disconnect(conn)
        return Decision(Outcome.ALLOW)
    return explain_error(engine, contexts)


def explain_error(engine: Engine, contexts: Mapping[str, Any]) -> Decision:
    error = contexts.get("error") or error_context(RuntimeError(), Hook.ERROR.value)
    activation = {**contexts, "error": error, "hook": error.get("hook") or "event"}
    classification = classify(engine.policy, activation)
    failure = engine.policy.defaults.on_eval_error
    trace: list[TraceEntry] = []
    for rule in engine.policy.errors:
        hit = matches(rule.when, activation, failure)
        trace.append(TraceEntry("errors", rule.name, hit, rule.code if hit else "skip"))
        if hit:
            break
    return classification_decision(classification, trace)


def classification_decision(
    classification: Classification, trace: list[TraceEntry] | None = None
) -> Decision:
    payload = classification.payload(new_correlation_id())
    return Decision(
        Outcome.REJECT,
        f"errors/{classification.rule}",
        payload,
        trace=tuple(trace or ()),
    )


async def record_call(
    engine: Engine,
    contexts: Mapping[str, Any],
    *,
    error: Mapping[str, Any] | None,
    duration: float,
) -> None:
    """Feed one handler outcome to the breakers, as if it had taken ``duration`` seconds."""
    conn, claims, event = contexts["conn"], contexts["claims"], contexts["event"]
    guard = await engine.before_call(conn, claims, event)
    if isinstance(guard, Decision) or not guard.permits:
        return
    started = BreakerGuard(guard.permits, guard.started - duration)
    classification = None
    if error is not None:
        activation = {**contexts, "error": error, "hook": Hook.EVENT.value}
        classification = classify(engine.policy, activation)
    await engine.after_call(started, conn, event, classification, error)


def _with_trace(decision: Decision, trace: tuple[TraceEntry, ...], explain: bool) -> Decision:
    if not explain:
        return decision
    breaker = TraceEntry("circuit_breakers", decision.rule or "", True, "reject")
    return decision._replace(trace=(*trace, breaker))
