"""``load``: how the sampler smooths its signals and when ``load.overloaded`` is true.

Shedding rules act on these signals, so a threshold pair that cannot work (an ``exit``
above its ``enter``, which would make the state flap on every sample) is refused here
rather than discovered under load. An ``overloaded`` block lists every signal that
decides overload: one it leaves out is not considered, not kept at its default.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from policy_engine.compiler.compilation import Compilation, Convert
from policy_engine.language.model import LoadSpec, OverloadSpec, ThresholdSpec
from policy_engine.language.units import parse_duration

_FIELDS: Mapping[str, Convert] = {"window": parse_duration}
_SIGNALS = ("loop_lag_avg_ms", "events_per_second_avg", "connects_per_second_avg")


def build_load(c: Compilation, raw: Mapping[str, Any] | None) -> LoadSpec:
    if raw is None:
        return LoadSpec()
    values = c.read(raw, "/load", _FIELDS)
    if values.get("window") == 0:
        c.error(
            "/load/window",
            "bad-window",
            "window must be longer than 0",
            "the averages need a time to average over, e.g. 10s",
        )
        del values["window"]
    if "overloaded" in raw:
        values["overloaded"] = _overloaded(c, raw["overloaded"])
    return LoadSpec(**values)


def _overloaded(c: Compilation, raw: Mapping[str, Any]) -> OverloadSpec:
    pointer = "/load/overloaded"
    values: dict[str, Any] = c.read(raw, pointer, {"min_hold": parse_duration})
    for name in _SIGNALS:
        body = raw.get(name)
        values[name] = None if body is None else _threshold(c, body, f"{pointer}/{name}")
    if not any(values[name] for name in _SIGNALS):
        c.error(
            pointer,
            "no-signal",
            "`overloaded` names no signal, so the server would never be overloaded",
            f"give at least one of {', '.join(_SIGNALS)} an enter and an exit threshold",
            key=True,
        )
    return OverloadSpec(**values)


def _threshold(c: Compilation, body: Mapping[str, Any], pointer: str) -> ThresholdSpec:
    enter, exit_ = int(body["enter"]), int(body["exit"])
    if exit_ > enter:
        c.error(
            f"{pointer}/exit",
            "bad-hysteresis",
            f"exit ({exit_}) is above enter ({enter}): overload would end while it still holds",
            "set exit at or below enter, e.g. a quarter of it, so one value cannot flip it",
        )
    return ThresholdSpec(enter=enter, exit=exit_)
