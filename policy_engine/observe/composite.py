"""Several observers as one: each report fanned out in order, a failing observer contained.

A bug in a metrics exporter must neither hide the log line nor raise into the request path
that reported the fact, so a failure is logged and the next observer still hears it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import structlog

from policy_engine.algorithms.breaker import Transition
from policy_engine.core.classify import Classification
from policy_engine.core.decision import Decision, Outcome
from policy_engine.errors import Diagnostic
from policy_engine.observe.logs import LOGGER_NAME
from policy_engine.observe.observer import Observer


class CompositeObserver:
    """Fans every report out to several observers, in order."""

    def __init__(self, *observers: Observer) -> None:
        self.observers: tuple[Observer, ...] = observers
        # Every event reports a decision: those reports go to bound methods looked up once,
        # and a plain allowed one skips the observers that say it does not concern them
        # (``quiet_when_allowed``).
        self._decision_reports = tuple((o, o.decision) for o in observers)
        self._allowed_reports = tuple(
            (o, o.decision) for o in observers if not getattr(o, "quiet_when_allowed", False)
        )
        self._log = structlog.get_logger(LOGGER_NAME)

    def decision(
        self, hook: str, decision: Decision, seconds: float, conn: Mapping[str, Any] | None
    ) -> None:
        reports = self._decision_reports
        if decision.outcome is Outcome.ALLOW and not decision.shadowed:
            reports = self._allowed_reports
        for observer, report in reports:
            try:
                report(hook, decision, seconds, conn)
            except Exception:
                self._failed(observer, "decision")

    def error(
        self,
        hook: str,
        classification: Classification,
        error: Mapping[str, Any],
        payload: Mapping[str, Any],
        conn: Mapping[str, Any] | None,
    ) -> None:
        self._each("error", hook, classification, error, payload, conn)

    def breaker_transition(self, name: str, transition: Transition) -> None:
        self._each("breaker_transition", name, transition)

    def shed(self, rule: str, action: str, count: int) -> None:
        self._each("shed", rule, action, count)

    def reload(
        self, ok: bool, version: str | None, path: str, diagnostics: Sequence[Diagnostic]
    ) -> None:
        self._each("reload", ok, version, path, diagnostics)

    def connection(self, event: str, conn: Mapping[str, Any], reason: str = "") -> None:
        self._each("connection", event, conn, reason)

    def outbound_drop(self, conn: Mapping[str, Any], event: str, reason: str) -> None:
        self._each("outbound_drop", conn, event, reason)

    def _each(self, method: str, *args: Any) -> None:
        for observer in self.observers:
            try:
                getattr(observer, method)(*args)
            except Exception:
                self._failed(observer, method)

    def _failed(self, observer: Observer, method: str) -> None:
        self._log.exception(
            "observer.failed", observer=type(observer).__name__, method=method, audit=False
        )
