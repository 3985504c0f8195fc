"""``circuit_breakers``: which handlers a breaker guards, and when it opens and recovers."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from policy_engine.compiler.compilation import Compilation, Convert, default_of
from policy_engine.compiler.expressions import expression
from policy_engine.language.contexts import BREAKER_MATCH_VARIABLES, BREAKER_RECORD_VARIABLES
from policy_engine.language.model import (
    FAIL_SAFE,
    CircuitBreakerSpec,
    DefaultsSpec,
    EvalFailureMode,
    Expression,
    Mode,
    SlowCallSpec,
    WindowSpec,
)
from policy_engine.language.units import parse_duration, parse_percent

_FIELDS: Mapping[str, Convert] = {
    "mode": Mode,
    "failure_rate": parse_percent,
    "minimum_calls": int,
    "open_for": parse_duration,
    "half_open_calls": int,
    "code": str,
    "message": str,
    "on_eval_error": EvalFailureMode,
}
_WINDOW: Mapping[str, Convert] = {"calls": int, "time": parse_duration}
_SLOW_CALL: Mapping[str, Convert] = {"over": parse_duration, "rate": parse_percent}


def build_circuit_breakers(
    c: Compilation, raw: list[Mapping[str, Any]] | None, defaults: DefaultsSpec
) -> tuple[CircuitBreakerSpec, ...]:
    rules: list[CircuitBreakerSpec] = []
    for pointer, name, body in c.rules(raw, "/circuit_breakers", "circuit_breakers"):
        match = expression(
            c,
            body["match"],
            f"{pointer}/match",
            BREAKER_MATCH_VARIABLES,
            context="circuit_breakers.match",
        )
        record_when = _record_when(c, body, pointer)
        values = c.read(body, pointer, _FIELDS)
        if "window" in body:
            values["window"] = WindowSpec(**c.read(body["window"], f"{pointer}/window", _WINDOW))
        if "slow_call" in body:
            slow = c.read(body["slow_call"], f"{pointer}/slow_call", _SLOW_CALL)
            values["slow_call"] = SlowCallSpec(**slow) if "over" in slow else None
        _check(c, pointer, values)
        if match is None or ("record_when" in body and record_when is None):
            continue
        values.setdefault("mode", defaults.mode)
        values.setdefault("on_eval_error", defaults.on_eval_error or FAIL_SAFE)
        rules.append(
            CircuitBreakerSpec(
                name=name,
                match=match,
                record_when=record_when,
                fallback=MappingProxyType(dict(body["fallback"])) if "fallback" in body else None,
                location=c.document.locate(pointer),
                **values,
            )
        )
    return tuple(rules)


def _record_when(c: Compilation, body: Mapping[str, Any], pointer: str) -> Expression | None:
    if "record_when" not in body:
        return None
    return expression(
        c,
        body["record_when"],
        f"{pointer}/record_when",
        BREAKER_RECORD_VARIABLES,
        context="circuit_breakers.record_when",
    )


def _check(c: Compilation, pointer: str, values: Mapping[str, Any]) -> None:
    """Settings that each pass the schema but together describe a breaker that cannot work."""
    window: WindowSpec = values.get("window", default_of(CircuitBreakerSpec, "window"))
    minimum_calls = values.get("minimum_calls", default_of(CircuitBreakerSpec, "minimum_calls"))
    if window.calls is not None and minimum_calls > window.calls:
        c.error(
            f"{pointer}/minimum_calls",
            "out-of-range",
            f"minimum_calls ({minimum_calls}) exceeds the window of {window.calls} calls: "
            "the breaker could never open",
            f"lower minimum_calls to at most {window.calls}",
        )
    if window.time is not None and window.time < 1:
        c.error(f"{pointer}/window/time", "out-of-range", "a time window is at least 1s")
    if values.get("failure_rate") == 0:
        c.error(
            f"{pointer}/failure_rate",
            "out-of-range",
            "a failure_rate of 0% opens the breaker on every call",
        )
