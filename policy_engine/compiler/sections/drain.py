"""``drain``: how a stopping server lets its clients go (deadline, pace, advice)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from policy_engine.compiler.compilation import Compilation, Convert
from policy_engine.language.model import DrainSpec
from policy_engine.language.units import parse_duration, parse_rate

_FIELDS: Mapping[str, Convert] = {
    "deadline": parse_duration,
    "grace": parse_duration,
    "close_rate": parse_rate,
    "jitter": parse_duration,
    "reconnect_url": str,
}


def build_drain(c: Compilation, raw: Mapping[str, Any] | None) -> DrainSpec:
    drain = c.record(DrainSpec, raw, "/drain", _FIELDS)
    if drain.grace >= drain.deadline:
        c.error(
            "/drain/grace",
            "drain-grace",
            f"grace ({drain.grace:g}s) leaves no time before the deadline ({drain.deadline:g}s)",
            "make grace shorter than deadline: clients are closed between the two",
        )
    return drain
