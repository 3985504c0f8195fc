"""One decision from hand-written contexts, with its trace: ``explain`` and policy tests.

Operators reason about a policy with concrete cases ("what happens to a viewer who sends
oh_user_action while the loop lags 400 ms?"). This module turns such a case, given as
JSON or YAML, into complete typed contexts and runs the engine's own decision on them
with a :class:`~policy_engine.core.recorder.TraceRecorder`: the trace is of the decision
the server would make, by the same code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from policy_engine.core.classify import Classification, classify, error_context
from policy_engine.core.decision import Decision, Outcome
from policy_engine.core.engine import BreakerGuard, Engine, EventVerdict
from policy_engine.core.recorder import NULL_RECORDER, Recorder, TraceRecorder
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
    """Run ``hook`` as the server would; the error hook answers with its classification.

    With ``explain`` the decision carries the trace of every rule it visited; without, it
    takes the request path's own entry points (the event hook's synchronous judgement
    first), so the two can be compared.
    """
    if "load" in contexts:
        engine.load = contexts["load"]
    recorder: Recorder = TraceRecorder() if explain else NULL_RECORDER
    conn, claims, event = contexts["conn"], contexts["claims"], contexts["event"]
    if hook is Hook.CONNECT:
        return await engine.on_connect(conn, claims, recorder=recorder)
    if hook is Hook.EVENT:
        return await _run_event(engine, conn, claims, event, recorder)
    if hook is Hook.EMIT:
        return await engine.on_emit(conn, claims, event, recorder=recorder)
    if hook is Hook.DISCONNECT:
        await engine.on_disconnect(conn)
        return Decision(Outcome.ALLOW)
    return explain_error(engine, contexts, recorder)


async def _run_event(
    engine: Engine,
    conn: dict[str, Any],
    claims: dict[str, Any],
    event: dict[str, Any],
    recorder: Recorder,
) -> Decision:
    """The event hook up to the handler: the decision, then the breakers' permits."""
    guard: BreakerGuard | Decision | None = None
    if recorder.enabled:
        decision = await engine.on_event(conn, claims, event, recorder=recorder)
    else:
        verdict = engine.judge_event_now(conn, claims, event)
        if isinstance(verdict, EventVerdict):
            decision, guard = verdict.decision, verdict.guard
        else:
            decision = await engine.settle_event(verdict)
    if not decision.allowed:
        return decision
    if guard is None:
        guard = await engine.before_call(conn, claims, event, recorder=recorder)
    if isinstance(guard, Decision):
        return guard
    await engine.after_call(guard, conn, event, None, None)
    return decision


def explain_error(
    engine: Engine, contexts: Mapping[str, Any], recorder: Recorder | None = None
) -> Decision:
    """The classification of the error in ``contexts``, as the error hook makes it."""
    recorder = recorder or TraceRecorder()
    error = contexts.get("error") or error_context(RuntimeError(), Hook.ERROR.value)
    activation = {**contexts, "error": error, "hook": error.get("hook") or "event"}
    classification = classify(engine.policy, activation, recorder)
    return classification_decision(classification, recorder)


def classification_decision(
    classification: Classification, recorder: Recorder = NULL_RECORDER
) -> Decision:
    return Decision(
        Outcome.REJECT,
        f"errors/{classification.rule}",
        classification.payload(),
        trace=recorder.entries(),
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
