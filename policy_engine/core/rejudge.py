"""Judging recorded traffic again under another policy, and what that would change.

``policy-engine replay`` (recorded decisions) and the live canary (decisions as they
happen) ask the same question: had this other policy been in force, which decisions would
have differed? Both feed :class:`Judgement` records, in the order they happened, to a
:class:`Rejudge`: an engine of the other policy on a fresh memory state whose clock is the
time each decision was made, so limits and shedding hold time as they did live. What
differs is gathered by :class:`Changes`: counts by kind, rule and verdict, and the first
few examples of each kind.

A circuit breaker's refusal depends on the handler outcomes it saw, which no record holds,
so those decisions are skipped, never judged again.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from policy_engine.core.decision import Decision, Outcome
from policy_engine.core.engine import Engine
from policy_engine.language.contexts import LOAD, Hook
from policy_engine.language.model import PolicySet
from policy_engine.state.memory import MemoryStore

ALLOWED_TO_REFUSED = "allowed_to_refused"
REFUSED_TO_ALLOWED = "refused_to_allowed"
CODE_CHANGED = "code_changed"
KINDS = (ALLOWED_TO_REFUSED, REFUSED_TO_ALLOWED, CODE_CHANGED)
DISCONNECT = "disconnect"
_BREAKERS = "circuit_breakers/"
_JUDGED_HOOKS = frozenset({Hook.CONNECT.value, Hook.EVENT.value, Hook.EMIT.value})


def verdict(decision: Decision) -> str:
    """What a client got, in one word: ``allow``, ``delay``, or the refusal's code."""
    if decision.outcome is Outcome.ALLOW or decision.outcome is Outcome.DELAY:
        return decision.outcome.value
    code = (decision.payload or {}).get("code")
    return str(code) if code else decision.outcome.value


def is_allowed(verdict_: str) -> bool:
    return verdict_ in {"allow", "delay"}


@dataclass(frozen=True, slots=True)
class Judgement:
    """One decision as it was made: when, at which hook, on what, and its verdict.

    ``at`` is a time on the clock of whoever judges it again (the wall clock in a decision
    log, the monotonic clock live); ``hook`` is ``disconnect`` for a connection that closed.
    """

    hook: str
    at: float
    conn: Mapping[str, Any]
    claims: Mapping[str, Any] = field(default_factory=dict)
    event: Mapping[str, Any] | None = None
    load: Mapping[str, Any] = field(default_factory=dict)
    verdict: str = "allow"
    rule: str | None = None
    correlation_id: str | None = None

    @property
    def replayable(self) -> bool:
        """Whether another policy can judge it from the record alone."""
        if self.hook not in _JUDGED_HOOKS:
            return False
        return not (self.rule or "").startswith(_BREAKERS)


@dataclass(frozen=True, slots=True)
class Change:
    """A decision another policy would have made differently."""

    kind: str
    judgement: Judgement
    rule: str
    before: str
    after: str

    def to_dict(self) -> dict[str, Any]:
        j = self.judgement
        event = j.event or {}
        return {
            "kind": self.kind,
            "hook": j.hook,
            "rule": self.rule,
            "from": self.before,
            "to": self.after,
            "sid": j.conn.get("sid"),
            "user_id": j.conn.get("user_id"),
            "event": event.get("name"),
            "correlation_id": j.correlation_id,
        }


class Rejudge:
    """An engine of ``policy`` on its own fresh memory state, judging recorded decisions
    in order with the recorded times as its clock."""

    def __init__(self, policy: PolicySet) -> None:
        self.now = 0.0
        self.engine = Engine(policy, MemoryStore(), clock=lambda: self.now)

    async def decide(self, judgement: Judgement) -> Decision | None:
        """The decision under this policy; None for what is not judged (a disconnect, a
        breaker's refusal). A disconnect still frees the connection's counts."""
        engine = self.engine
        self.now = judgement.at
        conn = dict(judgement.conn)
        if judgement.hook == DISCONNECT:
            if conn.get("sid"):
                await engine.on_disconnect(_with_defaults(conn))
            return None
        if not judgement.replayable:
            return None
        engine.load = dict(judgement.load) if judgement.load else LOAD.defaults()
        claims = dict(judgement.claims)
        if judgement.hook == Hook.CONNECT.value:
            return await engine.on_connect(conn, claims)
        event = dict(judgement.event or {})
        if judgement.hook == Hook.EMIT.value:
            return await engine.on_emit(conn, claims, event)
        return await engine.on_event(conn, claims, event)


class Changes:
    """What another policy would change: counts by kind, rule and verdicts, and examples."""

    def __init__(self, examples: int = 5) -> None:
        self.examples = examples
        self.judged = 0
        self.skipped = 0
        self.counts: Counter[tuple[str, str, str, str]] = Counter()
        self.by_kind: Counter[str] = Counter()
        self.samples: dict[str, list[Change]] = {kind: [] for kind in KINDS}

    def add(self, judgement: Judgement, decision: Decision | None) -> Change | None:
        """Count one decision judged again (None: skipped); the change, if it is one."""
        if decision is None:
            if judgement.hook != DISCONNECT:
                self.skipped += 1
            return None
        self.judged += 1
        before, after = judgement.verdict, verdict(decision)
        if before == after:
            return None
        if is_allowed(before) and not is_allowed(after):
            kind = ALLOWED_TO_REFUSED
        elif is_allowed(after) and not is_allowed(before):
            kind = REFUSED_TO_ALLOWED
        else:
            kind = CODE_CHANGED
        rule = (decision.rule if not is_allowed(after) else judgement.rule) or "none"
        change = Change(kind, judgement, rule, before, after)
        self.counts[kind, rule, before, after] += 1
        self.by_kind[kind] += 1
        if len(self.samples[kind]) < self.examples:
            self.samples[kind].append(change)
        return change

    @property
    def changed(self) -> int:
        return sum(self.by_kind.values())

    @property
    def changed_fraction(self) -> float:
        return self.changed / self.judged if self.judged else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "judged": self.judged,
            "skipped": self.skipped,
            "changed": self.changed,
            "changed_fraction": self.changed_fraction,
            "by_kind": {kind: self.by_kind[kind] for kind in KINDS},
            "by_rule": [
                {"kind": kind, "rule": rule, "from": before, "to": after, "count": count}
                for (kind, rule, before, after), count in sorted(
                    self.counts.items(), key=lambda item: (-item[1], item[0])
                )
            ],
            "examples": {
                kind: [change.to_dict() for change in self.samples[kind]] for kind in KINDS
            },
        }


def _with_defaults(conn: dict[str, Any]) -> dict[str, Any]:
    conn.setdefault("user_id", "")
    conn.setdefault("ip", "")
    return conn


async def rejudge_all(
    policy: PolicySet,
    judgements: Iterable[Judgement],
    *,
    examples: int = 5,
    on_change: Callable[[Change], None] | None = None,
) -> Changes:
    """Every judgement judged again under ``policy``, in order, from a fresh state."""
    rejudge = Rejudge(policy)
    changes = Changes(examples)
    for judgement in judgements:
        change = changes.add(judgement, await rejudge.decide(judgement))
        if change is not None and on_change is not None:
            on_change(change)
    return changes
