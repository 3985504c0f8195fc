"""``shedding``: what the server refuses, drops, delays or disconnects while overloaded."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from policy_engine.compiler.compilation import Compilation, Convert
from policy_engine.compiler.expressions import expression
from policy_engine.language.contexts import HOOK_VARIABLES, LOAD_VARIABLES, Hook
from policy_engine.language.model import (
    FAIL_SAFE,
    DefaultsSpec,
    EvalFailureMode,
    Mode,
    Priority,
    ShedAction,
    SheddingRuleSpec,
)
from policy_engine.language.units import parse_duration

_FIELDS: Mapping[str, Convert] = {
    "mode": Mode,
    "retry_after": parse_duration,
    "delay": parse_duration,
    "sustained_for": parse_duration,
    "max_priority": Priority,
    "max_disconnects": int,
    "code": str,
    "message": str,
    "on_eval_error": EvalFailureMode,
}
# Refusing needs a connect to refuse; dropping or delaying needs an event.
_HOOKS_OF: Mapping[ShedAction, frozenset[Hook]] = {
    ShedAction.REJECT: frozenset({Hook.CONNECT}),
    ShedAction.DROP: frozenset({Hook.EVENT, Hook.EMIT}),
    ShedAction.DELAY: frozenset({Hook.EVENT, Hook.EMIT}),
}


def build_shedding(
    c: Compilation, raw: list[Mapping[str, Any]] | None, defaults: DefaultsSpec
) -> tuple[SheddingRuleSpec, ...]:
    rules: list[SheddingRuleSpec] = []
    for pointer, name, body in c.rules(raw, "/shedding", "shedding"):
        action = ShedAction(body["action"])
        hook = _hook(c, body, action, pointer)
        variables = HOOK_VARIABLES[hook] if hook else LOAD_VARIABLES
        context = f"shedding at hook {hook.value}" if hook else "shedding (disconnect)"
        when = expression(c, body["when"], f"{pointer}/when", variables, context=context)
        if action is ShedAction.DELAY and "delay" not in body:
            c.error(pointer, "missing-key", "action delay needs `delay:` (how long to hold events)")
        values = c.read(body, pointer, _FIELDS)
        if when is None:
            continue
        values.setdefault("mode", defaults.mode)
        values.setdefault("on_eval_error", defaults.on_eval_error or FAIL_SAFE)
        rules.append(
            SheddingRuleSpec(
                name=name,
                hook=hook,
                when=when,
                action=action,
                location=c.document.locate(pointer),
                **values,
            )
        )
    return tuple(rules)


def _hook(c: Compilation, body: Mapping[str, Any], action: ShedAction, pointer: str) -> Hook | None:
    """Where the action can act; None for disconnect, which runs on the load sampler's tick."""
    if action is ShedAction.DISCONNECT:
        if "hook" in body:
            c.warn(
                f"{pointer}/hook",
                "ignored-hook",
                "action disconnect runs on the load sampler's tick; `hook` is ignored",
            )
        return None
    if "hook" not in body:
        c.error(pointer, "missing-key", f"action {action.value} needs `hook:`", key=True)
        return None
    hook = Hook(body["hook"])
    allowed = _HOOKS_OF[action]
    if hook not in allowed:
        names = " or ".join(sorted(h.value for h in allowed))
        c.error(
            f"{pointer}/hook",
            "bad-hook",
            f"action {action.value} cannot act at hook {hook.value}",
            f"use hook {names}",
        )
    return hook
