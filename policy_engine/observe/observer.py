"""What the engine's edges report, as a protocol: logs and metrics plug in here.

The adapter, the reloader and the load sampler call an :class:`Observer`; structlog and
Prometheus implementations live at the edge, and tests or embedding applications can pass
their own. Each call is one fact (a decision, a classified error, a breaker transition, a
reload) with the identifiers needed to correlate it: connection id, rule, correlation id.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from policy_engine.algorithms.breaker import Transition
from policy_engine.core.classify import Classification
from policy_engine.core.decision import Decision
from policy_engine.errors import Diagnostic


class Observer(Protocol):
    """What the edges report. Every method does nothing by default, so an observer that
    subclasses this protocol implements only the facts it cares about."""

    def decision(
        self, hook: str, decision: Decision, seconds: float, conn: Mapping[str, Any] | None
    ) -> None:
        """Every decision, allowed or not; ``seconds`` is the time the engine took."""
        return

    def error(
        self,
        hook: str,
        classification: Classification,
        error: Mapping[str, Any],
        payload: Mapping[str, Any],
        conn: Mapping[str, Any] | None,
    ) -> None:
        """A handler raised; ``payload`` is what the client was sent (with correlation_id)."""
        return

    def breaker_transition(self, name: str, transition: Transition) -> None:
        return None

    def shed(self, rule: str, action: str, count: int) -> None:
        return None

    def reload(
        self, ok: bool, version: str | None, path: str, diagnostics: Sequence[Diagnostic]
    ) -> None:
        return None

    def connection(self, event: str, conn: Mapping[str, Any], reason: str = "") -> None:
        """``opened``, ``closed``, ``idle_closed``, ``shed`` or ``recovered``."""
        return

    def outbound_drop(self, conn: Mapping[str, Any], event: str, reason: str) -> None:
        return None


class NullObserver(Observer):
    """Reports nothing: the default when an application wires no logging or metrics."""
