"""``authorization``: allow or deny a connect or an event; the first matching rule decides."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from policy_engine.compiler.compilation import Compilation, Convert, is_catch_all
from policy_engine.compiler.expressions import expression
from policy_engine.language.contexts import HOOK_VARIABLES, Hook
from policy_engine.language.model import (
    AuthorizationSpec,
    AuthzRuleSpec,
    DefaultsSpec,
    Effect,
    EvalFailureMode,
    Mode,
    authz_failure_default,
)

_FIELDS: Mapping[str, Convert] = {
    "mode": Mode,
    "code": str,
    "message": str,
    "on_eval_error": EvalFailureMode,
}


def build_authorization(
    c: Compilation, raw: Mapping[str, Any] | None, defaults: DefaultsSpec
) -> AuthorizationSpec:
    """``raw`` is None when the section is not a mapping; its valid rules are read otherwise."""
    if raw is None:
        return AuthorizationSpec()
    rules: list[AuthzRuleSpec] = []
    catch_all: dict[Hook, str] = {}
    for pointer, name, body in c.rules(raw.get("rules"), "/authorization/rules", "authorization"):
        hook = Hook(body["hook"])
        if hook in catch_all:
            c.warn(
                f"{pointer}/when",
                "unreachable-rule",
                f"authorization rule {name!r} is never reached: {catch_all[hook]} "
                f"decides every {hook.value} first",
            )
        when = expression(
            c,
            body["when"],
            f"{pointer}/when",
            HOOK_VARIABLES[hook],
            context=f"authorization at hook {hook.value}",
        )
        if is_catch_all(body["when"]) and hook not in catch_all:
            catch_all[hook] = f"rule {name!r} (line {c.line_of(pointer)})"
        values = c.read(body, pointer, _FIELDS)
        if when is None:
            continue
        values.setdefault("mode", defaults.mode)
        effect = Effect(body["effect"])
        values.setdefault("on_eval_error", defaults.on_eval_error or authz_failure_default(effect))
        rules.append(
            AuthzRuleSpec(
                name=name,
                hook=hook,
                when=when,
                effect=effect,
                location=c.document.locate(pointer),
                **values,
            )
        )
    if "default" in raw and c.schema.intact("/authorization/default"):
        return AuthorizationSpec(Effect(raw["default"]), tuple(rules))
    return AuthorizationSpec(rules=tuple(rules))
