"""``errors``: how an exception is classified and what the client is told; first match wins."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from policy_engine.compiler.compilation import Compilation, Convert, is_catch_all
from policy_engine.compiler.expressions import expression
from policy_engine.language.contexts import HOOK_VARIABLES, Hook
from policy_engine.language.model import (
    DEFAULT_ERROR_MESSAGES,
    Category,
    DefaultsSpec,
    ErrorRuleSpec,
    ErrorSeverity,
)
from policy_engine.language.units import parse_duration

_FIELDS: Mapping[str, Convert] = {
    "code": str,
    "message": str,
    "backoff": str,
    "severity": ErrorSeverity,
    "retryable": bool,
    "retry_after": parse_duration,
    "alert": bool,
}


def build_errors(
    c: Compilation,
    raw: list[Mapping[str, Any]] | None,
    defaults: DefaultsSpec,
    backoff_names: frozenset[str] | None,
) -> tuple[ErrorRuleSpec, ...]:
    rules: list[ErrorRuleSpec] = []
    catch_all: str | None = None
    for pointer, name, body in c.rules(raw, "/errors", "errors"):
        if catch_all is not None:
            c.warn(
                f"{pointer}/when",
                "unreachable-rule",
                f"error rule {name!r} is never reached: {catch_all} matches every error first",
                "move the catch-all rule to the end of `errors:`",
            )
        when = expression(
            c, body["when"], f"{pointer}/when", HOOK_VARIABLES[Hook.ERROR], context="errors"
        )
        if is_catch_all(body["when"]) and catch_all is None:
            catch_all = f"rule {name!r} (line {c.line_of(pointer)})"
        if "backoff" in body:
            c.check_backoff_ref(body["backoff"], f"{pointer}/backoff", backoff_names)
        values = c.read(body, pointer, _FIELDS)
        if when is None:
            continue
        category = Category(body["category"])
        values.setdefault("message", DEFAULT_ERROR_MESSAGES[category])
        values.setdefault("backoff", defaults.backoff)
        rules.append(
            ErrorRuleSpec(
                name=name,
                when=when,
                category=category,
                location=c.document.locate(pointer),
                **values,
            )
        )
    return tuple(rules)
