"""``backoff``: the named retry schedules clients are told to follow."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from policy_engine.compiler.compilation import Compilation, Convert
from policy_engine.language.model import BUILTIN_BACKOFF, BackoffSpec, BackoffStrategy
from policy_engine.language.units import parse_duration

_FIELDS: Mapping[str, Convert] = {
    "strategy": BackoffStrategy,
    "base": parse_duration,
    "max": parse_duration,
    "max_attempts": int,
    "multiplier": float,
}


def build_backoff(c: Compilation, raw: Mapping[str, Any] | None) -> Mapping[str, BackoffSpec]:
    """The built-in policies, overridden or joined by the file's own."""
    policies = dict(BUILTIN_BACKOFF)
    for name, pointer, body in c.entries(raw, "/backoff"):
        spec = BackoffSpec(name, **c.read(body, pointer, _FIELDS))
        if spec.base <= 0:
            c.error(f"{pointer}/base", "out-of-range", "backoff base must be above zero")
        if spec.max < spec.base:
            c.error(
                f"{pointer}/max",
                "out-of-range",
                f"backoff max ({_written(body, 'max', spec.max)}) is below its base "
                f"({_written(body, 'base', spec.base)})",
            )
        policies[name] = spec
    return MappingProxyType(policies)


def backoff_names(c: Compilation, raw: Mapping[str, Any] | None) -> frozenset[str] | None:
    """Every name a rule may refer to; None when the section is too broken to tell."""
    if not c.schema.sound("/backoff"):
        return None
    return frozenset(BUILTIN_BACKOFF).union(raw or ())


def _written(body: Mapping[str, Any], key: str, seconds: float) -> str:
    return str(body[key]) if key in body else f"{seconds:g}s"
