"""The near cache of keys over their limit: refusals answered without asking the store.

A key a shared limit refused with ``retry_after = r`` cannot pass before ``r`` has gone
by, whatever any process does meanwhile (spending only moves its next admission later).
So until then the process answers the refusal itself: over-limit traffic, the traffic of
the clients the limit exists to stop, never reaches Redis (envoyproxy/ratelimit's
local cache does the same). The wait it reports is what is left of ``r``.

Entries are keyed by the rule's name, algorithm and parameters and the key: a reload that changes a
rule's rate does not keep refusing on the old one. The cache is bounded: past
``max_keys`` its expired entries go, and if that is not enough, all of it (what is
forgotten is asked of the store again, never wrongly admitted).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from policy_engine.algorithms.ratelimit import CombinedDecision, RateDecision
from policy_engine.language.model import RateLimitSpec

Entry = tuple[str, str, int, float, int, str]


class OverLimitCache:
    """Keys refused until a known instant, on the clock of the ``now`` passed in (the
    store's: this process's monotonic clock while Redis keeps time, else the caller's)."""

    def __init__(self, max_keys: int = 100_000) -> None:
        self.max_keys = max_keys
        self.hits = 0  # refusals answered here: round trips saved
        self._until: dict[Entry, float] = {}

    def __len__(self) -> int:
        return len(self._until)

    def refusal(
        self, checks: Sequence[tuple[RateLimitSpec, str]], now: float
    ) -> CombinedDecision | None:
        """The refusal of the first key still over its limit at ``now``, if any."""
        until = self._until
        if not until:
            return None
        for spec, key in checks:
            entry = _entry(spec, key)
            at = until.get(entry)
            if at is None:
                continue
            if at <= now:
                del until[entry]
                continue
            self.hits += 1
            wait = at - now
            return CombinedDecision(False, wait, spec.name, RateDecision(False, 0, wait, wait))
        return None

    def holds(self, checks: Sequence[tuple[RateLimitSpec, str]], now: float) -> bool:
        """Whether some key of these checks is still over its limit at ``now`` (a peek:
        nothing counted, nothing dropped)."""
        until = self._until
        return bool(until) and any(until.get(_entry(s, k), now) > now for s, k in checks)

    def remember(
        self, checks: Sequence[tuple[RateLimitSpec, str]], decision: CombinedDecision, now: float
    ) -> None:
        """Note the key that refused ``decision``, until its ``retry_after``."""
        wait = decision.retry_after
        if decision.allowed or not 0 < wait < math.inf or decision.decision is None:
            return
        for spec, key in checks:
            if spec.name == decision.rule:
                if len(self._until) >= self.max_keys:
                    self._prune(now)
                self._until[_entry(spec, key)] = now + wait
                return

    def _prune(self, now: float) -> None:
        self._until = {entry: at for entry, at in self._until.items() if at > now}
        if len(self._until) >= self.max_keys:
            self._until.clear()


def _entry(spec: RateLimitSpec, key: str) -> Entry:
    return (spec.name, spec.algorithm.value, spec.rate.limit, spec.rate.period, spec.burst, key)
