"""``decision_log``: whether sampled decisions are written, where, and what is masked."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from policy_engine.compiler.compilation import Compilation, Convert
from policy_engine.language.model import DecisionLogSpec
from policy_engine.language.units import parse_percent, parse_size

_FIELDS: Mapping[str, Convert] = {
    "sample": parse_percent,
    "path": str,
    "max_bytes": parse_size,
    "backups": int,
    "redact": tuple,
}


def build_decision_log(c: Compilation, raw: Mapping[str, Any] | None) -> DecisionLogSpec | None:
    """None when the policy has no ``decision_log`` section: nothing is logged."""
    if raw is None or not c.schema.intact("/decision_log"):
        return None
    return c.record(DecisionLogSpec, raw, "/decision_log", _FIELDS)
