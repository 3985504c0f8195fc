"""What sees every judgement the engine makes: the decision log and the live canary.

A :class:`DecisionTap` is told each decision of the rules with the contexts they read
(``conn``, ``claims``, ``event``, ``load``), at the moment the engine reaches it, and each
disconnect (which frees the connection's counts). That is what a second policy needs to
judge the same traffic again, live (the canary) or later (``replay``), so both are taps.
The engine holds none by default and then pays one attribute test per decision.

A tap is called synchronously on the request path: it must not raise, block or keep the
contexts without copying them (the adapter reuses ``conn`` and the engine ``event``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from policy_engine.core.decision import Decision
from policy_engine.language.contexts import Hook


class DecisionTap(Protocol):
    def judged(  # noqa: PLR0917 (the tap's signature: positional, one call per decision)
        self,
        hook: Hook,
        conn: Mapping[str, Any],
        claims: Mapping[str, Any],
        event: Mapping[str, Any] | None,
        load: Mapping[str, Any],
        decision: Decision,
    ) -> None:
        """A decision of the rules at ``hook`` (``event`` is None at connect)."""

    def disconnected(self, conn: Mapping[str, Any]) -> None:
        """A connection the engine counted has closed."""


class Taps:
    """Several taps as one, called in order."""

    def __init__(self, taps: Sequence[DecisionTap]) -> None:
        self.taps = tuple(taps)

    def judged(  # noqa: PLR0917 (the tap's signature: positional, one call per decision)
        self,
        hook: Hook,
        conn: Mapping[str, Any],
        claims: Mapping[str, Any],
        event: Mapping[str, Any] | None,
        load: Mapping[str, Any],
        decision: Decision,
    ) -> None:
        for tap in self.taps:
            tap.judged(hook, conn, claims, event, load, decision)

    def disconnected(self, conn: Mapping[str, Any]) -> None:
        for tap in self.taps:
            tap.disconnected(conn)
