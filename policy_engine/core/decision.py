"""What the engine answers at a hook.

A :class:`Decision` is plain data: the Socket.IO adapter turns it into a refused
handshake, an ack, an error event, a dropped or delayed event, or a disconnect. What a
refused client receives is its ``payload``, built by :mod:`policy_engine.core.payload`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple


class Outcome(StrEnum):
    ALLOW = "allow"
    REJECT = "reject"
    DROP = "drop"
    DELAY = "delay"
    DISCONNECT = "disconnect"


@dataclass(frozen=True, slots=True)
class TraceEntry:
    """One rule the engine looked at, for ``policy-engine explain`` and debug logs."""

    section: str
    rule: str
    matched: bool
    outcome: str
    detail: Mapping[str, Any] = field(default_factory=dict)


class Decision(NamedTuple):
    """The verdict at one hook.

    ``rule`` names the deciding rule (``section/name``); ``shadowed`` lists the shadow-mode
    rules that would have refused; ``payload`` is what the client receives when refused;
    ``key`` is the refused rate-limit key, set only for rules with ``key_label`` (metrics
    label their refusals with it).
    A named tuple rather than a frozen dataclass: one may be built per event, and a tuple
    is cheaper to build.
    """

    outcome: Outcome
    rule: str | None = None
    payload: Mapping[str, Any] | None = None
    delay: float = 0.0
    shadowed: tuple[str, ...] = ()
    trace: tuple[TraceEntry, ...] = ()
    key: str | None = None

    @property
    def allowed(self) -> bool:
        return self.outcome is Outcome.ALLOW or self.outcome is Outcome.DELAY

    def to_dict(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome.value,
            "rule": self.rule,
            "payload": dict(self.payload) if self.payload is not None else None,
            "delay_ms": round(self.delay * 1000),
            "shadowed": list(self.shadowed),
            "trace": [
                {
                    "section": t.section,
                    "rule": t.rule,
                    "matched": t.matched,
                    "outcome": t.outcome,
                    "detail": dict(t.detail),
                }
                for t in self.trace
            ],
        }


ALLOW = Decision(Outcome.ALLOW)
