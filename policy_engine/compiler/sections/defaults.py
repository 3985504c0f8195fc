"""``defaults``: the mode, failure modes and backoff that every rule falls back to."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from policy_engine.compiler.compilation import Compilation, Convert
from policy_engine.language.model import DefaultsSpec, EvalFailureMode, Mode, StoreFailureMode
from policy_engine.language.units import parse_duration

_FIELDS: Mapping[str, Convert] = {
    "mode": Mode,
    "on_store_error": StoreFailureMode,
    "store_timeout": parse_duration,
    "on_eval_error": EvalFailureMode,
    "backoff": str,
}


def build_defaults(c: Compilation, raw: Mapping[str, Any] | None) -> DefaultsSpec:
    """``raw`` is None when the schema refused the section: the model's defaults stand in."""
    return c.record(DefaultsSpec, raw, "/defaults", _FIELDS)
