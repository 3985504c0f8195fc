"""Human units in policy files: durations, rates, sizes and percentages.

Operators write ``500ms``, ``20/minute``, ``1MB`` and ``50%``; the engine works in
seconds (float), events per second, bytes (int) and fractions. Parsing happens once at
compile time, never on the request path.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from policy_engine.errors import UnitError

_DURATION_UNITS: dict[str, float] = {
    "us": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "sec": 1.0,
    "m": 60.0,
    "min": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(us|ms|sec|min|s|m|h|d)")

_PERIODS: dict[str, float] = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
}
_RATE = re.compile(r"(\d+)\s*/\s*([0-9a-z.]+)")

_SIZE_UNITS: dict[str, int] = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmg]i?b|b)?", re.IGNORECASE)
_PERCENT = re.compile(r"(\d+(?:\.\d+)?)\s*%")


@dataclass(frozen=True, slots=True)
class Rate:
    """``limit`` events per ``period`` seconds."""

    limit: int
    period: float

    @property
    def per_second(self) -> float:
        return self.limit / self.period

    @property
    def interval(self) -> float:
        """Seconds between two events at a steady rate (GCRA's emission interval)."""
        return self.period / self.limit

    def __str__(self) -> str:
        return f"{self.limit}/{format_duration(self.period)}"


def parse_duration(text: str | int | float) -> float:
    """``"1m30s"`` -> 90.0; a bare number is seconds. Negative or NaN durations are refused."""
    if isinstance(text, bool):
        raise UnitError(f"expected a duration such as 500ms or 30s, got {text!r}")
    if isinstance(text, int | float):
        if not math.isfinite(text) or text < 0:
            raise UnitError(f"a duration must be a finite, non-negative number, got {text!r}")
        return float(text)
    value = text.strip().lower()
    if not value:
        raise UnitError("empty duration: write for example 500ms, 30s or 5m")
    total = 0.0
    pos = 0
    for match in _DURATION_PART.finditer(value):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos != len(value) or pos == 0:
        raise UnitError(
            f"invalid duration {text!r}: write a number with a unit (us, ms, s, m, h, d), "
            "for example 500ms, 30s, 1m30s"
        )
    return total


def parse_rate(text: str) -> Rate:
    """``"20/minute"``, ``"10/s"``, ``"100/10s"`` -> :class:`Rate`."""
    if not isinstance(text, str):
        raise UnitError(f"expected a rate such as 20/minute or 10/s, got {text!r}")
    value = text.strip().lower()
    match = _RATE.fullmatch(value)
    if match is None:
        raise UnitError(f"invalid rate {text!r}: write COUNT/PERIOD, for example 20/minute, 10/s")
    count = int(match.group(1))
    period_text = match.group(2)
    singular = period_text[:-1] if period_text.endswith("s") else period_text
    if period_text in _PERIODS:
        period = _PERIODS[period_text]
    elif singular in _PERIODS and len(singular) > 1:
        period = _PERIODS[singular]
    elif period_text[:1].isdigit():
        period = parse_duration(period_text)
    else:
        raise UnitError(
            f"invalid rate {text!r}: unknown period {period_text!r} "
            "(use second, minute, hour, day or a duration such as 10s)"
        )
    if count <= 0 or period <= 0:
        raise UnitError(f"invalid rate {text!r}: count and period must be greater than zero")
    return Rate(count, period)


def parse_size(text: str | int) -> int:
    """``"1MB"`` -> 1_000_000, ``"64KiB"`` -> 65_536; a bare number is bytes."""
    if isinstance(text, bool):
        raise UnitError(f"expected a size such as 64KB or 1MB, got {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise UnitError(f"a size must not be negative, got {text}")
        return text
    match = _SIZE.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise UnitError(f"invalid size {text!r}: write a number with B, KB, MB, GB, KiB, MiB, GiB")
    unit = (match.group(2) or "b").lower()
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def parse_percent(text: str | int | float) -> float:
    """``"50%"`` -> 0.5. Values above 100% are refused: they can never trip."""
    if isinstance(text, bool):
        raise UnitError(f"expected a percentage such as 50%, got {text!r}")
    if isinstance(text, str):
        match = _PERCENT.fullmatch(text.strip())
        if match is None:
            raise UnitError(f"invalid percentage {text!r}: write for example 50%")
        fraction = float(match.group(1)) / 100.0
    else:
        fraction = float(text) / 100.0
    if not 0.0 <= fraction <= 1.0:
        raise UnitError(f"a percentage must be between 0% and 100%, got {text!r}")
    return fraction


def format_duration(seconds: float) -> str:
    """The shortest exact human form, so explanations print what the operator wrote."""
    if seconds == 0:
        return "0s"
    units = (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0), ("ms", 1e-3), ("us", 1e-6))
    for unit, factor in units:
        count = seconds / factor
        if count >= 1 and abs(count - round(count)) < 1e-9:
            return f"{round(count)}{unit}"
    # Not a whole number of any unit: plain decimal seconds (never scientific notation,
    # which parse_duration would refuse).
    return f"{seconds:.9f}".rstrip("0").rstrip(".") + "s"
