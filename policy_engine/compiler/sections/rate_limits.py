"""``rate_limits``: budgets per key (an IP, a user, a conversation) at connect, event or emit."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from policy_engine.compiler.compilation import Compilation, Convert, default_of
from policy_engine.compiler.expressions import expression
from policy_engine.language.contexts import HOOK_VARIABLES, Hook
from policy_engine.language.model import (
    FAIL_SAFE,
    DefaultsSpec,
    EvalFailureMode,
    Mode,
    RateAlgorithm,
    RateLimitSpec,
    Scope,
)
from policy_engine.language.units import parse_rate

# A sliding window keeps one timestamp per request in its window.
SLIDING_WINDOW_MAX_LIMIT: Final = 10_000

_FIELDS: Mapping[str, Convert] = {
    "burst": int,
    "mode": Mode,
    "algorithm": RateAlgorithm,
    "scope": Scope,
    "code": str,
    "message": str,
    "max_keys": int,
    "key_label": bool,
    "on_eval_error": EvalFailureMode,
}


def build_rate_limits(
    c: Compilation, raw: list[Mapping[str, Any]] | None, defaults: DefaultsSpec
) -> tuple[RateLimitSpec, ...]:
    rules: list[RateLimitSpec] = []
    for pointer, name, body in c.rules(raw, "/rate_limits", "rate_limits"):
        hook = Hook(body["hook"])
        variables = HOOK_VARIABLES[hook]
        context = f"rate_limits at hook {hook.value}"
        key = expression(
            c, body["key"], f"{pointer}/key", variables, context=context, expect="string"
        )
        when = (
            expression(c, body["when"], f"{pointer}/when", variables, context=context)
            if "when" in body
            else None
        )
        rate = c.unit(parse_rate, body["limit"], f"{pointer}/limit")
        values = c.read(body, pointer, _FIELDS)
        if rate is None:
            continue
        algorithm = values.get("algorithm", default_of(RateLimitSpec, "algorithm"))
        if algorithm is not RateAlgorithm.GCRA and "burst" in body:
            c.warn(
                f"{pointer}/burst",
                "ignored-burst",
                f"burst applies to the gcra algorithm only; {algorithm.value} ignores it",
            )
        if algorithm is RateAlgorithm.SLIDING_WINDOW and rate.limit > SLIDING_WINDOW_MAX_LIMIT:
            c.error(
                f"{pointer}/limit",
                "out-of-range",
                f"sliding_window keeps one timestamp per request: at most "
                f"{SLIDING_WINDOW_MAX_LIMIT} per window, got {rate.limit}",
                "use algorithm gcra for large limits",
            )
        if key is None or ("when" in body and when is None):
            continue
        values.setdefault("burst", rate.limit)
        values.setdefault("mode", defaults.mode)
        values.setdefault("on_eval_error", defaults.on_eval_error or FAIL_SAFE)
        rules.append(
            RateLimitSpec(
                name=name,
                hook=hook,
                key=key,
                rate=rate,
                when=when,
                location=c.document.locate(pointer),
                **values,
            )
        )
    return tuple(rules)
