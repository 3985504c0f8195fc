"""``recovery``: which events are buffered for replay, how many, how large, how long."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from policy_engine.compiler.compilation import Compilation, Convert
from policy_engine.language.model import RecoverySpec
from policy_engine.language.units import parse_duration, parse_size

_FIELDS: Mapping[str, Convert] = {
    "enabled": bool,
    "max_disconnection": parse_duration,
    "buffer_events": int,
    "max_buffer_bytes": parse_size,
    "max_total_bytes": parse_size,
    "events": tuple,
}


def build_recovery(c: Compilation, raw: Mapping[str, Any] | None) -> RecoverySpec:
    return c.record(RecoverySpec, raw, "/recovery", _FIELDS)
