"""Load signals worth acting on: time-weighted moving averages and overload hysteresis.

A single-sample signal makes shedding react to what a server rides out anyway: a GC pause,
one burst of handshakes. Here each sample moves an average by the share of the window it
covers (``1 - exp(-elapsed / window)``), so a stall much shorter than the window counts
for a fraction of its size and a sustained one fully; and ``overloaded`` has separate
enter and exit thresholds plus a minimum hold, so it cannot flap from sample to sample.

Pure: the caller passes ``now`` and the values; nothing here reads a clock or does I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from policy_engine.language.model import OverloadSpec


class MovingAverage:
    """An exponentially weighted moving average whose weights follow elapsed time.

    The first sample sets the average (there is nothing to smooth it with yet).
    """

    __slots__ = ("_value", "window")

    def __init__(self, window: float) -> None:
        if window <= 0:
            raise ValueError("window must be positive")
        self.window = window
        self._value: float | None = None

    @property
    def value(self) -> float:
        return 0.0 if self._value is None else self._value

    def update(self, sample: float, elapsed: float) -> float:
        """Take a sample that covers ``elapsed`` seconds; returns the new average."""
        if self._value is None:
            self._value = float(sample)
        else:
            weight = 1.0 - math.exp(-max(elapsed, 0.0) / self.window)
            self._value += weight * (sample - self._value)
        return self._value


class Overload:
    """Whether the server is overloaded, with hysteresis and a minimum hold.

    Enters when any signal the spec names is above its ``enter``; leaves only when every
    one is at or below its ``exit`` and the state has held for ``min_hold`` seconds.
    """

    __slots__ = ("since", "spec")

    def __init__(self, spec: OverloadSpec) -> None:
        self.spec = spec
        self.since: float | None = None

    @property
    def active(self) -> bool:
        return self.since is not None

    def update(self, signals: Mapping[str, float], now: float) -> bool:
        """The state after one sample of ``signals`` (by ``load`` field name) at ``now``."""
        thresholds = self.spec.thresholds()
        if self.since is None:
            if any(signals[name] > t.enter for name, t in thresholds):
                self.since = now
        elif now - self.since >= self.spec.min_hold and all(
            signals[name] <= t.exit for name, t in thresholds
        ):
            self.since = None
        return self.since is not None
